"""Boxes on a canvas: overlap and IoU (eval scores box answers by it), placing a block off the findings,
moving a region to a free area.

A box is (x1, y1, x2, y2) with x1 < x2 and y1 < y2, in pixels or grounding
units (0..1000); the functions do not care which, as long as one call uses one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

Box = tuple[float, float, float, float]
_GRID = 9  # candidate positions per axis when moving a region
_SHRINK = 0.7  # when a region fits nowhere, try it this much smaller


def intersection(a: Sequence[float], b: Sequence[float]) -> float:
    """Area shared by two boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, width) * max(0.0, height)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (0 when either has no area)."""
    shared = intersection(a, b)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - shared
    return shared / union if union > 0 else 0.0


def expanded(box: Sequence[float], by: float) -> Box:
    return (box[0] - by, box[1] - by, box[2] + by, box[3] + by)


def anchored_boxes(width: float, height: float, canvas: tuple[float, float], margin: float) -> list[Box]:
    """A width x height block at each corner and edge middle of the canvas, `margin` in from the border."""
    canvas_w, canvas_h = canvas
    xs = (margin, (canvas_w - width) / 2, canvas_w - margin - width)
    ys = (margin, (canvas_h - height) / 2, canvas_h - margin - height)
    boxes = []
    for y in ys:
        for x in xs:
            if (x, y) == (xs[1], ys[1]):  # the centre is where findings usually are
                continue
            left, top = max(0.0, x), max(0.0, y)
            boxes.append((round(left), round(top), round(left + width), round(top + height)))
    return boxes


def place_block(width: float, height: float, canvas: tuple[float, float], avoid: Sequence[Box],
                rng: random.Random, margin: float) -> tuple[Box, float]:
    """Where to put a caption or legend block: a random anchored spot clear of `avoid`.

    Returns the box and the area it shares with `avoid` (0 unless no spot is clear,
    in which case the spot that covers the least is taken).
    """
    candidates = anchored_boxes(width, height, canvas, margin)
    rng.shuffle(candidates)
    covered = [sum(intersection(box, other) for other in avoid) for box in candidates]
    best = min(range(len(candidates)), key=lambda i: (covered[i], i))
    return candidates[best], covered[best]


def relocate(box: Sequence[float], canvas: tuple[float, float], avoid: Sequence[Box], rng: random.Random,
             gap: float, min_side: float) -> Box | None:
    """The same-sized box somewhere it does not come within `gap` of any box in `avoid`.

    When no such spot exists the box shrinks (down to `min_side`); None when
    even that fits nowhere. Positions come from a grid over the canvas.
    """
    canvas_w, canvas_h = canvas
    width, height = box[2] - box[0], box[3] - box[1]
    while min(width, height) >= min_side:
        free = []
        for i in range(_GRID):
            for j in range(_GRID):
                x = round((canvas_w - width) * i / (_GRID - 1))
                y = round((canvas_h - height) * j / (_GRID - 1))
                candidate = (x, y, x + round(width), y + round(height))
                if x >= 0 and y >= 0 and all(intersection(candidate, expanded(other, gap)) == 0 for other in avoid):
                    free.append(candidate)
        if free:
            return rng.choice(sorted(set(free)))
        width, height = width * _SHRINK, height * _SHRINK
    return None
