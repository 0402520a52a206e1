"""Every model command on every image: reversed, oversized and out-of-range boxes in `infer --draw`, records
with the same id, and images of extreme aspect ratio in `infer` and `eval` (the tiny model's processor, like
Qwen2-VL's, refuses 200:1 and beyond). A one-line error or a counted skip; the answer always printed first."""

from __future__ import annotations

import json

import pytest
from PIL import Image, ImageColor

from aloe_cli.evaluation.inference import BOX_COLOURS
from support import aloe, chat, read_jsonl, scan, write_jsonl


def boxes_answer(*boxes: tuple, label: str | None = None) -> str:
    """An answer holding these boxes, as the fake server's [answer=...] marker (no ']' inside)."""
    ref = f"<|object_ref_start|>{label}<|object_ref_end|>" if label else ""
    text = " and ".join(f"{ref}<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>" for x1, y1, x2, y2 in boxes)
    return f"[answer={text}]"


@pytest.fixture
def server():
    from fake_openai_server import FakeOpenAIServer

    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture
def photo(tmp_path):
    scan(3, size=96).save(tmp_path / "scan.png")
    return tmp_path / "scan.png"


def served_infer(server, *args):
    return aloe("infer", "--model", "m", "--base-url", server.url, *args)


def test_a_reversed_and_an_oversized_box_print_the_answer_and_draw(tmp_path, server, photo):
    question = "Where is the lesion? " + boxes_answer((800, 700, 100, 200), (0, 0, 5000, 4000), label="lesion")
    result = served_infer(server, "--image", str(photo), "--draw", str(tmp_path / "drawn"), question)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("<|object_ref_start|>lesion<|object_ref_end|><|box_start|>(800,700),(100,200)")
    assert "flagged: reversed (drawn with its corners in order)" in result.stderr
    assert "flagged: outside_grid (not drawn)" in result.stderr
    drawn, original = Image.open(tmp_path / "drawn" / "answer.png").convert("RGB"), Image.open(photo)
    factor = drawn.width / original.width  # a small image is drawn enlarged, keeping its shape
    assert factor >= 1 and drawn.height == round(original.height * factor)
    # the reversed box is drawn where its corners in order put it: its left edge (x = 9.6) in the first colour
    red, y = ImageColor.getrgb(BOX_COLOURS[0]), round(40 * factor)
    left = round(9.6 * factor)
    assert red in {drawn.getpixel((x, y)) for x in range(left - 1, left + 2)}
    assert red not in {drawn.getpixel((x, y)) for x in range(round(20 * factor), round(70 * factor))}  # nothing inside


def test_boxes_outside_the_grid_are_flagged_in_the_records_and_the_summary(tmp_path, server, photo):
    records = [chat("Where? " + boxes_answer((-5, 10, 200, 300)), "", [photo.name], id="negative"),
               chat("Where? " + boxes_answer((100, 100, 1001, 500)), "", [photo.name], id="past-1000"),
               chat("Where? " + boxes_answer((100, 100, 500, 500)), "", [photo.name], id="good")]
    data = write_jsonl(tmp_path / "p.jsonl", records)
    result = served_infer(server, "-i", str(data), "--draw", str(tmp_path / "drawn"), "--report",
                          str(tmp_path / "report.json"), "-o", str(tmp_path / "answers.jsonl"))
    assert result.returncode == 0, result.stderr
    answers = {r["id"]: r["aloe"]["infer"] for r in read_jsonl(tmp_path / "answers.jsonl")}
    assert answers["negative"]["boxes"][0]["flags"] == ["outside_grid"]
    assert answers["past-1000"]["boxes"][0]["flags"] == ["outside_grid"]
    assert answers["good"]["boxes"][0]["flags"] == []
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["boxes"] == 3 and report["boxes_flagged"] == 2 and report["images_drawn"] == 3
    assert "aloe: warning: infer: 2 of 3 box(es) flagged (reversed or outside 0-1000)" in result.stderr


def test_records_with_the_same_id_get_distinct_drawings(tmp_path, server, photo):
    box = boxes_answer((100, 100, 500, 500))
    records = [chat(f"First. {box}", "", [photo.name], id="case"), chat(f"Second. {box}", "", [photo.name], id="case"),
               chat(f"Third. {box}", "", [photo.name], id="case-2"),
               chat(f"Fourth. {box}", "", [photo.name, photo.name], id="case")]
    data = write_jsonl(tmp_path / "p.jsonl", records)
    result = served_infer(server, "-i", str(data), "--draw", str(tmp_path / "drawn"), "--report",
                          str(tmp_path / "report.json"), "-o", str(tmp_path / "answers.jsonl"))
    assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in (tmp_path / "drawn").iterdir())
    assert files == ["case-2-2.png", "case-2.png", "case.png", "case_0.png", "case_1.png"]
    drawings = [r["aloe"]["infer"]["drawings"] for r in read_jsonl(tmp_path / "answers.jsonl")]
    named = [name.rsplit("/", 1)[-1] for names in drawings for name in names]
    assert sorted(named) == files  # every file belongs to exactly one record, and says so
    assert json.loads((tmp_path / "report.json").read_text())["images_drawn"] == len(files) == 5
    assert "drew 5 image(s)" in result.stderr


@pytest.mark.parametrize("size", [(1, 1000), (1000, 1), (2, 600)])
def test_an_extreme_aspect_ratio_is_one_line_or_a_counted_skip_in_infer(tmp_path, tiny_model_dir, size):
    Image.new("RGB", size, "gray").save(tmp_path / "strip.png")
    scan(1, size=64).save(tmp_path / "ok.png")
    one = aloe("infer", "--model", str(tiny_model_dir), "--image", str(tmp_path / "strip.png"), "--max-new-tokens",
               "2", "What is it?")
    assert one.returncode == 1 and one.stdout == ""
    assert one.stderr.strip().splitlines()[-1].startswith(
        f"aloe: error: <command line>: field 'images[0]': the model's processor cannot take a {size[0]}x{size[1]} "
        "image"), one.stderr
    data = write_jsonl(tmp_path / "p.jsonl", [chat("What is it?", "", ["strip.png"], id="strip"),
                                              chat("What is it?", "", ["ok.png"], id="ok")])
    skipped = aloe("infer", "--model", str(tiny_model_dir), "-i", str(data), "--max-new-tokens", "2", "--on-error",
                   "skip", "--rejects", str(tmp_path / "rejects.jsonl"), "--batch-size", "2")
    assert skipped.returncode == 0, skipped.stderr
    assert [r["id"] for r in read_jsonl(skipped.stdout)] == ["ok"]
    assert "2 read = 1 kept + 1 rejected" in skipped.stderr
    [reject] = read_jsonl(tmp_path / "rejects.jsonl")
    assert reject["aloe"]["reject"]["reason"] == "image_invalid"


def test_an_extreme_aspect_ratio_in_eval_is_one_line_or_a_counted_skip(tmp_path, tiny_model_dir):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (1, 1000), "gray").save(tmp_path / "images" / "tall.png")
    Image.new("RGB", (1000, 1), "gray").save(tmp_path / "images" / "wide.png")
    scan(2, size=64).save(tmp_path / "images" / "ok.png")
    bench = write_jsonl(tmp_path / "b.jsonl", [
        {"id": "1", "question": "Is this a CT?", "answer": "yes", "images": ["images/tall.png"]},
        {"id": "2", "question": "Is this a CT?", "answer": "no", "images": ["images/ok.png"]},
        {"id": "3", "question": "Is this a CT?", "answer": "no", "images": ["images/wide.png"]}])
    out = tmp_path / "out"
    failed = aloe("eval", "--model", str(tiny_model_dir), "--benchmark", str(bench), "-o", str(out),
                  "--max-new-tokens", "2")
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith(
        f"aloe: error: {bench}:1: field 'images[0]': the model's processor cannot take a 1x1000 image"), failed.stderr
    skipped = aloe("eval", "--model", str(tiny_model_dir), "--benchmark", str(bench), "-o", str(out),
                   "--max-new-tokens", "2", "--on-error", "skip")
    assert skipped.returncode == 0, skipped.stderr
    assert "3 read = 1 written + 2 skipped (image_invalid=2)" in skipped.stderr
    label = tiny_model_dir.name
    assert [p["id"] for p in read_jsonl(out / label / "b" / "predictions.jsonl")] == ["2"]


def test_an_extreme_aspect_ratio_in_perplexity_and_a_local_judge(tmp_path, tiny_model_dir):
    Image.new("RGB", (1, 1000), "gray").save(tmp_path / "strip.png")
    scan(1, size=64).save(tmp_path / "ok.png")
    data = write_jsonl(tmp_path / "p.jsonl", [chat("What is it?", "A strip.", ["strip.png"], id="strip"),
                                              chat("What is it?", "A scan.", ["ok.png"], id="ok")])
    commands = {"perplexity": ["perplexity", "--model", str(tiny_model_dir)],
                "score": ["score", "--backend", "hf", "--judge", str(tiny_model_dir), "--max-new-tokens", "4"]}
    for name, args in commands.items():
        failed = aloe(*args, "-i", str(data))
        assert failed.returncode == 1 and failed.stdout == "", name
        assert failed.stderr.strip().splitlines()[-1] == (
            f"aloe: error: {data}:1: field 'images[0]': the model's processor cannot take a 1x1000 image (absolute "
            "aspect ratio must be smaller than 200, got 1000.0); crop or pad it"), failed.stderr
        # --keep-all: the tiny judge's replies are not scores, and its verdict on "ok" is not what is tested here
        skipped = aloe(*args, "-i", str(data), "--on-error", "skip", "--keep-all")
        assert skipped.returncode == 0, skipped.stderr
        assert [r["id"] for r in read_jsonl(skipped.stdout)] == ["ok"], name
        assert "2 read = 1 kept + 1 rejected" in skipped.stderr and "image_invalid=1" in skipped.stderr, name
