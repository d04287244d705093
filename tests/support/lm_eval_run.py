"""lm-evaluation-harness runs for tests/test_lm_eval.py, made through lm-eval's Python API in its
own venv (never the app's): ``python lm_eval_run.py SPEC.json OUT.json``.

SPEC holds ``tasks_dir`` and a list of ``runs`` ({name, model, model_args, tasks, batch_size,
apply_chat_template}); OUT gets each run's ``results`` and, per task, every sample's ``resps``
and ``filtered_resps`` (a task with several filters lists each document once per filter). The task index is built from ``tasks_dir`` alone (``include_defaults``
off): indexing lm-eval's ~14,000 built-in task files would cost more than the runs.
"""
from __future__ import annotations

import json
import sys


def sample_facts(sample: dict) -> dict:
    return {"doc_id": sample["doc_id"], "filter": sample.get("filter"), "target": sample["target"], "resps": sample["resps"],
            "filtered_resps": sample["filtered_resps"]}


def main(spec_path: str, out_path: str) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    manager = TaskManager(include_path=spec["tasks_dir"], include_defaults=False)
    out = {}
    for run in spec["runs"]:
        results = simple_evaluate(model=run["model"], model_args=run["model_args"], tasks=run["tasks"], task_manager=manager,
                                  batch_size=run.get("batch_size", 1), apply_chat_template=run.get("apply_chat_template", False),
                                  log_samples=True)
        out[run["name"]] = {"results": results["results"],
                            "samples": {task: [sample_facts(sample) for sample in samples]
                                        for task, samples in results["samples"].items()}}
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump(out, handle, default=str)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
