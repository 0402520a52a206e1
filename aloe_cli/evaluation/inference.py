"""Inference: answer each record's prompt, read the boxes in the answer, optionally draw them.

Each record's conversation (up to, not including, a trailing assistant turn) goes to a generation
backend; the answer is written to `aloe.infer = {"text": ..., "boxes": [...]}`. Boxes come from the
Qwen2-VL grounding text in the answer (`aloe_cli.data.grounding`): each has its reference `label`, the
`box` as written (0..1000), `pixels`, the corners in pixels of the original image (the first image
of the record; null when the record has none), and `flags`: `reversed` (corners out of order) and
`outside_grid` (a coordinate outside 0..1000), empty for a good box. `draw_boxes` saves each image with its
boxes and labels: a reversed box is drawn with its corners put in order, a box outside the grid is not
drawn (it is no place on the image). Two records with the same id get distinct drawings (`-2`, `-3`, ...).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aloe_cli.data.grounding import GroundedBox, image_size, parse_grounding
from aloe_cli.data.io import Item
from aloe_cli.data.records import annotate
from aloe_cli.data.stage import Stage
from aloe_cli.errors import AloeError, RecordError
from aloe_cli.modeling.backends import Failure, GenerationBackend, GenerationParams, GenerationRequest

STAGE = "infer"
BOX_COLOURS = ("#ff3b30", "#34c759", "#0a84ff", "#ffcc00", "#af52de", "#ff9500")


def check_chat_template(model: str) -> None:
    """A local model folder must come with a chat template (hub ids are checked when they load)."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return
    for name in ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        try:
            if json.loads((folder / name).read_text(encoding="utf-8")).get("chat_template"):
                return
        except (OSError, ValueError, AttributeError):
            continue
    raise AloeError(f"model folder {model} has no chat template (no chat_template.jinja / chat_template.json, and "
                    "none in tokenizer_config.json): save the processor of an instruction-tuned model with it")


def locate_boxes(text: str, images: list, image_root) -> list[dict]:
    """The boxes of an answer, with pixel corners on the record's first image when it has one."""
    boxes = parse_grounding(text)
    if not boxes:
        return []
    size = image_size(images[0], image_root) if images else None
    return [_box(box, size) for box in boxes]


def _box(box: GroundedBox, size: tuple[int, int] | None) -> dict:
    pixels = [round(value, 1) for value in box.to_pixels(*size)] if size else None
    return {"label": box.label, "box": list(box.box), "image": 0 if size else None, "pixels": pixels,
            "flags": box.flags}


def drawable(box: dict) -> bool:
    """A box that marks a place on its image: pixels known, every coordinate inside the 0..1000 grid."""
    return bool(box.get("pixels")) and "outside_grid" not in (box.get("flags") or [])


def draw_boxes(images: list, image_root, boxes: list[dict], folder: Path, stem: str,
               taken: set[str] | None = None) -> list[Path]:
    """Save every image of a record as PNG, its drawable boxes drawn with their labels; returns the paths.

    Each file is written atomically (complete or absent). A drawing never replaces one of the record's own
    images (`--draw` pointed at the image folder, a record id equal to an image's name): a RecordError.
    `taken` holds the file names this run has drawn already: a record whose id repeats another's gets the
    stem `id-2` (then `-3`, ...) instead of drawing over it; the names used are added."""
    from PIL import ImageDraw

    from aloe_cli.data.images import load_image, resolve_path
    from aloe_cli.data.io import atomic_path, write_error

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(folder, exc) from None
    originals = {os.path.realpath(resolve_path(entry, image_root)) for entry in images
                 if isinstance(entry, str) and not entry.startswith("data:")}
    names = _drawing_names(stem, len(images), taken)
    written = []
    for position, entry in enumerate(images):
        image = load_image(entry, image_root).convert("RGB")
        draw = ImageDraw.Draw(image)
        width = max(1, round(max(image.size) / 200))
        for number, box in enumerate(b for b in boxes if b.get("image") == position and drawable(b)):
            colour = BOX_COLOURS[number % len(BOX_COLOURS)]
            left_x, top_y, right_x, bottom_y = box["pixels"]
            x1, x2 = sorted((left_x, right_x))  # a reversed box: its corners in order
            y1, y2 = sorted((top_y, bottom_y))
            draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
            if box.get("label"):
                left, top, right, bottom = draw.textbbox((x1, y1), box["label"])
                label_top = max(0, y1 - (bottom - top) - 2)
                draw.rectangle([x1, label_top, x1 + (right - left) + 4, label_top + (bottom - top) + 2], fill=colour)
                draw.text((x1 + 2, label_top), box["label"], fill="white")
        path = folder / names[position]
        if os.path.realpath(path) in originals:
            raise RecordError("draw_overwrites_input", f"--draw would replace the record's own image {path}: "
                              "draw into another folder", field="images")
        with atomic_path(path) as tmp:
            try:
                image.save(tmp, format="PNG")
            except OSError as exc:
                raise write_error(path, exc) from None
        written.append(path)
    return written


def _drawing_names(stem: str, count: int, taken: set[str] | None) -> list[str]:
    """The file names of one record's drawings: `stem.png`, or `stem_N.png` for several images; a stem whose
    names another record of this run already used becomes `stem-2`, `stem-3`, ..."""
    def names_for(base: str) -> list[str]:
        return [f"{base}.png"] if count == 1 else [f"{base}_{position}.png" for position in range(count)]

    names, repeat = names_for(stem), 1
    while taken is not None and any(name in taken for name in names):
        repeat += 1
        names = names_for(f"{stem}-{repeat}")
    if taken is not None:
        taken.update(names)
    return names


def prompt_of(record: dict, system: str | None) -> list[dict]:
    """The conversation to continue (a trailing assistant turn is the old answer: left out)."""
    messages = list(record["messages"])
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise RecordError("missing_field", "no user turn to answer", field="messages")
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]}, *messages]
    return messages


@dataclass
class InferStage(Stage):
    backend: Callable[[], GenerationBackend]
    params: GenerationParams
    system: str | None = None
    draw: Path | None = None
    drawn: list[Path] = field(default_factory=list)
    boxes: int = 0
    flagged: int = 0  # boxes with flags (reversed, outside the grid)
    _count: int = 0
    _drawn_names: set[str] = field(default_factory=set)

    name = STAGE

    def annotate(self, batch: list[Item]) -> None:
        ready: list[Item] = []
        requests: list[GenerationRequest] = []
        for item in batch:
            try:
                messages = prompt_of(item.record, self.system)
            except RecordError as error:
                item.error = error.located(item.where)
                continue
            ready.append(item)
            requests.append(GenerationRequest(messages=messages, images=list(item.record.get("images") or []),
                                              image_root=item.image_root))
        replies: dict[int, str] = {}

        def on_done(index: int, completion) -> None:
            if isinstance(completion, Failure):
                ready[index].error = RecordError(completion.reason, completion.message, where=ready[index].where)
            else:
                replies[index] = completion.text

        if requests:
            self.backend().generate(requests, self.params, on_done)
        for index, item in enumerate(ready):
            self._count += 1
            if index not in replies:
                continue
            try:
                self._finish(item, replies[index])
            except RecordError as error:
                item.error = error.located(item.where)

    def _finish(self, item: Item, text: str) -> None:
        images = list(item.record.get("images") or [])
        boxes = locate_boxes(text, images, item.image_root)
        annotate(item.record, STAGE, {"text": text, "boxes": boxes})
        self.boxes += len(boxes)
        self.flagged += sum(1 for box in boxes if box["flags"])
        if self.draw is not None and images:
            stem = re.sub(r"[^\w.\-]+", "_", str(item.record.get("id") or "")).strip("._") or f"{self._count:06d}"
            paths = draw_boxes(images, item.image_root, boxes, self.draw, stem, self._drawn_names)
            item.record["aloe"][STAGE]["drawings"] = [str(path) for path in paths]  # which files are this record's
            self.drawn.extend(paths)

    def summary(self) -> dict:
        return {"boxes": self.boxes, "boxes_flagged": self.flagged, "images_drawn": len(self.drawn)}


__all__ = ["InferStage", "check_chat_template", "draw_boxes", "drawable", "locate_boxes", "prompt_of"]
