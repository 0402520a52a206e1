"""The demo's pictures (the one place aloe draws synthetic scans): drawn from a seed, read back from pixels.

`lesion_scan` draws an axial abdominal scan with a bright round lesion near the centre of one quadrant
(or none); `shape_image` a coloured circle, square or triangle; `synthetic_scan` the plainer scan-like image
of `aloe sample-data` and the tests. `locate_lesion`, `lesion_quadrant` and
`read_object` recover what was drawn from the pixels alone, which is how a rule-based judge and the
tests know the truth without trusting the generator's labels.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from aloe_cli.filters.hashing import hash_image

IMAGE_SIZE = 56  # 4 image tokens for the tiny Qwen2-VL (one per quadrant)
QUADRANTS = ("upper left", "upper right", "lower left", "lower right")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
LESION_THRESHOLD = 185  # background tops out near 155, the lesion's core is 225-245
COLOUR_SATURATION = 60  # max - min channel: the drawn object is saturated, the background grey
_REENCODE_QUALITIES = (95, 92, 90, 88, 85, 80, 75, 70)


def _ellipse(yy: np.ndarray, xx: np.ndarray, centre, radii, edge: float) -> np.ndarray:
    """A soft-edged ellipse mask (1 inside, 0 outside; `edge` sets the sharpness)."""
    distance = np.hypot((yy - centre[0]) / radii[0], (xx - centre[1]) / radii[1])
    return 1 / (1 + np.exp((distance - 1) * edge))


def smooth_field(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, centres: tuple[float, float],
                 spreads: tuple[float, float]) -> np.ndarray:
    """Six random Gaussian blobs, scaled to 0..1: structure at the scales a perceptual hash looks at."""
    field = np.zeros(yy.shape)
    for _ in range(6):
        cy, cx = rng.uniform(*centres, 2)
        sy, sx = rng.uniform(*spreads, 2)
        field += rng.uniform(-1, 1) * np.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
    return (field - field.min()) / (np.ptp(field) + 1e-9)


def synthetic_scan(rng: np.random.Generator, size: int = 256, color: bool = False) -> Image.Image:
    """A smooth random image with a few ellipses: what `aloe sample-data` and the tests use as a scan."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    field = smooth_field(rng, yy, xx, (0.1, 0.9), (0.05, 0.3))
    gray = (field * 200 + rng.normal(0, 6, field.shape)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(gray, "L").convert("RGB" if color else "L")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.integers(0, size - 60, 2)
        w, h = rng.integers(15, 60, 2)
        fill = tuple(int(v) for v in rng.integers(0, 255, 3)) if color else int(rng.integers(0, 255))
        draw.ellipse([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=fill)
    return image


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """An axial abdominal section: body outline, liver on the image's left, stomach gas on its right.

    Values stay within 8-140 (air, gas, tissue, liver), well below a lesion's. The anatomy is what
    tells the quadrants apart, as on a real scan: Qwen2-VL's vision tower has no absolute position
    embedding and, in a model this small, M-RoPE barely separates the image tokens left from right,
    so on a featureless background the model can hardly learn *where* a lesion is.
    """
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    texture = smooth_field(rng, yy, xx, (0.05, 0.95), (0.15, 0.4))
    tissue = 40 + 100 * texture
    shift = lambda: rng.uniform(-0.03, 0.03)  # noqa: E731
    liver = _ellipse(yy, xx, (0.45 + shift(), 0.32 + shift()), rng.uniform((0.18, 0.14), (0.24, 0.18)), 8)
    tissue = tissue * (1 - liver) + rng.uniform(125, 140) * liver
    stomach = _ellipse(yy, xx, (0.38 + shift(), 0.68 + shift()), rng.uniform((0.08, 0.08), (0.12, 0.12)), 8)
    tissue = tissue * (1 - stomach) + rng.uniform(12, 30) * stomach
    body = _ellipse(yy, xx, 0.5 + rng.uniform(-0.03, 0.03, 2), rng.uniform((0.42, 0.46), (0.47, 0.5)), 25)
    return tissue * body + 8 * (1 - body) + rng.normal(0, 4, (size, size))


def quadrant_of(x: float, y: float, size: int = IMAGE_SIZE) -> int:
    return (2 if y >= size / 2 else 0) + (1 if x >= size / 2 else 0)


def lesion_scan(rng: np.random.Generator, quadrant: int | None,
                size: int = IMAGE_SIZE) -> tuple[Image.Image, tuple[int, int, int, int] | None]:
    """A scan with a bright round lesion near the centre of `quadrant` (None: no lesion).

    Returns the image and the lesion's pixel box (x1, y1, x2, y2), None without a lesion.
    """
    pixels = _background(rng, size)
    box = None
    if quadrant is not None:
        # The tiny model sees one image token per quadrant and answers a box near its quadrant's usual one. With a
        # radius of 4-5 pixels and the centre within a pixel of the quadrant's, every box a pixel from the usual one
        # still overlaps the lesion by IoU >= 0.5 in about 98% of scans, so the detection score counts finding
        # the lesion, not which of those near-equal boxes greedy decoding happens to prefer (docs/demo-task.md).
        radius = rng.uniform(4.0, 5.0)
        jitter = size / 56
        cx = size / 4 * (1 + 2 * (quadrant % 2)) + rng.uniform(-jitter, jitter)
        cy = size / 4 * (1 + 2 * (quadrant // 2)) + rng.uniform(-jitter, jitter)
        yy, xx = np.mgrid[0:size, 0:size]
        distance = np.hypot(xx + 0.5 - cx, yy + 0.5 - cy)
        disk = 1 / (1 + np.exp((distance - radius) / 0.6))  # soft edge
        pixels = pixels * (1 - disk) + rng.uniform(225, 245) * disk
        box = (int(np.floor(cx - radius)), int(np.floor(cy - radius)),
               int(np.ceil(cx + radius)), int(np.ceil(cy + radius)))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "L"), box


def shape_image(rng: np.random.Generator, colour: str, shape: str, size: int = IMAGE_SIZE) -> Image.Image:
    grey = int(rng.integers(20, 80))
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    half = rng.uniform(size * 0.18, size * 0.3)
    cx, cy = rng.uniform(half + 2, size - half - 2, 2)
    corners = [cx - half, cy - half, cx + half, cy + half]
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(corners, fill=fill)
    elif shape == "square":
        draw.rectangle(corners, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def hash_preserving_jpeg(image_png: bytes) -> bytes | None:
    """A JPEG re-encoding whose pHash equals the PNG's (None if no quality keeps it).

    At 56x56 pixels a JPEG round trip moves a pHash bit about half the time, so the quality is
    searched; the copy is still a different file with different pixels.
    """
    original = hash_image(image_png)
    image = Image.open(io.BytesIO(image_png))
    for quality in _REENCODE_QUALITIES:
        data = jpeg_bytes(image, quality)
        if hash_image(data) == original:
            return data
    return None


def locate_lesion(image: Image.Image) -> tuple[int, int, int, int] | None:
    """The pixel box (x1, y1, x2, y2) of the bright lesion, or None when there is none."""
    pixels = np.asarray(image.convert("L"), dtype=np.int16)
    ys, xs = np.nonzero(pixels > LESION_THRESHOLD)
    if len(xs) < 4:
        return None
    # The threshold cuts inside the soft edge; one pixel more on each side is the visible blob.
    height, width = pixels.shape
    return (max(0, int(xs.min()) - 1), max(0, int(ys.min()) - 1),
            min(width, int(xs.max()) + 2), min(height, int(ys.max()) + 2))


def lesion_quadrant(image: Image.Image) -> str | None:
    box = locate_lesion(image)
    if box is None:
        return None
    return QUADRANTS[quadrant_of((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, image.width)]


def read_object(image: Image.Image) -> tuple[str, str] | None:
    """(colour, shape) of the drawn object, or None when no saturated object is there."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    mask = pixels.max(axis=2) - pixels.min(axis=2) > COLOUR_SATURATION
    ys, xs = np.nonzero(mask)
    if len(xs) < 4:
        return None
    mean = pixels[mask].mean(axis=0)
    colour = min(COLOURS, key=lambda name: float(np.sum((np.array(COLOURS[name]) - mean) ** 2)))
    fill = mask.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    return colour, shape


