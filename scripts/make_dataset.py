"""Turns a folder of Markdown documents into SFT data: question/answer pairs about each section,
written by a model behind any OpenAI-compatible endpoint (this tester's own /v1 by default).

    python -m scripts.make_dataset --docs docs/ --out data/docs_qa.jsonl --project-name Widget \\
        [--base-url http://127.0.0.1:5000/v1] [--model NAME] [--api-key KEY] [--pairs 3] \\
        [--concurrency 4] [--retries 2] [--template FILE] [--dry-run]

1. Every ``*.md`` file under ``--docs`` is split into a heading tree (ATX ``#`` headings and
   setext underlines; a stack by heading level, so ``#`` then ``###`` nests the second under the
   first). Fenced code blocks are kept verbatim and never read as headings, so a ``# comment``
   in a shell block stays code. Each section's own text, the part before its first sub-heading,
   becomes a slice named by its heading path ``Guide -> Installation -> Linux``; text before a
   document's first heading is named after the document. Empty sections give no slice, and a
   section longer than ``--max-slice-chars`` is cut at paragraph and code-block boundaries.
2. A prompt template is filled for each slice: ``{project_name}``, ``{heading_path}``,
   ``{document_slice}`` and ``{n_pairs}``. Only these names are replaced, so a template may show
   a JSON example with bare braces. ``--template FILE`` replaces the built-in one.
3. The prompts go to ``{base_url}/chat/completions`` with the ``openai`` SDK, at most
   ``--concurrency`` at a time (a thread pool); the SDK itself retries connection errors, 429s
   (the tester's full queue, honouring Retry-After) and 5xx.
4. Answers are read leniently: code fences are stripped, the first JSON array is taken, and from
   an array cut off by max_tokens the complete objects are kept. Items need non-empty string
   ``question`` and ``answer``. A slice whose answer holds no valid pair is asked again, up to
   ``--retries`` more times, then skipped and counted.
5. The pairs are written as JSONL in the OpenAI messages format, which ``scripts.train_lora``
   (``scripts.sft_data.load_sft_dataset``) reads: ``{"messages": [{"role": "user", ...},
   {"role": "assistant", ...}], "source": "<heading path>", "doc": "<file>"}``, in document order.
   The file is written whole or not at all (a hidden temporary file renamed into place), also
   when the run is interrupted with what it had so far.

The run ends with a summary: slices, requests, pairs, malformed answers, retries, skipped slices,
request errors, seconds. Exit status: 0 with pairs written, 1 when no pair came back (the file is
still written, empty), 2 for bad arguments or an endpoint that cannot be used.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

log = logging.getLogger("make_dataset")

DEFAULT_BASE_URL = "http://127.0.0.1:5000/v1"  # the tester's own OpenAI-compatible API (run.py's default port)
DOC_SUFFIXES = (".md", ".markdown")
HEADING_SEPARATOR = " -> "

DEFAULT_TEMPLATE = """\
You are writing training data for an assistant that answers questions about {project_name}.

Here is one section of the {project_name} documentation, "{heading_path}":

<section>
{document_slice}
</section>

Write {n_pairs} question and answer pairs that a user of {project_name} could ask and that this section answers.
Each answer must be correct according to the section alone and understandable without it.
Reply with only a JSON array, no other text, in this form:
[{"question": "...", "answer": "..."}]
"""
PLACEHOLDERS = ("project_name", "document_slice", "heading_path", "n_pairs")
PLACEHOLDER_RE = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


class DatasetJobError(Exception):
    """The job cannot run with these arguments or this endpoint; the message says why."""


# --------------------------------------------------------------------------- Markdown to slices


@dataclass
class Section:
    """A heading and the text under it up to the next heading; level 0 is the document itself."""

    title: str
    level: int
    blocks: list[str] = field(default_factory=list)  # paragraphs and verbatim code blocks
    children: list["Section"] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n\n".join(self.blocks)


@dataclass(frozen=True)
class Slice:
    doc: str  # the document's path under the docs folder
    headings: tuple[str, ...]
    text: str
    part: int = 1
    parts: int = 1
    # The section's paragraphs and code blocks, where split_long may cut (a code block may hold blank lines).
    blocks: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @property
    def heading_path(self) -> str:
        path = HEADING_SEPARATOR.join(self.headings)
        return path if self.parts == 1 else f"{path} (part {self.part}/{self.parts})"


ATX_RE = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
FENCE_OPEN_RE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
SETEXT_RE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
# A paragraph that starts like one of these is a list, quote or table: a "---" under it is a
# thematic break, not a setext underline.
NOT_SETEXT_TEXT_RE = re.compile(r"^\s*([-*+>|]|\d+[.)])(\s|$)")


def _strip_front_matter(lines: list[str]) -> list[str]:
    """YAML front matter (``---`` ... ``---`` at the very top) is metadata, and its closing
    ``---`` under a ``title:`` line would otherwise read as a setext heading."""
    if lines and lines[0].strip() == "---":
        for i, line in enumerate(lines[1:], start=1):
            if line.strip() in ("---", "..."):
                return lines[i + 1:]
    return lines


def parse_markdown(text: str, title: str) -> Section:
    """The heading tree of one Markdown document, whose root (level 0) is named ``title``."""
    root = Section(title, 0)
    stack = [root]  # the open sections, each deeper than the one below it
    paragraph: list[str] = []
    lines = _strip_front_matter(text.splitlines())

    def flush() -> None:
        if paragraph:
            stack[-1].blocks.append("\n".join(paragraph))
            paragraph.clear()

    def open_section(level: int, heading: str) -> None:
        flush()
        while stack[-1].level >= level:
            stack.pop()
        section = Section(heading.strip() or "(untitled)", level)
        stack[-1].children.append(section)
        stack.append(section)

    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE_OPEN_RE.match(line)
        if fence and not (fence.group(1)[0] == "`" and "`" in fence.group(2)):
            # Verbatim up to a closing run of the same character, at least as long; an unclosed
            # fence runs to the end of the document, as CommonMark has it.
            flush()
            marker = fence.group(1)
            close = re.compile(r"^ {0,3}" + re.escape(marker[0]) + "{" + str(len(marker)) + r",}[ \t]*$")
            block = [line]
            i += 1
            while i < len(lines):
                block.append(lines[i])
                i += 1
                if close.match(block[-1]):
                    break
            stack[-1].blocks.append("\n".join(block))
            continue
        atx = ATX_RE.match(line)
        if atx:
            open_section(len(atx.group(1)), atx.group(2) or "")
        elif paragraph and SETEXT_RE.match(line) and not NOT_SETEXT_TEXT_RE.match(paragraph[0]):
            heading = " ".join(part.strip() for part in paragraph)
            paragraph.clear()
            open_section(1 if line.strip().startswith("=") else 2, heading)
        elif not line.strip():
            flush()
        else:
            paragraph.append(line.rstrip())
        i += 1
    flush()
    return root


def section_slices(root: Section, doc: str) -> list[Slice]:
    """A slice for every section with text of its own, in document order. The root's own text
    (before the first heading) is named after the document."""
    slices: list[Slice] = []

    def walk(section: Section, path: tuple[str, ...]) -> None:
        if section.text.strip():
            slices.append(Slice(doc, path, section.text.strip("\n"), blocks=tuple(section.blocks)))
        for child in section.children:
            walk(child, (*path, child.title) if section.level else (child.title,))

    walk(root, (root.title,))
    return slices


def split_long(piece: Slice, max_chars: int) -> list[Slice]:
    """A slice over ``max_chars`` as parts cut between paragraphs and code blocks (a single
    block longer than that is cut between lines), so each prompt fits the model's context."""
    if len(piece.text) <= max_chars:
        return [piece]
    blocks: list[str] = []
    for block in piece.blocks or piece.text.split("\n\n"):
        while len(block) > max_chars:
            cut = block.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            blocks.append(block[:cut])
            block = block[cut:].lstrip("\n")
        blocks.append(block)
    parts: list[str] = []
    for block in blocks:
        if parts and len(parts[-1]) + 2 + len(block) <= max_chars:
            parts[-1] += "\n\n" + block
        else:
            parts.append(block)
    return [Slice(piece.doc, piece.headings, text, k, len(parts)) for k, text in enumerate(parts, start=1)]


def find_documents(docs: Path) -> list[Path]:
    if docs.is_file():
        return [docs]
    if not docs.is_dir():
        raise DatasetJobError(f"--docs {docs}: no such file or folder")
    found = [p for p in sorted(docs.rglob("*")) if p.is_file() and p.suffix.lower() in DOC_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(docs).parts)]
    if not found:
        raise DatasetJobError(f"--docs {docs}: no Markdown files ({', '.join(DOC_SUFFIXES)}) in it")
    return found


def load_slices(docs: Path, max_chars: int = 6000, min_chars: int = 1) -> tuple[list[Path], list[Slice]]:
    """The documents under ``docs`` (a folder, or one file) and their slices, in order. Slices
    shorter than ``min_chars`` are dropped: a one-line section gives a model nothing to ask about."""
    docs = Path(docs)
    files = find_documents(docs)
    slices: list[Slice] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetJobError(f"{path}: not UTF-8 text ({exc})") from None
        name = path.name if docs.is_file() else path.relative_to(docs).as_posix()
        for piece in section_slices(parse_markdown(text, Path(name).stem), name):
            slices.extend(split_long(piece, max_chars))
    short = [s for s in slices if len(s.text.strip()) < min_chars]
    if short:
        log.info("leaving out %d slice(s) shorter than %d characters", len(short), min_chars)
    return files, [s for s in slices if len(s.text.strip()) >= min_chars]


# --------------------------------------------------------------------------- prompts and answers


def check_template(template: str) -> str:
    if "{document_slice}" not in template:
        raise DatasetJobError("the template has no {document_slice} placeholder, so the model would never see the text")
    unknown = sorted(set(re.findall(r"\{([A-Za-z_]\w*)\}", template)) - set(PLACEHOLDERS))
    if unknown:
        log.warning("the template's %s are not placeholders and stay as written (placeholders: %s)",
                    ", ".join("{%s}" % u for u in unknown), ", ".join("{%s}" % p for p in PLACEHOLDERS))
    return template


def fill_template(template: str, project_name: str, piece: Slice, n_pairs: int) -> str:
    # One pass over the template, so braces in the template's JSON example and placeholder-like
    # text inside the document slice are left alone.
    values = {"project_name": project_name, "document_slice": piece.text, "heading_path": piece.heading_path,
              "n_pairs": str(n_pairs)}
    return PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)


CODE_FENCE_RE = re.compile(r"```[^\n`]*\n?(.*?)(?:```|$)", re.S)


def _json_arrays(text: str, limit: int = 50):
    """Each list that decodes at one of the first ``limit`` '[' of ``text``; where none does at
    a '[' (an answer cut off mid-array), the complete objects that follow it, as a list."""
    decoder = json.JSONDecoder()
    start = text.find("[")
    while start != -1 and limit > 0:
        limit -= 1
        try:
            value, _ = decoder.raw_decode(text, start)
            if isinstance(value, list):
                yield value
        except json.JSONDecodeError:
            salvaged, pos = [], start + 1
            while True:
                while pos < len(text) and text[pos] in " \t\r\n,":
                    pos += 1
                try:
                    value, pos = decoder.raw_decode(text, pos)
                except json.JSONDecodeError:
                    break
                if not isinstance(value, dict):
                    break
                salvaged.append(value)
            if salvaged:
                yield salvaged
        start = text.find("[", start + 1)


def _pair(item) -> Optional[tuple[str, str]]:
    if not isinstance(item, dict):
        return None
    keys = {str(k).strip().lower(): v for k, v in item.items()}
    question, answer = keys.get("question"), keys.get("answer")
    if isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip():
        return question.strip(), answer.strip()
    return None


def parse_pairs(answer: str) -> list[tuple[str, str]]:
    """The question/answer pairs in a model's answer, read leniently; [] when there are none.

    Fenced blocks are tried first, then the whole answer; the first JSON array holding at least
    one valid item wins, and its invalid items are dropped. Repeated questions count once."""
    candidates = [m.group(1) for m in CODE_FENCE_RE.finditer(answer)] + [answer]
    for candidate in candidates:
        for items in _json_arrays(candidate):
            pairs, seen = [], set()
            for item in items:
                pair = _pair(item)
                if pair is not None and pair[0] not in seen:
                    seen.add(pair[0])
                    pairs.append(pair)
            if pairs:
                return pairs
    return []


# --------------------------------------------------------------------------- the job


@dataclass
class SliceResult:
    pairs: list[tuple[str, str]] = field(default_factory=list)
    requests: int = 0
    malformed: int = 0
    error: Optional[str] = None


@dataclass
class Summary:
    docs: int = 0
    slices: int = 0
    requests: int = 0
    pairs: int = 0
    malformed: int = 0  # answers with no valid pair in them
    retried: int = 0  # requests that asked a slice again after a malformed answer
    skipped: int = 0  # slices that gave no pair: malformed every time, or a request error
    errors: int = 0  # requests that failed (HTTP errors after the SDK's own retries)
    seconds: float = 0.0
    interrupted: bool = False
    out: Optional[str] = None

    def line(self) -> str:
        return (f"{self.slices} slices from {self.docs} documents, {self.requests} requests, {self.pairs} pairs, "
                f"{self.malformed} malformed, {self.retried} retried, {self.skipped} skipped, {self.errors} errors, "
                f"{self.seconds:.1f} s" + (" (interrupted)" if self.interrupted else ""))


@dataclass
class Job:
    base_url: str = DEFAULT_BASE_URL
    model: Optional[str] = None  # None: the first model the endpoint lists (the tester lists its loaded one first)
    api_key: str = "unused"
    project_name: str = "the project"
    template: str = DEFAULT_TEMPLATE
    n_pairs: int = 3
    concurrency: int = 4
    retries: int = 2
    temperature: float = 0.7  # above 0, so that asking again can give a different answer
    max_tokens: int = 1024
    timeout_s: float = 300.0


# HTTP statuses that every later request would get too: stop the run instead of skipping slices.
FATAL_STATUSES = (401, 403, 404)


def _client(job: Job):
    from openai import OpenAI  # imported here so that parsing and --dry-run work without a server library

    # max_retries: the SDK backs off on connection errors, 408/409/429 and 5xx (Retry-After honoured).
    return OpenAI(base_url=job.base_url, api_key=job.api_key, timeout=job.timeout_s, max_retries=3)


def resolve_model(client, job: Job) -> str:
    """The model to ask: the one named, else the endpoint's first listed one. Also the check
    that the endpoint answers at all, before any slice is sent."""
    import openai

    try:
        # One quick retry: a stopped server should be reported now, not after the SDK's full back-off.
        listed = [m.id for m in client.with_options(max_retries=1).models.list().data]
    except openai.APIConnectionError as exc:
        raise DatasetJobError(f"cannot reach {job.base_url} ({exc.__class__.__name__}); is the server running "
                              f"(make run, or run.py)?") from None
    except openai.APIStatusError as exc:
        if job.model and exc.status_code == 404:
            return job.model  # a server without /models; the named model is all we need
        raise DatasetJobError(f"{job.base_url}/models answered HTTP {exc.status_code}: {_error_message(exc)}") from None
    if job.model:
        return job.model
    if not listed:
        raise DatasetJobError(f"{job.base_url} lists no models; name one with --model")
    return listed[0]


def _error_message(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return " ".join(str(exc).split())[:300]


def ask_slice(client, job: Job, model: str, piece: Slice, abort: threading.Event) -> SliceResult:
    """Asks for one slice's pairs, again after a malformed answer, at most 1 + retries times."""
    import openai

    result = SliceResult()
    prompt = fill_template(job.template, job.project_name, piece, job.n_pairs)
    for attempt in range(1 + job.retries):
        if abort.is_set():
            return result
        result.requests += 1
        try:
            response = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}],
                temperature=job.temperature, max_tokens=job.max_tokens,
            )
        except openai.APIStatusError as exc:
            result.error = f"HTTP {exc.status_code}: {_error_message(exc)}"
            if exc.status_code in FATAL_STATUSES:
                abort.set()
            return result  # the same request would fail the same way: not a malformed answer to retry
        except openai.APIError as exc:  # connection errors and timeouts, after the SDK's own retries
            result.error = f"{exc.__class__.__name__}: {_error_message(exc)}"
            return result
        content = (response.choices[0].message.content or "") if response.choices else ""
        result.pairs = parse_pairs(content)
        if result.pairs:
            return result
        result.malformed += 1
        log.debug("malformed answer for %s (attempt %d): %.200r", piece.heading_path, attempt + 1, content)
    return result


def write_jsonl(out: Path, records: list[dict]) -> None:
    """All records or nothing: a hidden temporary file in the same folder, renamed over ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def records_for(piece: Slice, pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
             "source": piece.heading_path, "doc": piece.doc} for q, a in pairs]


def run_job(job: Job, slices: list[Slice], out: Path, docs: int = 0) -> Summary:
    """Asks for every slice's pairs, ``job.concurrency`` requests at a time, and writes them to
    ``out`` in slice order. Raises DatasetJobError when the endpoint cannot be used at all."""
    if job.concurrency < 1 or job.retries < 0 or job.n_pairs < 1:
        raise DatasetJobError("--concurrency and --pairs must be at least 1, --retries at least 0")
    started = time.perf_counter()
    client = _client(job)
    model = resolve_model(client, job)
    log.info("asking %s at %s for %d pairs from each of %d slices, %d at a time", model, job.base_url, job.n_pairs,
             len(slices), job.concurrency)
    summary = Summary(docs=docs, slices=len(slices), out=str(out))
    results: dict[int, SliceResult] = {}
    abort = threading.Event()
    fatal: Optional[str] = None
    pool = ThreadPoolExecutor(max_workers=job.concurrency, thread_name_prefix="make-dataset")
    futures: dict[Future, int] = {pool.submit(ask_slice, client, job, model, piece, abort): i
                                  for i, piece in enumerate(slices)}
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                index = futures[future]
                piece = slices[index]
                try:
                    result = future.result()
                except Exception as exc:  # a bug or an unexpected client error costs one slice, not the run
                    log.warning("%s failed", piece.heading_path, exc_info=True)
                    result = SliceResult(requests=1, error=f"{exc.__class__.__name__}: {exc}")
                results[index] = result
                if not result.requests:
                    continue  # never asked: the run is stopping
                if result.error:
                    log.warning("[%d/%d] %s: %s", len(results), len(slices), piece.heading_path, result.error)
                    if abort.is_set() and fatal is None:
                        fatal = result.error
                elif not result.pairs:
                    log.info("[%d/%d] %s: skipped, no valid pair in %d answers", len(results), len(slices),
                             piece.heading_path, result.requests)
                else:
                    log.info("[%d/%d] %s: %d pairs%s", len(results), len(slices), piece.heading_path,
                             len(result.pairs), f" after {result.requests} requests" if result.requests > 1 else "")
    except KeyboardInterrupt:
        summary.interrupted = True
        log.warning("interrupted: writing the %d slices answered so far", len(results))
    finally:
        # Requests already sent finish on their own threads; nothing new starts.
        pool.shutdown(wait=not summary.interrupted, cancel_futures=True)

    if fatal is not None:
        # Every later request would fail the same way; an earlier good file is worth more than an empty one.
        raise DatasetJobError(f"{job.base_url} refused the requests ({fatal}); stopped, {out} left as it was")
    records: list[dict] = []
    for index, piece in enumerate(slices):
        result = results.get(index)
        if result is None or not result.requests:
            continue
        records.extend(records_for(piece, result.pairs))
        summary.requests += result.requests
        summary.malformed += result.malformed
        summary.retried += max(result.requests - 1, 0)
        summary.errors += result.error is not None
        summary.skipped += not result.pairs
    summary.pairs = len(records)
    write_jsonl(out, records)
    summary.seconds = time.perf_counter() - started
    log.info("wrote %d pairs to %s: %s", summary.pairs, out, summary.line())
    return summary


# --------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=Path, required=True, help="folder of Markdown files (searched recursively), or one file")
    parser.add_argument("--out", type=Path, help="the JSONL file to write (needed unless --dry-run)")
    parser.add_argument("--project-name", help="what the documents are about, for the prompt (default: the docs folder's name)")
    parser.add_argument("--template", type=Path, help="prompt template file with {project_name}, {heading_path}, "
                        "{document_slice}, {n_pairs} (default: a built-in one)")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"OpenAI-compatible API root (default: {DEFAULT_BASE_URL})")
    parser.add_argument("--model", help="model name at the endpoint (default: the first one it lists)")
    # No default from OPENAI_API_KEY: that key should not travel to whatever --base-url names unasked.
    parser.add_argument("--api-key", default="unused",
                        help="bearer token for the endpoint, e.g. the tester's --api-key (default: a placeholder)")
    parser.add_argument("--pairs", type=int, default=3, help="question/answer pairs to ask for per slice (default 3)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    parser.add_argument("--retries", type=int, default=2, help="times to ask again after a malformed answer (default 2)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="longest answer per request (default 1024)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take (default 300)")
    parser.add_argument("--max-slice-chars", type=int, default=6000, help="longer sections are cut into parts (default 6000)")
    parser.add_argument("--min-chars", type=int, default=20, help="shorter sections are left out (default 20)")
    parser.add_argument("--limit", type=int, help="use only the first N slices (to try a template)")
    parser.add_argument("--dry-run", action="store_true", help="list the slices and show the first prompt; send nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "openai", "openai._base_client"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # one line per HTTP request drowns the progress

    try:
        if args.max_slice_chars < 200:
            raise DatasetJobError("--max-slice-chars must be at least 200")
        template = DEFAULT_TEMPLATE
        if args.template is not None:
            try:
                template = args.template.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise DatasetJobError(f"cannot read --template {args.template}: {exc}") from None
        check_template(template)
        files, slices = load_slices(args.docs, args.max_slice_chars, args.min_chars)
        if args.limit is not None:
            slices = slices[: max(args.limit, 0)]
        project = args.project_name or args.docs.resolve().stem
        job = Job(base_url=args.base_url.rstrip("/"), model=args.model, api_key=args.api_key, project_name=project,
                  template=template, n_pairs=args.pairs, concurrency=args.concurrency, retries=args.retries,
                  temperature=args.temperature, max_tokens=args.max_tokens, timeout_s=args.timeout)
        if args.dry_run:
            for piece in slices:
                log.info("%s: %s (%d chars)", piece.doc, piece.heading_path, len(piece.text))
            if slices:
                log.info("the first prompt:\n%s", fill_template(template, project, slices[0], args.pairs))
            log.info("%d slices from %d documents", len(slices), len(files))
            return 0
        if args.out is None:
            raise DatasetJobError("--out is needed (a .jsonl file), unless --dry-run")
        if args.out.suffix.lower() != ".jsonl":
            raise DatasetJobError(f"--out {args.out}: use a .jsonl name, which is what the training data loader reads")
        if not slices:
            raise DatasetJobError(f"no section in {args.docs} has text to ask about")
        summary = run_job(job, slices, args.out, docs=len(files))
    except DatasetJobError as exc:
        log.error("%s", exc)
        return 2
    if summary.interrupted:
        return 130
    if not summary.pairs:
        log.error("no valid pairs came back (%d malformed answers); %s is empty. A larger model, or a template "
                  "that shows the JSON form more plainly, usually does better", summary.malformed, args.out)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
