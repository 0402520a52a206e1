"""Drawing perturbations into images: a caption block, a legend key, a region box.

Text uses the font that ships inside Pillow (`ImageFont.load_default(size=...)`,
Pillow >= 10.1 with FreeType), so no system font is assumed. Its size follows
the image: FONT_FRACTION of the shorter side, never under MIN_FONT_PX (capital
letters about 8 pixels tall), so a caption stays readable however small the
image the model sees. A long text wraps onto up to MAX_LINES lines, shrinks
towards the minimum size when it needs more, and is cut with "..." when even
that is not enough; a block never covers more than about half the image.
Blocks sit on an opaque box whose shade is the opposite of what lies under it,
with text in the opposite shade of the box.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont, ImageStat, features

from aloe_cli.data.images import png_bytes, to_data_uri
from aloe_cli.errors import AloeError
from aloe_cli.perturb.geometry import Box, place_block

MIN_FONT_PX = 11
FONT_FRACTION = 0.05
MAX_BLOCK_HEIGHT = 0.45  # of the image height, unless two lines need more
MAX_LINES = 3
ELLIPSIS = "..."
KEY_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230))


@dataclass(frozen=True)
class TextBlock:
    font: ImageFont.FreeTypeFont
    px: int
    lines: tuple[str, ...]
    line_height: int
    cut: bool  # the text did not fit and ends in "..."

    @property
    def width(self) -> int:
        return max(round(self.font.getlength(line)) for line in self.lines)

    @property
    def height(self) -> int:
        return self.line_height * len(self.lines)


@dataclass(frozen=True)
class Drawn:
    """What was drawn where: the changed image and a JSON-ready description."""

    image: Image.Image
    info: dict


@lru_cache(maxsize=64)
def font(px: int) -> ImageFont.FreeTypeFont:
    if not features.check("freetype2"):
        raise AloeError("drawing text into images needs Pillow built with FreeType (the standard wheels are)")
    return ImageFont.load_default(size=px)


def font_px(width: int, height: int) -> int:
    return max(MIN_FONT_PX, round(FONT_FRACTION * min(width, height)))


def _padding(px: int) -> int:
    return max(2, px // 4)


def _margin(width: int, height: int) -> int:
    return max(1, round(0.02 * min(width, height)))


def _wrap(text: str, face: ImageFont.FreeTypeFont, max_width: float) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if face.getlength(candidate) <= max_width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        while face.getlength(word) > max_width and len(word) > 1:  # a word wider than the block: cut it
            cut = 1
            while cut < len(word) and face.getlength(word[:cut + 1]) <= max_width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    return lines or [""]


def _truncate(lines: list[str], keep: int, face: ImageFont.FreeTypeFont, max_width: float) -> list[str]:
    if len(lines) <= keep:
        return lines
    last = lines[keep - 1]
    while last and face.getlength(last + ELLIPSIS) > max_width:
        last = last[:-1]
    return lines[:keep - 1] + [last.rstrip() + ELLIPSIS]


def layout(text: str, max_width: float, max_height: float, start_px: int) -> TextBlock:
    """Wrap `text` into at most max_width x max_height, shrinking the font (not below MIN_FONT_PX) before cutting."""
    px = max(start_px, MIN_FONT_PX)
    while True:
        face = font(px)
        ascent, descent = face.getmetrics()
        line_height = ascent + descent
        fits = max(1, min(MAX_LINES, int(max_height // line_height)))
        lines = _wrap(text, face, max_width)
        if len(lines) <= fits or px == MIN_FONT_PX:
            return TextBlock(face, px, tuple(_truncate(lines, fits, face, max_width)), line_height, len(lines) > fits)
        px = max(MIN_FONT_PX, int(px * 0.85))


def layout_first(texts: Sequence[str], max_width: float, max_height: float, start_px: int) -> tuple[str, TextBlock]:
    """The first of several wordings that fits uncut (the last one, cut, when none does)."""
    for text in texts:
        block = layout(text, max_width, max_height, start_px)
        if not block.cut:
            return text, block
    return text, block


def _two_lines() -> int:
    """A block may always hold two lines of the smallest font, even in a tiny image."""
    return 2 * sum(font(MIN_FONT_PX).getmetrics())


def _shades(image: Image.Image, box: Box) -> tuple[int, int]:
    """(box shade, text shade) in 0..255: the box opposes what it covers, the text opposes the box."""
    under = ImageStat.Stat(image.convert("L").crop(box)).mean[0]
    background = 0 if under >= 128 else 255
    return background, 255 - background


def _colour(image: Image.Image, value: int | tuple[int, int, int]):
    if image.mode == "L":
        return value if isinstance(value, int) else round(sum(value) / 3)
    return (value, value, value) if isinstance(value, int) else value


def _block_limits(image: Image.Image, pad: int, margin: int, reserved_width: int = 0) -> tuple[float, float]:
    width, height = image.size
    max_width = width - 2 * margin - 2 * pad - reserved_width
    max_height = MAX_BLOCK_HEIGHT * height - 2 * pad
    return max(1, max_width), max(1, max_height)


def draw_caption(image: Image.Image, texts: Sequence[str], avoid: list[Box], rng: random.Random) -> Drawn:
    """An opaque caption block, at a spot clear of the `avoid` boxes, holding the first of `texts` that fits."""
    width, height = image.size
    start = font_px(width, height)
    pad, margin = _padding(start), _margin(width, height)
    max_width, max_height = _block_limits(image, pad, margin)
    text, block = layout_first(texts, max_width, max(max_height, _two_lines()), start)
    pad = _padding(block.px)
    box, covered = place_block(block.width + 2 * pad, block.height + 2 * pad, image.size, avoid, rng, margin)
    background, foreground = _shades(image, box)
    changed = image.copy()
    draw = ImageDraw.Draw(changed)
    draw.rectangle(_inclusive(box), fill=_colour(changed, background))
    for i, line in enumerate(block.lines):
        draw.text((box[0] + pad, box[1] + pad + i * block.line_height), line, font=block.font,
                  fill=_colour(changed, foreground))
    return Drawn(changed, {"text": text, "box": list(box), "font_px": block.px, "lines": list(block.lines),
                           "overlaps_finding": covered > 0})


def draw_legend(image: Image.Image, labels: Sequence[str], avoid: list[Box], rng: random.Random) -> Drawn:
    """A legend: a coloured key swatch and the first of `labels` that fits, in an opaque block clear of `avoid`."""
    width, height = image.size
    start = font_px(width, height)
    pad, margin = _padding(start), _margin(width, height)
    swatch = font(start).getmetrics()[0]
    gap = max(2, start // 3)
    max_width, max_height = _block_limits(image, pad, margin, reserved_width=swatch + gap)
    label, block = layout_first(labels, max_width, max(max_height, _two_lines()), start)
    pad, gap = _padding(block.px), max(2, block.px // 3)
    swatch = block.font.getmetrics()[0]
    inner_height = max(swatch, block.height)
    box, covered = place_block(block.width + swatch + gap + 2 * pad, inner_height + 2 * pad, image.size, avoid,
                               rng, margin)
    colour = rng.choice(KEY_COLOURS)
    changed = image.convert("RGB")
    background, foreground = _shades(changed, box)
    draw = ImageDraw.Draw(changed)
    draw.rectangle(_inclusive(box), fill=_colour(changed, background))
    key = (box[0] + pad, box[1] + pad, box[0] + pad + swatch, box[1] + pad + swatch)
    draw.rectangle(_inclusive(key), fill=colour, outline=_colour(changed, foreground))
    for i, line in enumerate(block.lines):
        draw.text((key[2] + gap, box[1] + pad + i * block.line_height), line, font=block.font,
                  fill=_colour(changed, foreground))
    return Drawn(changed, {"text": label, "box": list(box), "font_px": block.px, "lines": list(block.lines),
                           "key_box": list(key), "key_colour": list(colour), "overlaps_finding": covered > 0})


def draw_region(image: Image.Image, box: Box, rng: random.Random) -> Drawn:
    """A coloured box outline, drawn inside `box`, as annotation tools draw regions."""
    line = max(2, round(0.01 * min(image.size)))
    colour = rng.choice(KEY_COLOURS)
    changed = image.convert("RGB")
    ImageDraw.Draw(changed).rectangle(_inclusive(box), outline=colour, width=line)
    return Drawn(changed, {"box": list(box), "line_px": line, "colour": list(colour)})


def _inclusive(box: Box) -> tuple[int, int, int, int]:
    """Pillow's rectangle includes its second corner; ours ends before it."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return (x1, y1, x2 - 1, y2 - 1)


def png_data_uri(image: Image.Image) -> str:
    """The image as a PNG data URI with no metadata at all (no text chunks, EXIF or ICC profile)."""
    return to_data_uri(png_bytes(image))
