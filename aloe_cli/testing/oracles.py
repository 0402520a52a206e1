"""Slow, obviously-correct reference implementations that tests hold the fast code against."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def brute_force_search(entries: Iterable[tuple[int, Any]], h: int, max_distance: int) -> list[tuple[Any, int]]:
    """Reference semantics of `HashIndex.search`: every (payload, distance) with
    Hamming distance <= max_distance, sorted by distance, then insertion order."""
    found = []
    for position, (other, payload) in enumerate(entries):
        distance = (other ^ h).bit_count()
        if distance <= max_distance:
            found.append((distance, position, payload))
    found.sort(key=lambda item: (item[0], item[1]))
    return [(payload, distance) for distance, _, payload in found]
