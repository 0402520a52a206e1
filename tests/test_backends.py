"""Generation backends: the OpenAI-compatible client against a local fake server (retries, deadlines,
metadata-free images, structured output, key redaction), the response cache, the factory, and the hf
backend on the tiny model (batched == one at a time)."""

from __future__ import annotations

import base64
import email.utils
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fake_openai_server import FakeOpenAIServer
from PIL import Image, ImageCms, PngImagePlugin

from aloe_cli.data.images import load_image
from aloe_cli.errors import AloeError, UsageError
from aloe_cli.modeling.backends import GenerationParams, GenerationRequest, Reply
from aloe_cli.modeling.backends.cache import CachedBackend, ResponseCache, request_key
from aloe_cli.modeling.backends.factory import BackendConfig, build_backend
from aloe_cli.modeling.backends.openai import (
    OpenAIBackend,
    OpenAIConfig,
    ServerRefused,
    backoff_seconds,
    retry_after_seconds,
)
from support import jpeg_bytes, scan

DICOM_FILE = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
SCHEMA = {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}
SECRET = "sk-test-5up3r-s3cret-key"


def ask(text: str, images: list | None = None, root=None, **extra) -> GenerationRequest:
    images = images or []
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return GenerationRequest([{"role": "user", "content": content}], images, root, **extra)


def generate(backend, requests, params=None) -> list:
    """Completions in request order, checking that on_done runs in this thread, once per request."""
    results: dict[int, object] = {}
    caller = threading.get_ident()

    def on_done(index, completion):
        assert threading.get_ident() == caller and index not in results
        results[index] = completion

    backend.generate(requests, params or GenerationParams(max_new_tokens=16), on_done)
    assert sorted(results) == list(range(len(requests)))
    return [results[i] for i in range(len(requests))]


def openai_backend(server, api_key=None, **config) -> OpenAIBackend:
    return OpenAIBackend(OpenAIConfig(model="fake", base_url=server.url, **{"retry_backoff": 0.01, **config}),
                         api_key)


# ----------------------------------------------------------------------------- retries and deadlines

def test_server_errors_are_retried_until_an_answer():
    with FakeOpenAIServer(script=[500, 503]) as server:
        backend = openai_backend(server)
        [reply] = generate(backend, [ask("q [score=5]")])
        backend.close()
    assert reply == Reply('{"score": 5, "reason": "The fake judge read the marker."}')
    assert [r.action for r in server.requests] == [500, 503, "ok"]
    assert backend.counters.retries == 2 and backend.counters.attempts == 3


def test_retry_after_sets_the_least_wait():
    with FakeOpenAIServer(script=[429], retry_after="2") as server:
        backend = openai_backend(server, retry_backoff=0.001)
        [reply] = generate(backend, [ask("q")])
        backend.close()
    assert isinstance(reply, Reply) and [r.action for r in server.requests] == [429, "ok"]
    assert backend.counters.retry_wait_s >= 2.0  # the back-off alone would have been ~1 ms


def test_retry_after_in_seconds_or_as_a_date():
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds("-1") == 0.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    assert 100 < retry_after_seconds(later) <= 120
    assert all(0.5 <= backoff_seconds(0, 1.0) <= 1.0 for _ in range(50))
    assert backoff_seconds(3, 1.0, retry_after=30) == 30 and backoff_seconds(20, 1.0) <= 60


def test_a_hanging_request_times_out_and_is_retried():
    with FakeOpenAIServer(script=["hang"]) as server:
        backend = openai_backend(server, timeout=0.3)
        [reply] = generate(backend, [ask("q [score=3]")])
        backend.close()
    assert json.loads(reply.text)["score"] == 3 and len(server.requests) == 2


def test_a_trickling_server_hits_the_overall_deadline():
    # The first answer is a valid reply (score 1) sent one byte every 50 ms: no single read ever waits
    # 0.5 s, so only a deadline on the whole attempt cuts it off and asks again (score 4).
    with FakeOpenAIServer(script=["trickle"], trickle_interval=0.05) as server:
        backend = openai_backend(server, timeout=0.5)
        [reply] = generate(backend, [ask("q")])
        backend.close()
    assert [r.action for r in server.requests] == ["trickle", "ok"]
    assert json.loads(reply.text)["score"] == 4


def test_dropped_connections_and_malformed_replies_are_retried():
    with FakeOpenAIServer(script=["drop", "malformed"]) as server:
        backend = openai_backend(server)
        [reply] = generate(backend, [ask("q [score=2]")])
        backend.close()
    assert json.loads(reply.text)["score"] == 2 and len(server.requests) == 3


def test_requests_that_keep_failing_become_failures_or_stop_the_run():
    with FakeOpenAIServer(default=500) as server:
        backend = openai_backend(server, max_retries=1)
        [failure] = generate(backend, [ask("q")])
        backend.close()
    assert failure.reason == "request_failed"
    assert failure.message.startswith("HTTP 500 after 2 attempt(s) (last answer: ")
    assert "scripted failure 500" in failure.message
    with FakeOpenAIServer(default=413) as server:  # not worth retrying, not fatal either
        backend = openai_backend(server)
        [failure] = generate(backend, [ask("q")])
        backend.close()
    assert failure.reason == "request_failed" and failure.message.startswith("HTTP 413: ")
    assert len(server.requests) == 1
    for status, message in ((401, "refused the request (HTTP 401); set --api-key-env"),
                            (404, "wrong --base-url, or the server does not serve the model 'fake'")):
        with FakeOpenAIServer(default=status) as server:
            backend = openai_backend(server)
            with pytest.raises(ServerRefused, match=message.replace("(", r"\(").replace(")", r"\)")):
                generate(backend, [ask("q"), ask("r")])
            backend.close()


def test_many_requests_in_flight_cost_no_threads():
    with FakeOpenAIServer(delay=1.0) as server:
        backend = openai_backend(server, concurrency=16)
        threads_before = client_threads()
        threads_seen = []
        replies = {}

        def on_done(index, completion):
            threads_seen.append(client_threads())
            replies[index] = completion

        backend.generate([ask(f"q{i} [score={1 + i % 5}]") for i in range(32)], GenerationParams(), on_done)
        backend.close()
    assert [json.loads(replies[i].text)["score"] for i in range(32)] == [1 + i % 5 for i in range(32)]
    assert server.max_in_flight == 16  # never more than --concurrency, and all of them used
    assert set(threads_seen) == {threads_before}  # not one thread more while 16 requests are in flight


def client_threads() -> int:
    """Threads of this process, not counting the fake server's (one per connection it answers)."""
    return sum(1 for thread in threading.enumerate()
               if "process_request_thread" not in thread.name and "serve_forever" not in thread.name)


# ----------------------------------------------------------------------------- images

def png_with_patient_metadata() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "Patient: John Doe, DOB 1950-01-01")
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buffer = io.BytesIO()
    scan(1).convert("RGB").save(buffer, format="PNG", pnginfo=info, icc_profile=icc)
    return buffer.getvalue()


def jpeg_with_patient_exif() -> bytes:
    exif = Image.Exif()
    exif[0x010E] = "Patient: John Doe"  # ImageDescription
    exif[0x8298] = "St Example Hospital"  # Copyright
    buffer = io.BytesIO()
    scan(2).convert("RGB").save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def test_images_are_sent_as_pixels_without_metadata(tmp_path):
    (tmp_path / "a.png").write_bytes(png_with_patient_metadata())
    (tmp_path / "b.jpg").write_bytes(jpeg_with_patient_exif())
    assert b"John Doe" in (tmp_path / "a.png").read_bytes() and b"John Doe" in (tmp_path / "b.jpg").read_bytes()
    patient = str(pydicom.dcmread(DICOM_FILE).PatientName).encode()
    entries = ["a.png", "b.jpg", str(DICOM_FILE)]
    with FakeOpenAIServer() as server:
        backend = openai_backend(server)
        [reply] = generate(backend, [ask("describe", entries, tmp_path)])
        backend.close()
    assert isinstance(reply, Reply)
    sent = [base64.b64decode(uri.split(",", 1)[1]) for uri in server.requests[0].images]
    assert [uri.split(";", 1)[0] for uri in server.requests[0].images] == ["data:image/png", "data:image/jpeg",
                                                                           "data:image/png"]
    for data in sent:
        assert b"John Doe" not in data and b"Hospital" not in data and patient not in data
        opened = Image.open(io.BytesIO(data))
        assert not {"exif", "icc_profile", "Comment", "xmp"} & set(opened.info)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(sent[0]))), np.asarray(load_image("a.png", tmp_path)))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(sent[2]))), np.asarray(load_image(str(DICOM_FILE))))
    assert Image.open(io.BytesIO(sent[1])).size == load_image("b.jpg", tmp_path).size


def test_bad_images_fail_their_request_without_asking(tmp_path):
    scan(0).save(tmp_path / "ok.png")
    with FakeOpenAIServer() as server:
        backend = openai_backend(server)
        missing, mismatch, fine = generate(backend, [ask("q", ["gone.png"], tmp_path),
                                                     GenerationRequest(ask("q").messages, ["ok.png"], tmp_path),
                                                     ask("q", ["ok.png"], tmp_path)])
        backend.close()
    assert missing.reason == "image_missing" and "images[0]" in missing.message
    assert mismatch.reason == "image_count_mismatch" and isinstance(fine, Reply)
    assert len(server.requests) == 1


# ----------------------------------------------------------------------------- structured output

def test_structured_output_is_requested_both_ways():
    with FakeOpenAIServer() as server:
        backend = openai_backend(server)
        generate(backend, [ask("q", response_format=SCHEMA), ask("plain")])
        backend.close()
    by_prompt = {r.prompt: r.body for r in server.requests}
    assert by_prompt["q"]["response_format"] == {"type": "json_schema",
                                                 "json_schema": {"name": "reply", "schema": SCHEMA}}
    assert by_prompt["q"]["guided_json"] == SCHEMA
    assert "response_format" not in by_prompt["plain"] and "guided_json" not in by_prompt["plain"]
    assert backend.counters.structured_output == "json_schema+guided_json"


@pytest.mark.parametrize(("refused", "mode", "fields", "refusals"), [
    (("guided_json",), "json_schema", {"response_format"}, 1),  # like api.openai.com
    (("guided_json", "response_format"), "off", set(), 2),  # a server without structured output
])
def test_a_server_that_refuses_structured_output_is_asked_without_it(refused, mode, fields, refusals):
    with FakeOpenAIServer(refuse_fields=refused) as server:
        backend = openai_backend(server, concurrency=1)
        replies = generate(backend, [ask(f"q{i} [score=3]", response_format=SCHEMA) for i in range(4)])
        backend.close()
    assert all(json.loads(reply.text)["score"] == 3 for reply in replies)
    assert backend.counters.structured_output == mode and backend.counters.retries == 0
    answered = [r for r in server.requests if r.action == "ok"]
    assert len(answered) == 4 and all({"response_format", "guided_json"} & set(r.body) == fields for r in answered)
    assert len(server.requests) == 4 + refusals  # the fallback was found once, then kept


def test_a_request_refused_for_itself_does_not_turn_structured_output_off():
    with FakeOpenAIServer() as server:
        backend = openai_backend(server, concurrency=1)
        refused, fine = generate(backend, [ask("[action=400]", response_format=SCHEMA),
                                           ask("q", response_format=SCHEMA)])
        backend.close()
    assert refused.reason == "request_failed" and refused.message.startswith("HTTP 400")
    assert isinstance(fine, Reply) and backend.counters.structured_output == "json_schema+guided_json"
    assert "guided_json" in server.requests[-1].body


# ----------------------------------------------------------------------------- the API key

def test_the_key_is_sent_and_redacted_from_everything_returned():
    with FakeOpenAIServer(echo_key=True) as server:
        backend = openai_backend(server, api_key=SECRET, max_retries=0)
        reply, failure = generate(backend, [ask("q"), ask("[action=500]")])
        backend.close()
    assert server.requests[0].authorization == f"Bearer {SECRET}"
    assert "You sent Bearer ***." in reply.text and SECRET not in reply.text
    assert SECRET not in failure.message and SECRET not in repr(backend) + backend.describe()
    with FakeOpenAIServer(echo_key=True, default=400) as server:  # error bodies are redacted too
        backend = openai_backend(server, api_key=SECRET)
        [failure] = generate(backend, [ask("q")])
        backend.close()
    assert "Bearer ***" in failure.message and SECRET not in failure.message


# ----------------------------------------------------------------------------- cache

def test_request_keys_cover_model_messages_image_bytes_and_format(tmp_path):
    scan(1).save(tmp_path / "a.png")
    scan(2).save(tmp_path / "b.png")
    messages = ask("q", ["x"]).messages
    keys = {request_key("m1", messages, ["a.png"], tmp_path), request_key("m1", messages, ["b.png"], tmp_path),
            request_key("m2", messages, ["a.png"], tmp_path), request_key("m1", ask("r", ["x"]).messages, ["a.png"],
                                                                          tmp_path),
            request_key("m1", messages, ["a.png"], tmp_path, response_format=SCHEMA),
            request_key("m1", messages, ["a.png"], tmp_path, salt="max_new_tokens=8")}
    assert len(keys) == 6
    assert request_key("m1", messages, [str(tmp_path / "a.png")]) in keys  # where the image lives does not matter
    with pytest.raises(AloeError, match="images\\[0\\].*not found"):
        request_key("m1", messages, ["gone.png"], tmp_path)


def test_cache_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text(json.dumps({"key": "k1", "reply": "ok"}) + "\n" + '{"key": "k2", "rep')
    cache = ResponseCache(path)
    assert len(cache) == 1 and cache.bad_lines == 1
    cache.put("k3", "fine", id="r3")
    cache.close()
    reloaded = ResponseCache(path)
    assert reloaded.replies == {"k1": "ok", "k3": "fine"} and reloaded.bad_lines == 1
    assert json.loads(path.read_text().splitlines()[-1]) == {"key": "k3", "reply": "fine", "id": "r3"}
    with pytest.raises(AloeError, match="cache folder does not exist"):
        ResponseCache(tmp_path / "nowhere" / "c.jsonl")


def test_cached_backend_answers_hits_and_stores_accepted_replies(tmp_path):
    requests = [ask(f"q{i} [score={i}]", key=f"k{i}", id=str(i)) for i in range(1, 5)]
    cache = ResponseCache(tmp_path / "c.jsonl")
    cache.put("k1", '{"score": 1}')
    cache.put("k2", "not worth keeping")
    with FakeOpenAIServer() as server:
        backend = CachedBackend(openai_backend(server), cache, accept=lambda text: text.startswith("{"))
        replies = generate(backend, requests)
        asked = sorted(server.prompts())
        again = generate(backend, requests)
        backend.close()
    assert [reply.cached for reply in replies] == [True, False, False, False]
    assert asked == ["q2 [score=2]", "q3 [score=3]", "q4 [score=4]"]  # the refused cached reply is asked again
    assert all(reply.cached for reply in again) and [r.text for r in again] == [r.text for r in replies]
    assert len(server.requests) == 3 and ResponseCache(tmp_path / "c.jsonl").replies["k4"] == replies[3].text


# ----------------------------------------------------------------------------- factory and options

def test_factory_builds_the_backend_the_options_ask_for(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    announced = []
    backend = build_backend(BackendConfig(model="m", base_url="http://127.0.0.1:9/v1"), on_ready=announced.append)
    assert backend.name == "openai" and backend.url == "http://127.0.0.1:9/v1/chat/completions"
    assert announced == ["m at http://127.0.0.1:9/v1/chat/completions, 64 request(s) in flight, no API key"]
    with pytest.raises(AloeError, match="--base-url must be an http"):
        build_backend(BackendConfig(model="m", base_url="localhost:8000"))
    with pytest.raises(AloeError, match="NOT_SET_ANYWHERE"):
        build_backend(BackendConfig(model="m", backend="openai", api_key_env="NOT_SET_ANYWHERE"))
    with pytest.raises(AloeError, match="model folder not found"):
        build_backend(BackendConfig(model=str(tmp_path / "none")))
    with pytest.raises(UsageError, match="is for --backend openai") as conflict:
        build_backend(BackendConfig(model="m", backend="hf", base_url="http://127.0.0.1:9/v1"))
    assert conflict.value.option == "--base-url"


# ----------------------------------------------------------------------------- hf backend, tiny model

@pytest.mark.slow
def test_hf_backend_gives_the_same_replies_batched_or_one_at_a_time(tiny_model_dir, tmp_path):
    pytest.importorskip("torch")
    from aloe_cli.modeling.backends.hf import HFBackend
    from aloe_cli.modeling.loading import ModelSpec, load_model

    loaded = load_model(ModelSpec(str(tiny_model_dir), device="cpu"))
    scan(3, 90).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(jpeg_bytes(scan(4, 96)))
    requests = [ask("What organ is shown?", ["a.png"], tmp_path),
                GenerationRequest([{"role": "system", "content": "Answer briefly."},
                                   {"role": "user", "content": [{"type": "text", "text": "Is it a CT?"}]}]),
                ask("Compare the two films in detail please.", ["a.png", "b.jpg"], tmp_path),
                ask("Broken", ["gone.png"], tmp_path),
                ask("Short?")]
    greedy = GenerationParams(max_new_tokens=6)
    one_by_one = [generate(HFBackend(loaded, batch_size=1), [request], greedy)[0] for request in requests]
    batched = generate(HFBackend(loaded, batch_size=4), requests, greedy)
    assert batched == one_by_one
    assert all(isinstance(reply, Reply) and reply.text for reply in batched[:3] + batched[4:])
    assert batched[3].reason == "image_missing" and "images[0]" in batched[3].message

    loads = []
    lazy = HFBackend(lambda: loads.append(1) or loaded, batch_size=2)
    generate(lazy, [])
    assert loads == []  # nothing to generate: the model is not loaded
    sampling = GenerationParams(max_new_tokens=6, temperature=1.0, seed=7)
    first, second = (generate(lazy, requests[:3], sampling) for _ in range(2))
    assert first == second and loads == [1]  # seeded sampling is reproducible


def test_hf_replies_keep_grounding_markers_and_drop_end_and_padding(tiny_model_dir):
    from transformers import AutoTokenizer

    from aloe_cli.modeling.backends.hf import decode_replies

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    answer = "<|object_ref_start|>lesion<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|>"
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    end, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    rows = [ids + [end, pad, pad], [pad] + tokenizer("Yes.", add_special_tokens=False)["input_ids"] + [end]]
    assert decode_replies(tokenizer, rows, [end, pad]) == [answer, "Yes."]


# ----------------------------------------------------------------------------- the shared flags


def test_every_backend_field_is_a_flag_of_every_generating_command():
    import dataclasses
    import importlib

    import typer

    fields = [f.name.replace("_", "-") for f in dataclasses.fields(BackendConfig) if f.name != "model"]
    assert len(fields) == 12
    for name in ("score", "eval", "infer"):
        command = typer.main.get_command(importlib.import_module(f"aloe_cli.commands.{name}").app)
        flags = {flag for param in command.params for flag in param.opts}
        assert {f"--{field}" for field in fields} <= flags, name
        twins = {f"--judge-{field}" for field in fields}
        assert twins <= flags if name == "eval" else not twins & flags, name


def test_the_judge_takes_the_models_values_except_its_server_key_and_remote_code():
    import typer
    from typer.testing import CliRunner

    from aloe_cli.options import with_backend_options

    seen = {}
    app = typer.Typer()

    @app.command()
    @with_backend_options(judge=True, timeout=120.0)
    def command(backend_config: BackendConfig = None, judge_config: BackendConfig = None) -> None:
        seen.update(model=backend_config, judge=judge_config)

    result = CliRunner().invoke(app, ["--base-url", "http://a:1/v1", "--concurrency", "7", "--trust-remote-code",
                                      "--api-key-env", "K", "--judge-timeout", "9", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    model, judge = seen["model"], seen["judge"]
    assert (model.kind, model.timeout, model.concurrency, model.dtype) == ("openai", 120.0, 7, "float32")
    assert type(model.dtype) is str and model.trust_remote_code and model.api_key_env == "K"
    assert (judge.kind, judge.base_url, judge.api_key_env, judge.trust_remote_code) == ("hf", None, None, False)
    assert (judge.timeout, judge.concurrency, judge.dtype) == (9.0, 7, "float32")
