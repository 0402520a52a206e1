"""Open-ended answers: reference alternatives, the exact-match fallback, box answers, and how a line says
what scored it.

An open item is scored one of three ways, named on its prediction line as `scored_by`:

- `judge`: `--judge` graded it 0 / 0.5 / 1 (`evaluation.judge`); `correct` and `correct_aloe` both hold the
  grade (null when the judge gave no verdict: unjudged).
- `exact_match` (no `--judge`): **not judged**. `correct` is VLMEvalKit's VQA score and `correct_aloe` the
  exact match, both after VLMEvalKit's answer normalisation (`normalize_answer`), following
  `vlmeval/dataset/utils/vqa_eval.py` and `vlmeval/smp/misc.py` at `vlmevalkit.VLMEVALKIT_COMMIT`, as
  `ImageVQADataset.evaluate_heuristic` applies them to a dataset with no rule of its own:
  the VQA score compares the prediction with each reference in turn against the *other* references,
  min(1, matches / 3), averaged over the references (VQA's leave-one-out accuracy; with a single
  reference there is no other one, so the VQA score is 0 whatever the prediction, as in VLMEvalKit);
  the exact match is 1 when the prediction equals any reference.
- `box_iou`: the reference is one box (Qwen2-VL grounding text `<|box_start|>(x1,y1),(x2,y2)<|box_end|>`
  or a list `[x1, y1, x2, y2]`, both on the 0..1000 grid): the first box in the prediction is right when
  its IoU with the reference box is at least 0.5. Box answers are never sent to the judge.

A reference written as a list literal (`"['red', 'crimson']"`, a JSON list) holds alternatives: any of them
is right (the exact match), the VQA score counts them as the references, and the judge is shown them all.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from aloe_cli.data.grounding import BOX_START, parse_grounding
from aloe_cli.errors import RecordError
from aloe_cli.evaluation.vlmevalkit import process_punctuation
from aloe_cli.perturb.geometry import iou

JUDGE, EXACT_MATCH, BOX_IOU = "judge", "exact_match", "box_iou"
SCORED_BY = (JUDGE, EXACT_MATCH, BOX_IOU)
IOU_THRESHOLD = 0.5
GRADES = (0.0, 0.5, 1.0)

# ----------------------------------------------------------------------------- reference answers

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_LIST_BOX = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")


def _literal_list(text: str) -> list | None:
    """The list a bracketed answer spells (Python or JSON literal), else None."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    for parse in (ast.literal_eval, json.loads):
        try:
            value = parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        return value if isinstance(value, list) else None
    return None


def reference_box(answer: str) -> tuple[float, ...] | None:
    """The reference box of a detection answer (grounding text with one box, or `[x1, y1, x2, y2]`), else None."""
    if BOX_START in answer:
        boxes = parse_grounding(answer)
        return tuple(float(v) for v in boxes[0].box) if len(boxes) == 1 else None
    value = _literal_list(answer)
    if value is not None and len(value) == 4 and all(_is_number(v) for v in value):
        return tuple(float(v) for v in value)
    return None


def predicted_box(prediction: str) -> tuple[float, ...] | None:
    """The first box of a model's answer: grounding text (or bare corner pairs), else `[x1, y1, x2, y2]`."""
    boxes = parse_grounding(prediction)
    if boxes:
        return tuple(float(v) for v in boxes[0].box)
    match = _LIST_BOX.search(prediction)
    return tuple(float(v) for v in match.groups()) if match else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def alternatives(answer: str) -> list[str]:
    """The answers that count as right: a list literal's entries (repeats kept: the VQA score counts how many
    references agree), else the answer itself."""
    if reference_box(answer) is not None:
        return [answer]
    value = _literal_list(answer)
    entries = [str(v) for v in value if v is not None] if value else []
    return entries or [answer]


def judge_reference(answer: str) -> str:
    """The reference as the judge reads it: alternatives are listed, any of them right."""
    options = list(dict.fromkeys(option.strip() for option in alternatives(answer) if option.strip()))
    if len(options) <= 1:
        return options[0] if options else answer
    return "any one of these is correct: " + "; ".join(json.dumps(option, ensure_ascii=False) for option in options)


# ----------------------------------------------------------------------------- VLMEvalKit's normalisation

_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
# Contractions, spelled right; the same word with any one apostrophe left out is read as it.
_CONTRACTIONS = (
    "'ow's'at", "'twas", "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't",
    "don't", "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's",
    "isn't", "it'd", "it'd've", "it'll", "ma'am", "might've", "mightn't", "mightn't've", "must've", "mustn't",
    "needn't", "not've", "o'clock", "oughtn't", "shan't", "she'd've", "should've", "shouldn't", "shouldn't've",
    "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll", "someone's",
    "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've", "there're", "there's",
    "they'd", "they'd've", "they'll", "they're", "they've", "wasn't", "we'd've", "we've", "weren't", "what'll",
    "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've", "who'll",
    "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all",
    "y'all'd've", "y'all'll", "you'd", "you'd've", "you'll", "you're", "you've")
_SPELLED = {form[:i] + form[i + 1:]: form for form in _CONTRACTIONS for i, c in enumerate(form) if c == "'"}
_SPELLED["somebody'd"] = "somebodyd"  # the reference table maps this one the wrong way round; kept for parity


def _words(text: str) -> str:
    """Lower case; number words one to ten (and none) as digits; no articles; contractions spelled out."""
    kept = [word for word in (_NUMBER_WORDS.get(w, w) for w in text.lower().split()) if word not in _ARTICLES]
    return " ".join(_SPELLED.get(word, word) for word in kept)


def normalize_answer(text: str) -> str:
    """An answer as VLMEvalKit compares open answers (its `process_answer`)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _words(process_punctuation(text))


def vqa_score(references: list[str], prediction: str) -> float:
    """VLMEvalKit's default VQA score: for each reference, how many of the others equal the prediction, over
    three (at most 1); the mean over the references."""
    gold = [normalize_answer(reference) for reference in references]
    predicted = normalize_answer(prediction)
    per_reference = [min(1.0, sum(1 for j, other in enumerate(gold) if j != i and other == predicted) / 3)
                     for i in range(len(gold))]
    return sum(per_reference) / len(per_reference) if per_reference else 0.0


def exact_match(references: list[str], prediction: str) -> bool:
    """Whether the normalised prediction equals any normalised reference (an empty answer never does)."""
    predicted = normalize_answer(prediction)
    return bool(predicted) and any(normalize_answer(reference) == predicted for reference in references)


# ----------------------------------------------------------------------------- prediction lines

def open_verdict(answer: str, prediction: str | None) -> dict:
    """An open item's verdict without a judge: box IoU for a box reference, else the exact-match fallback."""
    prediction = prediction if isinstance(prediction, str) else ""
    extracted = prediction.strip() or None
    box = reference_box(answer)
    if box is not None:
        predicted = predicted_box(prediction)
        overlap = iou(box, predicted) if predicted is not None and _valid(predicted) else 0.0
        right = overlap >= IOU_THRESHOLD
        return {"extracted": extracted, "correct": right, "correct_aloe": right, "scored_by": BOX_IOU,
                "iou": round(overlap, 4)}
    references = alternatives(answer)
    return {"extracted": extracted, "correct": vqa_score(references, prediction),
            "correct_aloe": exact_match(references, prediction), "scored_by": EXACT_MATCH}


def _valid(box: tuple[float, ...]) -> bool:
    return box[2] > box[0] and box[3] > box[1]


def judged(score: float | None) -> dict:
    """The line fields of a judge's grade (None: no verdict, the item is unjudged)."""
    return {"correct": score, "correct_aloe": score, "scored_by": JUDGE}


def judge_value(value: Any) -> float | None:
    """A stored judge grade: 0, 0.5 or 1 (booleans as 1/0); None when unjudged."""
    if value is None:
        return None
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)) and float(value) in GRADES:
        return float(value)
    raise RecordError("invalid_field", f"must be true/false, 0, 0.5, 1 or null, got {value!r}", field="correct")


def rescore_open(line: dict) -> dict:
    """An open line's verdict from its fields: a judge's grade is kept (the line has a `judge` verdict, says
    `scored_by: judge`, or carries a grade and says nothing), everything else is scored again. The grade is
    the one aloe's verdict holds (`correct_aloe`; `correct` may hold VLMEvalKit's own rule, as for MMMU)."""
    scored_by = line.get("scored_by")
    if scored_by is not None and scored_by not in SCORED_BY:
        raise RecordError("invalid_field", f"must be one of {', '.join(SCORED_BY)}, got {scored_by!r}",
                          field="scored_by")
    verdict = line.get("judge") if isinstance(line.get("judge"), dict) else None
    stored = line.get("correct_aloe", line.get("correct"))
    if verdict is not None or scored_by == JUDGE or (scored_by is None and stored is not None):
        grade = verdict.get("score") if verdict is not None else stored
        prediction = line["prediction"] if isinstance(line["prediction"], str) else ""
        return {"extracted": prediction.strip() or None, **judged(judge_value(grade))}
    return open_verdict(str(line["answer"]), line["prediction"])


def open_value(line: dict, value: Any, name: str = "correct") -> float | None:
    """An open line's verdict `value` (its `correct` or `correct_aloe`) as a number in 0..1; None when
    unjudged. Without a judge it may be any score in 0..1 (the VQA score); a judge's is 0, 0.5 or 1."""
    if line.get("scored_by") in (EXACT_MATCH, BOX_IOU):
        if value is None:
            return None
        if isinstance(value, bool) or (isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0):
            return float(value)
        raise RecordError("invalid_field", f"must be a score between 0 and 1, got {value!r}", field=name)
    return judge_value(value)


def scored_by_counts(lines: list[dict]) -> dict[str, int]:
    """How many open lines each way scored (`exact_match` ones were not judged)."""
    counts: dict[str, int] = {}
    for line in lines:
        if line.get("kind") == "open":
            key = line.get("scored_by") or JUDGE
            counts[key] = counts.get(key, 0) + 1
    return counts


__all__ = ["BOX_IOU", "EXACT_MATCH", "JUDGE", "alternatives", "exact_match", "judge_reference",
           "judge_value", "judged", "normalize_answer", "open_value", "open_verdict", "predicted_box",
           "reference_box", "rescore_open", "scored_by_counts", "vqa_score"]
