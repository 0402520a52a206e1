"""The answer matching common evaluation kits use, as a baseline for `aloe_cli.evaluation.extraction`.

Written from the documented behaviour of VLMEvalKit's rule-based matching (no LLM fallback):
- multiple choice: punctuation `.()[],:;!*#{}` becomes spaces and the answer is split into words; if
  exactly one option letter is among the words it is the answer (but never when the word "A" is there
  and the answer has more than three words, since "A" may be an article); otherwise, if exactly one
  option's text occurs in the lower-cased answer, that option; else no answer.
- yes/no: the lower-cased words of the answer; "yes" without "no" is Yes, "no" without "yes" is No,
  anything else is no answer.
Used only to measure how many realistic answers such matching misreads (`benchmarks/extraction.py`).
"""

from __future__ import annotations

from collections.abc import Mapping

_PUNCTUATION = ".()[],:;!*#{}"


def baseline_choice(answer: str, options: Mapping[str, str]) -> str | None:
    text = answer
    for char in _PUNCTUATION:
        text = text.replace(char, " ")
    words = text.split()
    found = [letter for letter in options if letter in words]
    if len(found) == 1:
        if "A" in words and len(words) > 3:
            return None
        return found[0]
    lowered = answer.lower()
    by_text = [letter for letter, option in options.items() if str(option).lower() in lowered]
    return by_text[0] if len(by_text) == 1 else None


def baseline_yesno(answer: str) -> str | None:
    text = answer.lower()
    for char in _PUNCTUATION + "'\"":
        text = text.replace(char, " ")
    words = text.split()
    if "yes" in words and "no" not in words:
        return "yes"
    if "no" in words and "yes" not in words:
        return "no"
    return None
