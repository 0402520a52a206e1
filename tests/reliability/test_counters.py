"""What the closing summaries count must be what happened: requests that reached the judge, values that were
really reused. Through the real CLI, against a local OpenAI-compatible server and the tiny model."""

from __future__ import annotations

import json

import pytest
from fake_openai_server import FakeOpenAIServer

from support import aloe, chat, read_jsonl, scan, write_jsonl


def test_score_counts_only_the_requests_it_sent(tmp_path):
    scan(3, size=64).save(tmp_path / "ok.png")
    good = [chat(f"Question {i}?", f"Answer {i}.", id=f"good-{i}", source="s") for i in range(3)]
    good.append(chat("What is shown?", "A scan.", ["ok.png"], id="good-image", source="s"))
    broken = [chat("What is shown?", "A lesion.", ["missing.png"], id="bad-image", source="s"),
              {"id": "no-answer", "source": "s", "messages": [{"role": "user", "content": "Only a question"}]}]
    write_jsonl(tmp_path / "train.jsonl", good[:2] + broken[:1] + good[2:] + broken[1:])
    report, rejects = tmp_path / "score.json", tmp_path / "rejects.jsonl"
    with FakeOpenAIServer() as server:
        proc = aloe("score", "-i", str(tmp_path / "train.jsonl"), "--judge", "m", "--base-url", server.url,
                    "--on-error", "skip", "--rejects", str(rejects), "--report", str(report), "-o",
                    str(tmp_path / "kept.jsonl"), "--max-retries", "0")
        sent = len(server.requests)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(report.read_text())
    assert sent == len(good) == 4
    assert summary["requests"] == sent  # the two broken records never reached the server
    assert summary["failed_before_request"] == len(broken)
    assert summary["request_failures"] == 0 and summary["cached"] == 0
    assert f"{sent} request(s) to the judge" in proc.stderr
    assert f"{len(broken)} record(s) failed before a request could be sent" in proc.stderr
    assert summary["read"] == summary["kept"] + summary["rejected"] == 6
    assert {r["id"] for r in read_jsonl(tmp_path / "kept.jsonl")} == {r["id"] for r in good}
    assert {r["id"]: r["aloe"]["reject"]["reason"] for r in read_jsonl(rejects)} == {
        "bad-image": "image_missing", "no-answer": "no_answer"}


def test_score_counts_a_request_that_failed_after_its_retries_as_sent(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [chat("q", "a", id="1", source="s"), chat("q2", "b", id="2", source="s")])
    with FakeOpenAIServer(script=[500]) as server:
        proc = aloe("score", "-i", str(tmp_path / "train.jsonl"), "--judge", "m", "--base-url", server.url,
                    "--on-error", "skip", "--report", str(tmp_path / "r.json"), "--max-retries", "0",
                    "--concurrency", "1")
        sent = len(server.requests)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "r.json").read_text())
    assert sent == 2 and summary["requests"] == 2 and summary["request_failures"] == 1
    assert summary["failed_before_request"] == 0
    assert len(read_jsonl(proc.stdout)) == 1


# ----------------------------------------------------------------------------- perplexity --reuse

@pytest.fixture(scope="module")
def scored(tiny_model_dir, tmp_path_factory):
    """Records scored once by the tiny model (each carries aloe.perplexity.model = the model folder)."""
    folder = tmp_path_factory.mktemp("ppl")
    records = [chat(f"Which organ is shown in case {i}?", f"The {w}.", id=str(i), source="s")
               for i, w in enumerate(["liver", "spleen", "left kidney", "heart", "brain", "lung"])]
    write_jsonl(folder / "train.jsonl", records)
    proc = aloe("perplexity", "-i", str(folder / "train.jsonl"), "--model", str(tiny_model_dir), "--device", "cpu",
                "--keep-all", "-o", str(folder / "scored.jsonl"))
    assert proc.returncode == 0, proc.stderr
    return folder, read_jsonl(folder / "scored.jsonl")


def test_reuse_takes_only_values_of_the_same_model(tiny_model_dir, scored, tmp_path):
    folder, records = scored
    truth = {r["id"]: r["aloe"]["perplexity"]["value"] for r in records}
    assert all(r["aloe"]["perplexity"]["model"] == str(tiny_model_dir) for r in records)
    planted = []
    for record in records:
        record = json.loads(json.dumps(record))
        values = record["aloe"]["perplexity"]
        if record["id"] in ("0", "1"):  # computed by another model: must not be taken for this one's
            values.update(model="Qwen/Qwen2-VL-72B-Instruct", value=123456.0)
        elif record["id"] == "2":  # from a run that did not record its model
            del values["model"]
            values["value"] = 654321.0
        planted.append(record)
    write_jsonl(tmp_path / "planted.jsonl", planted)
    # The same folder spelled differently is the same model.
    spelled = str(tiny_model_dir / ".." / tiny_model_dir.name)
    proc = aloe("perplexity", "-i", str(tmp_path / "planted.jsonl"), "--model", spelled, "--device", "cpu",
                "--reuse", "--keep-all", "--report", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    out = {r["id"]: r["aloe"]["perplexity"] for r in read_jsonl(proc.stdout)}
    assert len(out) == len(records)
    for key in ("0", "1", "2"):  # recomputed: this model's value, this model's name
        assert out[key]["value"] == pytest.approx(truth[key], rel=1e-4) and out[key]["model"] == spelled
    for key in ("3", "4", "5"):  # reused untouched
        assert out[key]["value"] == truth[key] and out[key]["model"] == str(tiny_model_dir)
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["records_reused"] == 3
    assert summary["records_recomputed_other_model"] == 3
    assert summary["records_scored"] == 3
    assert "3 value(s) reused, 3 recomputed" in proc.stderr
