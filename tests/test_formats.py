"""The formats users bring, read by every command through the one normalisation on read: JSON arrays
(LLaVA, LLaMA-Factory), LLaMA-Factory sharegpt / messages / alpaca records with `<image>` placeholders,
TRL prompt/completion records, OpenAI `image_url` and transformers image parts. Through the real CLI."""

from __future__ import annotations

import base64
import gzip
import io
import json

import pytest

from support import aloe, read_jsonl, scan

QUESTION = "Which organ is shown?"


def image_files(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        scan(seed, size=64).save(folder / name)
    return folder


def data_uri(seed: int) -> str:
    buffer = io.BytesIO()
    scan(seed, size=64).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_array(path, records, indent=2):
    path.write_text(json.dumps(records, indent=indent))
    return path


def llama_factory_records():
    """One record of each LLaMA-Factory shape (data/README.md): openai-style messages, sharegpt, alpaca."""
    return [
        {"messages": [{"role": "user", "content": "<image>Which organ is shown?"},
                      {"role": "assistant", "content": "The liver."}], "images": ["a.png"], "id": "lf-messages"},
        {"conversations": [{"from": "human", "value": "<image>\nCompare with this one: <image>"},
                           {"from": "gpt", "value": "They match."}],
         "system": "You are a radiologist.", "images": ["a.png", "b.png"], "id": "lf-sharegpt"},
        {"instruction": "<image>Describe the scan.", "input": "One sentence.", "output": "A CT slice.",
         "system": "Be brief.", "history": [["Hello.", "Hello, how can I help?"]], "images": ["b.png"],
         "id": "lf-alpaca"},
    ]


def trl_and_openai_records():
    return [
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
         "completion": [{"role": "assistant", "content": [{"type": "text", "text": "The liver."}]}],
         "images": ["a.png"], "id": "trl-conversational"},
        {"prompt": QUESTION, "completion": "The spleen.", "images": ["b.png"], "id": "trl-standard"},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(7)}},
                                                   {"type": "text", "text": QUESTION}]},
                      {"role": "assistant", "content": "The kidney."}], "id": "openai-data-uri"},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Compare "},
                                                   {"type": "image_url", "image_url": {"url": "a.png"}},
                                                   {"type": "image_url", "image_url": "file://b.png"}]},
                      {"role": "assistant", "content": "Same organ."}], "id": "openai-paths"},
        {"messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"},
                                                   {"type": "text", "text": QUESTION}]},
                      {"role": "assistant", "content": "The lung."}], "id": "transformers-image-part"},
    ]


def against(folder):
    """An evaluation set whose one image is none of the training images: dedup removes nothing."""
    scan(99, size=64).save(folder / "eval.png")
    path = folder / "eval.jsonl"
    path.write_text(json.dumps({"question": "?", "answer": "!", "images": ["eval.png"]}) + "\n")
    return str(path)


def by_id(records):
    return {record["id"]: record for record in records}


def test_a_json_array_of_llama_factory_records_is_read_as_records(tmp_path):
    image_files(tmp_path, "a.png", "b.png")
    data = write_array(tmp_path / "lf.json", llama_factory_records())
    result = aloe("dedup", "-i", str(data), "--against", str(data), "--keep-all")
    assert result.returncode == 0, result.stderr
    assert "3 read = 3 kept + 0 rejected" in result.stderr
    out = by_id(read_jsonl(result.stdout))
    assert out["lf-messages"]["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": QUESTION}]
    assert out["lf-messages"]["messages"][1]["content"] == [{"type": "text", "text": "The liver."}]
    sharegpt = out["lf-sharegpt"]["messages"]
    assert sharegpt[0] == {"role": "system", "content": [{"type": "text", "text": "You are a radiologist."}]}
    assert [part["type"] for part in sharegpt[1]["content"]] == ["image", "text", "image"]
    # on stdout, paths are absolute: the next command in a pipe finds them from any folder
    assert out["lf-sharegpt"]["images"] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    alpaca = out["lf-alpaca"]["messages"]
    assert [m["role"] for m in alpaca] == ["system", "user", "assistant", "user", "assistant"]
    assert alpaca[3]["content"] == [{"type": "image"}, {"type": "text", "text": "Describe the scan.\nOne sentence."}]
    assert alpaca[4]["content"] == [{"type": "text", "text": "A CT slice."}]
    assert "instruction" not in out["lf-alpaca"] and "conversations" not in out["lf-sharegpt"]
    # every record was hashed from its image: the images were found from the array's folder
    assert all(len(r["aloe"]["dedup"]["phash"]) == len(r["images"]) for r in out.values())


def test_trl_prompt_completion_and_openai_image_parts_are_read(tmp_path):
    image_files(tmp_path, "a.png", "b.png")
    data = tmp_path / "trl.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in trl_and_openai_records()))
    result = aloe("dedup", "-i", str(data), "--against", str(data), "--keep-all")
    assert result.returncode == 0, result.stderr
    assert "5 read = 5 kept + 0 rejected" in result.stderr
    out = by_id(read_jsonl(result.stdout))
    conversational = out["trl-conversational"]
    assert [m["role"] for m in conversational["messages"]] == ["user", "assistant"]
    assert "prompt" not in conversational and "completion" not in conversational
    standard = out["trl-standard"]  # a string prompt: its image goes before the text (TRL's convention)
    assert standard["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": QUESTION}]
    assert standard["messages"][1]["content"] == "The spleen." or standard["messages"][1]["content"] == [
        {"type": "text", "text": "The spleen."}]
    assert out["openai-data-uri"]["images"] == [data_uri(7)]
    assert out["openai-data-uri"]["messages"][0]["content"][0] == {"type": "image"}
    assert out["openai-paths"]["images"] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert [p["type"] for p in out["openai-paths"]["messages"][0]["content"]] == ["text", "image", "image"]
    assert out["transformers-image-part"]["images"] == [str(tmp_path / "a.png")]
    # the same image, hashed through a path and through a data URI, agrees
    assert out["openai-paths"]["aloe"]["dedup"]["phash"][0] == out["trl-conversational"]["aloe"]["dedup"]["phash"][0]


def test_json_arrays_from_stdin_and_gzip_and_with_a_byte_order_mark(tmp_path):
    image_files(tmp_path, "a.png", "b.png")
    text = json.dumps(llama_factory_records(), indent=1)
    (tmp_path / "lf.json.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf\n  " + text.encode())
    for args, stdin in ((["-i", str(tmp_path / "lf.json.gz")], None), (["-i", str(tmp_path / "bom.json")], None),
                        (["--image-root", str(tmp_path)], text)):
        result = aloe("dedup", *args, "--against", str(tmp_path / "bom.json"), "--keep-all", stdin=stdin)
        assert result.returncode == 0, (args, result.stderr)
        assert [r["id"] for r in read_jsonl(result.stdout)] == ["lf-messages", "lf-sharegpt", "lf-alpaca"]


def test_a_broken_json_array_is_one_line_naming_its_line(tmp_path):
    data = tmp_path / "broken.json"
    data.write_text('[\n  {"messages": [{"role": "user", "content": "hi"}]},\n  {"messages": []\n]\n')
    result = aloe("dedup", "-i", str(data), "--against", str(data), "--on-error", "skip")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"aloe: error: {data}:4: invalid JSON array"), \
        result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


BAD_RECORDS = [
    ({"instruction": 5, "output": "x"}, "invalid_field", "field 'instruction': must be a string"),
    ({"instruction": "q", "history": [["only one"]]}, "invalid_field", "field 'history[0]': must be a pair"),
    ({"prompt": "q", "completion": [{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.org/x.png"}}]}]},
     "image_invalid", "field 'completion[0].content[0].image_url.url': remote image URLs are not fetched"),
    ({"prompt": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "completion": "x"},
     "invalid_field", "field 'prompt[0].content[0].image_url': must be an object with a 'url'"),
    ({"messages": [{"role": "user", "content": "<image><image> two?"}], "images": ["a.png"]},
     "image_count_mismatch", "field 'images': 2 image placeholder(s) in messages but 1 in images"),
    ({"prompt": 3, "completion": "x"}, "invalid_field", "field 'prompt': must be a string or a non-empty list"),
    ({"conversations": [{"from": "human", "value": "<image> hi"}], "images": []},
     "image_count_mismatch", "field 'images': 1 image placeholder(s) in messages but 0 in images"),
    (7, "invalid_record", "expected a JSON object"),
    ({"messages": [{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "x"}],
      "videos": ["clip.mp4"]}, "unsupported_media", "field 'videos': aloe reads images and text only"),
]


@pytest.mark.parametrize(("record", "reason", "message"), BAD_RECORDS)
def test_a_bad_record_in_a_json_array_names_the_element_and_field(tmp_path, record, reason, message):
    image_files(tmp_path, "a.png")
    good = {"messages": [{"role": "user", "content": "<image>ok?"}, {"role": "assistant", "content": "ok"}],
            "images": ["a.png"], "id": "good"}
    data = write_array(tmp_path / "data.json", [good, record])
    failed = aloe("dedup", "-i", str(data), "--against", against(tmp_path))
    assert failed.returncode == 1
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"aloe: error: {data}[1]: ") and message in last, failed.stderr
    skipped = aloe("dedup", "-i", str(data), "--against", against(tmp_path), "--on-error", "skip", "--rejects",
                   str(tmp_path / "rejects.jsonl"))
    assert skipped.returncode == 0, skipped.stderr
    assert "2 read = 1 kept + 1 rejected" in skipped.stderr
    assert [r["id"] for r in read_jsonl(skipped.stdout)] == ["good"]
    [reject] = read_jsonl(tmp_path / "rejects.jsonl")
    assert reject["aloe"]["reject"]["reason"] == reason and reject["aloe"]["reject"]["where"] == f"{data}[1]"


def test_a_json_file_holding_one_pretty_printed_record_is_that_record(tmp_path):
    image_files(tmp_path, "a.png")
    data = tmp_path / "one.json"
    data.write_text(json.dumps(llama_factory_records()[0], indent=2))
    result = aloe("dedup", "-i", str(data), "--against", against(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "1 read = 1 kept + 0 rejected" in result.stderr
    [record] = read_jsonl(result.stdout)
    assert record["id"] == "lf-messages" and record["messages"][0]["content"][0] == {"type": "image"}
    # a JSONL file whose first line is broken is still read line by line
    lines = tmp_path / "lines.json"
    lines.write_text('{"messages": [}\n' + json.dumps(llama_factory_records()[0]) + "\n")
    skipped = aloe("dedup", "-i", str(lines), "--against", against(tmp_path), "--on-error", "skip")
    assert skipped.returncode == 0 and "2 read = 1 kept + 1 rejected" in skipped.stderr, skipped.stderr
    failed = aloe("dedup", "-i", str(lines), "--against", against(tmp_path))
    assert failed.returncode == 1 and f"aloe: error: {lines}:1: invalid JSON" in failed.stderr, failed.stderr


def test_a_bad_record_in_a_jsonl_file_names_the_line_and_the_field_it_was_written_in(tmp_path):
    data = tmp_path / "trl.jsonl"
    data.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n" + json.dumps(
        {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "robot", "content": "a"}]}) + "\n")
    result = aloe("dedup", "-i", str(data), "--against", str(data))
    assert result.returncode == 1
    assert f"{data}:2: field 'completion[0].role': role must be one of" in result.stderr, result.stderr


def test_score_and_mix_read_the_foreign_formats_too(tmp_path, tiny_model_dir):
    from fake_openai_server import FakeOpenAIServer

    image_files(tmp_path, "a.png", "b.png")
    array = write_array(tmp_path / "lf.json", llama_factory_records())
    lines = tmp_path / "trl.jsonl"
    lines.write_text("".join(json.dumps(record) + "\n" for record in trl_and_openai_records()))
    with FakeOpenAIServer() as server:
        scored = aloe("score", "-i", str(array), "-i", str(lines), "--judge", "j", "--base-url", server.url)
        images_sent = sum(len(request.images) for request in server.requests)
    assert scored.returncode == 0, scored.stderr
    assert "8 read = 8 kept + 0 rejected" in scored.stderr
    assert len(read_jsonl(scored.stdout)) == 8 and images_sent == 10  # every image went to the judge
    mixed = aloe("mix", "-i", str(array), "-i", str(lines), "--tokenizer", str(tiny_model_dir), "--domain", "medical",
                 "--share", "medical/multimodal=1", "--no-cache", "-o", str(tmp_path / "mix.jsonl"))
    assert mixed.returncode == 0, mixed.stderr
    assert len({r["id"] for r in read_jsonl(tmp_path / "mix.jsonl")}) == 8
