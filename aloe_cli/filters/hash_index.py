"""The near-duplicate index: exact and Hamming-distance lookup of 64-bit hashes (multi-index hashing),
and its versioned binary file format (`.idx`).

A core module: it never prints; user mistakes are `AloeError`.
"""

from __future__ import annotations

import gc
import io
import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from aloe_cli.data.io import atomic_path
from aloe_cli.errors import AloeError

HASH_BITS = 64
# The 64-bit hashes an index may hold (see hashing.HASH_FUNCTIONS); stored in the file header.
HASH_KINDS = ("phash", "dhash", "ahash", "whash")
_HASH_MASK = (1 << HASH_BITS) - 1


# ---------------------------------------------------------------------------
# Near-duplicate index


def _check_hash(h: Any) -> int:
    h = int(h)  # accepts numpy integers too
    if not 0 <= h <= _HASH_MASK:
        raise ValueError(f"hash out of 64-bit range: {h}")
    return h



def _chunk_layout(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of max_distance+1 disjoint, near-equal bit ranges covering 64 bits."""
    count = max_distance + 1
    base, extra = divmod(HASH_BITS, count)
    layout, shift = [], 0
    for i in range(count):
        width = base + (1 if i < extra else 0)
        layout.append((shift, (1 << width) - 1))
        shift += width
    return layout


def _popcount_fallback(values: np.ndarray) -> np.ndarray:
    # numpy < 2.0 has no bitwise_count: sum a per-byte lookup table instead.
    return _BYTE_POPCOUNT[values.view(np.uint8)].reshape(-1, 8).sum(axis=1)


_BYTE_POPCOUNT = np.array([i.bit_count() for i in range(256)], dtype=np.uint8)
_popcount = getattr(np, "bitwise_count", _popcount_fallback)

# A bucket this large is checked with numpy instead of a Python loop; below it
# the loop wins (measured crossover: ~3 us either way at 64 hashes).
_PACK_MIN = 64


class HashIndex:
    """(hash, payload) entries with exact and near-duplicate lookup.

    Multi-index hashing: the 64 bits are cut into max_distance+1 disjoint
    chunks. If two hashes differ in at most k bits, those k bits can touch at
    most k of the k+1 chunks, so (pigeonhole) at least one chunk is equal. A
    search looks up each of the query's chunks in that chunk's dict and checks
    only those candidates' full distance with a popcount. max_distance=0
    needs no chunk tables: the exact dict is the index.

    Chunk tables hold each distinct hash once (duplicate images are common in
    medical datasets, e.g. blank slices); the distinct hash maps to its
    entries. A bucket is a Python list while small and moves into a uint64
    numpy array once it reaches _PACK_MIN hashes, so big buckets are verified
    with one vectorised XOR+popcount. Chunks narrow as max_distance grows
    (k=8: 7-8 bits, at most 256 buckets), so with millions of entries a k=8
    search still checks ~(k+1)/2^(64/(k+1)) of the index (7% at k=8, against
    0.01% at k=4); it is always exact.
    """

    def __init__(self, max_distance: int = 0):
        max_distance = int(max_distance)
        if not 0 <= max_distance < HASH_BITS:
            raise AloeError(f"max distance must be between 0 and {HASH_BITS - 1}, got {max_distance}")
        self.max_distance = max_distance
        self._hashes: list[int] = []
        self._payloads: list[Any] = []
        # distinct hash -> entry position, or a list of positions when repeated
        # (an int, not a 1-item list, for the common unique case: much less memory).
        self._by_hash: dict[int, int | list[int]] = {}
        self._layout = _chunk_layout(max_distance) if max_distance > 0 else []
        # Per chunk: chunk value -> distinct hashes, split into a recent Python
        # list (cheap appends) and a packed numpy array (fast verification).
        # A bucket holding one hash stores the bare int: wide chunks (k <= 2)
        # leave most buckets with one hash, and a 1-item list per bucket would
        # cost ~70 bytes and an allocation each, for millions of buckets.
        self._lists: list[dict[int, list[int]]] = [{} for _ in self._layout]
        self._packed: list[dict[int, np.ndarray]] = [{} for _ in self._layout]

    def __len__(self) -> int:
        return len(self._hashes)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        """(hash, payload) in insertion order."""
        return zip(self._hashes, self._payloads)

    def add(self, h: int, payload: Any) -> None:
        h = _check_hash(h)
        position = len(self._hashes)
        self._hashes.append(h)
        self._payloads.append(payload)
        known = self._by_hash.get(h)
        if known is None:
            self._by_hash[h] = position
            # Only a new distinct hash enters the chunk tables.
            for lists, packed, (shift, mask) in zip(self._lists, self._packed, self._layout):
                key = (h >> shift) & mask
                bucket = lists.get(key)
                if bucket is None:
                    lists[key] = h  # a lone hash is stored bare, see __init__
                    continue
                if type(bucket) is int:
                    lists[key] = bucket = [bucket]
                bucket.append(h)
                if len(bucket) >= _PACK_MIN:
                    # Pack once the list is 1/16 of the array: each hash is copied
                    # ~16 times at most on average however big the bucket grows,
                    # and the Python-checked list stays short.
                    old = packed.get(key)
                    if old is None or len(bucket) * 16 >= len(old):
                        new = np.array(bucket, dtype=np.uint64)
                        packed[key] = new if old is None else np.concatenate([old, new])
                        bucket.clear()
        elif isinstance(known, list):
            known.append(position)
        else:
            self._by_hash[h] = [known, position]

    def _positions(self, h: int) -> list[int]:
        known = self._by_hash.get(h)
        if known is None:
            return []
        return known if isinstance(known, list) else [known]

    def exact(self, h: int) -> list[Any]:
        """Payloads whose hash equals h, in insertion order."""
        return [self._payloads[p] for p in self._positions(_check_hash(h))]

    def search(self, h: int, max_distance: int | None = None) -> list[tuple[Any, int]]:
        """(payload, distance) for every entry within max_distance (default: the
        index's), sorted by distance then insertion order, like brute_force_search."""
        h = _check_hash(h)
        k = self.max_distance if max_distance is None else int(max_distance)
        if k > self.max_distance:
            # The chunk tables only guarantee recall up to the distance they were built for.
            raise ValueError(f"this index was built for max distance {self.max_distance}, asked for {k}")
        if k < 0:
            return []
        if k == 0:
            return [(self._payloads[p], 0) for p in self._positions(h)]
        matches: dict[int, int] = {}  # distinct hash -> distance (a set of sorts: chunks overlap in candidates)
        query = np.uint64(h)
        for lists, packed, (shift, mask) in zip(self._lists, self._packed, self._layout):
            key = (h >> shift) & mask
            array = packed.get(key)
            if array is not None:
                distances = _popcount(array ^ query)
                hits = np.flatnonzero(distances <= k)
                if hits.size:
                    matches.update(zip(array[hits].tolist(), distances[hits].tolist()))
            bucket = lists.get(key)
            if type(bucket) is int:
                distance = (bucket ^ h).bit_count()
                if distance <= k:
                    matches[bucket] = distance
            elif bucket:
                for other in bucket:
                    distance = (other ^ h).bit_count()
                    if distance <= k:
                        matches[other] = distance
        found = [(distance, p) for other, distance in matches.items() for p in self._positions(other)]
        found.sort()
        return [(self._payloads[p], distance) for distance, p in found]

    # -- persistence -------------------------------------------------------

    def save(self, path: str | os.PathLike, meta: dict) -> None:
        """Write the entries to `path` (format: see the comment above `_write_index`).

        Payloads must be (source_name: str, row_id: int | str) pairs; `meta`
        must name the hash `kind` and the `fast` flag used, because hashes of
        different kinds or decode modes must never be compared. Other meta keys
        (JSON-serialisable) are stored as they are.
        """
        _write_index(Path(path), self._hashes, self._payloads, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, max_distance: int = 0) -> tuple[HashIndex, dict]:
        """Read a file written by `save`; build the chunk tables for `max_distance`.

        Returns (index, meta): meta as saved, with 'kind', 'fast' and 'sources'.
        Raises AloeError for a missing, foreign, corrupt or newer-version file.
        """
        index = cls(max_distance)
        # Millions of new lists and tuples trigger the cyclic GC over and over
        # (it scans the growing heap each time, ~3x the load time); none of them
        # can form a cycle, so pause it for the load.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            hashes, payloads, meta = _read_index(Path(path))
            index._bulk_load(hashes, payloads)
        finally:
            if gc_was_enabled:
                gc.enable()
        return index, meta

    def _bulk_load(self, hashes: np.ndarray, payloads: list[Any]) -> None:
        """Fill an empty index from a uint64 array: the same state add() in a loop
        would give, but grouped with numpy sorts instead of a million dict updates."""
        n = len(hashes)
        self._hashes = hashes.tolist()
        self._payloads = payloads
        if n == 0:
            return
        # Distinct hashes map to their position in C (dict(zip)); only repeated
        # hashes, found by sorting, need a Python loop to build their lists.
        self._by_hash = dict(zip(reversed(self._hashes), range(n - 1, -1, -1)))  # first position wins
        order = np.argsort(hashes, kind="stable")
        sorted_hashes = hashes[order]
        repeated = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1]) + 1
        if repeated.size:
            for position, h in zip(order[repeated].tolist(), sorted_hashes[repeated].tolist()):
                known = self._by_hash[h]
                if isinstance(known, list):
                    known.append(position)  # stable sort: positions arrive ascending
                else:
                    self._by_hash[h] = [known, position]
        if not self._layout:
            return
        distinct = np.delete(sorted_hashes, repeated)
        for lists, packed, (shift, mask) in zip(self._lists, self._packed, self._layout):
            keys = (distinct >> np.uint64(shift)) & np.uint64(mask)
            # Narrow keys sort by radix sort, much faster than a 64-bit comparison sort.
            keys = keys.astype(np.uint16 if mask < (1 << 16) else np.uint32 if mask < (1 << 32) else np.uint64)
            key_order = np.argsort(keys, kind="stable")
            sorted_keys = keys[key_order]
            values = distinct[key_order]
            starts = np.concatenate([[0], np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1])
            ends = np.append(starts[1:], len(values))
            big = (ends - starts) >= _PACK_MIN
            for key, start, end in zip(sorted_keys[starts[big]].tolist(), starts[big].tolist(), ends[big].tolist()):
                packed[key] = values[start:end]
            # Wide chunks (k <= 2) give mostly one-hash buckets: store those bare
            # in one C-level update, and loop in Python only over the rest.
            single = (ends - starts) == 1
            lists.update(zip(sorted_keys[starts[single]].tolist(), values[starts[single]].tolist()))
            middle = ~big & ~single
            if middle.any():
                value_list = values.tolist()
                for key, start, end in zip(sorted_keys[starts[middle]].tolist(), starts[middle].tolist(),
                                           ends[middle].tolist()):
                    lists[key] = value_list[start:end]


# ---------------------------------------------------------------------------
# File format (version 1), little-endian throughout:
#
#   8 bytes   magic b"ALOEHSH\x00"
#   4 bytes   uint32 header length H
#   H bytes   UTF-8 JSON header:
#               {"format": "aloe-hash-index", "version": 1, "hash_bits": 64,
#                "kind": "phash", "fast": false, "count": N,
#                "sources": [names...], "row_ids": "int64" | "json",
#                "body_bytes": B, "crc32": C, "meta": {caller's other keys}}
#   B bytes   body: N uint64 hashes, N uint32 source indexes (into "sources"),
#             then the row ids: N int64, or (row_ids == "json") a UTF-8 JSON
#             list, used when some row id is not an int.
#
# Raw arrays make load a few numpy.frombuffer calls (1M entries = 20 MB), the
# CRC32 of the body catches bit rot and truncation, and the JSON header stays
# readable with `head -c`. Readers refuse versions they do not know.

_MAGIC = b"ALOEHSH\x00"
_FORMAT_NAME = "aloe-hash-index"
_FORMAT_VERSION = 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _write_index(path: Path, hashes: list[int], payloads: list[Any], meta: dict) -> None:
    meta = dict(meta)
    kind, fast = meta.pop("kind", None), meta.pop("fast", None)
    meta.pop("sources", None)  # derived from the payloads
    if kind not in HASH_KINDS:
        raise AloeError(f"unknown hash kind {kind!r} (choose from {', '.join(HASH_KINDS)})")
    if not isinstance(fast, bool):
        raise AloeError("hash index meta must say whether hashes were computed with fast=True or False")
    source_ids: dict[str, int] = {}
    source_index = np.empty(len(payloads), dtype="<u4")
    row_ids = []
    for i, payload in enumerate(payloads):
        if not (isinstance(payload, (tuple, list)) and len(payload) == 2 and isinstance(payload[0], str)
                and isinstance(payload[1], (int, str)) and not isinstance(payload[1], bool)):
            raise AloeError(f"cannot save hash index entry {i}: payload must be (source_name, row_id), "
                            f"got {payload!r:.80}")
        source_index[i] = source_ids.setdefault(payload[0], len(source_ids))
        row_ids.append(payload[1])
    all_int = all(type(r) is int and _INT64_MIN <= r <= _INT64_MAX for r in row_ids)
    body = io.BytesIO()
    body.write(np.asarray(hashes, dtype=np.uint64).astype("<u8").tobytes())
    body.write(source_index.tobytes())
    if all_int:
        body.write(np.asarray(row_ids, dtype="<i8").tobytes())
    else:
        body.write(json.dumps(row_ids, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    body_bytes = body.getvalue()
    header = {
        "format": _FORMAT_NAME, "version": _FORMAT_VERSION, "hash_bits": HASH_BITS,
        "kind": kind, "fast": fast, "count": len(hashes), "sources": list(source_ids),
        "row_ids": "int64" if all_int else "json", "body_bytes": len(body_bytes),
        "crc32": zlib.crc32(body_bytes), "meta": meta,
    }
    try:
        header_bytes = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise AloeError(f"hash index meta is not JSON-serialisable: {exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(_MAGIC)
            f.write(struct.pack("<I", len(header_bytes)))
            f.write(header_bytes)
            f.write(body_bytes)
    except OSError as exc:
        raise AloeError(f"cannot write hash index {path}: {exc.strerror or exc}") from None


def _read_index(path: Path) -> tuple[np.ndarray, list[Any], dict]:
    def bad(why: str) -> AloeError:
        return AloeError(f"{path} is not a usable aloe hash index: {why}")

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AloeError(f"hash index not found: {path}") from None
    except OSError as exc:
        raise AloeError(f"cannot read hash index {path}: {exc.strerror or exc}") from None
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 4:
        raise bad("unknown file type (no aloe hash index signature)")
    (header_len,) = struct.unpack_from("<I", data, len(_MAGIC))
    body_start = len(_MAGIC) + 4 + header_len
    if body_start > len(data):
        raise bad("file is truncated")
    try:
        header = json.loads(data[len(_MAGIC) + 4:body_start].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("header is corrupt") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT_NAME:
        raise bad("header is corrupt")
    if header.get("version") != _FORMAT_VERSION:
        raise bad(f"format version {header.get('version')!r} is not supported "
                  f"(this aloe reads version {_FORMAT_VERSION}); rebuild the index")
    try:
        count, kind, fast = int(header["count"]), header["kind"], header["fast"]
        sources, row_format = header["sources"], header["row_ids"]
        if not isinstance(sources, list):
            raise TypeError
        body_bytes, crc = int(header["body_bytes"]), int(header["crc32"])
        meta = dict(header.get("meta") or {})
        if (header.get("hash_bits") != HASH_BITS or kind not in HASH_KINDS or not isinstance(fast, bool)
                or not all(isinstance(name, str) for name in sources)):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise bad("header is corrupt") from None
    body = memoryview(data)[body_start:]
    if len(body) != body_bytes:
        raise bad("file is truncated" if len(body) < body_bytes else "file has trailing data")
    if zlib.crc32(body) != crc:
        raise bad("checksum mismatch (file is corrupt)")
    fixed = count * (8 + 4)
    if count < 0 or fixed > len(body):
        raise bad("header is corrupt")
    hashes = np.frombuffer(body, dtype="<u8", count=count).astype(np.uint64, copy=False)
    source_index = np.frombuffer(body, dtype="<u4", count=count, offset=count * 8)
    if count and int(source_index.max()) >= len(sources):
        raise bad("source index out of range")
    if row_format == "int64":
        if len(body) != fixed + count * 8:
            raise bad("header is corrupt")
        row_ids = np.frombuffer(body, dtype="<i8", count=count, offset=fixed).tolist()
    elif row_format == "json":
        try:
            row_ids = json.loads(bytes(body[fixed:]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise bad("row ids are corrupt") from None
        if not isinstance(row_ids, list) or len(row_ids) != count:
            raise bad("row ids are corrupt")
    else:
        raise bad("header is corrupt")
    payloads = list(zip([sources[i] for i in source_index.tolist()], row_ids))
    meta.update(kind=kind, fast=fast, sources=sources)
    return hashes, payloads, meta
