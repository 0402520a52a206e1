"""`aloe infer`: grounding boxes read from answers onto real images (DICOM, photographs), drawing, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib
import pydicom
import pytest
from PIL import Image

from aloe_cli.data.grounding import format_object, pixels_to_grounding
from aloe_cli.data.images import load_image
from aloe_cli.errors import AloeError
from aloe_cli.evaluation.inference import BOX_COLOURS, check_chat_template, draw_boxes, locate_boxes
from support import aloe, chat, read_jsonl, write_jsonl

DICOM_DIR = Path(pydicom.data.__file__).parent / "test_files"  # shipped with pydicom, no download
PHOTO = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"


def answer_with_boxes(regions, width, height) -> str:
    """What a grounding model writes for pixel regions of a width x height image."""
    parts = [format_object(label, pixels_to_grounding(box, width, height)) for label, box in regions]
    return "I found these regions: " + " and ".join(parts) + "."


@pytest.mark.parametrize("image", [DICOM_DIR / "CT_small.dcm", DICOM_DIR / "MR_small.dcm", PHOTO])
def test_boxes_come_back_in_pixels_of_the_original_image(image):
    width, height = load_image(str(image)).size
    regions = [("lesion", (0.1 * width, 0.2 * height, 0.45 * width, 0.5 * height)),
               ("left kidney", (0.5 * width, 0.55 * height, 0.9 * width, 0.95 * height))]
    boxes = locate_boxes(answer_with_boxes(regions, width, height), [str(image)], None)
    assert [box["label"] for box in boxes] == ["lesion", "left kidney"]
    step = max(width, height) / 1000
    for (_, expected), box in zip(regions, boxes):
        assert box["image"] == 0
        assert all(abs(got - want) <= step for got, want in zip(box["pixels"], expected)), (box, expected)


def test_non_square_image_scales_x_and_y_separately():
    width, height = Image.open(PHOTO).size
    assert width != height
    boxes = locate_boxes("<|box_start|>(0,0),(1000,500)<|box_end|>", [str(PHOTO)], None)
    assert boxes[0]["pixels"] == [0.0, 0.0, float(width), height / 2] and boxes[0]["label"] is None


def test_answers_without_images_or_boxes():
    assert locate_boxes("No box here.", [], None) == []
    assert locate_boxes("the nodule (100,200),(300,400)", [], None) == [
        {"label": None, "box": [100, 200, 300, 400], "image": None, "pixels": None, "flags": []}]


def test_drawn_boxes_sit_on_the_original_pixels(tmp_path):
    dicom = tmp_path / "scan.dcm"
    shutil.copy(DICOM_DIR / "CT_small.dcm", dicom)
    width, height = load_image(str(dicom)).size
    regions = [("lesion", (20, 30, 80, 90))]
    boxes = locate_boxes(answer_with_boxes(regions, width, height), ["scan.dcm"], tmp_path)
    [path] = draw_boxes(["scan.dcm"], tmp_path, boxes, tmp_path / "drawn", "case1")
    drawn = Image.open(path).convert("RGB")
    original = load_image(str(dicom)).convert("RGB")
    colour = tuple(int(BOX_COLOURS[0][i:i + 2], 16) for i in (1, 3, 5))
    x1, y1, x2, y2 = (round(v) for v in boxes[0]["pixels"])
    assert drawn.size == original.size
    assert drawn.getpixel((x2, (y1 + y2) // 2)) == colour and drawn.getpixel(((x1 + x2) // 2, y2)) == colour
    assert drawn.getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == original.getpixel(((x1 + x2) // 2, (y1 + y2) // 2))
    assert drawn.getpixel((x1 + 1, y1 - 3)) == colour  # the label's background sits just above the box


def test_a_model_folder_without_chat_template_is_refused(tmp_path, tiny_model_dir):
    check_chat_template(str(tiny_model_dir))
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink()
    for name in ("tokenizer_config.json", "processor_config.json"):
        path = bare / name
        if path.exists():
            data = json.loads(path.read_text())
            data.pop("chat_template", None)
            path.write_text(json.dumps(data))
    with pytest.raises(AloeError, match="has no chat template"):
        check_chat_template(str(bare))


# ----------------------------------------------------------------------------- the CLI

def test_one_question_about_an_image_prints_the_answer(tmp_path, tiny_model_dir):
    shutil.copy(DICOM_DIR / "CT_small.dcm", tmp_path / "scan.dcm")
    result = aloe("infer", "--model", str(tiny_model_dir), "--image", str(tmp_path / "scan.dcm"),
                  "What abnormality do you see?", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and result.stdout.count("\n") >= 1


def test_records_are_answered_in_input_order_with_boxes_drawn(tmp_path, tiny_model_dir):
    shutil.copy(DICOM_DIR / "CT_small.dcm", tmp_path / "scan.dcm")
    shutil.copy(PHOTO, tmp_path / "photo.jpg")
    records = [chat("Where is the lesion?", "old answer", ["scan.dcm"], id="r1"),
               {"id": "r2", "messages": [{"role": "user", "content": "What is a pneumothorax?"}]},
               chat("Compare.", "x", ["photo.jpg", "scan.dcm"], id="r3")]
    write_jsonl(tmp_path / "prompts.jsonl", records)
    result = aloe("infer", "--model", str(tiny_model_dir), "-i", str(tmp_path / "prompts.jsonl"), "--draw",
                  str(tmp_path / "drawn"), "--max-new-tokens", "6", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    out = read_jsonl(result.stdout)
    assert [r["id"] for r in out] == ["r1", "r2", "r3"]
    assert all(isinstance(r["aloe"]["infer"]["text"], str) and isinstance(r["aloe"]["infer"]["boxes"], list)
               for r in out)
    assert out[0]["messages"] == records[0]["messages"]  # the record itself is untouched
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["r1.png", "r3_0.png", "r3_1.png"]
    assert "3 read = 3 kept + 0 rejected" in result.stderr


def test_served_grounded_answer_becomes_pixel_boxes_on_the_dicom(tmp_path):
    from fake_openai_server import FakeOpenAIServer

    shutil.copy(DICOM_DIR / "CT_small.dcm", tmp_path / "scan.dcm")
    width, height = load_image(str(tmp_path / "scan.dcm")).size
    grounded = answer_with_boxes([("lesion", (20, 30, 80, 90))], width, height)
    write_jsonl(tmp_path / "p.jsonl", [chat(f"Locate the lesion. [answer={grounded}]", "", ["scan.dcm"], id="c1")])
    with FakeOpenAIServer() as server:
        result = aloe("infer", "--model", "served", "--base-url", server.url, "-i", str(tmp_path / "p.jsonl"),
                      "--draw", str(tmp_path / "drawn"), "-o", str(tmp_path / "answers.jsonl"))
        sent = server.requests[0].images
    assert result.returncode == 0, result.stderr
    assert sent and sent[0].startswith("data:image/png;base64,")  # DICOM rendered, never sent as DICOM
    [answer] = read_jsonl(tmp_path / "answers.jsonl")
    [box] = answer["aloe"]["infer"]["boxes"]
    assert box["label"] == "lesion" and all(abs(a - b) <= 1 for a, b in zip(box["pixels"], (20, 30, 80, 90)))
    assert (tmp_path / "drawn" / "c1.png").is_file()


def test_bad_usage_and_a_model_without_chat_template(tmp_path, tiny_model_dir):
    assert aloe("infer", "--model", str(tiny_model_dir)).returncode == 2
    assert aloe("infer", "--model", str(tiny_model_dir), "q", "-i", "x.jsonl").returncode == 2
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink()
    for name in ("tokenizer_config.json", "processor_config.json"):
        path = bare / name
        if path.exists():
            data = json.loads(path.read_text())
            data.pop("chat_template", None)
            path.write_text(json.dumps(data))
    result = aloe("infer", "--model", str(bare), "What is this?")
    assert result.returncode == 1 and "has no chat template" in result.stderr
