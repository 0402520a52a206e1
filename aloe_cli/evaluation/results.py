"""The results folder: predictions and scores per model, and the tables built from every model's scores.

    results/
      results.md, results.csv            one row per model: benchmarks, then the adversarial columns
      <model>/scores.json                {"model", "benchmarks": {name: scores}, ...}
      <model>/<benchmark>/predictions.jsonl
      <model>/<benchmark>/acc.csv        the benchmark's breakdown, like VLMEvalKit's `_acc.csv`

Every figure is shown under both protocols: VLMEvalKit's (`accuracy`, `main`: comparable with published
baselines) and aloe's extraction (`accuracy_aloe`, `main_aloe`), in two tables, never mixed. The main
table puts the published benchmarks (evaluation.registry) first, in the published order. The adversarial
table has the published columns (cls Base Cap Pmt Syc, det Base Cap Pmt Syc Leg) unless asked for all the
cells measured or a list of them. Breakdowns follow VLMEvalKit's `report_acc`: a row per split (`none`
when the file has no split), Overall, then the l2-categories, then the categories, each sorted.

`results.csv` holds, per model, the benchmark columns (VLMEvalKit protocol), the same with ` (aloe)`, then
the `<task> <Perturbation>` columns (e.g. `cls Base`, `det Leg`) and the same with ` (aloe)`. A second
model evaluated into the same folder adds its row; evaluating a model again replaces the benchmarks it
re-ran and keeps the others.
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
from aloe_cli.errors import AloeError, RecordError, UsageError
from aloe_cli.evaluation import registry
from aloe_cli.perturb.names import EVAL_NAMES, PUBLISHED_COLUMNS, TITLES

SCORES_FILE = "scores.json"
PREDICTIONS_FILE = "predictions.jsonl"
ACC_FILE = "acc.csv"  # a benchmark's breakdown, next to its predictions (VLMEvalKit's `_acc.csv`)
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


ROBUSTNESS_CHOICES = ("published", "all")  # the adversarial table's columns: PUBLISHED_COLUMNS, or every cell
# (key, title): the figure comparable with published baselines first, aloe's extraction beside it
PROTOCOLS = (("vlmevalkit", "VLMEvalKit protocol, comparable with published baselines"),
             ("aloe", "aloe extraction, not comparable with published baselines"))
PROTOCOL_LABELS = {"vlmevalkit": "VLMEvalKit", "aloe": "aloe"}
NO_SPLIT = "none"  # VLMEvalKit's split label for a file without a split column


def parse_robustness_columns(text: str) -> str | tuple[tuple[str, str], ...]:
    """`published`, `all`, or a list of cells `task:perturbation` (e.g. `cls:leg,det:region`)."""
    choice = text.strip().lower()
    if choice in ROBUSTNESS_CHOICES:
        return choice
    cells = []
    for part in choice.split(","):
        task, _, kind = part.strip().replace(" ", ":").partition(":")
        if task not in TASK_ORDER or kind not in EVAL_NAMES:
            raise UsageError(f"{part.strip()!r} is not a column: give published, all, or cells such as "
                             f"cls:leg,det:region (tasks {', '.join(TASK_ORDER)}; perturbations "
                             f"{', '.join(EVAL_NAMES)})", "--robustness-columns")
        cells.append((task, kind))
    return tuple(dict.fromkeys(cells))


def benchmark_columns(models: list[dict]) -> list[str]:
    """Every benchmark, the published ones first in the published order, then the others as first seen."""
    names: dict[str, str | None] = {}
    for data in models:
        for name, scores in data["benchmarks"].items():
            names.setdefault(name, scores.get("published"))
    last = len(registry.PUBLISHED)
    ranks = {name: registry.published_rank(name, published) for name, published in names.items()}
    return sorted(names, key=lambda name: last if ranks[name] is None else ranks[name])


def _perturbation_order(kind: str) -> tuple[int, str]:
    order = EVAL_NAMES
    return (order.index(kind) if kind in order else len(order), kind)


def robustness_columns(models: list[dict], choice: str | tuple = "published") -> list[tuple[str, str]]:
    """(task, perturbation) columns: the published ones for the tasks measured, every measured cell with
    `all`, or exactly the cells listed."""
    if not isinstance(choice, str):
        return list(choice)
    seen = {(task, kind) for data in models for scores in data["benchmarks"].values()
            for task, kinds in (scores.get("robustness") or {}).items() for kind in kinds}
    tasks = [task for task in TASK_ORDER if any(t == task for t, _ in seen)]
    tasks += sorted({task for task, _ in seen} - set(tasks))
    published = PUBLISHED_COLUMNS
    columns = []
    for task in tasks:
        cells = [(task, kind) for kind in published.get(task, ())]
        if choice == "all" or task not in published:
            cells += sorted(((t, k) for t, k in seen if t == task and (t, k) not in cells),
                            key=lambda cell: _perturbation_order(cell[1]))
            cells.sort(key=lambda cell: _perturbation_order(cell[1]))
        columns += cells
    return columns


def _accuracy_key(protocol: str) -> str:
    return "accuracy" if protocol == "vlmevalkit" else "accuracy_aloe"


def headline(name: str, scores: dict, protocol: str) -> float | None:
    """The benchmark's figure in the main table: its `main` (or `main_aloe`), or, for a benchmark whose
    published figure is one split's (MMMU: validation), that split's Overall. lm-eval tasks have one figure."""
    if scores.get("source") == "lm-eval":
        return scores.get("main")
    entry = registry.lookup(scores.get("published") or name)
    split = (scores.get("splits") or {}).get(entry.main_split) if entry and entry.main_split else None
    if split is not None:
        return split.get(_accuracy_key(protocol))
    return scores.get("main" if protocol == "vlmevalkit" else "main_aloe")


def _robustness(data: dict, task: str, kind: str, protocol: str = "vlmevalkit") -> float | None:
    """Accuracy of one model under one perturbation and task, pooled over its benchmarks."""
    key = _accuracy_key(protocol)
    total = weighted = 0.0
    for scores in data["benchmarks"].values():
        entry = (scores.get("robustness") or {}).get(task, {}).get(kind)
        if entry and entry.get(key) is not None and entry.get("items"):
            total += entry["items"]
            weighted += entry["items"] * entry[key]
    return weighted / total if total else None


def _column_title(task: str, kind: str) -> str:
    return f"{task} {TITLES.get(kind, kind.capitalize())}"


def table_rows(models: list[dict], protocol: str = "vlmevalkit", robustness: str | tuple = "published"
               ) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(benchmark headers, rows, adversarial headers, rows) under one protocol, cells as text with one decimal."""
    benchmarks = benchmark_columns(models)
    adversarial = robustness_columns(models, robustness)
    main_rows = [[str(data["model"]), *(_cell(headline(name, data["benchmarks"][name], protocol))
                                        if name in data["benchmarks"] else "-" for name in benchmarks)]
                 for data in models]
    adv_headers = [_column_title(task, kind) for task, kind in adversarial]
    adv_rows = [[str(data["model"]), *(_cell(_robustness(data, task, kind, protocol)) for task, kind in adversarial)]
                for data in models if any(s.get("robustness") for s in data["benchmarks"].values())]
    return ["model", *benchmarks], main_rows, ["model", *adv_headers], adv_rows


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _has_breakdown(scores: dict) -> bool:
    """Categories, or splits besides the one `none` split of a file without them."""
    splits = set(scores.get("splits") or {}) - {NO_SPLIT}
    return bool(scores.get("categories") or scores.get("l2_categories") or splits)


def breakdown_columns(entries: list[dict]) -> list[tuple[str, str, str]]:
    """(title, field, name): Overall, then l2-categories, then categories, each sorted, as VLMEvalKit's
    report_acc orders them; a name that is both an l2-category and a category is told apart by '(l2)'."""
    parts = [scores for entry in entries for scores in (entry, *(entry.get("splits") or {}).values())]
    l2 = sorted({name for scores in parts for name in scores.get("l2_categories") or {}})
    categories = sorted({name for scores in parts for name in scores.get("categories") or {}})
    return ([("Overall", "", "")] + [(f"{name} (l2)" if name in categories else name, "l2_categories", name)
                                     for name in l2]
            + [(name, "categories", name) for name in categories])


def breakdown_rows(scores: dict, protocol: str, columns: list[tuple[str, str, str]]) -> list[list[str]]:
    """[split, Overall, per column...] per split (one `none` row without splits), figures as stored."""
    key = _accuracy_key(protocol)
    splits = scores.get("splits") or {NO_SPLIT: scores}
    rows = []
    for split, part in splits.items():
        values = []
        for _, field_name, name in columns:
            entry = part if not field_name else (part.get(field_name) or {}).get(name)
            values.append(None if entry is None else entry.get(key))
        rows.append([str(split), *values])
    return rows


def render_markdown(models: list[dict], robustness: str | tuple = "published") -> str:
    parts = []
    for protocol, title in PROTOCOLS:
        headers, rows, adv_headers, adv_rows = table_rows(models, protocol, robustness)
        parts += ["" if parts else None, f"## Benchmarks (accuracy, %): {title}", "", *_markdown(headers, rows)]
    for protocol, title in PROTOCOLS:
        headers, rows, adv_headers, adv_rows = table_rows(models, protocol, robustness)
        if adv_rows:
            parts += ["", f"## Adversarial robustness (accuracy, %, Base then each perturbation): {title}", "",
                      *_markdown(adv_headers, adv_rows)]
    for name in benchmark_columns(models):
        entries = [(data["model"], data["benchmarks"][name]) for data in models if name in data["benchmarks"]
                   and _has_breakdown(data["benchmarks"][name])]
        if not entries:
            continue
        columns = breakdown_columns([scores for _, scores in entries])
        rows = [[str(model), row[0], PROTOCOL_LABELS[protocol], *(_cell(value) for value in row[1:])]
                for model, scores in entries for protocol, _ in PROTOCOLS
                for row in breakdown_rows(scores, protocol, columns)]
        parts += ["", f"## {name}: accuracy per split and category (%)", "",
                  *_markdown(["model", "split", "protocol", *(title for title, _, _ in columns)], rows, text=3)]
    return "\n".join(part for part in parts if part is not None) + "\n"


def _markdown(headers: list[str], rows: list[list[str]], text: int = 1) -> list[str]:
    """A markdown table whose first `text` columns are left-aligned and the rest (figures) right-aligned."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(["---"] * text + ["---:"] * (len(headers) - text)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_csv(models: list[dict], robustness: str | tuple = "published") -> str:
    """One row per model: `model`, the benchmarks (VLMEvalKit protocol), the same with ` (aloe)`, then the
    robustness cells (`cls Base`, ...) and the same with ` (aloe)`."""
    headers, rows, adv_headers, adv_rows = table_rows(models, "vlmevalkit", robustness)
    _, aloe_rows, _, aloe_adv_rows = table_rows(models, "aloe", robustness)
    adversarial = {row[0]: row[1:] for row in adv_rows}
    aloe_adversarial = {row[0]: row[1:] for row in aloe_adv_rows}
    blank = ["-"] * (len(adv_headers) - 1)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers + [f"{name} (aloe)" for name in headers[1:]] + adv_headers[1:]
                    + [f"{name} (aloe)" for name in adv_headers[1:]])
    for row, aloe_row in zip(rows, aloe_rows):
        writer.writerow(row + aloe_row[1:] + adversarial.get(row[0], blank) + aloe_adversarial.get(row[0], blank))
    return buffer.getvalue()


def render_acc_csv(scores: dict) -> str:
    """A benchmark's breakdown like VLMEvalKit's `_acc.csv`: `protocol, split, Overall, <l2-categories>,
    <categories>`, one row per protocol and split, accuracy in percent as stored (empty: not measured)."""
    columns = breakdown_columns([scores])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["protocol", "split", *(title for title, _, _ in columns)])
    for protocol, _ in PROTOCOLS:
        for row in breakdown_rows(scores, protocol, columns):
            writer.writerow([protocol, row[0], *("" if value is None else value for value in row[1:])])
    return buffer.getvalue()


def write_tables(folder: Path, robustness: str | tuple = "published") -> list[dict]:
    """results.md and results.csv of every model in the folder, and `<model>/<benchmark>/acc.csv` for each
    benchmark with a breakdown whose predictions folder is there; all written together, or none."""
    folder = Path(folder)
    models = collect_scores(folder)
    files = {folder / "results.md": render_markdown(models, robustness).encode("utf-8"),
             folder / "results.csv": render_csv(models, robustness).encode("utf-8")}
    for path in sorted(folder.glob(f"*/{SCORES_FILE}")):
        for name, scores in load_scores(path)["benchmarks"].items():
            if _has_breakdown(scores) and (path.parent / name).is_dir():
                files[path.parent / name / ACC_FILE] = render_acc_csv(scores).encode("utf-8")
    write_atomic_many(files)
    return models


__all__ = ["ACC_FILE", "PREDICTIONS_FILE", "SCORES_FILE", "benchmark_columns",
           "breakdown_columns", "breakdown_rows", "collect_scores", "folder_name", "headline", "load_scores",
           "parse_robustness_columns", "read_prediction_lines", "render_acc_csv", "render_csv", "render_markdown",
           "robustness_columns", "save_scores", "table_rows", "write_tables", "write_text_atomic"]
