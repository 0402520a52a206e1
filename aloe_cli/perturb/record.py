"""One record -> one perturbed copy.

`perturb_record(record, kind, wrong_answer)` returns a new record (the input is
not touched) whose final assistant answer is unchanged and whose question or
image now pushes `wrong_answer`:

- `cap`    the wrong answer as a caption drawn into an image, off the known findings;
- `pmt`    a caption line stating the wrong answer, before or after the question;
- `syc`    the user's confident, wrong opinion after the question;
- `leg`    a legend drawn into an image: a coloured key labelled with the wrong answer;
- `region` the region the question refers to moved to an area clear of every true
           box: the grounding box in the question is rewritten, or, when the
           question quotes none, a box is drawn on the wrong area of the image.

The copy gets the id `<id>#<kind>` and `aloe.perturb = {kind, wrong_answer,
text (what was injected), of (the original id), seed, ...}`. Changed images
become PNG data URIs with no metadata; other images stay as they were, except
embedded DICOM data, which is always re-encoded (its header may hold patient
data). Every choice draws from a generator seeded by (seed, record id, kind).
"""

from __future__ import annotations

import copy
import os
import random
from typing import Any

from aloe_cli.data.grounding import (
    BOX_START,
    format_box,
    format_object,
    has_regions,
    image_size,
    parse_grounding,
    pixels_to_grounding,
    record_regions,
    replace_boxes,
)
from aloe_cli.data.images import is_embedded_dicom, load_image
from aloe_cli.data.records import text_of
from aloe_cli.errors import RecordError
from aloe_cli.perturb import render
from aloe_cli.perturb.answers import answer_text, normalized, option_letter, record_options, target_answer, yes_no
from aloe_cli.perturb.geometry import Box, relocate
from aloe_cli.perturb.keys import record_key, record_rng
from aloe_cli.perturb.names import KINDS
from aloe_cli.perturb.text import (
    add_text,
    image_caption,
    legend_label,
    prompt_caption,
    question_of,
    sycophancy,
    target_turn_index,
)

GROUNDING_CANVAS = (1000, 1000)
_GROUNDING_GAP = 20  # grounding units kept between a moved box and any true box
_MIN_GROUNDING_SIDE = 10


def perturb_record(record: dict, kind: str, wrong_answer: str | None, *,
                   image_root: str | os.PathLike | None = None, seed: int = 0, bbox_format: str = "xyxy") -> dict:
    """A perturbed copy of `record`; RecordError (e.g. `perturb_needs_image`) when `kind` cannot apply.

    `region` may be given no wrong answer (a detection answer that is only a box has none to push): its
    `wrong_answer` is then the moved region itself."""
    if kind not in KINDS:
        raise ValueError(f"unknown perturbation {kind!r}; choose from {', '.join(KINDS)}")
    if not (wrong_answer is None and kind == "region") and (not isinstance(wrong_answer, str)
                                                            or not wrong_answer.strip()):
        raise ValueError("wrong_answer must be a non-empty string")
    key = record_key(record)
    rng = record_rng(seed, key, kind)
    options = record_options(record)
    letter = option_letter(wrong_answer, options) if options and wrong_answer is not None else None
    wrong = options[letter] if letter else wrong_answer.strip() if wrong_answer is not None else None
    correct = answer_text(record)
    if wrong is not None and correct is not None and normalized(correct) == normalized(wrong):
        raise ValueError(f"the wrong answer {wrong!r} is the record's correct answer")
    claim = f"{letter} ({wrong})" if letter else wrong
    is_yes_no = bool(wrong is not None and yes_no(wrong) and yes_no(target_answer(record) or ""))

    out = copy.deepcopy(record)
    turn = out["messages"][target_turn_index(out)]
    info: dict[str, Any] = {"kind": kind, "wrong_answer": wrong}
    if letter:
        info["wrong_option"] = letter
    if kind == "pmt":
        before = rng.random() < 0.5
        info["text"] = prompt_caption(claim, question_of(record), is_yes_no, rng)
        info["position"] = "before" if before else "after"
        add_text(turn, info["text"], before=before)
    elif kind == "syc":
        info["text"] = sycophancy(claim, rng)
        info["position"] = "after"
        add_text(turn, info["text"], before=False)
    elif kind in ("cap", "leg"):
        index = _pick_image(out, kind, rng)
        image = load_image(out["images"][index], image_root)
        avoid = finding_boxes(out, index, image.size, bbox_format)
        # A small image may not hold the whole wording: then the bare answer is drawn.
        if kind == "cap":
            drawn = render.draw_caption(image, [image_caption(wrong, is_yes_no, rng), wrong], avoid, rng)
        else:
            drawn = render.draw_legend(image, [legend_label(wrong, rng), wrong], avoid, rng)
        out["images"][index] = render.png_data_uri(drawn.image)
        info.update(image=index, **drawn.info)
    else:
        info.update(_move_region(out, turn, rng, image_root, bbox_format))
        if wrong is None:
            info["wrong_answer"] = info["text"]
    _reencode_embedded_dicom(out, image_root)
    out["id"] = f"{key}#{kind}"
    aloe = out.get("aloe") if isinstance(out.get("aloe"), dict) else {}
    out["aloe"] = {**aloe, "perturb": {**info, "of": key, "seed": seed}}
    return out


def _pick_image(record: dict, kind: str, rng: random.Random) -> int:
    images = record.get("images") or []
    if not images:
        raise RecordError("perturb_needs_image", f"'{kind}' draws into an image; the record has none", field="images")
    return rng.randrange(len(images))


def finding_boxes(record: dict, index: int, size: tuple[int, int], bbox_format: str = "xyxy") -> list[Box]:
    """Pixel boxes of the known findings on image `index`: `objects`/`bbox`, and grounding text in any turn.

    Grounding text does not say which image it is about, so it counts for every image.
    """
    width, height = size
    boxes: list[Box] = []
    if has_regions(record):
        boxes += [region.bbox for region in record_regions(record, bbox_format) if region.image == index]
    for message in record["messages"]:
        boxes += [grounded.to_pixels(width, height) for grounded in parse_grounding(text_of(message))]
    return boxes


def _move_region(record: dict, turn: dict, rng: random.Random, image_root, bbox_format: str) -> dict:
    question = text_of(turn)
    if BOX_START in question and parse_grounding(question):
        return _move_quoted_boxes(record, turn, rng, image_root, bbox_format)
    return _draw_moved_box(record, rng, image_root, bbox_format)


def _move_quoted_boxes(record: dict, turn: dict, rng: random.Random, image_root, bbox_format: str) -> dict:
    """Rewrite each box the question quotes to a same-sized box clear of every true box (grounding units)."""
    true_boxes = [grounded.box for message in record["messages"] for grounded in parse_grounding(text_of(message))]
    images = record.get("images") or []
    if has_regions(record) and images:
        sizes: dict[int, tuple[int, int]] = {}
        for region in record_regions(record, bbox_format):
            if region.image < len(images):
                size = sizes.setdefault(region.image, image_size(images[region.image], image_root))
                true_boxes.append(pixels_to_grounding(region.bbox, *size))
    moved: dict[tuple[int, int, int, int], Box] = {}

    def move(box: tuple[int, int, int, int]) -> Box:
        if box not in moved:
            target = relocate(box, GROUNDING_CANVAS, true_boxes + list(moved.values()), rng,
                              _GROUNDING_GAP, _MIN_GROUNDING_SIDE)
            if target is None:
                raise RecordError("perturb_no_free_area", f"no free area to move the box {list(box)} to")
            moved[box] = target
        return moved[box]

    content = turn["content"]
    if isinstance(content, str):
        turn["content"] = replace_boxes(content, move)
    else:
        for part in content:
            if part.get("type") == "text":
                part["text"] = replace_boxes(part["text"], move)
    return {"text": "\n".join(format_box(box) for box in moved.values()), "units": "grounding",
            "from": [list(box) for box in moved], "to": [list(box) for box in moved.values()]}


def _draw_moved_box(record: dict, rng: random.Random, image_root, bbox_format: str) -> dict:
    """Draw a true region's box, moved to an area clear of every true box, into its image."""
    images = record.get("images") or []
    regions = record_regions(record, bbox_format) if has_regions(record) else []
    text_boxes = [grounded for message in record["messages"] for grounded in parse_grounding(text_of(message))]
    if not regions and not text_boxes:
        raise RecordError("perturb_needs_box", "'region' needs a box: grounding text in the question, "
                          "`objects`/`bbox`, or grounding text in the answer", field="objects")
    if not images:
        raise RecordError("perturb_needs_image", "'region' has no box in the question to move and no image to "
                          "draw one into", field="images")
    index = regions[0].image if regions else 0
    if index >= len(images):
        raise RecordError("grounding_without_image", f"a region refers to image {index}, but the record has "
                          f"{len(images)} image(s)", field="objects")
    image = load_image(images[index], image_root)
    width, height = image.size
    true_boxes = finding_boxes(record, index, image.size, bbox_format)
    labels = [region.label for region in regions if region.image == index] + [box.label for box in text_boxes]
    chosen = rng.randrange(len(true_boxes))
    side = min(width, height)
    target = relocate(true_boxes[chosen], image.size, true_boxes, rng, max(1.0, 0.02 * side), max(4.0, 0.03 * side))
    if target is None:
        raise RecordError("perturb_no_free_area", f"no free area of the {width}x{height} image to draw the box in")
    drawn = render.draw_region(image, target, rng)
    images[index] = render.png_data_uri(drawn.image)
    label = labels[chosen] if chosen < len(labels) else None
    return {"text": format_object(label, pixels_to_grounding(target, width, height)), "units": "pixels",
            "image": index, "from": [round(v, 1) for v in true_boxes[chosen]], "to": list(target),
            "line_px": drawn.info["line_px"]}


def _reencode_embedded_dicom(record: dict, image_root) -> None:
    """Embedded DICOM data carries its header; the copy gets the rendered pixels as PNG instead."""
    images = record.get("images") or []
    for i, entry in enumerate(images):
        if is_embedded_dicom(entry):
            images[i] = render.png_data_uri(load_image(entry, image_root))
