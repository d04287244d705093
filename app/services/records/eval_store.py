"""Evals on disk, under ``results/evals/<id>/``: ``meta.json``, the test set as ``rows.jsonl``, and
one file per finished answer in ``outputs/``. Every file is written whole to a temporary name
and renamed over the old one, so a crash (or kill -9) mid-eval leaves each file either as it was
or complete, never torn; an eval resumes by skipping the answers already on disk."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from pydantic import BaseModel

from app.services.core.errors import NotFound
from app.services.core.spreadsheet import safe_row
from app.services.records.eval_records import EvalAnswer, EvalMeta, EvalReport
from app.services.records.test_sets import TestRow

EVAL_ID_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")
CSV_COLUMNS = ("index", "model", "prompt", "system", "reference", "output", "bleu", "rouge_l", "exact_match",
               "ref_nll", "ref_tokens", "ref_perplexity", "latency_ms", "ttft_ms", "tokens_per_second", "completion_tokens",
               "finish_reason", "error")


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def jsonl(records: Iterable[BaseModel]) -> str:
    return "".join(record.model_dump_json() + "\n" for record in records)


class EvalStore:
    def __init__(self, root: Path):
        self.root = root

    def _dir(self, eval_id: str) -> Path:
        # ids come from URLs: only our own shape may name a folder
        if not eval_id or not set(eval_id) <= EVAL_ID_CHARS or not (self.root / eval_id / "meta.json").is_file():
            raise NotFound(f"no eval {eval_id!r}; GET /api/evals lists them")
        return self.root / eval_id

    def create(self, eval_id: str, meta: EvalMeta, rows: list[TestRow]) -> None:
        folder = self.root / eval_id
        atomic_write(folder / "rows.jsonl", jsonl(rows))
        atomic_write(folder / "meta.json", meta.model_dump_json(indent=1))  # last: marks it complete

    def write_meta(self, eval_id: str, meta: EvalMeta) -> None:
        atomic_write(self._dir(eval_id) / "meta.json", meta.model_dump_json(indent=1))

    def read_meta(self, eval_id: str) -> EvalMeta:
        """The eval's meta; a file that is not one raises a ValueError (pydantic's ValidationError).
        A key an earlier version wrote and this one dropped is ignored, not an unreadable eval."""
        return EvalMeta.model_validate_json((self._dir(eval_id) / "meta.json").read_bytes(), extra="ignore")

    def rows(self, eval_id: str) -> list[TestRow]:
        lines = (self._dir(eval_id) / "rows.jsonl").read_text(encoding="utf-8").splitlines()
        return [TestRow.model_validate_json(line) for line in lines if line.strip()]

    def save_output(self, eval_id: str, row: int, model: int, output: EvalAnswer) -> None:
        atomic_write(self._dir(eval_id) / "outputs" / f"r{row:06d}-m{model:02d}.json", output.model_dump_json())

    def _output_files(self, eval_id: str) -> list[Path]:
        folder = self._dir(eval_id) / "outputs"
        return sorted(folder.glob("r*-m*.json")) if folder.is_dir() else []

    def count_outputs(self, eval_id: str) -> int:
        """How many answers are saved, from the file names alone (the listing and progress need no more)."""
        return len(self._output_files(eval_id))

    def outputs(self, eval_id: str) -> dict[tuple[int, int], EvalAnswer]:
        """Each saved answer by (row index, model index)."""
        found: dict[tuple[int, int], EvalAnswer] = {}
        for path in self._output_files(eval_id):
            row, model = path.stem[1:].split("-m")
            found[(int(row), int(model))] = EvalAnswer.model_validate_json(path.read_bytes(), extra="ignore")
        return found

    def size_of(self, eval_id: str) -> int:
        """Bytes on disk under the eval's folder."""
        total = 0
        stack = [self.root / eval_id]
        while stack:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
        return total

    def remove(self, eval_id: str) -> None:
        shutil.rmtree(self._dir(eval_id))

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted((p.name for p in self.root.iterdir() if (p / "meta.json").is_file()), reverse=True)

    # -- exports ---------------------------------------------------------------------------
    def export_jsonl(self, report: EvalReport) -> str:
        return jsonl(report.rows)

    def export_csv(self, report: EvalReport) -> str:
        """One line per answer (row × model), so a spreadsheet can filter and pivot it."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in report.rows:
            for label, output in row.outputs.items():
                writer.writerow(safe_row({**output.model_dump(), "index": row.index, "model": label, "prompt": row.prompt,
                                          "system": row.system or "", "reference": row.reference or ""}))
        return buffer.getvalue()

    def save_exports(self, eval_id: str, report: EvalReport) -> Optional[Path]:
        folder = self._dir(eval_id)
        atomic_write(folder / "results.jsonl", self.export_jsonl(report))
        atomic_write(folder / "results.csv", self.export_csv(report))
        summary = [entry.model_dump(mode="json") for entry in report.summary]
        atomic_write(folder / "summary.json", json.dumps(summary, ensure_ascii=False, indent=1))
        return folder
