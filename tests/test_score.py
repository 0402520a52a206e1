"""`aloe score`: reply parsing, the rubric, and the real CLI against a local fake OpenAI-compatible
server (structured output, failures, timeouts, a leaking server, interruption and resume) and with the
hf backend on the tiny model. The backends themselves are tested in test_backends.py."""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from fake_openai_server import GARBAGE_REPLY, FakeOpenAIServer
from PIL import Image

from aloe_cli.data.images import load_image
from aloe_cli.data.io import Item
from aloe_cli.errors import AloeError
from aloe_cli.filters.judge import (
    DEFAULT_RUBRIC,
    JUDGE_SCHEMA,
    Rubric,
    UnparseableReply,
    judge_request,
    load_rubric,
    parse_judge_reply,
    transcript,
)
from support import ROOT, aloe, chat, jpeg_bytes, read_jsonl, scan, write_jsonl

FAST_RETRIES = ["--retry-backoff", "0.01"]


# ----------------------------------------------------------------------------- parsing

@pytest.mark.parametrize(("reply", "score", "reason"), [
    ('{"score": 4, "reason": "Clear and relevant."}', 4, "Clear and relevant."),
    ('Sure!\n```json\n{"score": 2, "reason": "Off topic."}\n```', 2, "Off topic."),
    ('{"Score": "5", "explanation": "Perfect."}', 5, "Perfect."),
    ('{"score": 3.0}', 3, ""),
    ("Score: 1\nReason: The answer contradicts the image.", 1, "The answer contradicts the image."),
    ("**Score:** 5/5 - the answer is exactly right.", 5, "the answer is exactly right."),
    ("The sample is fine. score = 4", 4, "The sample is fine."),
])
def test_replies_in_json_or_score_line_form(reply, score, reason):
    verdict = parse_judge_reply(reply)
    assert (verdict.score, verdict.reason) == (score, reason)


@pytest.mark.parametrize("reply", [GARBAGE_REPLY, "", '{"score": 7}', '{"score": 3.5}', "Score: 0",
                                   '{"reason": "no score"}', "I give it a 4."])
def test_unparseable_replies(reply):
    with pytest.raises(UnparseableReply):
        parse_judge_reply(reply)


# ----------------------------------------------------------------------------- the prompt

def test_rubric_shows_images_question_and_answer():
    record = {"messages": [
        {"role": "system", "content": "You are a radiologist."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which organ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The liver."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And here?"}]},
        {"role": "assistant", "content": "The spleen."}], "images": ["a.png", "b.png"]}
    assert transcript(record["messages"]).splitlines() == [
        "System: You are a radiologist.", "User: [image 1] Which organ?", "Assistant: The liver.",
        "User: [image 2] And here?", "Assistant: The spleen."]
    text = Rubric().render(record)
    assert "User: [image 2] And here?" in text and "1 to 5" in text and '{"score"' in text
    custom = Rubric("Q={question} A={answer}").render(record)
    assert custom == "Q=Which organ? A=The spleen."


def test_prompt_file_needs_a_placeholder(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("Rate this.")
    with pytest.raises(AloeError, match=r"must contain \{conversation\} or \{answer\}"):
        load_rubric(path)
    path.write_text("Rate: {conversation}")
    assert load_rubric(path).template == "Rate: {conversation}"
    with pytest.raises(AloeError, match="prompt file not found"):
        load_rubric(tmp_path / "none.txt")


def test_show_prompt_prints_the_rubric_without_loading_anything():
    result = aloe("score", "--show-prompt")
    assert result.returncode == 0 and result.stdout == DEFAULT_RUBRIC


def test_the_judge_sees_the_images_then_the_rubric_and_keys_cover_both(tmp_path):
    scan(1).save(tmp_path / "a.png")
    scan(2).save(tmp_path / "b.png")
    request = judge_request(chat("q", "a", ["a.png"], id=7), tmp_path, Rubric(), "j1", keyed=True)
    assert request.messages[0]["content"][0] == {"type": "image"} and request.images == ["a.png"]
    assert request.messages[0]["content"][1]["text"] == Rubric().render(chat("q", "a", ["a.png"]))
    assert request.response_format == JUDGE_SCHEMA and request.id == "7"
    keys = {judge_request(chat("q", "a", [name]), tmp_path, Rubric(), judge, keyed=True).key
            for name, judge in (("a.png", "j1"), ("b.png", "j1"), ("a.png", "j2"))}
    assert len(keys) == 3 and request.key in keys
    assert judge_request(chat("q", "a", ["a.png"]), tmp_path, Rubric(), "j1").key is None  # no cache, no key


# ----------------------------------------------------------------------------- openai backend, real CLI

def records_with_scores(tmp_path, scores, sources=None, images=True):
    """One record per score; the fake judge answers the [score=N] marker in the answer."""
    records = []
    for index, value in enumerate(scores):
        names = []
        if images and index % 2 == 0:
            names = [f"img{index}.png"]
            scan(index).save(tmp_path / names[0])
        source = sources[index] if sources else "slake"
        records.append(chat(f"What is finding {index}?", f"Finding {index}. [score={value}]", names,
                            id=str(index), source=source))
    return write_jsonl(tmp_path / "data.jsonl", records)


def run_score(server, data, *extra, env=None):
    return aloe("score", "-i", str(data), "--judge", "fake-judge", "--base-url", server.url, *extra, env=env)


def test_scores_thresholds_per_source_and_images_as_data_urls(tmp_path):
    data = records_with_scores(tmp_path, [5, 2, 4, 3, 4, 1], ["slake", "slake", "pmc", "pmc", "vqa", "vqa"])
    (tmp_path / "t.yaml").write_text("default: {min: 3}\npmc: {min: 4}\n")
    with FakeOpenAIServer() as server:
        result = run_score(server, data, "--thresholds", str(tmp_path / "t.yaml"),
                           "--rejects", str(tmp_path / "rej.jsonl"), "--report", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    kept, rejected = read_jsonl(result.stdout), read_jsonl(tmp_path / "rej.jsonl")
    assert [r["id"] for r in kept] == ["0", "2", "4"]
    assert {r["id"]: r["aloe"]["reject"]["reason"] for r in rejected} == {"1": "low_score", "3": "low_score",
                                                                           "5": "low_score"}
    assert kept[0]["aloe"]["score"] == {"value": 5, "reason": "The fake judge read the marker.",
                                        "judge": "fake-judge"}
    sent = {request.prompt.split("Finding ")[1][:1]: request.images for request in server.requests}
    image = Image.open(io.BytesIO(base64.b64decode(sent["0"][0].split(",", 1)[1])))
    assert np.array_equal(np.asarray(image), np.asarray(load_image("img0.png", tmp_path)))
    assert sent["1"] == [] and all(r.body["model"] == "fake-judge" for r in server.requests)
    # the reply is asked for as JSON following the judge's schema, both the OpenAI and the vLLM way
    assert all(r.body["response_format"]["json_schema"]["schema"] == JUDGE_SCHEMA == r.body["guided_json"]
               for r in server.requests)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["thresholds"]["pmc"]["min"] == 4 and report["scores"]["slake"]["5"] == 1


def test_score_line_replies_and_servers_without_structured_output(tmp_path):
    jpeg = jpeg_bytes(scan(7))
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    data = write_jsonl(tmp_path / "d.jsonl", [chat("q", f"a{i} [score=4]", [uri]) for i in range(3)])
    with FakeOpenAIServer(style="line", refuse_fields=("response_format", "guided_json")) as server:
        result = run_score(server, data, "--concurrency", "1", "--report", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    assert [r["aloe"]["score"]["value"] for r in read_jsonl(result.stdout)] == [4, 4, 4]
    assert [r.action for r in server.requests] == [400, 400, "ok", "ok", "ok"]  # found once, then kept
    assert "structured output: off" in result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["client"]["structured_output"] == "off"
    sent = base64.b64decode(server.requests[-1].images[0].split(",", 1)[1])
    assert server.requests[-1].images[0].startswith("data:image/jpeg;") and Image.open(io.BytesIO(sent)).size == (128,
                                                                                                                128)


def test_garbage_replies_are_retried_then_rejected_as_unparseable(tmp_path):
    data = records_with_scores(tmp_path, [4, 4, 4], images=False)
    with FakeOpenAIServer(default="garbage") as server:
        result = run_score(server, data, "--parse-retries", "2", "--rejects", str(tmp_path / "rej.jsonl"))
        assert len(server.requests) == 9  # every record asked three times
        assert {r.body["temperature"] for r in server.requests} == {0.0, 0.7}  # retries sample
        assert sorted({r.body.get("seed") for r in server.requests[3:]}) == [1, 2]  # each retry its own seed
        kept_all = run_score(server, data, "--parse-retries", "0", "--keep-all")
    assert result.returncode == 0 and read_jsonl(result.stdout) == []
    assert kept_all.returncode == 0, kept_all.stderr
    rejected = read_jsonl(tmp_path / "rej.jsonl")
    assert {r["aloe"]["reject"]["reason"] for r in rejected} == {"judge_unparseable"}
    annotation = rejected[0]["aloe"]["score"]
    assert annotation["value"] is None and "3 attempt(s)" in annotation["error"]
    assert annotation["reply"] == GARBAGE_REPLY
    flagged = read_jsonl(kept_all.stdout)
    assert len(flagged) == 3 and flagged[0]["aloe"]["score"]["flag"]["reason"] == "judge_unparseable"


def test_server_errors_are_retried_with_backoff(tmp_path):
    data = records_with_scores(tmp_path, [5], images=False)
    with FakeOpenAIServer(script=[500, 429, 503]) as server:
        result = run_score(server, data, "--concurrency", "1", *FAST_RETRIES)
    assert result.returncode == 0, result.stderr
    assert [r.action for r in server.requests] == [500, 429, 503, "ok"]
    assert read_jsonl(result.stdout)[0]["aloe"]["score"]["value"] == 5


def test_a_hanging_request_times_out_and_is_retried(tmp_path):
    data = records_with_scores(tmp_path, [4], images=False)
    with FakeOpenAIServer(script=["hang"]) as server:
        result = run_score(server, data, "--timeout", "0.5", *FAST_RETRIES)
    assert result.returncode == 0, result.stderr
    assert read_jsonl(result.stdout)[0]["aloe"]["score"]["value"] == 4
    assert len(server.requests) == 2


def test_requests_that_keep_failing_follow_on_error(tmp_path):
    data = records_with_scores(tmp_path, [4, 4], images=False)
    with FakeOpenAIServer(default="hang", hang_seconds=5) as server:
        skipped = run_score(server, data, "--timeout", "0.3", "--max-retries", "1", *FAST_RETRIES,
                            "--on-error", "skip", "--rejects", str(tmp_path / "rej.jsonl"))
    assert skipped.returncode == 0, skipped.stderr
    rejected = read_jsonl(tmp_path / "rej.jsonl")
    assert [r["aloe"]["reject"]["reason"] for r in rejected] == ["judge_request_failed"] * 2
    assert "timed out after 0.3 s after 2 attempt(s)" in rejected[0]["aloe"]["reject"]["detail"]
    with FakeOpenAIServer(default=500) as server:
        failed = run_score(server, data, "--max-retries", "1", *FAST_RETRIES)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith(f"aloe: error: {data}:1: judge request failed: "
                                                             f"HTTP 500 after 2 attempt(s)")


def test_missing_image_is_rejected_without_asking_the_judge(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a [score=5]", ["gone.png"], id="bad"),
                                              chat("q", "a [score=5]", id="good")])
    with FakeOpenAIServer() as server:
        result = run_score(server, data, "--on-error", "skip", "--rejects", str(tmp_path / "rej.jsonl"))
    assert result.returncode == 0, result.stderr
    assert [r["id"] for r in read_jsonl(result.stdout)] == ["good"]
    assert read_jsonl(tmp_path / "rej.jsonl")[0]["aloe"]["reject"]["reason"] == "image_missing"
    assert len(server.requests) == 1


def test_api_key_is_sent_but_never_printed(tmp_path):
    data = records_with_scores(tmp_path, [4], images=False)
    secret = "sk-test-5up3r-s3cret"
    with FakeOpenAIServer() as server:
        ok = run_score(server, data, "--api-key-env", "JUDGE_KEY", env={"JUDGE_KEY": secret})
        assert server.requests[-1].authorization == f"Bearer {secret}"
    with FakeOpenAIServer(default=401) as server:
        refused = run_score(server, data, "--api-key-env", "JUDGE_KEY", env={"JUDGE_KEY": secret})
    assert ok.returncode == 0 and secret not in ok.stderr + ok.stdout
    assert [r["aloe"]["score"]["value"] for r in read_jsonl(ok.stdout)] == [4]
    assert refused.returncode == 1 and secret not in refused.stderr
    assert "refused the request (HTTP 401); check the key in $JUDGE_KEY" in refused.stderr
    missing = run_score(server, data, "--api-key-env", "NOT_SET_ANYWHERE")
    assert missing.returncode == 1 and "NOT_SET_ANYWHERE" in missing.stderr


def test_wrong_url_or_model_stops_the_run(tmp_path):
    data = records_with_scores(tmp_path, [4], images=False)
    with FakeOpenAIServer(default=404) as server:  # what vLLM answers for a model it does not serve
        result = run_score(server, data)
    assert result.returncode == 1 and "HTTP 404" in result.stderr and "'fake-judge'" in result.stderr
    assert len(server.requests) == 1  # not retried


def test_bad_backend_options_are_usage_errors(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a")])
    bad_url = aloe("score", "-i", str(data), "--judge", "j", "--base-url", "localhost:8000")
    assert bad_url.returncode == 2 and "must be an http(s) URL" in bad_url.stderr and bad_url.stdout == ""
    both = aloe("score", "-i", str(data), "--judge", "j", "--backend", "hf", "--base-url", "http://127.0.0.1:9/v1")
    assert both.returncode == 2 and "is for --backend openai" in both.stderr


def test_an_interrupted_run_resumes_from_the_cache(tmp_path):
    data = records_with_scores(tmp_path, [1, 2, 3, 4, 5] * 3, images=False)
    cache = tmp_path / "judge.cache.jsonl"
    args = [sys.executable, "-m", "aloe_cli", "score", "-i", str(data), "--judge", "fake-judge",
            "--concurrency", "2", "--cache", str(cache), "--keep-all", "-o", str(tmp_path / "out.jsonl")]
    with FakeOpenAIServer(delay=0.25) as server:
        process = subprocess.Popen([*args, "--base-url", server.url], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not cache.exists() or len(cache.read_text().splitlines()) < 4):
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 130, stderr.decode()
        assert not (tmp_path / "out.jsonl").exists()
        finished = {entry["id"] for entry in map(json.loads, cache.read_text().splitlines())}
        assert 4 <= len(finished) < 15
        asked_before = len(server.requests)

        resumed = subprocess.run([*args, "--base-url", server.url], cwd=ROOT, capture_output=True, text=True,
                                 timeout=60)
        asked_again = {p.split("Finding ")[1].split(".")[0] for p in server.prompts()[asked_before:]}
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(finished)} cached reply(ies)" in resumed.stderr
    assert asked_again == {str(i) for i in range(15)} - finished  # finished records were not asked again
    output = read_jsonl(tmp_path / "out.jsonl")
    assert [r["aloe"]["score"]["value"] for r in output] == [1, 2, 3, 4, 5] * 3


def test_a_server_that_echoes_the_key_leaks_it_nowhere(tmp_path):
    secret = "sk-test-echo-3ch0-s3cret"
    records = [chat("q", "a [score=4]", id="parsed"), chat("q", "a [action=garbage]", id="unparseable"),
               chat("q", "a [action=500]", id="failed"), chat("q", "a [score=2]", id="low")]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    files = {name: tmp_path / name for name in ("cache.jsonl", "rejects.jsonl", "report.json")}
    with FakeOpenAIServer(echo_key=True) as server:
        result = run_score(server, data, "--api-key-env", "JUDGE_KEY", "--max-retries", "1", *FAST_RETRIES,
                           "--parse-retries", "1", "--on-error", "skip", "--cache", str(files["cache.jsonl"]),
                           "--rejects", str(files["rejects.jsonl"]), "--report", str(files["report.json"]),
                           env={"JUDGE_KEY": secret})
    assert result.returncode == 0, result.stderr
    assert all(r.authorization == f"Bearer {secret}" for r in server.requests)  # the server did get it
    kept, rejected = read_jsonl(result.stdout), read_jsonl(files["rejects.jsonl"])
    assert [r["id"] for r in kept] == ["parsed"] and "You sent Bearer ***." in kept[0]["aloe"]["score"]["reason"]
    assert {r["id"]: r["aloe"]["reject"]["reason"] for r in rejected} == {
        "unparseable": "judge_unparseable", "failed": "judge_request_failed", "low": "low_score"}
    assert "Bearer ***" in json.dumps(rejected)  # the echoes are there, masked
    outputs = [result.stdout, result.stderr, *(path.read_text() for path in files.values())]
    assert all(secret not in text for text in outputs) and files["cache.jsonl"].read_text()


# ----------------------------------------------------------------------------- hf backend, tiny model

@pytest.mark.slow
def test_hf_judge_rejects_the_garbage_of_a_random_model(tiny_model_dir, tmp_path):
    pytest.importorskip("torch")
    from aloe_cli.filters.judge import ScoreConfig, ScoreStage
    from aloe_cli.modeling.backends.hf import HFBackend
    from aloe_cli.modeling.loading import ModelSpec, load_model

    loaded = load_model(ModelSpec(str(tiny_model_dir), device="cpu"))
    scan(3, 90).save(tmp_path / "a.png")
    records = [chat("What organ is shown?", "The liver.", ["a.png"]), chat("Is it a CT?", "Yes."),
               chat("Describe the film in detail please.", "A small nodule in the right upper lobe.", ["a.png"])]
    stage = ScoreStage(HFBackend(loaded, batch_size=3), ScoreConfig(judge="tiny", parse_retries=1, max_new_tokens=8),
                       Rubric())
    items = [Item(r, f"t:{i}", "t", image_root=tmp_path) for i, r in enumerate(records)]
    stage.annotate(items)
    assert all(item.error is None for item in items)
    assert [stage.decide(item).reason for item in items] == ["judge_unparseable"] * 3  # random weights: garbage
    assert stage.counters.requests == 6 and stage.summary()["unparseable"] == 3
    assert all(item.record["aloe"]["score"]["reply"] for item in items)


@pytest.mark.slow
def test_hf_backend_through_the_cli(tiny_model_dir, tmp_path):
    scan(3, 90).save(tmp_path / "a.png")
    data = write_jsonl(tmp_path / "d.jsonl", [chat("What organ?", "The liver.", ["a.png"], id="1"),
                                              chat("Is it a CT?", "Yes.", id="2")])
    result = aloe("score", "-i", str(data), "--judge", str(tiny_model_dir), "--device", "cpu", "--keep-all",
                  "--max-new-tokens", "4", "--parse-retries", "0", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    flagged = read_jsonl(result.stdout)
    assert [r["id"] for r in flagged] == ["1", "2"]
    assert {r["aloe"]["score"]["flag"]["reason"] for r in flagged} == {"judge_unparseable"}
    assert f"judging with {tiny_model_dir} on cpu" in result.stderr and "2 request(s) to the judge" in result.stderr
