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
        {"label": None, "box": [100, 200, 300, 400], "image": None, "pixels": None}]


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
