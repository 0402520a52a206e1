"""Stable record keys and per-record random generators.

A perturbation's randomness comes from (seed, record key, purpose) alone, never
from a record's position in the stream, so sharding or batching a run cannot
change what any record receives.
"""

from __future__ import annotations

import hashlib
import json
import random

from aloe_cli.data.images import describe


def record_key(record: dict) -> str:
    """The record's `id`; for a record without one, a digest of its messages and image names."""
    record_id = record.get("id")
    if record_id not in (None, ""):
        return str(record_id)
    content = json.dumps([record.get("messages"), [describe(entry) for entry in record.get("images") or []]],
                         sort_keys=True, default=str)
    return "sha1-" + hashlib.sha1(content.encode()).hexdigest()[:16]


def record_rng(seed: int, key: str, purpose: str) -> random.Random:
    """A generator that depends only on the seed, the record key and what it is for."""
    digest = hashlib.sha256(f"{seed}\x1f{key}\x1f{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))
