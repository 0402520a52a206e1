"""Rules that grade the demo task from what a judge is shown: the prompt, the answer and the pixels.

A stand-in for an LVLM judge needs the truth of every training sample without peeking at how it was
made, so it reads it back: the lesion is the bright blob (`locate_lesion`), the object's colour and
shape come from its pixels (`read_object`), text answers from the fact table or the arithmetic in
the question. `check_sample` then says whether a training sample's answer is right, and why not:
planted wrong and empty answers fail it, everything else the generator writes passes
(tests/test_demo_task.py). `grade_open` grades an open-ended prediction against its reference on
the evaluation judge's 0 / 0.5 / 1 scale (a box by its overlap, words by the answer they name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image

from aloe_cli.data.grounding import grounding_to_pixels, parse_grounding
from aloe_cli.demo.images import COLOURS, QUADRANTS, SHAPES, lesion_quadrant, locate_lesion, read_object
from aloe_cli.demo.task import (
    COLOUR_OPTIONS,
    COLOUR_QUESTION,
    DETECT_QUESTION,
    LETTERS,
    LOCATION_QUESTION,
    MED_FACTS,
    NO,
    PRESENCE_QUESTION,
    QUADRANT_QUESTION,
    SHAPE_QUESTION,
    YES,
)
from aloe_cli.perturb.geometry import iou

MIN_IOU = 0.5
_ARITHMETIC = re.compile(r"What is (\d+) (plus|minus) (\d+)\?")


@dataclass(frozen=True)
class Verdict:
    """Whether an answer is right; `reason` says why not (or what could not be judged)."""

    correct: bool | None  # None: the rule does not know this question
    reason: str

    @property
    def score(self) -> int | None:
        """On the judge's 1-5 scale: right answers 5, wrong or empty ones 1."""
        return None if self.correct is None else 5 if self.correct else 1


def _right(reason: str = "answer matches the image") -> Verdict:
    return Verdict(True, reason)


def _wrong(expected: str, answer: str) -> Verdict:
    return Verdict(False, f"expected {expected!r}, got {answer!r}")


def _letter(answer: str) -> str | None:
    text = answer.strip()
    return text[0] if text and text[0] in LETTERS and (len(text) == 1 or not text[1].isalpha()) else None


def _words(answer: str, vocabulary) -> list[str]:
    """The vocabulary entries an answer names, as whole words ("gallbladder" does not name "bladder")."""
    lower = answer.lower()
    found = [w for w in vocabulary if re.search(rf"\b{re.escape(w.lower())}\b", lower)]
    return [w for w in found if not any(w != other and w.lower() in other.lower() for other in found)]


def check_sample(prompt: str, answer: str, image: Image.Image | None) -> Verdict:
    """Grade one question-answer sample of the demo task (hints in the prompt are ignored)."""
    if not answer.strip():
        return Verdict(False, "empty answer")
    if QUADRANT_QUESTION in prompt or LOCATION_QUESTION in prompt or DETECT_QUESTION in prompt \
            or PRESENCE_QUESTION in prompt:
        if image is None:
            return Verdict(None, "a lesion question without an image")
        return _check_lesion(prompt, answer, image)
    if COLOUR_QUESTION in prompt or SHAPE_QUESTION in prompt:
        seen = read_object(image) if image is not None else None
        if seen is None:
            return Verdict(None, "no object in the image")
        if COLOUR_QUESTION in prompt:
            letter = list(COLOUR_OPTIONS)[list(COLOURS).index(seen[0])]
            return _right() if _letter(answer) == letter else _wrong(letter, answer)
        return _right() if _words(answer, SHAPES) == [seen[1]] else _wrong(seen[1], answer)
    for question, fact in MED_FACTS.items():
        if question in prompt:
            named = _words(answer, set(MED_FACTS.values()))
            return _right("answer matches the fact") if fact in named and len(named) == 1 else _wrong(fact, answer)
    match = _ARITHMETIC.search(prompt)
    if match:
        a, op, b = int(match[1]), match[2], int(match[3])
        value = str(a + b if op == "plus" else a - b)
        return _right("answer is the result") if answer.strip().rstrip(".") == value else _wrong(value, answer)
    return Verdict(None, "not a question of the demo task")


def _check_lesion(prompt: str, answer: str, image: Image.Image) -> Verdict:
    box = locate_lesion(image)
    quadrant = lesion_quadrant(image)
    if PRESENCE_QUESTION in prompt:
        expected = NO if box is None else YES
        return _right() if answer.strip().lower().startswith(expected.lower()) else _wrong(expected, answer)
    if box is None:
        return Verdict(False, "the image shows no lesion")
    if QUADRANT_QUESTION in prompt:
        letter = LETTERS[QUADRANTS.index(quadrant)]
        return _right() if _letter(answer) == letter else _wrong(letter, answer)
    if LOCATION_QUESTION in prompt:
        return _right() if _words(answer, QUADRANTS) == [quadrant] else _wrong(quadrant, answer)
    boxes = parse_grounding(answer)
    if len(boxes) != 1:
        return Verdict(False, f"expected one box, got {len(boxes)}")
    overlap = iou(grounding_to_pixels(boxes[0].box, image.width, image.height), box)
    return _right() if overlap >= MIN_IOU else Verdict(False, f"box overlaps the lesion by IoU {overlap:.2f}")


def _answer_words() -> tuple[str, ...]:
    return (*QUADRANTS, *SHAPES, *COLOURS, *MED_FACTS.values())


def grade_open(reference: str, prediction: str) -> float:
    """An open-ended prediction against its reference: 1 right, 0.5 half right, 0 wrong.

    A box reference: 1 when the prediction holds exactly one box overlapping it by IoU >= 0.5, 0.5
    for one box at IoU >= 0.25. A word reference: 1 when the prediction names it and no other answer
    of the task. A number: 1 when the prediction is that number.
    """
    reference_boxes = parse_grounding(reference)
    if reference_boxes:
        boxes = parse_grounding(prediction)
        if len(boxes) != 1:
            return 0.0
        overlap = iou(boxes[0].box, reference_boxes[0].box)
        return 1.0 if overlap >= MIN_IOU else 0.5 if overlap >= MIN_IOU / 2 else 0.0
    if reference.strip().isdigit():
        return 1.0 if prediction.strip().rstrip(".") == reference.strip() else 0.0
    named = _words(prediction, {*_answer_words(), reference})
    return 1.0 if [word.lower() for word in named] == [reference.lower()] else 0.0

