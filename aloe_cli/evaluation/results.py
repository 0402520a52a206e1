"""The results folder: predictions and scores per model, and the two tables built from every model's scores.

    results/
      results.md, results.csv            one row per model; benchmarks, then the adversarial columns
      <model>/scores.json                {"model", "benchmarks": {name: scores}, ...}
      <model>/<benchmark>/predictions.jsonl

`results.csv` holds both tables side by side (one row per model): the benchmark columns, then
`<task> <Perturbation>` columns (e.g. `cls Base`, `det Leg`). A second model evaluated into the same
folder adds its row; evaluating a model again replaces the benchmarks it re-ran and keeps the others.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

from aloe_cli.data.io import read_file
from aloe_cli.data.writing import write_atomic, write_atomic_many
from aloe_cli.errors import AloeError, RecordError
from aloe_cli.perturb.names import EVAL_NAMES, TITLES

SCORES_FILE = "scores.json"
PREDICTIONS_FILE = "predictions.jsonl"
TASK_ORDER = ("cls", "det")


def folder_name(label: str) -> str:
    """A model label as a folder name ('Qwen/Qwen2-VL-7B-Instruct' -> 'Qwen__Qwen2-VL-7B-Instruct')."""
    return re.sub(r"[^\w.\-]+", "_", label.replace("/", "__")).strip("._") or "model"


def write_text_atomic(path: Path, text: str) -> None:
    """`text` to `path`, complete or not at all (`data.writing`: synced, renamed, the umask's mode)."""
    write_atomic(path, text.encode("utf-8"))


def read_prediction_lines(path: str) -> Iterator[tuple[str, dict | None, RecordError | None]]:
    """(where, line, error) for every line of a predictions file."""
    if not Path(path).is_file():
        raise AloeError(f"predictions file not found: {path}")
    for item in read_file(path):
        raw = item.raw
        if item.error is not None and not isinstance(raw, dict):
            yield item.where, None, item.error
        else:
            yield item.where, raw, None


def load_scores(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AloeError(f"cannot read scores {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), dict):
        raise AloeError(f"{path}: not an aloe scores file (no 'benchmarks' object)")
    return data


def save_scores(model_dir: Path, label: str, benchmarks: dict, info: dict | None = None) -> dict:
    """Merge `benchmarks` into the model's scores.json (re-run benchmarks are replaced)."""
    path = model_dir / SCORES_FILE
    data = load_scores(path) if path.exists() else {"model": label, "created": time.time(), "benchmarks": {}}
    data["model"] = label
    data.update(info or {})
    data["benchmarks"].update(benchmarks)
    data["updated"] = time.time()
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return data


def collect_scores(folder: Path) -> list[dict]:
    """Every model's scores under a results folder (or the folder's own scores.json), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AloeError(f"results folder not found: {folder}")
    paths = sorted(folder.glob(f"*/{SCORES_FILE}"))
    if (folder / SCORES_FILE).is_file():
        paths.insert(0, folder / SCORES_FILE)
    if not paths:
        raise AloeError(f"{folder}: no {SCORES_FILE} found (expected {folder}/<model>/{SCORES_FILE})")
    models = [load_scores(path) for path in paths]
    return sorted(models, key=lambda data: (data.get("created") or 0, str(data.get("model"))))


def _columns(models: list[dict]) -> tuple[list[str], list[tuple[str, str]]]:
    benchmarks = list(dict.fromkeys(name for data in models for name in data["benchmarks"]))
    seen = {(task, kind) for data in models for scores in data["benchmarks"].values()
            for task, kinds in scores.get("robustness", {}).items() for kind in kinds}
    tasks = [task for task in TASK_ORDER if any(t == task for t, _ in seen)]
    tasks += sorted({task for task, _ in seen} - set(tasks))
    adversarial = [(task, kind) for task in tasks for kind in EVAL_NAMES if (task, kind) in seen]
    return benchmarks, adversarial


def _robustness(data: dict, task: str, kind: str) -> float | None:
    """Accuracy of one model under one perturbation and task, pooled over its benchmarks."""
    total = weighted = 0.0
    for scores in data["benchmarks"].values():
        entry = scores.get("robustness", {}).get(task, {}).get(kind)
        if entry and entry.get("accuracy") is not None and entry.get("items"):
            total += entry["items"]
            weighted += entry["items"] * entry["accuracy"]
    return weighted / total if total else None


def table_rows(models: list[dict]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(benchmark headers, rows, adversarial headers, rows), cells as text with one decimal."""
    benchmarks, adversarial = _columns(models)
    main_rows = [[str(data["model"]), *(_cell(data["benchmarks"].get(name, {}).get("main")) for name in benchmarks)]
                 for data in models]
    adv_headers = [f"{task} {TITLES.get(kind, kind)}" for task, kind in adversarial]
    adv_rows = [[str(data["model"]), *(_cell(_robustness(data, task, kind)) for task, kind in adversarial)]
                for data in models if any(s.get("robustness") for s in data["benchmarks"].values())]
    return ["model", *benchmarks], main_rows, ["model", *adv_headers], adv_rows


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render_markdown(models: list[dict]) -> str:
    headers, rows, adv_headers, adv_rows = table_rows(models)
    parts = ["## Benchmarks (accuracy, %)", "", *_markdown(headers, rows)]
    if adv_rows:
        parts += ["", "## Adversarial robustness (accuracy, %: Base, then under each perturbation)", "",
                  *_markdown(adv_headers, adv_rows)]
    return "\n".join(parts) + "\n"


def _markdown(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_csv(models: list[dict]) -> str:
    headers, rows, adv_headers, adv_rows = table_rows(models)
    adversarial = {row[0]: row[1:] for row in adv_rows}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers + adv_headers[1:])
    for row in rows:
        writer.writerow(row + adversarial.get(row[0], ["-"] * (len(adv_headers) - 1)))
    return buffer.getvalue()


def write_tables(folder: Path) -> list[dict]:
    models = collect_scores(folder)
    write_atomic_many({Path(folder) / "results.md": render_markdown(models).encode("utf-8"),
                       Path(folder) / "results.csv": render_csv(models).encode("utf-8")})  # together, or neither
    return models


__all__ = ["PREDICTIONS_FILE", "SCORES_FILE", "collect_scores", "folder_name", "load_scores",
           "read_prediction_lines", "render_csv", "render_markdown", "save_scores", "table_rows", "write_tables",
           "write_text_atomic"]
