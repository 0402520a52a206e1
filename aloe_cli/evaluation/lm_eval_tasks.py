"""Text-only benchmarks through lm-evaluation-harness (MedQA, MedMCQA, PubMedQA, MMLU, ...).

`run_lm_eval` hands the already loaded model and its tokenizer to `lm_eval.simple_evaluate` (as an
`HFLM` wrapping the model object, so nothing is loaded twice) and turns each requested task's result
into the same scores entry as an aloe benchmark: `{"items", "accuracy", "main", "metric",
"source": "lm-eval"}`, accuracy in percent. Needs the `[eval]` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aloe_cli.errors import AloeError

INSTALL_HINT = "pip install 'aloe-cli[eval]' (lm-evaluation-harness)"
METRICS = ("acc", "exact_match", "acc_norm", "f1")  # the first one a task reports is its headline


def parse_tasks(text: str) -> list[str]:
    tasks = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not tasks:
        raise AloeError("--lm-eval-tasks: no task named (e.g. medqa_4options,medmcqa,pubmedqa)")
    return tasks


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise AloeError("--lm-eval-tasks needs lm-evaluation-harness, which is not installed: "
                        + INSTALL_HINT) from None


def run_lm_eval(model: Any, tokenizer: Any, tasks: list[str], *, include_path: str | Path | None = None,
                limit: int | None = None, batch_size: int = 8) -> dict[str, dict]:
    """Scores per task, for tasks known to lm-eval (plus those defined under `include_path`)."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise AloeError(f"--lm-eval-tasks: unknown task(s) {', '.join(unknown)} (lm-eval lists its tasks with "
                        "`lm-eval ls tasks`)")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    output = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                             bootstrap_iters=0)
    if output is None:
        raise AloeError("lm-eval returned no results")
    return {task: _entry(task, output) for task in tasks}


def _entry(task: str, output: dict) -> dict:
    results = output.get("results", {}).get(task) or output.get("groups", {}).get(task) or {}
    for metric in METRICS:
        value = next((v for k, v in results.items() if k.split(",")[0] == metric and isinstance(v, (int, float))),
                     None)
        if value is not None:
            accuracy = round(100.0 * float(value), 2)
            items = output.get("n-samples", {}).get(task, {}).get("effective") or results.get("sample_len")
            return {"items": items, "accuracy": accuracy, "main": accuracy, "metric": metric, "source": "lm-eval"}
    raise AloeError(f"lm-eval task {task} reported none of the metrics {', '.join(METRICS)}")


__all__ = ["INSTALL_HINT", "parse_tasks", "require_lm_eval", "run_lm_eval"]
