"""Pixel boxes <-> Qwen2-VL grounding text, and record normalisation."""

from __future__ import annotations

import base64
import random

import pytest
from PIL import Image

from aloe_cli.data.grounding import (
    GroundedBox,
    format_object,
    ground_record,
    grounding_to_pixels,
    image_size,
    parse_grounding,
    pixels_to_grounding,
)
from aloe_cli.data.images import load_image
from aloe_cli.errors import RecordError
from support import chat, jpeg_bytes, scan


def test_pixel_to_grid_to_pixel_round_trips_within_one_pixel():
    rng = random.Random(0)
    for _ in range(2000):
        width, height = rng.randint(16, 2000), rng.randint(16, 2000)
        x1, x2 = sorted(rng.uniform(0, width) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, height) for _ in range(2))
        grid = pixels_to_grounding((x1, y1, x2, y2), width, height)
        assert all(isinstance(v, int) and 0 <= v <= 1000 for v in grid)
        back = grounding_to_pixels(grid, width, height)
        assert max(abs(a - b) for a, b in zip(back, (x1, y1, x2, y2))) <= 1.0


def test_text_round_trip_through_the_parser():
    boxes = [("left lung nodule", (12, 40, 300, 455)), (None, (0, 0, 1000, 1000)), ("liver", (500, 510, 620, 700))]
    text = "Findings:\n" + "\n".join(format_object(label, box) for label, box in boxes) + "\nDone."
    assert text.splitlines()[1] == ("<|object_ref_start|>left lung nodule<|object_ref_end|>"
                                    "<|box_start|>(12,40),(300,455)<|box_end|>")
    parsed = parse_grounding(text)
    assert [(b.label, b.box) for b in parsed] == boxes


def test_parser_tolerates_model_output_variants():
    spaced = "<|object_ref_start|> the mass <|object_ref_end|> <|box_start|>( 10 , 20 ) , ( 30 , 40 )<|box_end|>"
    assert parse_grounding(spaced) == [GroundedBox("the mass", 10, 20, 30, 40)]
    two_boxes = ("There are <|object_ref_start|>kidneys<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"
                 "<|box_start|>(5,6),(7,8)<|box_end|> and <|box_start|>(9,9),(10,10)<|box_end|>.")
    assert [(b.label, b.box) for b in parse_grounding(two_boxes)] == [
        ("kidneys", (1, 2, 3, 4)), ("kidneys", (5, 6, 7, 8)), (None, (9, 9, 10, 10))]
    # Decoded with skip_special_tokens=True: only the coordinates are left.
    assert parse_grounding("the mass(100,200),(300,400) and (1,1),(2,2)") == [
        GroundedBox(None, 100, 200, 300, 400), GroundedBox(None, 1, 1, 2, 2)]
    assert parse_grounding("no boxes here (1, 2)") == []
    assert GroundedBox("x", 0, 500, 1000, 1000).to_pixels(200, 100) == (0.0, 50.0, 200.0, 100.0)


def test_image_size_reads_only_the_header(tmp_path):
    data = jpeg_bytes(scan(0, size=256).resize((320, 200)))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 3])  # header intact, pixels cut off
    assert image_size(str(truncated)) == (320, 200)
    with pytest.raises(RecordError):
        load_image(str(truncated))  # a decode would fail: the size did not come from one
    uri = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    assert image_size(uri) == (320, 200)
    assert image_size("truncated.jpg", tmp_path) == (320, 200)
    with pytest.raises(RecordError) as error:
        image_size(str(tmp_path / "missing.png"))
    assert error.value.reason == "image_missing"


def test_image_size_follows_exif_rotation_like_image_loading(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    path = tmp_path / "rotated.jpg"
    scan(1).resize((300, 120)).save(path, exif=exif)
    assert image_size(str(path)) == (120, 300) == load_image(str(path)).size


@pytest.fixture
def image_dir(tmp_path):
    scan(2, size=128).resize((400, 200)).save(tmp_path / "a.png")
    return tmp_path


def test_objects_become_the_answer_and_the_conversion_is_idempotent(image_dir):
    record = chat("Locate the findings.", "", ["a.png"],
                  objects=[{"bbox": [40, 20, 200, 100], "label": "nodule"}, {"bbox": [0, 0, 400, 200]}])
    assert ground_record(record, image_dir)
    answer = record["messages"][-1]["content"][0]["text"]
    assert answer == ("<|object_ref_start|>nodule<|object_ref_end|><|box_start|>(100,100),(500,500)<|box_end|>\n"
                      "<|box_start|>(0,0),(1000,1000)<|box_end|>")
    assert record["aloe"]["grounding"] == {"boxes": 2, "image_sizes": {"0": [400, 200]}, "scale": 1000,
                                           "bbox_format": "xyxy"}
    assert not ground_record(record, image_dir)  # already converted: unchanged
    assert record["messages"][-1]["content"][0]["text"] == answer


def test_an_answer_that_already_ends_with_the_boxes_does_not_get_them_twice(image_dir):
    boxes = "<|object_ref_start|>mass<|object_ref_end|><|box_start|>(0,0),(100,100)<|box_end|>"
    record = chat("Where is it?", f"Upper left.\n{boxes}", ["a.png"], bbox=[0, 0, 40, 20], label="mass")
    assert ground_record(record, image_dir)  # marked as grounded...
    assert record["messages"][-1]["content"][0]["text"] == f"Upper left.\n{boxes}"  # ...with the text as it was
    assert record["aloe"]["grounding"]["boxes"] == 1


def test_existing_answers_are_kept_and_missing_answers_added(image_dir):
    answered = chat("Where is it?", "In the upper left.", ["a.png"], bbox=[0, 0, 40, 20], label="mass")
    ground_record(answered, image_dir)
    assert answered["messages"][-1]["content"][0]["text"] == (
        "In the upper left.\n<|object_ref_start|>mass<|object_ref_end|><|box_start|>(0,0),(100,100)<|box_end|>")
    question_only = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}],
                     "images": ["a.png"], "bbox": [[0, 0, 20, 20], [20, 20, 40, 40]], "label": ["a", "b"]}
    ground_record(question_only, image_dir, bbox_format="xyxy")
    assert question_only["messages"][-1]["role"] == "assistant"
    assert [b.label for b in parse_grounding(question_only["messages"][-1]["content"][0]["text"])] == ["a", "b"]


def test_xywh_boxes(image_dir):
    record = chat("?", "", ["a.png"], objects=[{"bbox": [40, 20, 160, 80], "label": "x"}])
    ground_record(record, image_dir, bbox_format="xywh")
    assert parse_grounding(record["messages"][-1]["content"][0]["text"])[0].box == (100, 100, 500, 500)


@pytest.mark.parametrize("record, reason, field", [
    (chat("?", "", ["a.png"], objects=[{"bbox": [10, 10, 5, 20]}]), "invalid_bbox", "objects[0].bbox"),
    (chat("?", "", ["a.png"], objects=[{"bbox": [1, 2, 3]}]), "invalid_bbox", "objects[0].bbox"),
    (chat("?", "", ["a.png"], objects=[{"bbox": [0, 0, 500, 100]}]), "bbox_outside_image", "objects[0].bbox"),
    (chat("?", "", ["a.png"], objects=[{"bbox": [0, 0, 5, 5], "label": 3}]), "invalid_field", "objects[0].label"),
    (chat("?", "", [], objects=[{"bbox": [0, 0, 5, 5]}]), "grounding_without_image", "objects"),
    (chat("?", "", ["a.png"], objects="nope"), "invalid_field", "objects"),
    (chat("?", "", ["a.png"], bbox=[[0, 0, 5, 5]], label=["a", "b"]), "invalid_field", "label"),
])
def test_bad_region_annotations_are_record_errors(image_dir, record, reason, field):
    with pytest.raises(RecordError) as error:
        ground_record(record, image_dir)
    assert (error.value.reason, error.value.field) == (reason, field)
