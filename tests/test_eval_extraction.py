"""Answer extraction on realistic model answers, and the {0, 0.5, 1} judge's verdict parsing."""

from __future__ import annotations

from collections import Counter

import pytest
from extraction_cases import CHOICE_CASES, YESNO_CASES

from aloe_cli.evaluation import vlmevalkit
from aloe_cli.evaluation.extraction import clean, extract_choice, extract_yesno, normalize_yesno
from aloe_cli.evaluation.judge import UnparseableVerdict, parse_verdict


@pytest.mark.parametrize(("options", "reference", "output", "expected"), CHOICE_CASES,
                         ids=[f"mcq{i}" for i in range(len(CHOICE_CASES))])
def test_multiple_choice_answers(options, reference, output, expected):
    extraction = extract_choice(output, options)
    assert extraction.value == expected, extraction.rule


@pytest.mark.parametrize(("reference", "output", "expected"), YESNO_CASES,
                         ids=[f"yn{i}" for i in range(len(YESNO_CASES))])
def test_yes_no_answers(reference, output, expected):
    extraction = extract_yesno(output)
    assert extraction.value == expected, extraction.rule


def tally(pairs) -> Counter:
    counts = Counter()
    for extracted, reference in pairs:
        counts["unanswered" if extracted is None else "right" if extracted == reference else "wrong"] += 1
    return counts


def vlmevalkit_readings() -> list[tuple[str | None, str]]:
    """(what VLMEvalKit's exact matching reads, reference) for every case: `can_infer`, `YOrN_Extraction`."""
    read = vlmevalkit.prediction_as_read
    return ([(vlmevalkit.can_infer(read(out), opts), ref) for opts, ref, out, _ in CHOICE_CASES]
            + [({"Yes": "yes", "No": "no"}.get(vlmevalkit.yorn_extraction(read(out))), ref)
               for ref, out, _ in YESNO_CASES])


def test_counts_over_the_whole_set_and_against_exact_matching():
    assert len(CHOICE_CASES) + len(YESNO_CASES) >= 150
    ours = ([(extract_choice(out, opts).value, ref) for opts, ref, out, _ in CHOICE_CASES]
            + [(extract_yesno(out).value, ref) for ref, out, _ in YESNO_CASES])
    by_hand = ([(exp, ref) for _, ref, _, exp in CHOICE_CASES] + [(exp, ref) for ref, _, exp in YESNO_CASES])
    theirs = vlmevalkit_readings()
    counts = tally(ours)
    assert counts == tally(by_hand)
    assert sum(counts.values()) == len(ours) and counts["right"] > counts["unanswered"] > counts["wrong"] > 0
    misread = sum(1 for (got, _), (want, _) in zip(theirs, by_hand) if got != want)
    guessed = sum(1 for (got, _), (want, _) in zip(theirs, by_hand) if got is not None and want is None)
    # exact matching misreads a large share of realistic answers (and sometimes picks one nobody gave)
    assert misread >= len(ours) // 4 and guessed >= 1


def test_aloe_keeps_every_right_reading_of_exact_matching_and_never_scores_a_wrong_answer_right():
    """Where VLMEvalKit's rules read the answer the reader gives, aloe reads it too; where the reader finds
    no right answer, aloe never scores one (its only departures from exact matching are improvements)."""
    ours = ([extract_choice(out, opts).value for opts, _, out, _ in CHOICE_CASES]
            + [extract_yesno(out).value for _, out, _ in YESNO_CASES])
    by_hand = ([(exp, ref) for _, ref, _, exp in CHOICE_CASES] + [(exp, ref) for ref, _, exp in YESNO_CASES])
    for got, (theirs, _), (label, reference) in zip(ours, vlmevalkit_readings(), by_hand):
        if theirs is not None and theirs == label:
            assert got == label
        if label != reference:
            assert got != reference


def test_the_answer_committed_to_is_taken_never_a_guess():
    options = {"A": "Pleural effusion", "B": "Pneumothorax"}
    assert extract_choice("It is either A or B, I cannot tell.", options).rule == "several_options"
    assert extract_choice("None of the above.", options).rule == "none_of_the_above"
    assert extract_choice("I'm sorry, I cannot determine this.", options).rule == "refusal"
    assert extract_choice("", options).rule == "empty"
    assert extract_choice("A. Pleural effusion\nB. Pneumothorax", options).rule == "options_repeated"
    assert extract_choice("The answer is A. Actually the answer is B.", options).rule == "conflicting_statements"
    assert extract_yesno("Yes and no.").rule == "both"
    assert extract_yesno("There is a mass but no effusion.").rule == "mixed_statement"


def test_clean_drops_markup_only():
    assert clean("**Answer:** `B`<|im_end|>") == "Answer: B"
    assert clean("\\boxed{C}") == "C"
    assert clean("Ｃ") == "C"


@pytest.mark.parametrize(("value", "expected"), [("Yes", "yes"), ("no.", "no"), ("TRUE", "yes"), ("0", "no"),
                                                 ("maybe", None)])
def test_reference_yes_no(value, expected):
    assert normalize_yesno(value) == expected


@pytest.mark.parametrize(("reply", "score"), [
    ('{"score": 1, "reason": "Same finding."}', 1.0),
    ('{"score": 0.5, "reason": "Names the organ but not the side."}', 0.5),
    ('```json\n{"score": 0, "reason": "Different organ."}\n```', 0.0),
    ('{"Score": "0.5"}', 0.5),
    ("Score: 1\nReason: equivalent.", 1.0),
    ("**Score:** 0.5 - partially right", 0.5),
    ("score = 0", 0.0),
    ("1", 1.0),
    ("0.5", 0.5),
    (".5", 0.5),
])
def test_judge_verdicts(reply, score):
    assert parse_verdict(reply)[0] == score


@pytest.mark.parametrize("reply", ["", "The answer is mostly right.", '{"score": 2}', '{"score": 0.7}',
                                   "Score: 3/5", '{"reason": "no score"}', "I would give it 1 or 0.5", "Score: 10"])
def test_unparseable_judge_verdicts(reply):
    with pytest.raises(UnparseableVerdict):
        parse_verdict(reply)
