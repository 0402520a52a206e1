"""`aloe eval` without generating: benchmark files, scoring and pairs, --rescore, --table, bad inputs."""

from __future__ import annotations

import csv
import io
import json

import pytest
from eval_fixtures import mcq_tsv, paired_jsonl, text_jsonl, write_items, write_tsv, yesno_tsv

from aloe_cli.errors import AloeError
from aloe_cli.evaluation.benchmarks import parse_benchmark_spec, read_benchmark
from aloe_cli.evaluation.prompts import MCQ_INSTRUCTION, eval_record, prompt_text
from aloe_cli.evaluation.results import collect_scores, render_csv, render_markdown
from aloe_cli.evaluation.scoring import benchmark_scores, rescore_line
from support import aloe, read_jsonl


def eval_items(items):
    return [item.annotations["eval_item"] for item in items]


# ----------------------------------------------------------------------------- benchmark files

def test_tsv_items_keep_options_categories_and_the_bare_question(tmp_path):
    spec = parse_benchmark_spec(f"organs={mcq_tsv(tmp_path / 'mcq.tsv')}")
    items = eval_items(read_benchmark(spec))
    first = items[0]
    assert (spec.name, len(items)) == ("organs", 6)
    assert (first.kind, first.answer, first.category, first.l2_category) == ("mcq", "A", "chest", "organ")
    assert first.options == {"A": "Liver", "B": "Spleen", "C": "Kidney", "D": "Lung"}
    assert first.question == "Which organ is shown in scan 0?" and first.images[0].startswith("data:image/png")
    assert prompt_text(first) == ("Question: Which organ is shown in scan 0?\nOptions:\nA. Liver\nB. Spleen\n"
                                  f"C. Kidney\nD. Lung\n{MCQ_INSTRUCTION}")
    record = eval_record(first)
    assert record["messages"][0]["content"][0] == {"type": "image"} and record["meta"]["options"] == first.options


def test_kinds_are_inferred_and_yes_no_prompts_ask_for_yes_or_no(tmp_path):
    items = eval_items(read_benchmark(parse_benchmark_spec(str(yesno_tsv(tmp_path / "yn.tsv")))))
    assert [item.kind for item in items] == ["yesno"] * 4 and [item.answer for item in items][:2] == ["yes", "no"]
    assert prompt_text(items[0]).endswith("? Please answer yes or no.")
    text = eval_items(read_benchmark(parse_benchmark_spec(str(text_jsonl(tmp_path / "t.jsonl")))))
    assert text[1].options["B"] == "Vitamin B12" and text[1].answer == "B" and text[1].images == []


def test_hint_and_answers_given_as_option_text(tmp_path):
    path = write_tsv(tmp_path / "h.tsv", [{"index": "1", "question": "Stain?", "hint": "Pink cytoplasm",
                                           "A": "H&E", "B": "PAS", "answer": "PAS"}])
    item = eval_items(read_benchmark(parse_benchmark_spec(str(path))))[0]
    assert (item.question, item.hint, item.answer) == ("Stain?", "Pink cytoplasm", "B")
    assert prompt_text(item).startswith("Hint: Pink cytoplasm\nQuestion: Stain?\nOptions:\nA. H&E\nB. PAS\n")


def test_bad_items_name_the_line_and_field(tmp_path):
    path = write_items(tmp_path / "bad.jsonl", [
        {"id": "1", "question": "q", "answer": "yes"},
        {"id": "1b", "question": "q", "options": ["x", "y"], "answer": "C"},
        {"id": "2", "question": "q", "kind": "yesno", "answer": "maybe"},
        {"id": "3", "question": "q"},
        {"id": "4", "question": "q", "answer": "a", "task": "seg"},
        {"id": "1", "question": "q", "answer": "b"},
    ])
    errors = [item.error for item in read_benchmark(parse_benchmark_spec(str(path)))]
    assert errors[0] is None
    assert [(e.where, e.field, e.reason) for e in errors[1:]] == [
        (f"{path}:2", "answer", "invalid_answer"), (f"{path}:3", "answer", "invalid_answer"),
        (f"{path}:4", "answer", "missing_field"), (f"{path}:5", "task", "invalid_field"),
        (f"{path}:6", "id", "duplicate_id")]
    assert "answer 'C' is not one of the options A, B" in str(errors[1])


def test_whole_file_problems(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(AloeError, match="no items"):
        read_benchmark(parse_benchmark_spec(str(empty)))
    with pytest.raises(AloeError, match="benchmark file not found"):
        parse_benchmark_spec(str(tmp_path / "missing.tsv"))
    no_answer = write_tsv(tmp_path / "noanswer.tsv", [{"index": "1", "question": "q", "A": "x", "B": "y"}])
    with pytest.raises(AloeError, match="no 'answer' column"):
        read_benchmark(parse_benchmark_spec(str(no_answer)))


def written(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: write_tsv(p / "noanswer.tsv", [{"index": "1", "question": "q", "A": "x", "B": "y"}]),
     "noanswer.tsv: VLMEvalKit TSV has no 'answer' column (field 'answer')"),
    (lambda p: write_tsv(p / "letter.tsv", [{"index": "1", "question": "q", "A": "x", "B": "y", "answer": "A"},
                                            {"index": "2", "question": "q", "A": "x", "B": "y", "answer": "E"}]),
     "letter.tsv:3: field 'answer': answer 'E' is not one of the options A, B"),
    (lambda p: written(p / "empty.tsv", "index\tquestion\tanswer\n"),
     "empty.tsv: the benchmark has no items (empty file)"),
    (lambda p: written(p / "empty.jsonl", ""), "empty.jsonl: the benchmark has no items"),
])
def test_bad_benchmark_files_through_the_cli(tmp_path, tiny_model_dir, make, message):
    path = make(tmp_path)
    result = aloe("eval", "--model", str(tiny_model_dir), "--benchmark", str(path), "-o", str(tmp_path / "out"))
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_usage_errors(tmp_path):
    assert aloe("eval", "--benchmark", "x.tsv", "-o", str(tmp_path)).returncode == 2
    result = aloe("eval", "--model", "m", "--benchmark", str(text_jsonl(tmp_path / "t.jsonl")), "-o", str(tmp_path),
                  "--perturb", "base,blur")
    assert result.returncode == 2 and "unknown perturbation(s) blur" in result.stderr


# ----------------------------------------------------------------------------- scoring

def line(id, kind, answer, prediction, **extra):
    options = extra.pop("options", {"A": "Liver", "B": "Spleen"} if kind == "mcq" else None)
    return rescore_line({"id": id, "benchmark": "b", "kind": kind, "question": "q", "options": options,
                         "answer": answer, "prediction": prediction, **extra})


def test_scores_pairs_categories_perturbations_and_unjudged_items():
    lines = [
        line("1", "yesno", "yes", "Yes.", pair_id="p1", category="ct", task="cls"),
        line("2", "yesno", "no", "No.", pair_id="p1", category="ct", task="cls"),
        line("3", "yesno", "yes", "Yes", pair_id="p2", category="mr", task="det"),
        line("4", "yesno", "no", "Yes", pair_id="p2", category="mr", task="det"),
        line("1", "yesno", "yes", "No", pair_id="p1", perturb="syc", task="cls"),
        line("3", "yesno", "yes", "I cannot tell.", pair_id="p2", perturb="syc", task="det"),
        line("5", "open", "the liver", "Liver", correct=0.5),
        line("6", "open", "the spleen", "Kidney", correct=None, judge={"score": None, "error": "unparseable"}),
    ]
    scores = benchmark_scores(lines)
    assert (scores["items"], scores["judged"], scores["unjudged"], scores["unanswered"]) == (6, 5, 1, 0)
    assert scores["accuracy"] == round(100 * 3.5 / 5, 2)
    assert scores["pairs"] == {"count": 2, "accuracy": 50.0, "accuracy_aloe": 50.0} and scores["main"] == 50.0
    assert scores["main_aloe"] == 50.0 and scores["unreadable"] == 0
    assert scores["categories"]["mr"] == {"items": 2, "accuracy": 50.0, "accuracy_aloe": 50.0}
    assert scores["splits"]["none"]["accuracy"] == scores["accuracy"]
    assert scores["perturbations"]["syc"] == {"items": 2, "accuracy": 0.0, "accuracy_aloe": 0.0}
    assert scores["robustness"]["cls"] == {"base": {"items": 2, "accuracy": 100.0, "accuracy_aloe": 100.0},
                                           "syc": {"items": 1, "accuracy": 0.0, "accuracy_aloe": 0.0}}


def test_the_two_protocols_score_the_same_answers_side_by_side():
    """Both verdicts on the same answers: 'b) spleen, clearly' is B to both (to VLMEvalKit by the option's text),
    'There is a lesion.' is yes to aloe only; a split column breaks the figures down."""
    lines = [
        line("1", "mcq", "B", "The answer is (B).", split="val", category="ct"),
        line("2", "mcq", "B", "b) spleen, clearly", split="val", category="ct"),
        line("3", "yesno", "no", "No, there is none.", split="test"),
        line("4", "yesno", "yes", "There is a lesion.", split="test"),
    ]
    assert [(entry["extracted"], entry["extracted_aloe"]) for entry in lines] == [
        ("B", "B"), ("B", "B"), ("No", "no"), (None, "yes")]
    scores = benchmark_scores(lines)
    assert (scores["accuracy"], scores["accuracy_aloe"], scores["unreadable"], scores["unanswered"]) == (
        75.0, 100.0, 1, 0)
    assert scores["splits"]["test"] == {"items": 2, "accuracy": 50.0, "accuracy_aloe": 100.0}
    assert scores["splits"]["val"]["categories"]["ct"] == {"items": 2, "accuracy": 100.0, "accuracy_aloe": 100.0}


def test_rescore_line_checks_the_line():
    with pytest.raises(AloeError, match="field 'prediction'"):
        rescore_line({"id": "1", "benchmark": "b", "kind": "mcq", "answer": "A"})
    with pytest.raises(AloeError, match="field 'options'"):
        rescore_line({"id": "1", "benchmark": "b", "kind": "mcq", "answer": "A", "prediction": "A"})
    with pytest.raises(AloeError, match="field 'correct'"):
        rescore_line({"id": "1", "benchmark": "b", "kind": "open", "answer": "x", "prediction": "x", "correct": 0.7})


# ----------------------------------------------------------------------------- --rescore and --table

def handwritten_predictions(path):
    """As another tool might write them: raw outputs, stale or missing extraction fields."""
    options = {"A": "Pleural effusion", "B": "Pneumothorax", "C": "Cardiomegaly"}
    rows = [
        {"id": "1", "benchmark": "chest", "kind": "mcq", "question": "Finding?", "options": options, "answer": "B",
         "prediction": "The answer is (B).", "extracted": None, "correct": False, "category": "xray"},
        {"id": "2", "benchmark": "chest", "kind": "mcq", "question": "Finding?", "options": options, "answer": "C",
         "prediction": "**C. Cardiomegaly**"},
        {"id": "3", "benchmark": "chest", "kind": "mcq", "question": "Finding?", "options": options, "answer": "A",
         "prediction": "It could be A or B."},
        {"id": "4", "benchmark": "chest", "kind": "mcq", "question": "Finding?", "options": options, "answer": "A",
         "prediction": "Pneumothorax"},
        {"id": "5", "benchmark": "lesions", "kind": "yesno", "question": "Lesion?", "options": None, "answer": "No",
         "prediction": "No, there is no lesion."},
        {"id": "6", "benchmark": "slake", "kind": "open", "question": "Organ?", "options": None, "answer": "liver",
         "prediction": "The liver", "correct": 1, "judge": {"score": 1, "reason": "same"}},
    ]
    return write_items(path, rows)


def test_rescore_a_handwritten_predictions_file(tmp_path):
    source = handwritten_predictions(tmp_path / "preds.jsonl")
    result = aloe("eval", "--rescore", str(source), "-o", str(tmp_path / "re"))
    assert result.returncode == 0, result.stderr
    assert "6 read = 6 kept + 0 rejected" in result.stderr and "line(s) changed" in result.stderr
    lines = {row["id"]: row for row in read_jsonl(tmp_path / "re" / "predictions.jsonl")}
    assert [(lines[i]["extracted_aloe"], lines[i]["correct_aloe"]) for i in "12345"] == [
        ("B", True), ("C", True), (None, False), ("B", False), ("no", True)]
    assert lines["5"]["extracted"] == "No" and lines["5"]["correct"] is True  # VLMEvalKit's reading, beside
    assert lines["3"]["rule"] == "several_options" and lines["6"]["correct"] == 1.0
    scores = json.loads((tmp_path / "re" / "scores.json").read_text())["benchmarks"]
    assert scores["chest"]["accuracy"] == 50.0 and scores["chest"]["unanswered"] == 1
    assert scores["lesions"]["accuracy"] == 100.0 and scores["slake"]["accuracy"] == 100.0
    table = (tmp_path / "re" / "results.md").read_text()
    assert "| rescored | 100.0 | 50.0 | 100.0 |" in table  # slake is SLAKE, a published benchmark: first


def test_rescore_bad_lines_fail_or_are_counted(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps({"id": "1", "benchmark": "b", "kind": "yesno", "answer": "yes", "prediction": "Yes"})
                    + "\n{not json\n" + json.dumps({"id": "2", "benchmark": "b", "kind": "mcq", "answer": "A",
                                                    "prediction": "A"}) + "\n")
    failed = aloe("eval", "--rescore", str(path), "-o", str(tmp_path / "a"))
    assert failed.returncode == 1 and f"{path}:2: invalid JSON" in failed.stderr
    skipped = aloe("eval", "--rescore", str(path), "-o", str(tmp_path / "b"), "--on-error", "skip")
    assert skipped.returncode == 0 and "3 read = 1 kept + 2 rejected" in skipped.stderr
    assert "invalid_field=1" in skipped.stderr and "invalid_json=1" in skipped.stderr


def test_table_reprints_saved_scores_and_rows_accumulate(tmp_path):
    source = handwritten_predictions(tmp_path / "preds.jsonl")
    assert aloe("eval", "--rescore", str(source), "-o", str(tmp_path / "res" / "m1")).returncode == 0
    edited = [dict(row, model="m2", prediction="A") if row["kind"] == "mcq" else dict(row, model="m2")
              for row in read_jsonl(source)]
    write_items(tmp_path / "preds2.jsonl", edited)
    assert aloe("eval", "--rescore", str(tmp_path / "preds2.jsonl"), "-o", str(tmp_path / "res" / "m2")).returncode == 0
    result = aloe("eval", "--table", str(tmp_path / "res"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2:6] == ["| model | slake | chest | lesions |", "|---|---:|---:|---:|",
                                               "| rescored | 100.0 | 50.0 | 100.0 |", "| m2 | 100.0 | 50.0 | 100.0 |"]
    models = collect_scores(tmp_path / "res")
    assert render_markdown(models) == result.stdout
    rows = list(csv.reader(io.StringIO(render_csv(models))))
    assert rows[0][:4] == ["model", "slake", "chest", "lesions"] and rows[2][:4] == ["m2", "100.0", "50.0", "100.0"]
    missing = aloe("eval", "--table", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "results folder not found" in missing.stderr


def test_paired_benchmark_headline_is_the_paired_accuracy(tmp_path):
    path = paired_jsonl(tmp_path / "probmed.jsonl", pairs=2)
    items = eval_items(read_benchmark(parse_benchmark_spec(str(path))))
    answers = {"p0a": "Yes", "p0b": "No", "p1a": "Yes", "p1b": "Yes"}
    rows = [{**item.fields(),
             "prediction": answers[item.id]} for item in items]
    scores = benchmark_scores([rescore_line(row) for row in rows])
    assert (scores["accuracy"], scores["pairs"]["accuracy"], scores["main"]) == (75.0, 50.0, 50.0)
