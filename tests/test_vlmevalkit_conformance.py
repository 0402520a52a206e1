"""aloe's `vlmevalkit` protocol against facts produced by VLMEvalKit's own code (tests/data/vlmevalkit/README.md):
every prompt, every verdict and every breakdown figure must agree, 100%."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer

from aloe_cli.evaluation import vlmevalkit
from aloe_cli.evaluation.benchmarks import BenchmarkSpec, read_benchmark
from aloe_cli.evaluation.prompts import prompt_text
from aloe_cli.evaluation.scoring import benchmark_scores, score_open, score_prediction
from support import aloe, read_jsonl

DATA = Path(__file__).parent / "data" / "vlmevalkit"
ROOT = Path(__file__).resolve().parents[1]
PROMPT_SUITES = {"mcq": "mcq", "yesno": "yesno", "open": "open", "e2e_mcq": "mcq", "e2e_yesno": "yesno",
                 "MMMU_DEV_VAL": "mcq"}
VERDICT_SUITES = {"mcq": "mcq", "yesno": "yesno", "e2e_mcq": "mcq", "e2e_yesno": "yesno",
                  "extraction_choice": "mcq", "extraction_yesno": "yesno", "MMMU_DEV_VAL": "mcq"}


def items_of(suite: str) -> dict:
    """The suite's TSV read by aloe's benchmark reader: id -> EvalItem."""
    items = read_benchmark(BenchmarkSpec(suite, str(DATA / f"{suite}.tsv")))
    assert all(item.error is None for item in items), [str(item.error) for item in items if item.error]
    return {item.annotations["eval_item"].id: item.annotations["eval_item"] for item in items}


def verdict_lines(suite: str) -> list[tuple[dict, dict]]:
    """(stored fact, aloe's prediction line) for every stored answer of a suite."""
    items = items_of(suite)
    pairs = []
    for fact in read_jsonl(DATA / f"{suite}_predictions.jsonl"):
        item = items[str(fact["index"])]
        fields = item.vlmevalkit_fields()
        view = {"dataset": suite, "answer": fields.answer, "options": fields.options}
        line = {**item.fields(), "prediction": fact["prediction"], "protocol": "vlmevalkit"}
        if item.kind == "open":  # MMMU's questions without options
            line.update(score_open(fact["prediction"], view), correct_aloe=None)
        else:
            line.update(score_prediction(item.kind, fact["prediction"], item.answer, item.options, view))
        pairs.append((fact, line))
    return pairs


def test_the_facts_are_as_many_as_promised():
    answers = sum(len(read_jsonl(DATA / f"{suite}_predictions.jsonl")) for suite in VERDICT_SUITES)
    prompts = sum(len(read_jsonl(DATA / f"{suite}_prompts.jsonl")) for suite in PROMPT_SUITES)
    assert answers >= 300 and prompts >= 100
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    assert vlmevalkit.VLMEVALKIT_COMMIT in readme


def test_the_commit_is_written_once_in_code_and_cited_in_the_docs():
    in_code = [path for path in (ROOT / "aloe_cli").rglob("*.py")
               if vlmevalkit.VLMEVALKIT_COMMIT in path.read_text(encoding="utf-8")]
    assert in_code == [ROOT / "aloe_cli" / "evaluation" / "vlmevalkit.py"]
    assert vlmevalkit.VLMEVALKIT_COMMIT in (ROOT / "docs" / "eval.md").read_text(encoding="utf-8")


def test_na_strings_are_pandas_own():
    parsers = pytest.importorskip("pandas._libs.parsers")
    assert vlmevalkit.NA_STRINGS == frozenset(parsers.STR_NA_VALUES)


@pytest.mark.parametrize("suite", PROMPT_SUITES)
def test_prompts_are_vlmevalkits_character_for_character(suite):
    items = items_of(suite)
    facts = read_jsonl(DATA / f"{suite}_prompts.jsonl")
    wrong = [(fact["index"], fact["dataset"]) for fact in facts
             if prompt_text(items[str(fact["index"])], "vlmevalkit", fact["dataset"]) != fact["prompt"]]
    assert not wrong and facts


@pytest.mark.parametrize("suite", VERDICT_SUITES)
def test_verdicts_are_vlmevalkits(suite):
    pairs = verdict_lines(suite)
    wrong = []
    for fact, line in pairs:
        if "hit" in fact:
            expected = (fact.get("extracted", line["extracted"]), bool(fact["hit"]))
        else:
            expected = (None if fact["extracted"] == "Unknown" else fact["extracted"], fact["score"])
        if (line["extracted"], line["correct"]) != expected:
            wrong.append((fact, line["extracted"], line["correct"]))
        assert vlmevalkit.prediction_as_read(fact["prediction"]) == fact["read_as"]
    assert not wrong and pairs


def percent(value: float) -> float:
    return round(100.0 * value, 2)


@pytest.mark.parametrize("suite", ["mcq", "e2e_mcq", "extraction_choice", "MMMU_DEV_VAL"])
def test_mcq_breakdowns_are_report_accs(suite):
    scores = benchmark_scores(line for _, line in verdict_lines(suite))
    facts = json.loads((DATA / f"{suite}_acc.json").read_text()) if suite != "extraction_choice" else \
        json.loads((DATA / "extraction_acc.json").read_text())["choice"]
    assert set(scores["splits"]) == {row["split"] for row in facts}
    for row in facts:
        split = scores["splits"][row["split"]]
        ours = {"Overall": split["accuracy"]}
        for key in ("categories", "l2_categories"):
            ours.update({name: entry["accuracy"] for name, entry in split.get(key, {}).items()})
        assert ours == {name: percent(value) for name, value in row.items() if name != "split"}


@pytest.mark.parametrize("suite", ["yesno", "e2e_yesno", "extraction_yesno"])
def test_yes_no_figures_are_default_ratings(suite):
    scores = benchmark_scores(line for _, line in verdict_lines(suite))
    if suite == "extraction_yesno":
        facts = json.loads((DATA / "extraction_acc.json").read_text())["yesno"][0]
    else:
        facts = json.loads((DATA / f"{suite}_rating.json").read_text())[0]
    ours = {"Overall": scores["accuracy"]}
    for key in ("categories", "l2_categories"):
        ours.update({name: entry["accuracy"] for name, entry in scores.get(key, {}).items()})
    assert ours == {name: round(value, 2) for name, value in facts.items()}


def test_rules_read_the_way_vlmevalkit_does():
    options = {"A": "Liver", "B": "Spleen", "C": "Kidney"}
    assert vlmevalkit.can_infer("B", options) == "B"
    assert vlmevalkit.can_infer("b", options) is None  # letters are case-sensitive
    assert vlmevalkit.can_infer("spleen", options) == "B"  # by option text
    assert vlmevalkit.can_infer("B is right, the spleen is enlarged in this view.", options) is None  # too early
    assert vlmevalkit.can_infer("Cannot determine the answer", options) == "Z"
    assert vlmevalkit.prediction_as_read("None") == "nan" and vlmevalkit.prediction_as_read(" NA") == " NA"
    assert vlmevalkit.yorn_extraction("Yes, there is.") == "Yes"
    assert vlmevalkit.yorn_extraction("yes and no") == "Unknown"
    assert vlmevalkit.yesno_verdict("Yes", "yes").correct is False  # the reference is compared as written
    assert vlmevalkit.yesno_verdict("Yes", "yes", "AMBER").correct is True


ANSWER = re.compile(r" \[answer=([^\]]*)\]")


def test_cli_run_matches_vlmevalkit_prompts_and_per_category_figures(tmp_path):
    """A 40-row MCQ and a 30-row yes/no TSV in VLMEvalKit's format, through `aloe eval` against the echo server
    answering what each question's marker says: prompts as VLMEvalKit sends them, its figures to the decimal."""
    with FakeOpenAIServer() as server:
        result = aloe("eval", "--model", "served", "--backend", "openai", "--base-url", server.url,
                      "--benchmark", str(DATA / "e2e_mcq.tsv"), "--benchmark", str(DATA / "e2e_yesno.tsv"),
                      "-o", str(tmp_path / "out"), "--concurrency", "4", "--retry-backoff", "0.01")
        sent = sorted(server.prompts())
    assert result.returncode == 0, result.stderr
    assert "e2e_mcq" in result.stderr and "accuracy_aloe" in result.stderr
    stored = {suite: {fact["index"]: fact["prompt"] for fact in read_jsonl(DATA / f"{suite}_prompts.jsonl")}
              for suite in ("e2e_mcq", "e2e_yesno")}
    assert sent == sorted(prompt for prompts in stored.values() for prompt in prompts.values())
    scores = json.loads((tmp_path / "out" / "served" / "scores.json").read_text())["benchmarks"]
    for suite in ("e2e_mcq", "e2e_yesno"):
        lines = read_jsonl(tmp_path / "out" / "served" / suite / "predictions.jsonl")
        assert len(lines) == len(stored[suite])
        facts = {fact["index"]: fact for fact in read_jsonl(DATA / f"{suite}_predictions.jsonl")}
        for line in lines:
            index = int(line["id"])
            assert line["prompt"] == stored[suite][index] and line["protocol"] == "vlmevalkit"
            assert line["prediction"] == facts[index]["prediction"]
            assert {"correct", "correct_aloe", "extracted", "extracted_aloe", "rule"} <= set(line)
        entry = scores[suite]
        ours = {"Overall": entry["accuracy"]}
        for key in ("categories", "l2_categories"):
            ours.update({name: figures["accuracy"] for name, figures in entry[key].items()})
        if suite == "e2e_mcq":
            row = json.loads((DATA / "e2e_mcq_acc.json").read_text())[0]
            assert entry["splits"]["none"]["accuracy"] == entry["accuracy"]
            expected = {name: percent(value) for name, value in row.items() if name != "split"}
        else:
            expected = {name: round(value, 2) for name, value in
                        json.loads((DATA / "e2e_yesno_rating.json").read_text())[0].items()}
        assert ours == expected
        assert entry["protocol"] == "vlmevalkit" and entry["accuracy_aloe"] is not None
        assert entry["unreadable"] == sum(1 for line in lines if line["extracted"] is None)
        # rescoring the saved predictions, without the model, gives the same figures under both protocols
        again = aloe("eval", "--rescore", str(tmp_path / "out" / "served" / suite / "predictions.jsonl"),
                     "-o", str(tmp_path / f"rescored-{suite}"))
        assert again.returncode == 0 and "0 line(s) changed" in again.stderr, again.stderr
        rescored = json.loads((tmp_path / f"rescored-{suite}" / "scores.json").read_text())["benchmarks"][suite]
        for key in ("accuracy", "accuracy_aloe", "categories", "l2_categories", "splits", "unreadable"):
            assert rescored[key] == entry[key]


def test_an_mmmu_question_without_options_gets_exact_matching_beside_the_judges_grade():
    from aloe_cli.evaluation.scoring import rescore_line

    line = rescore_line({"id": "7", "benchmark": "MMMU_DEV_VAL", "kind": "open", "question": "<image 1> How many?",
                         "options": None, "answer": "24", "prediction": "The answer is 24.",
                         "judge": {"score": 0.5}, "vlmevalkit": {"dataset": "MMMU_DEV_VAL", "answer": "24"}})
    assert (line["extracted"], line["correct"], line["correct_aloe"]) == ("A", True, 0.5)
    plain = rescore_line({**line, "vlmevalkit": None, "benchmark": "slake"})
    assert plain["correct"] == plain["correct_aloe"] == 0.5


def test_a_tsv_pandas_reads_otherwise_falls_back_to_the_na_rule_cell_by_cell(tmp_path):
    """An unclosed quote makes pandas read on over the next rows; aloe's reader keeps them apart, and each item
    then applies pandas' NA rule to its own cells."""
    path = tmp_path / "odd.tsv"
    path.write_text('index\tquestion\tA\tB\tC\tanswer\n'
                    '1\t"Quoted start of a question?\tLiver\tNone\tSpleen\tC\n'
                    '2\tWhich side?\tLeft\tRight\tNA\tA\n', encoding="utf-8")
    assert vlmevalkit.read_tsv_fields(str(path)) is None or len(vlmevalkit.read_tsv_fields(str(path))) < 2
    items = {item.annotations["eval_item"].id: item.annotations["eval_item"]
             for item in read_benchmark(BenchmarkSpec("odd", str(path)))}
    assert prompt_text(items["1"], "vlmevalkit") == ('Question: "Quoted start of a question?\nOptions:\nA. Liver\n'
                                                      'C. Spleen\nPlease select the correct answer from the options '
                                                      'above. \n')
    assert items["2"].vlmevalkit_fields().options == {"A": "Left", "B": "Right"}
    assert items["1"].question == '"Quoted start of a question?'  # the options block is not part of it
    assert prompt_text(items["1"], "aloe").count("Options:") == 1
