"""Hostile judge servers through the real `aloe score`: one that trickles bytes, one that echoes the key,
and what the server is sent (pixels, never the image file's metadata)."""

from __future__ import annotations

import base64
import io
import json

from fake_openai_server import FakeOpenAIServer
from PIL import Image, PngImagePlugin

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
