"""Prediction lines -> correctness -> scores.

A prediction line (DESIGN.md, "Evaluation output") holds the item (`id, benchmark, kind, question,
options, answer`, breakdown fields), the raw `prediction`, what was `extracted` from it, and `correct`:
true/false for mcq and yes/no; for open items the judge's 0 / 0.5 / 1 (null when unjudged), or, without a
judge, a score from exact matching, or a box's IoU verdict (`scored_by`, `evaluation.open_answers`). Lines are
the source of truth: `rescore_line` recomputes `extracted` and `correct` from `prediction` with the
current rules, and `benchmark_scores` computes every figure from lines alone.

Accuracy is the mean of `correct` over the unperturbed lines, in percent; unanswered items count as
wrong, unjudged open items are left out of the mean and counted. Items sharing a `pair_id` also get a
paired accuracy (a pair counts only if all of its items are right), which is the benchmark's headline
figure when it has pairs (ProbMed's convention).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from aloe_cli.errors import RecordError
from aloe_cli.evaluation.extraction import extract_choice, extract_yesno, normalize_yesno
from aloe_cli.evaluation.open_answers import judge_value, open_value, rescore_open, scored_by_counts
from aloe_cli.perturb.names import EVAL_NAMES

REQUIRED = ("id", "benchmark", "kind", "answer", "prediction")


def score_prediction(kind: str, prediction: str | None, answer: str, options: dict | None) -> dict:
    """`extracted`, `correct` and the extraction `rule` for an mcq or yes/no prediction."""
    if kind == "mcq":
        extraction = extract_choice(prediction, options or {})
        return {"extracted": extraction.value, "correct": extraction.value == str(answer).strip().upper(),
                "rule": extraction.rule}
    extraction = extract_yesno(prediction)
    return {"extracted": extraction.value, "correct": extraction.value == normalize_yesno(answer),
            "rule": extraction.rule}


def rescore_line(line: dict) -> dict:
    """The line with `extracted` and `correct` recomputed from `prediction` (open items keep their grade)."""
    if not isinstance(line, dict):
        raise RecordError("invalid_record", "expected a JSON object")
    for name in REQUIRED:
        if name not in line:
            raise RecordError("missing_field", "missing (a prediction line needs id, benchmark, kind, answer, "
                              "prediction)", field=name)
    kind = line["kind"]
    prediction = line["prediction"] if isinstance(line["prediction"], str) else None
    if kind == "open":  # judged, exact-matched or box-scored: evaluation.open_answers
        return {**line, **rescore_open(line)}
    if kind == "mcq":
        options = line.get("options")
        if not isinstance(options, dict) or not options:
            raise RecordError("invalid_field", "an mcq line needs options {letter: text}", field="options")
        if str(line["answer"]).strip().upper() not in {key.upper() for key in options}:
            raise RecordError("invalid_answer", f"answer {line['answer']!r} is not one of the options "
                              f"{', '.join(options)}", field="answer")
    elif kind == "yesno":
        if normalize_yesno(line["answer"]) is None:
            raise RecordError("invalid_answer", f"needs yes or no, got {line['answer']!r}", field="answer")
    else:
        raise RecordError("invalid_field", f"must be mcq, yesno or open, got {kind!r}", field="kind")
    return {**line, **score_prediction(kind, prediction, line["answer"], line.get("options"))}


def _value(line: dict) -> float | None:
    correct = line.get("correct")
    if line.get("kind") == "open":
        return open_value(line)
    return None if correct is None else (1.0 if correct is True or correct == 1 else 0.0)


def _percent(values: list[float]) -> float | None:
    return round(100.0 * sum(values) / len(values), 2) if values else None


def _accuracy(lines: list[dict]) -> dict:
    values = [v for v in (_value(line) for line in lines) if v is not None]
    return {"items": len(lines), "accuracy": _percent(values)}


def perturbation_of(line: dict) -> str:
    return line.get("perturb") or "base"


def benchmark_scores(lines: Iterable[dict]) -> dict:
    """Every figure of one benchmark from its prediction lines."""
    lines = list(lines)
    base = [line for line in lines if perturbation_of(line) == "base"]
    judged = [line for line in base if _value(line) is not None]
    scores: dict[str, Any] = {
        **_accuracy(base),
        "kinds": _counts(line.get("kind") for line in base),
        "unanswered": sum(1 for line in base if line.get("kind") != "open" and line.get("extracted") is None),
        "unjudged": sum(1 for line in base if line.get("kind") == "open" and _value(line) is None),
        "judged": len(judged),
    }
    if any(line.get("kind") == "open" for line in base):
        scores["scored_by"] = scored_by_counts(base)  # exact_match: open items that were not judged
    pairs = _pairs(base)
    if pairs is not None:
        scores["pairs"] = pairs
    scores["main"] = pairs["accuracy"] if pairs is not None else scores["accuracy"]
    for field_name, key in (("category", "categories"), ("l2_category", "l2_categories")):
        groups = _group(base, field_name)
        if groups:
            scores[key] = {name: _accuracy(group) for name, group in groups.items()}
    by_perturbation = _group(lines, None)
    if set(by_perturbation) != {"base"}:
        scores["perturbations"] = {kind: _accuracy(group) for kind, group in by_perturbation.items()}
    # every item has a task (given or inferred): the robustness figures are for runs that perturbed
    tasks = _group([line for line in lines if line.get("task")], "task") if "perturbations" in scores else {}
    if tasks:
        scores["robustness"] = {task: {kind: _accuracy(group) for kind, group in _group(task_lines, None).items()}
                                for task, task_lines in tasks.items()}
    return scores


def _counts(values: Iterable[Any]) -> dict:
    counts: dict = defaultdict(int)
    for value in values:
        counts[value] += 1
    return dict(counts)


def _group(lines: list[dict], field_name: str | None) -> dict[str, list[dict]]:
    """Lines by a field's value (None: by perturbation, in the published order)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        key = perturbation_of(line) if field_name is None else line.get(field_name)
        if key not in (None, ""):
            groups[str(key)].append(line)
    if field_name is None:
        order = {kind: position for position, kind in enumerate(EVAL_NAMES)}
        return dict(sorted(groups.items(), key=lambda entry: order.get(entry[0], len(order))))
    return dict(groups)


def _pairs(lines: list[dict]) -> dict | None:
    groups = _group(lines, "pair_id")
    if not groups:
        return None
    results = []
    for group in groups.values():
        values = [_value(line) for line in group]
        if any(value is None for value in values):
            continue  # a pair with an unjudged item is left out, like the item
        results.append(1.0 if all(value == 1.0 for value in values) else 0.0)
    return {"count": len(groups), "accuracy": _percent(results)}


__all__ = ["benchmark_scores", "judge_value", "perturbation_of",
           "rescore_line", "score_prediction"]
