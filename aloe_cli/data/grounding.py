"""Region annotations <-> Qwen2-VL grounding text.

Qwen2-VL reads and writes a region as

    <|object_ref_start|>the lesion<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>

where (x1, y1) is the top-left and (x2, y2) the bottom-right corner, each
coordinate scaled to 0..1000 of the image's width or height (so the text does
not depend on how the processor resizes the image). This module converts
pixel boxes to that text, parses the text back (for inference and evaluation),
and normalises records that carry region annotations:

    {"objects": [{"bbox": [x1, y1, x2, y2], "label": "nodule", "image": 0}, ...]}   # pixel coordinates
    {"bbox": [x1, y1, x2, y2], "label": "nodule"}                                    # or box columns

One step of the 0..1000 grid is max(width, height) / 1000 pixels, so a
pixel -> text -> pixel round trip is exact to within one pixel for images up
to 2000 pixels a side, and to within half a grid step beyond.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aloe_cli.errors import RecordError

SCALE = 1000
OBJECT_REF_START, OBJECT_REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
BBOX_FORMATS = ("xyxy", "xywh")
# Boxes may stick out of the image by this many pixels (annotation tools round); beyond that they are errors.
EDGE_TOLERANCE_PX = 1.0

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_CORNERS = rf"\({_NUMBER},{_NUMBER}\)\s*,?\s*\({_NUMBER},{_NUMBER}\)"
_BOX_RE = re.compile(re.escape(BOX_START) + r"\s*" + _CORNERS + r"\s*" + re.escape(BOX_END))
_REF_RE = re.compile(re.escape(OBJECT_REF_START) + r"(.*?)" + re.escape(OBJECT_REF_END), re.DOTALL)
_BARE_BOX_RE = re.compile(_CORNERS)
_SAME_LINE_GAP = re.compile(r"[ \t]*")


@dataclass(frozen=True)
class GroundedBox:
    """One region in grounding units (0..1000), with the phrase that refers to it (None if none)."""

    label: str | None
    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x1, self.y1, self.x2, self.y2)

    def to_pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        return grounding_to_pixels(self.box, width, height)

    @property
    def flags(self) -> list[str]:
        """What is wrong with the box as written: `reversed` (a corner pair out of order: x1 > x2 or
        y1 > y2) and `outside_grid` (a coordinate outside 0..1000). Models write both; neither is a box."""
        flags = []
        if self.x1 > self.x2 or self.y1 > self.y2:
            flags.append("reversed")
        if any(not 0 <= value <= SCALE for value in self.box):
            flags.append("outside_grid")
        return flags


# ----------------------------------------------------------------------------- coordinates

def pixels_to_grounding(bbox: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel corners (x1, y1, x2, y2) -> integers on the 0..1000 grid, clamped to it."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = bbox
    scaled = (x1 / width, y1 / height, x2 / width, y2 / height)
    return tuple(min(SCALE, max(0, round(v * SCALE))) for v in scaled)  # type: ignore[return-value]


def grounding_to_pixels(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """0..1000 grid corners -> pixel corners of a width x height image."""
    x1, y1, x2, y2 = box
    return (x1 * width / SCALE, y1 * height / SCALE, x2 * width / SCALE, y2 * height / SCALE)


def xywh_to_xyxy(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, w, h = bbox
    return (x, y, x + w, y + h)


# ----------------------------------------------------------------------------- text

def format_box(box: Sequence[int]) -> str:
    x1, y1, x2, y2 = box
    return f"{BOX_START}({x1},{y1}),({x2},{y2}){BOX_END}"


def format_object(label: str | None, box: Sequence[int]) -> str:
    """The grounding text of one region; without a label only the box is written."""
    ref = f"{OBJECT_REF_START}{label}{OBJECT_REF_END}" if label else ""
    return ref + format_box(box)


def parse_grounding(text: str) -> list[GroundedBox]:
    """Every box in a model's answer, each with the phrase that refers to it.

    A phrase in `<|object_ref_start|>..<|object_ref_end|>` labels the boxes
    that follow it directly (spaces allowed in between, as in
    `<ref>kidneys</ref><box>..</box><box>..</box>`); any other text, a newline
    included, ends it, and a box with no phrase before it is unlabelled. When
    the text holds no `<|box_start|>` at all (special tokens were skipped when
    decoding), bare `(x1,y1),(x2,y2)` pairs are read instead, unlabelled.
    Coordinates are returned as written.
    """
    boxes = [(m.start(), m.end(), _coords(m)) for m in _BOX_RE.finditer(text)]
    if not boxes:
        return [GroundedBox(None, *_coords(m)) for m in _BARE_BOX_RE.finditer(text)]
    refs = [(m.start(), m.end(), m.group(1).strip() or None) for m in _REF_RE.finditer(text)]
    marks = sorted([(start, end, "ref", phrase) for start, end, phrase in refs]
                   + [(start, end, "box", coords) for start, end, coords in boxes], key=lambda mark: mark[0])
    result, label, last_end = [], None, 0
    for start, end, kind, value in marks:
        if start < last_end:  # a box written inside a phrase: not a well-formed mark
            continue
        if not _SAME_LINE_GAP.fullmatch(text[last_end:start]):
            label = None
        if kind == "ref":
            label = value
        else:
            result.append(GroundedBox(label, *value))
        last_end = end
    return result


def replace_boxes(text: str, replace: Callable[[tuple[int, int, int, int]], Sequence[int]]) -> str:
    """`text` with each `<|box_start|>..<|box_end|>` box rewritten as `replace(corners)` (as written, 0..1000)."""
    return _BOX_RE.sub(lambda match: format_box(replace(_coords(match))), text)


def without_grounding(text: str) -> str:
    """The words of `text` without grounding markup, on one line.

    A line that holds only regions (as `ground_record` appends them) is
    dropped; a phrase referred to inside a sentence keeps its words.
    """
    kept = []
    for line in text.splitlines():
        if not _BOX_RE.sub("", _REF_RE.sub("", line)).strip() and BOX_START in line:
            continue
        kept.append(_BOX_RE.sub("", _REF_RE.sub(lambda match: match.group(1), line)))
    return " ".join(" ".join(kept).split())


def _coords(match: re.Match) -> tuple[int, int, int, int]:
    return tuple(round(float(v)) for v in match.groups()[-4:])  # type: ignore[return-value]


# ----------------------------------------------------------------------------- image size

def image_size(entry: Any, image_root: str | os.PathLike | None = None) -> tuple[int, int]:
    """(width, height) as the model will see the image, read from the header only.

    Pixels are never decoded. EXIF orientations that rotate by 90 degrees swap
    the two, because image loading applies the orientation. A header that
    promises more pixels than the decompression-bomb limit, DICOM without pixel
    data or without a decoder, and every unreadable entry are record errors
    (`images.probe_image`).
    """
    from aloe_cli.data.images import probe_image

    return probe_image(entry, image_root)


# ----------------------------------------------------------------------------- records

@dataclass(frozen=True)
class Region:
    """A pixel box (x1, y1, x2, y2) on image `image` of a record, with its label."""

    bbox: tuple[float, float, float, float]
    label: str | None
    image: int = 0


def has_regions(record: dict) -> bool:
    return bool(record.get("objects")) or record.get("bbox") not in (None, [], "")


def record_regions(record: dict, bbox_format: str = "xyxy") -> list[Region]:
    """The regions of `objects` (or of `bbox`/`label` columns), as pixel xyxy boxes."""
    if bbox_format not in BBOX_FORMATS:
        raise ValueError(f"bbox_format must be one of {BBOX_FORMATS}, got {bbox_format!r}")
    if record.get("objects"):
        return _object_regions(record["objects"], bbox_format)
    return _column_regions(record.get("bbox"), record.get("label"), bbox_format)


def _object_regions(objects: Any, bbox_format: str) -> list[Region]:
    if not isinstance(objects, list):
        raise RecordError("invalid_field", "must be a list of {bbox, label} objects", field="objects")
    regions = []
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict):
            raise RecordError("invalid_field", "must be an object with 'bbox'", field=f"objects[{i}]")
        label = _label(obj.get("label"), f"objects[{i}].label")
        image = obj.get("image", 0)
        if not isinstance(image, int) or isinstance(image, bool) or image < 0:
            raise RecordError("invalid_field", "must be a non-negative image index", field=f"objects[{i}].image")
        regions.append(Region(_bbox(obj.get("bbox"), f"objects[{i}].bbox", bbox_format), label, image))
    return regions


def _column_regions(bbox: Any, label: Any, bbox_format: str) -> list[Region]:
    boxes = bbox if isinstance(bbox, list) and bbox and isinstance(bbox[0], (list, tuple)) else [bbox]
    labels = label if isinstance(label, list) else [label] * len(boxes)
    if len(labels) != len(boxes):
        raise RecordError("invalid_field", f"{len(labels)} label(s) for {len(boxes)} box(es)", field="label")
    return [Region(_bbox(box, "bbox" if len(boxes) == 1 else f"bbox[{i}]", bbox_format),
                   _label(lab, "label"))
            for i, (box, lab) in enumerate(zip(boxes, labels))]


def _label(value: Any, field: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RecordError("invalid_field", "must be a string", field=field)
    return value.strip() or None


def _bbox(value: Any, field: str, bbox_format: str) -> tuple[float, float, float, float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise RecordError("invalid_bbox", f"must be 4 finite numbers [{', '.join(_corner_names(bbox_format))}]",
                          field=field)
    box = xywh_to_xyxy(value) if bbox_format == "xywh" else tuple(float(v) for v in value)
    if not (box[0] < box[2] and box[1] < box[3]):
        raise RecordError("invalid_bbox", f"needs x1 < x2 and y1 < y2, got {list(value)} ({bbox_format})", field=field)
    return box  # type: ignore[return-value]


def _corner_names(bbox_format: str) -> tuple[str, ...]:
    return ("x", "y", "w", "h") if bbox_format == "xywh" else ("x1", "y1", "x2", "y2")


def _check_inside(region: Region, width: int, height: int, field: str) -> None:
    x1, y1, x2, y2 = region.bbox
    tol = EDGE_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise RecordError("bbox_outside_image",
                          f"box {[round(v, 1) for v in region.bbox]} lies outside the {width}x{height} image",
                          field=field)


def grounding_text(regions: Iterable[Region], sizes: dict[int, tuple[int, int]]) -> str:
    """The grounding text for regions, one per line; `sizes` maps image index -> (width, height)."""
    lines = []
    for region in regions:
        width, height = sizes[region.image]
        lines.append(format_object(region.label, pixels_to_grounding(region.bbox, width, height)))
    return "\n".join(lines)


def ground_record(record: dict, image_root: str | os.PathLike | None = None, bbox_format: str = "xyxy") -> bool:
    """Write a record's region annotations into its answer as grounding text (in place).

    The text becomes the last assistant turn's answer (appended after a
    newline when that turn already has text; a new assistant turn when the
    record has none). `aloe.grounding` records what was done, which also makes
    the conversion idempotent; an answer that already ends with the text is
    not given it twice either. Returns True when the record was changed.
    """
    aloe = record.get("aloe")
    if not has_regions(record) or (isinstance(aloe, dict) and "grounding" in aloe):
        return False
    regions = record_regions(record, bbox_format)
    images = record.get("images") or []
    sizes: dict[int, tuple[int, int]] = {}
    for i, region in enumerate(regions):
        if region.image >= len(images):
            raise RecordError("grounding_without_image",
                              f"region {i} refers to image {region.image}, but the record has {len(images)} image(s)",
                              field="objects" if record.get("objects") else "bbox")
        if region.image not in sizes:
            try:
                sizes[region.image] = image_size(images[region.image], image_root)
            except RecordError as error:
                raise RecordError(error.reason, error.message, field=f"images[{region.image}]") from None
        _check_inside(region, *sizes[region.image], field=f"objects[{i}].bbox" if record.get("objects") else "bbox")
    text = grounding_text(regions, sizes)
    if not _last_answer(record).endswith(text):
        _append_answer(record, text)
    if not isinstance(record.get("aloe"), dict):
        record["aloe"] = {}
    record["aloe"]["grounding"] = {
        "boxes": len(regions), "image_sizes": {str(k): list(v) for k, v in sorted(sizes.items())}, "scale": SCALE,
        "bbox_format": bbox_format}
    return True


def _last_answer(record: dict) -> str:
    last = record["messages"][-1]
    if last.get("role") != "assistant":
        return ""
    content = last.get("content")
    if isinstance(content, str):
        return content
    texts = [part.get("text", "") for part in content if part.get("type") == "text"]
    return texts[-1] if texts else ""


def _append_answer(record: dict, text: str) -> None:
    messages = record["messages"]
    last = messages[-1]
    if last.get("role") != "assistant":
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        return
    content = last.get("content")
    if isinstance(content, str):
        last["content"] = f"{content}\n{text}" if content.strip() else text
        return
    texts = [part for part in content if part.get("type") == "text"]
    if texts and texts[-1].get("text", "").strip():
        texts[-1]["text"] = f"{texts[-1]['text']}\n{text}"
    elif texts:
        texts[-1]["text"] = text
    else:
        content.append({"type": "text", "text": text})
