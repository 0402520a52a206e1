"""Hostile judge servers through the real `aloe score`: one that trickles bytes, one that echoes the key,
and what the server is sent (pixels, never the image file's metadata). Servers and Hubs that are not there:
one line naming the flag (or model) in seconds, before any work; a judge that stops answering is an error;
Ctrl-C says what the run keeps."""

from __future__ import annotations

import base64
import io
import json
import shutil
import signal
import socket
import time

from fake_openai_server import FakeOpenAIServer
from PIL import Image, PngImagePlugin

from reliability.hostile import start, wait_for
from support import aloe, chat, read_jsonl, write_jsonl


def score(server, data, *extra, env=None):
    return aloe("score", "-i", str(data), "--judge", "fake-judge", "--base-url", server.url,
                "--retry-backoff", "0.01", *extra, env=env)


def test_a_trickling_judge_is_cut_off_by_the_overall_deadline_and_asked_again(tmp_path):
    # The first reply (score 1) arrives one byte every 50 ms: no single read waits 0.5 s, so without a
    # deadline on the whole request the record would wait for it (or forever).
    data = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a [score=4]", id="r1")])
    with FakeOpenAIServer(script=["trickle"], trickle_interval=0.05) as server:
        result = score(server, data, "--timeout", "0.5", "--report", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr
    assert [r.action for r in server.requests] == ["trickle", "ok"]
    [kept] = read_jsonl(result.stdout)
    assert kept["id"] == "r1" and kept["aloe"]["score"]["value"] == 4
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["read"] == report["kept"] + report["rejected"] == 1


def test_a_judge_that_echoes_the_key_leaks_it_into_no_output(tmp_path):
    secret = "sk-reliability-echo-0123456789"
    data = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a [score=4]", id="kept"), chat("q", "a [score=1]", id="low")])
    files = {name: tmp_path / name for name in ("cache.jsonl", "rejects.jsonl", "report.json")}
    with FakeOpenAIServer(echo_key=True) as server:
        result = score(server, data, "--api-key-env", "JUDGE_KEY", "--cache", str(files["cache.jsonl"]),
                       "--rejects", str(files["rejects.jsonl"]), "--report", str(files["report.json"]),
                       env={"JUDGE_KEY": secret})
    assert result.returncode == 0, result.stderr
    assert all(r.authorization == f"Bearer {secret}" for r in server.requests)
    assert [r["id"] for r in read_jsonl(result.stdout)] == ["kept"]
    assert [r["id"] for r in read_jsonl(files["rejects.jsonl"])] == ["low"]
    written = [result.stdout, result.stderr, *(path.read_text() for path in files.values())]
    assert "Bearer ***" in result.stdout and all(secret not in text for text in written)


def test_the_judge_gets_the_pixels_without_the_files_metadata(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("PatientName", "Doe^Jane")
    info.add_text("Comment", "MRN 0042-117")
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (90, 30, 200)).save(buffer, format="PNG", pnginfo=info)
    (tmp_path / "scan.png").write_bytes(buffer.getvalue())
    assert b"Doe^Jane" in (tmp_path / "scan.png").read_bytes()
    data = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a [score=5]", images=["scan.png"], id="img")])
    with FakeOpenAIServer() as server:
        result = score(server, data)
        sent = [base64.b64decode(uri.split(",", 1)[1]) for uri in server.requests[0].images]
    assert result.returncode == 0, result.stderr
    assert [r["id"] for r in read_jsonl(result.stdout)] == ["img"]
    assert len(sent) == 1 and b"Doe^Jane" not in sent[0] and b"MRN" not in sent[0]
    received = Image.open(io.BytesIO(sent[0]))
    assert received.getpixel((3, 3)) == (90, 30, 200) and not {"PatientName", "Comment"} & set(received.info)


# ----------------------------------------------------------------------------- fail fast, and say the real cause

def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound once by us, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def timed(*args, env=None):
    start = time.monotonic()
    proc = aloe(*args, env=env, timeout=60)
    return proc, time.monotonic() - start


def open_benchmark(tmp_path, answer="liver"):
    return write_jsonl(tmp_path / "open.jsonl", [{"id": "o1", "question": "Which organ? [answer=The liver]",
                                                  "answer": answer}])


def test_an_unreachable_base_url_is_one_line_naming_the_flag_within_seconds(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    data = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a [score=4]", id="r1")])
    bench = open_benchmark(tmp_path)
    runs = {"score": ["score", "-i", str(data), "--judge", "j", "--base-url", url, "-o", str(tmp_path / "s.jsonl")],
            "eval": ["eval", "--model", "m", "--base-url", url, "--benchmark", str(bench), "-o", str(tmp_path / "e")],
            "infer": ["infer", "--model", "m", "--base-url", url, "-i", str(data), "-o", str(tmp_path / "i.jsonl")]}
    for name, args in runs.items():
        proc, seconds = timed(*args)
        assert proc.returncode == 1, (name, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert lines == [f"aloe: error: --base-url {url}: cannot connect to 127.0.0.1:{url.split(':')[2][:-3]} "
                         "(Connection refused); is the server running there?"], (name, proc.stderr)
        assert seconds < 15, (name, seconds)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d.jsonl", "open.jsonl"]  # nothing was written


def test_an_unreachable_judge_url_stops_eval_before_any_work(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    with FakeOpenAIServer() as model_server:
        proc, seconds = timed("eval", "--model", "m", "--base-url", model_server.url, "--benchmark",
                              str(open_benchmark(tmp_path)), "--judge", "j", "--judge-base-url", url,
                              "-o", str(tmp_path / "out"))
        asked = len(model_server.requests)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"aloe: error: --judge-base-url {url}: cannot connect to "
                                                f"{url[7:-3]} (Connection refused); is the server running there?"]
    assert seconds < 15 and asked == 0 and not (tmp_path / "out").exists()


def test_a_judge_that_does_not_answer_is_an_error_not_an_unjudged_item(tmp_path):
    # The reference carries the marker, so only the judge's prompt gets the 500 (the model answers "The liver").
    bench = open_benchmark(tmp_path, answer="liver [action=500]")
    args = ["eval", "--model", "m", "--benchmark", str(bench), "--judge", "j", "--judge-max-retries", "0",
            "--retry-backoff", "0.01"]
    with FakeOpenAIServer() as server:
        failed = aloe(*args, "--base-url", server.url, "--judge-base-url", server.url, "-o", str(tmp_path / "a"))
        skipped = aloe(*args, "--base-url", server.url, "--judge-base-url", server.url, "-o", str(tmp_path / "b"),
                       "--on-error", "skip")
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith(f"aloe: error: {bench}:1: judge request failed: "
                                                             "HTTP 500 after 1 attempt(s)")
    assert "unparseable" not in failed.stderr and "no judge verdict" not in failed.stderr
    assert skipped.returncode == 0, skipped.stderr
    assert "1 read = 0 written + 1 skipped (judge_request_failed=1)" in skipped.stderr
    scores = json.loads((tmp_path / "b" / "m" / "scores.json").read_text())["benchmarks"]["open"]
    assert scores["skipped"] == {"judge_request_failed": 1} and scores.get("unjudged", 0) == 0


def test_a_hub_id_that_cannot_be_reached_is_one_line_within_seconds(tmp_path):
    # No Hub at HF_ENDPOINT (a closed port), an empty cache: like a machine without network.
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HUB_CACHE": str(tmp_path / "hub")}
    data = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a", id="r1")])
    bench = open_benchmark(tmp_path)
    runs = [["infer", "--model", "nonexistent-org/model", "hi"],
            ["score", "-i", str(data), "--judge", "nonexistent-org/model", "--backend", "hf"],
            ["eval", "--model", "nonexistent-org/model", "--benchmark", str(bench), "-o", str(tmp_path / "e")],
            ["perplexity", "-i", str(data), "--model", "nonexistent-org/model"],
            ["train", "-i", str(data), "--model", "nonexistent-org/model", "--output-dir", str(tmp_path / "run")],
            ["adv-train", "-i", str(data), "--base", "nonexistent-org/model", "--output-dir", str(tmp_path / "run")],
            ["mix", "-i", str(data), "--tokenizer", "nonexistent-org/model", "--share", "medical/text=1", "--dry-run"]]
    for args in runs:
        for offline in ({}, {"HF_HUB_OFFLINE": "1"}):
            proc, seconds = timed(*args, env={**env, **offline})
            assert proc.returncode == 1, (args, proc.stderr)
            [line] = proc.stderr.strip().splitlines()
            prefix = "cannot load tokenizer 'nonexistent-org/model': " if args[0] == "mix" else ""
            assert line.startswith(f"aloe: error: {prefix}model nonexistent-org/model: no such local folder"), line
            assert ("HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached") in line, line
            assert seconds < 15, (args, seconds)
    assert not (tmp_path / "run").exists() and not (tmp_path / "e").exists()


def test_a_cached_hub_id_loads_from_the_cache_when_the_hub_cannot_be_reached(tiny_model_dir, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-vl"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc, seconds = timed("infer", "--model", "acme/tiny-vl", "--device", "cpu", "--max-new-tokens", "2", "Hi?",
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "acme/tiny-vl on cpu" in proc.stderr
    assert seconds < 60, seconds


def test_ctrl_c_during_eval_says_what_the_run_keeps(tmp_path):
    cache = tmp_path / "replies.jsonl"
    with FakeOpenAIServer(default="hang", hang_seconds=30) as server:
        proc = start(["eval", "--model", "m", "--base-url", server.url, "--benchmark", str(open_benchmark(tmp_path)),
                      "-o", str(tmp_path / "out"), "--cache", str(cache)])
        wait_for(lambda: len(server.requests) >= 1, proc, timeout=60)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    stderr = stderr.decode()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == (f"aloe: interrupted; the replies received so far are kept in --cache "
                                               f"{cache}: a rerun asks only for the rest")
    assert "Traceback" not in stderr
