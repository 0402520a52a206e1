"""The wrong answer a perturbation pushes.

In order of preference:
1. the record's own options (`meta.options`, or a top-level `options`, as
   {letter: text} or a list): a wrong option, never the correct one, which the
   answer names by letter or by text;
2. a yes/no question (the answer is "yes"/"no", alone or followed by
   punctuation): the opposite;
3. another answer of the same source, preferring answers to the same question.

Answers are compared and pooled as words: grounding markup (the regions
`ground_record` appends) is dropped, and an answer that is only regions is not
pooled.

The pool behind 3 is a set: the pick depends on which answers it holds, not
on the order they were added, so build it once from the whole input (not
from one shard) when shards must agree. Every pick draws from a generator
derived from the seed and the record key only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from aloe_cli.data.grounding import without_grounding
from aloe_cli.data.records import text_of
from aloe_cli.errors import RecordError
from aloe_cli.perturb.keys import record_key, record_rng
from aloe_cli.perturb.text import question_of

YES, NO = "yes", "no"
_LETTER = re.compile(r"^\(?([A-Za-z])\)?[.:)]?$")
_YES_NO = re.compile(r"^\s*(yes|no)\s*(?:$|[.,;:!])", re.IGNORECASE)
_NOT_WORD = re.compile(r"[\W_]+")


def normalized(text: str) -> str:
    """Case, punctuation and spacing do not make two answers different."""
    return _NOT_WORD.sub(" ", text.casefold()).strip()


def target_answer(record: dict) -> str | None:
    """The final assistant turn's text (the answer that stays correct), or None."""
    messages = record.get("messages") or []
    if not messages or messages[-1].get("role") != "assistant":
        return None
    return text_of(messages[-1]).strip() or None


def record_options(record: dict) -> dict[str, str]:
    """{letter: text} from `meta.options` or `options`; empty when the record has none."""
    meta = record.get("meta")
    options = meta.get("options") if isinstance(meta, dict) else None
    if options is None:
        options = record.get("options")
    if isinstance(options, (list, tuple)):
        options = {chr(ord("A") + i): value for i, value in enumerate(options)}
    if not isinstance(options, dict):
        return {}
    return {str(letter).strip().upper(): str(text).strip() for letter, text in options.items()
            if text is not None and str(text).strip() not in ("", "nan")}


def option_letter(answer: str, options: dict[str, str]) -> str | None:
    """The option an answer names, by letter ("B", "(B)", "B.") or by its text; None if neither."""
    match = _LETTER.match(answer.strip())
    if match and match.group(1).upper() in options:
        return match.group(1).upper()
    wanted = normalized(answer)
    found = [letter for letter, text in options.items() if normalized(text) == wanted]
    return found[0] if len(found) == 1 else None


def yes_no(answer: str) -> str | None:
    """'yes' or 'no' when the answer is one (possibly followed by an explanation), else None."""
    match = _YES_NO.match(answer)
    return match.group(1).lower() if match else None


def opposite(answer: str) -> str:
    """The other of yes/no, capitalised like the answer."""
    flipped = NO if yes_no(answer) == YES else YES
    return flipped.capitalize() if answer.strip()[:1].isupper() else flipped


def answer_text(record: dict) -> str | None:
    """The correct answer in words: a letter becomes its option's text, grounding markup is dropped.

    None when there is no answer, or when it is only regions (a detection answer has no words to push).
    """
    answer = target_answer(record)
    if answer is None:
        return None
    options = record_options(record)
    letter = option_letter(answer, options) if options else None
    return options[letter] if letter else (without_grounding(answer) or None)


class WrongAnswerPicker:
    """Picks a wrong answer for a record; holds the per-source answer pool for records without options."""

    def __init__(self, records: Iterable[dict] = ()):
        self._answers: dict[str, dict[str, str]] = {}  # source -> normalized answer -> its text
        self._by_question: dict[tuple[str, str], set[str]] = {}  # (source, normalized question) -> answers
        for record in records:
            self.add(record)

    def add(self, record: dict) -> None:
        """Add a record's answer to its source's pool (yes/no answers are not pooled: they flip instead).

        Anything but a record (an unreadable line's None) is ignored, so a reader's items can be fed as they come.
        """
        if not isinstance(record, dict):
            return
        answer = answer_text(record)
        if answer is None or yes_no(answer):
            return
        source, key = str(record.get("source") or ""), normalized(answer)
        if not key:
            return
        texts = self._answers.setdefault(source, {})
        texts[key] = min(texts.get(key, answer), answer)  # one spelling per answer, whatever the order
        try:
            question = normalized(question_of(record))
        except RecordError:
            return
        self._by_question.setdefault((source, question), set()).add(key)

    def __len__(self) -> int:
        return sum(len(texts) for texts in self._answers.values())

    def pick(self, record: dict, *, seed: int = 0) -> str:
        """A wrong answer for `record`; RecordError `perturb_no_wrong_answer` when there is none."""
        answer = target_answer(record)
        if answer is None:
            raise RecordError("perturb_no_answer", "the record has no final assistant answer", field="messages")
        rng = record_rng(seed, record_key(record), "wrong-answer")
        options = record_options(record)
        if len(options) >= 2:
            correct = option_letter(answer, options)
            correct_text = normalized(options[correct] if correct else without_grounding(answer))
            wrong = sorted(letter for letter, text in options.items()
                           if letter != correct and normalized(text) != correct_text)
            if wrong:
                return options[rng.choice(wrong)]
        if yes_no(answer):
            return opposite(answer)
        return self._from_pool(record, rng)

    def _from_pool(self, record: dict, rng) -> str:
        source = str(record.get("source") or "")
        texts = self._answers.get(source, {})
        correct = normalized(answer_text(record) or "")
        try:
            same_question = self._by_question.get((source, normalized(question_of(record))), set())
        except RecordError:
            same_question = set()
        for candidates in (same_question, texts.keys()):
            wrong = sorted(key for key in candidates if key != correct)
            if wrong:
                return texts[rng.choice(wrong)]
        raise RecordError("perturb_no_wrong_answer",
                          f"no options, not a yes/no answer, and no other answer of source {source or '(none)'!r} "
                          "to use as the wrong answer")
