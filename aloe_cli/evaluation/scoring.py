"""Prediction lines -> correctness under both protocols -> scores.

A prediction line (DESIGN.md, "Evaluation output") holds the item (`id, benchmark, kind, question,
options, answer`, breakdown fields), the raw `prediction`, the `protocol` whose prompt was sent, and two
verdicts on the same answer, whatever prompt was sent:
- `extracted`, `correct`: VLMEvalKit's exact matching (`aloe_cli.evaluation.vlmevalkit`), on the fields as
  VLMEvalKit reads them (kept on the line under `vlmevalkit`: {dataset, options, answer}); `extracted` is
  null when those rules cannot read the answer;
- `extracted_aloe`, `correct_aloe`, `rule`: aloe's extraction (`aloe_cli.evaluation.extraction`).
Open items (`aloe_cli.evaluation.open_answers`, which `scored_by` names) carry the judge's 0 / 0.5 / 1 (null
when unjudged) in both, or, without a judge, VLMEvalKit's VQA score in `correct` and the exact match in
`correct_aloe` (not judged), or a box answer's IoU verdict in both. Lines are the source of truth:
`rescore_line` recomputes both verdicts from `prediction`, `benchmark_scores` every figure from lines alone.

Accuracy is the mean of `correct` (`accuracy`) or `correct_aloe` (`accuracy_aloe`) over the unperturbed
lines, in percent; unread answers count as wrong, unjudged open items are left out of the mean and
counted. Breakdowns follow VLMEvalKit's `report_acc`: per category, l2-category and split (a benchmark
without splits is the one split `none`). Items sharing a `pair_id` also get a paired accuracy (a pair
counts only if all of its items are right), the benchmark's headline figure (`main`, `main_aloe`) when it
has pairs (ProbMed's convention).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from aloe_cli.errors import RecordError
from aloe_cli.evaluation import vlmevalkit
from aloe_cli.evaluation.extraction import extract_choice, extract_yesno, normalize_yesno
from aloe_cli.evaluation.open_answers import judge_value, open_value, rescore_open, scored_by_counts
from aloe_cli.perturb.names import EVAL_NAMES

REQUIRED = ("id", "benchmark", "kind", "answer", "prediction")


def vlmevalkit_view(kind: str, answer: str, options: dict | None, dataset: str | None = None) -> dict:
    """A line's `vlmevalkit` entry for an item known only by aloe's fields (the letter or Yes/No, the options)."""
    view: dict[str, Any] = {"dataset": dataset, "answer": answer.capitalize() if kind == "yesno" else answer}
    if kind == "mcq":
        view["options"] = {letter: text for letter, text in (options or {}).items() if vlmevalkit.na_cell(text)}
    return view


def score_prediction(kind: str, prediction: str | None, answer: str, options: dict | None,
                     view: dict | None = None) -> dict:
    """Both verdicts on an mcq or yes/no prediction: `extracted`, `correct` (VLMEvalKit's rules, on `view`,
    the fields as VLMEvalKit holds them) and `extracted_aloe`, `correct_aloe`, `rule` (aloe's)."""
    view = view or vlmevalkit_view(kind, answer, options)
    dataset = view.get("dataset")
    if kind == "mcq":
        theirs = vlmevalkit.mcq_verdict(prediction, view.get("options") or {}, view.get("answer"), dataset)
        ours = extract_choice(prediction, options or {})
        correct_aloe = ours.value == str(answer).strip().upper()
    else:
        if vlmevalkit.reformulates_open(dataset):  # MMMU scores a question without options as a choice
            theirs = vlmevalkit.mmmu_open_verdict(prediction, view.get("answer"))
        else:
            theirs = vlmevalkit.yesno_verdict(prediction, view.get("answer"), dataset)
        ours = extract_yesno(prediction)
        correct_aloe = ours.value == normalize_yesno(answer)
    return {"extracted": theirs.extracted, "correct": theirs.correct, "extracted_aloe": ours.value,
            "correct_aloe": correct_aloe, "rule": ours.rule}


def score_open(prediction: str | None, view: dict) -> dict | None:
    """VLMEvalKit's exact-matching verdict on an open item, where it has one (MMMU's questions without options);
    None elsewhere (open items are graded by the judge under both protocols)."""
    if not vlmevalkit.reformulates_open(view.get("dataset")):
        return None
    verdict = vlmevalkit.mmmu_open_verdict(prediction, view.get("answer"))
    return {"extracted": verdict.extracted, "correct": verdict.correct}


def rescore_line(line: dict) -> dict:
    """The line with both verdicts recomputed from `prediction` (open items keep their grade)."""
    if not isinstance(line, dict):
        raise RecordError("invalid_record", "expected a JSON object")
    for name in REQUIRED:
        if name not in line:
            raise RecordError("missing_field", "missing (a prediction line needs id, benchmark, kind, answer, "
                              "prediction)", field=name)
    kind = line["kind"]
    prediction = line["prediction"] if isinstance(line["prediction"], str) else None
    if kind == "open":  # judged, exact-matched or box-scored: evaluation.open_answers
        scored = {**line, **rescore_open(line)}
        scored["extracted_aloe"] = scored["extracted"]
        view = line.get("vlmevalkit")
        theirs = score_open(prediction, view) if isinstance(view, dict) else None
        return {**scored, **theirs} if theirs is not None else scored
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
    view = line.get("vlmevalkit")
    if view is not None and not (isinstance(view, dict) and isinstance(view.get("options", {}), dict)):
        raise RecordError("invalid_field", "must be an object {dataset, options, answer}", field="vlmevalkit")
    return {**line, **score_prediction(kind, prediction, line["answer"], line.get("options"), view)}


def _value(line: dict, key: str = "correct") -> float | None:
    correct = line.get(key, line.get("correct"))  # a line of another tool may carry one verdict only
    if line.get("kind") == "open":
        return open_value(line, correct, key)
    return None if correct is None else (1.0 if correct is True or correct == 1 else 0.0)


def _percent(values: list[float]) -> float | None:
    return round(100.0 * sum(values) / len(values), 2) if values else None


def _accuracy(lines: list[dict]) -> dict:
    """Items and accuracy under both protocols."""
    figures: dict[str, Any] = {"items": len(lines)}
    for key, name in (("correct", "accuracy"), ("correct_aloe", "accuracy_aloe")):
        figures[name] = _percent([v for v in (_value(line, key) for line in lines) if v is not None])
    return figures


def _breakdowns(lines: list[dict]) -> dict:
    """`categories` and `l2_categories` of some lines (only those the lines have)."""
    result = {}
    for field_name, key in (("category", "categories"), ("l2_category", "l2_categories")):
        groups = _group(lines, field_name)
        if groups:
            result[key] = {name: _accuracy(group) for name, group in sorted(groups.items())}
    return result


def perturbation_of(line: dict) -> str:
    return line.get("perturb") or "base"


def benchmark_scores(lines: Iterable[dict]) -> dict:
    """Every figure of one benchmark from its prediction lines."""
    lines = list(lines)
    base = [line for line in lines if perturbation_of(line) == "base"]
    judged = [line for line in base if _value(line, "correct_aloe") is not None]
    closed = [line for line in base if line.get("kind") != "open"]
    scores: dict[str, Any] = {
        **_accuracy(base),
        "unreadable": sum(1 for line in closed if line.get("extracted") is None),
        "kinds": _counts(line.get("kind") for line in base),
        "unanswered": sum(1 for line in closed if line.get("extracted_aloe", line.get("extracted")) is None),
        "unjudged": sum(1 for line in base if line.get("kind") == "open" and _value(line, "correct_aloe") is None),
        "judged": len(judged),
    }
    if any(line.get("kind") == "open" for line in base):
        scores["scored_by"] = scored_by_counts(base)  # exact_match: open items that were not judged
    pairs = _pairs(base)
    if pairs is not None:
        scores["pairs"] = pairs
    scores["main"] = pairs["accuracy"] if pairs is not None else scores["accuracy"]
    scores["main_aloe"] = pairs["accuracy_aloe"] if pairs is not None else scores["accuracy_aloe"]
    scores.update(_breakdowns(base))
    splits: dict[str, list[dict]] = defaultdict(list)
    for line in base:
        splits[str(line.get("split") or vlmevalkit.SPLIT_NONE)].append(line)
    scores["splits"] = {name: {**_accuracy(group), **_breakdowns(group)} for name, group in sorted(splits.items())}
    by_perturbation = _group(lines, None)
    if set(by_perturbation) != {"base"}:
        scores["perturbations"] = {kind: _accuracy(group) for kind, group in by_perturbation.items()}
    # every item has a task (given or inferred): the robustness figures are for runs that perturbed
    tasks = _group([line for line in lines if line.get("task")], "task") if "perturbations" in scores else {}
    if tasks:
        scores["robustness"] = {task: {kind: _accuracy(group) for kind, group in _group(task_lines, None).items()}
                                for task, task_lines in tasks.items()}
    protocols = {line.get("protocol") for line in base if line.get("protocol")}
    scores["protocol"] = protocols.pop() if len(protocols) == 1 else ("mixed" if protocols else None)
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
    figures: dict[str, Any] = {"count": len(groups)}
    for key, name in (("correct", "accuracy"), ("correct_aloe", "accuracy_aloe")):
        results = []
        for group in groups.values():
            values = [_value(line, key) for line in group]
            if any(value is None for value in values):
                continue  # a pair with an unjudged item is left out, like the item
            results.append(1.0 if all(value == 1.0 for value in values) else 0.0)
        figures[name] = _percent(results)
    return figures


__all__ = ["benchmark_scores", "judge_value", "perturbation_of",
           "rescore_line", "score_open", "score_prediction", "vlmevalkit_view"]
