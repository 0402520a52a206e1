"""`aloe eval --backend openai` against a local OpenAI-compatible test server: answers, 500 then 200, a
timeout, garbage, requests that never succeed, the served judge, and resuming from the response cache."""

from __future__ import annotations

import json

from eval_fixtures import write_items
from fake_openai_server import FakeOpenAIServer

from support import aloe, read_jsonl

FAST = ["--retry-backoff", "0.01", "--concurrency", "4"]
OPTIONS = {"A": "Pleural effusion", "B": "Pneumothorax", "C": "Cardiomegaly"}


def served_benchmark(path, answers):
    """Items whose served 'model' answers what the [answer=...] marker in the question says."""
    items = []
    for index, (reference, reply) in enumerate(answers):
        if reference in ("yes", "no"):
            items.append({"id": f"y{index}", "question": f"Is there an effusion in case {index}? [answer={reply}]",
                          "answer": reference})
        else:
            items.append({"id": f"m{index}", "question": f"Finding in case {index}? [answer={reply}]",
                          "options": OPTIONS, "answer": reference})
    return write_items(path, items)


def run_eval(server, bench, out, *extra):
    return aloe("eval", "--model", "served-model", "--backend", "openai", "--base-url", server.url,
                "--benchmark", f"chest={bench}", "-o", str(out), *FAST, *extra)


def test_served_model_answers_are_extracted_and_scored(tmp_path):
    bench = served_benchmark(tmp_path / "chest.jsonl", [
        ("B", "The answer is (B)."), ("A", "**C. Cardiomegaly**"), ("C", "cardiomegaly"),
        ("yes", "Yes, a small one."), ("no", "No, there is no effusion."), ("no", "yes and no")])
    with FakeOpenAIServer() as server:
        result = run_eval(server, bench, tmp_path / "out")
        requests = list(server.requests)
    assert result.returncode == 0, result.stderr
    assert len(requests) == 6 and all(r.body["model"] == "served-model" for r in requests)
    assert all(r.body["temperature"] == 0 for r in requests)
    lines = {line["id"]: line for line in read_jsonl(tmp_path / "out" / "served-model" / "chest" /
                                                     "predictions.jsonl")}
    assert [(lines[i]["extracted_aloe"], lines[i]["correct_aloe"]) for i in ("m0", "m1", "m2", "y3", "y4", "y5")] == [
        ("B", True), ("C", False), ("C", True), ("yes", True), ("no", True), (None, False)]
    scores = json.loads((tmp_path / "out" / "served-model" / "scores.json").read_text())["benchmarks"]["chest"]
    assert scores["accuracy"] == round(100 * 4 / 6, 2) and scores["unanswered"] == 1


def test_500_then_200_a_timeout_and_garbage(tmp_path):
    bench = served_benchmark(tmp_path / "chest.jsonl", [("B", "B"), ("A", "A"), ("C", "C"), ("yes", "Yes")])
    items = read_jsonl(bench)
    items[3]["question"] = "Is there an effusion in case 3? [action=garbage]"
    write_items(bench, items)
    with FakeOpenAIServer(script=[500, "hang"], hang_seconds=5) as server:
        # one request in flight: the 500 and the hang both fall on the first item (its first two attempts)
        result = run_eval(server, bench, tmp_path / "out", "--timeout", "0.5", "--concurrency", "1")
        actions = [r.action for r in server.requests]
    assert result.returncode == 0, result.stderr
    assert actions.count(500) == 1 and actions.count("hang") == 1 and len(actions) == 6  # 4 items + 2 retries
    lines = {line["id"]: line for line in read_jsonl(tmp_path / "out" / "served-model" / "chest" /
                                                     "predictions.jsonl")}
    assert [lines[i]["correct"] for i in ("m0", "m1", "m2")] == [True, True, True]
    garbage = lines["y3"]
    assert garbage["prediction"].startswith("I am sorry") and garbage["extracted"] is None
    assert garbage["rule"] == "refusal" and garbage["correct"] is False


def test_a_request_that_never_succeeds_fails_its_item_or_is_counted(tmp_path):
    bench = served_benchmark(tmp_path / "chest.jsonl", [("B", "B"), ("A", "A [action=500]")])
    with FakeOpenAIServer() as server:
        failed = run_eval(server, bench, tmp_path / "a", "--max-retries", "1")
        skipped = run_eval(server, bench, tmp_path / "b", "--max-retries", "1", "--on-error", "skip")
    assert failed.returncode == 1 and f"{bench}:2:" in failed.stderr and "HTTP 500" in failed.stderr
    assert skipped.returncode == 0, skipped.stderr
    assert "2 read = 1 written + 1 skipped (request_failed=1)" in skipped.stderr


def test_resume_from_the_cache(tmp_path):
    bench = served_benchmark(tmp_path / "chest.jsonl", [("B", "B"), ("A", "A"), ("C", "B"), ("yes", "No")])
    cache = tmp_path / "replies.jsonl"
    with FakeOpenAIServer() as server:
        first = run_eval(server, bench, tmp_path / "out1", "--cache", str(cache), "--limit", "2")  # "interrupted"
        asked_first = len(server.requests)
        second = run_eval(server, bench, tmp_path / "out2", "--cache", str(cache))
        asked_second = len(server.requests) - asked_first
        third = run_eval(server, bench, tmp_path / "out3", "--cache", str(cache))
        asked_third = len(server.requests) - asked_first - asked_second
    assert first.returncode == second.returncode == third.returncode == 0, third.stderr
    assert (asked_first, asked_second, asked_third) == (2, 2, 0)
    assert "4 cached reply(ies)" in third.stderr
    assert len(read_jsonl(cache)) == 4
    resumed = read_jsonl(tmp_path / "out3" / "served-model" / "chest" / "predictions.jsonl")
    fresh = read_jsonl(tmp_path / "out2" / "served-model" / "chest" / "predictions.jsonl")
    assert resumed == fresh and [line["prediction"] for line in resumed] == ["B", "A", "B", "No"]


def test_served_judge_grades_open_items_and_retries_unparseable_verdicts(tmp_path):
    # the fake judge answers {"score": N} from a [score=N] marker (the reference holds it); without one it
    # repeats the [answer=...] marker of the question, which is no verdict
    bench = write_items(tmp_path / "slake.jsonl", [
        {"id": "o1", "question": "Which organ? [answer=The liver]", "answer": "liver [score=1]"},
        {"id": "o2", "question": "Which side? [answer=left]", "answer": "right [score=0]"},
        {"id": "o3", "question": "Which lobe? [answer=upper]", "answer": "upper lobe"},
        {"id": "o4", "question": "Which lesion? [answer=]", "answer": "cyst"},
    ])
    with FakeOpenAIServer() as server:
        result = aloe("eval", "--model", "served-model", "--base-url", server.url, "--benchmark", str(bench),
                      "--judge", "judge-model", "--judge-base-url", server.url, "--judge-parse-retries", "2",
                      "-o", str(tmp_path / "out"), *FAST)
        judge_requests = [r for r in server.requests if r.body["model"] == "judge-model"]
    assert result.returncode == 0, result.stderr
    lines = {line["id"]: line for line in read_jsonl(tmp_path / "out" / "served-model" / "slake" /
                                                     "predictions.jsonl")}
    assert (lines["o1"]["correct"], lines["o2"]["correct"], lines["o3"]["correct"]) == (1.0, 0.0, None)
    assert lines["o3"]["judge"]["attempts"] == 3 and "unparseable" in lines["o3"]["judge"]["error"]
    assert lines["o4"]["correct"] == 0.0 and lines["o4"]["judge"]["reason"] == "empty answer"
    assert len(judge_requests) == 2 + 3  # o1, o2 once; o3 three times; o4 never (empty answer)
    assert sorted(r.body["temperature"] for r in judge_requests)[-2:] == [0.7, 0.7]
    scores = json.loads((tmp_path / "out" / "served-model" / "scores.json").read_text())["benchmarks"]["slake"]
    assert (scores["accuracy"], scores["unjudged"], scores["judged"]) == (round(100 / 3, 2), 1, 3)
    assert "1 open-ended item(s) have no judge verdict" in result.stderr


def test_a_judge_url_for_a_local_judge_is_a_usage_error_naming_the_judges_flag(tmp_path):
    proc = aloe("eval", "--model", "m", "--base-url", "http://127.0.0.1:9/v1", "--benchmark", str(tmp_path / "b.tsv"),
                "-o", str(tmp_path / "out"), "--judge", "j", "--judge-backend", "hf",
                "--judge-base-url", "http://127.0.0.1:9/v1")
    assert proc.returncode == 2, proc.stderr
    assert "--judge-base-url" in proc.stderr and "is for --judge-backend openai" in proc.stderr
    assert not (tmp_path / "out").exists()
