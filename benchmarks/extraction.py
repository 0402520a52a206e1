"""Benchmark: aloe's answer extraction vs VLMEvalKit's exact matching, on the same answers.

Scores the same model answers under both protocols of `aloe eval` (`correct`: VLMEvalKit's rules, as
re-implemented in aloe_cli/evaluation/vlmevalkit.py; `correct_aloe`: aloe's extraction) and prints each
one's accuracy and their difference, on two sets:
- the hand-labelled answers of tests/extraction_cases.py, with right / wrong / unread counts and how many
  readings disagree with what a careful reader takes from the answer (the hand label);
- the conformance answers of tests/data/vlmevalkit/ (generated questions and answers).
On both, the VLMEvalKit-rule accuracy is printed beside the figure VLMEvalKit's own code computed for the
same answers (stored in tests/data/vlmevalkit/), and the script fails if they differ.

    python benchmarks/extraction.py
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from extraction_cases import CHOICE_CASES, YESNO_CASES  # noqa: E402

from aloe_cli.evaluation.benchmarks import BenchmarkSpec, read_benchmark  # noqa: E402
from aloe_cli.evaluation.scoring import score_prediction  # noqa: E402
from aloe_cli.evaluation.vlmevalkit import VLMEVALKIT_COMMIT  # noqa: E402

DATA = ROOT / "tests" / "data" / "vlmevalkit"


def hand_labelled() -> list[dict]:
    """Every hand-labelled case scored under both protocols, with its reference and hand label."""
    rows = []
    for options, reference, output, label in CHOICE_CASES:
        view = {"answer": reference, "options": options}
        rows.append({"reference": reference, "label": label,
                     **score_prediction("mcq", output, reference, options, view)})
    for reference, output, label in YESNO_CASES:
        view = {"answer": reference.capitalize()}
        scored = score_prediction("yesno", output, reference, None, view)
        scored["extracted"] = scored["extracted"].lower() if scored["extracted"] else None
        rows.append({"reference": reference, "label": label, **scored})
    return rows


def tally(rows: list[dict], extracted: str, correct: str) -> dict:
    counts = Counter()
    for row in rows:
        counts["right" if row[correct] else "unread" if row[extracted] is None else "wrong"] += 1
        counts["misread"] += row[extracted] != row["label"]
        counts["guessed"] += row[extracted] is not None and row["label"] is None
    counts["accuracy"] = round(100.0 * counts["right"] / len(rows), 2)
    return counts


def conformance_answers() -> list[dict]:
    """The conformance suites' answers scored under both protocols (aloe's reading of the same TSVs)."""
    rows = []
    for suite in ("mcq", "yesno"):
        items = {item.annotations["eval_item"].id: item.annotations["eval_item"]
                 for item in read_benchmark(BenchmarkSpec(suite, str(DATA / f"{suite}.tsv")))}
        for text in (DATA / f"{suite}_predictions.jsonl").read_text(encoding="utf-8").splitlines():
            fact = json.loads(text)
            item = items[str(fact["index"])]
            fields = item.vlmevalkit_fields()
            view = {"dataset": suite, "answer": fields.answer, "options": fields.options}
            rows.append(score_prediction(item.kind, fact["prediction"], item.answer, item.options, view))
    return rows


def stored_accuracy(files: list[tuple[str, str]]) -> float:
    """The accuracy VLMEvalKit's code computed, weighted over (file of facts, verdict field) pairs."""
    hits = [bool(json.loads(text)[field]) for name, field in files
            for text in (DATA / name).read_text(encoding="utf-8").splitlines()]
    return round(100.0 * sum(hits) / len(hits), 2)


def main() -> int:
    print(f"VLMEvalKit rules at {VLMEVALKIT_COMMIT[:8]} vs aloe's extraction, on the same answers")
    rows = hand_labelled()
    print(f"\n{len(CHOICE_CASES)} multiple-choice + {len(YESNO_CASES)} yes/no hand-labelled answers "
          "(tests/extraction_cases.py)")
    print(f"{'':22}{'accuracy':>9}{'right':>7}{'wrong':>7}{'unread':>8}{'misread':>9}{'guessed':>9}")
    theirs = tally(rows, "extracted", "correct")
    ours = tally(rows, "extracted_aloe", "correct_aloe")
    for name, counts in (("VLMEvalKit rules", theirs), ("aloe extraction", ours)):
        print(f"{name:22}{counts['accuracy']:>9.2f}{counts['right']:>7}{counts['wrong']:>7}{counts['unread']:>8}"
              f"{counts['misread']:>9}{counts['guessed']:>9}")
    real = stored_accuracy([("extraction_choice_predictions.jsonl", "hit"),
                            ("extraction_yesno_predictions.jsonl", "score")])
    print(f"VLMEvalKit's own code on these answers: {real:.2f}; difference aloe - VLMEvalKit: "
          f"{ours['accuracy'] - theirs['accuracy']:+.2f} points")
    answers = conformance_answers()
    both = {name: round(100.0 * sum(row[key] for row in answers) / len(answers), 2)
            for name, key in (("vlmevalkit", "correct"), ("aloe", "correct_aloe"))}
    real_conformance = stored_accuracy([("mcq_predictions.jsonl", "hit"), ("yesno_predictions.jsonl", "score")])
    print(f"\n{len(answers)} conformance answers (tests/data/vlmevalkit/mcq, yesno)")
    print(f"VLMEvalKit rules {both['vlmevalkit']:.2f} (its own code: {real_conformance:.2f}), aloe extraction "
          f"{both['aloe']:.2f}, difference {both['aloe'] - both['vlmevalkit']:+.2f} points")
    if theirs["accuracy"] != real or both["vlmevalkit"] != real_conformance:
        print("the VLMEvalKit-rule accuracy differs from VLMEvalKit's own figure", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
