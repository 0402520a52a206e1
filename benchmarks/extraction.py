"""Benchmark: answer extraction vs exact matching on realistic model answers.

Runs aloe's extraction and a VLMEvalKit-style rule-based matcher (aloe_cli/testing/exact_matching.py) over
the hand-labelled answers of tests/extraction_cases.py and prints, for each, how many answers come out
right, wrong and unanswered against the reference, and how many disagree with what a careful reader takes
from the answer (the hand label).

    python benchmarks/extraction.py
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from extraction_cases import CHOICE_CASES, YESNO_CASES  # noqa: E402

from aloe_cli.evaluation.extraction import extract_choice, extract_yesno  # noqa: E402
from aloe_cli.testing.exact_matching import baseline_choice, baseline_yesno  # noqa: E402


def outcomes(choice, yesno) -> tuple[list, list]:
    """(extracted, reference) and (extracted, hand label) pairs over every case."""
    against_reference = ([(choice(out, opts), ref) for opts, ref, out, _ in CHOICE_CASES]
                         + [(yesno(out), ref) for ref, out, _ in YESNO_CASES])
    hand = [exp for _, _, _, exp in CHOICE_CASES] + [exp for _, _, exp in YESNO_CASES]
    return against_reference, [(got, want) for (got, _), want in zip(against_reference, hand)]


def tally(pairs) -> Counter:
    counts = Counter()
    for got, reference in pairs:
        counts["unanswered" if got is None else "right" if got == reference else "wrong"] += 1
    return counts


def main() -> int:
    print(f"{len(CHOICE_CASES)} multiple-choice + {len(YESNO_CASES)} yes/no answers")
    print(f"{'':34}{'right':>7}{'wrong':>7}{'unanswered':>12}{'misread':>9}{'guessed':>9}")
    misreads = {}
    for name, choice, yesno in (("aloe extraction", lambda o, p: extract_choice(o, p).value,
                                 lambda o: extract_yesno(o).value),
                                ("VLMEvalKit-style exact matching", baseline_choice, baseline_yesno)):
        against_reference, against_reader = outcomes(choice, yesno)
        counts = tally(against_reference)
        misread = sum(1 for got, want in against_reader if got != want)
        guessed = sum(1 for got, want in against_reader if got is not None and want is None)
        misreads[name] = misread
        print(f"{name:34}{counts['right']:>7}{counts['wrong']:>7}{counts['unanswered']:>12}{misread:>9}{guessed:>9}")
    ours, baseline = misreads.values()
    print(f"misread answers: {baseline} with exact matching vs {ours} with aloe's extraction")
    return 0


if __name__ == "__main__":
    sys.exit(main())
