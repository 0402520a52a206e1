"""Slow, obviously-correct reference implementations that tests and benchmarks hold the fast code against."""

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


def reference_count(tokenizer, messages: list[dict], chat_template: str | None = None) -> int:
    """Loss tokens the slow, obviously right way: one transformers `apply_chat_template` call, summing the mask.

    `tokenizer` is a transformers tokenizer; `chat_template` the template with
    generation markers to render with (default: its own).
    """
    out = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    return int(sum(out["assistant_masks"]))
