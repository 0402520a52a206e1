"""Pass 2 of `aloe mix` (write): the selected records, in a seeded random order, without holding them in memory.

`write_pass` reads the inputs again in the same order and sends each copy of a
selected record to a spool bucket chosen by its position in the shuffled
output; `ShuffleSpool.drain` then writes the buckets out one by one in
position order. Memory stays bounded by one bucket's index, whatever the size
of the records. A record that is not what pass 1 counted means the input
changed between the passes: an error, never a silently different mixture.
"""

from __future__ import annotations

import math
import os
from array import array
from collections.abc import Iterator
from typing import Any

import numpy as np

from aloe_cli.data.images import relocate
from aloe_cli.data.io import Item, RecordWriter, dumps, write_error
from aloe_cli.data.streams import loads
from aloe_cli.errors import AloeError, RecordError
from aloe_cli.mixing.counting import GroupIndex, Prepared, prepare
from aloe_cli.mixing.plan import Plan, output_rng
from aloe_cli.mixing.recipe import Recipe, SourceSpec

_RECORDS_PER_BUCKET = 4096
_MAX_BUCKETS = 256
_PROGRESS_STEP = 1024


class ShuffleSpool:
    """Writes records in a given random order without holding them in memory.

    Each copy goes to the bucket file of its output position; a bucket is
    then read back in position order (only positions and file offsets are
    held in memory) and written out.
    """

    def __init__(self, total: int, folder: str):
        self.total = total
        buckets = min(_MAX_BUCKETS, max(1, math.ceil(total / _RECORDS_PER_BUCKET)))
        self.per_bucket = max(1, math.ceil(total / buckets))
        self.folder = folder
        self._files = [open(os.path.join(folder, f"bucket-{b:04d}"), "wb") for b in range(buckets)]

    def add(self, position: int, line: bytes) -> None:
        """`line` is one JSONL line (with its newline), as io.dumps writes it."""
        try:
            self._files[position // self.per_bucket].write(b"%d\t%s" % (position, line))
        except OSError as exc:
            raise write_error(self.folder, exc) from None

    def close(self) -> None:
        for handle in self._files:
            handle.close()

    def drain(self, writer: RecordWriter) -> int:
        """Write every bucket, in position order, to `writer`; return the number of records."""
        self.close()
        written = 0
        for handle in self._files:
            written += self._drain_bucket(handle.name, writer)
            os.unlink(handle.name)
        return written

    @staticmethod
    def _drain_bucket(path: str, writer: RecordWriter) -> int:
        positions, offsets = array("q"), array("q")
        with open(path, "rb") as bucket:
            offset = 0
            for line in bucket:
                tab = line.index(b"\t")
                positions.append(int(line[:tab]))
                offsets.append(offset + tab + 1)
                offset += len(line)
            for index in np.argsort(np.frombuffer(positions, dtype=np.int64), kind="stable"):
                bucket.seek(offsets[index])
                writer.write(loads(bucket.readline()))
        return len(positions)


def _changed(where: str) -> AloeError:
    return AloeError(f"{where}: the input changed between the counting and the writing pass; run again")


def write_pass(items: Iterator[tuple[SourceSpec, Item]], plan: Plan, group_of: np.ndarray, tokens: np.ndarray,
                groups: GroupIndex, recipe: Recipe, spool: ShuffleSpool, progress: Any,
                image_folder: str | None = None) -> None:
    """Write the plan's copies into `spool`; image paths are rewritten to resolve from `image_folder` (the
    mixture's folder), absolute when it is None: a source's paths are relative to the source's folder."""
    copies = plan.copies
    positions = output_positions(plan.samples, recipe.seed)
    next_copy = 0  # copies are numbered in reading order; copy k of the mixture goes to positions[k]
    seen = 0
    for seq, (spec, item) in enumerate(items):
        seen = seq + 1
        if seq >= len(copies):
            raise _changed(item.where)
        if seen % _PROGRESS_STEP == 0:
            progress.advance(_PROGRESS_STEP)
        count = int(copies[seq])
        if count == 0:
            continue
        if item.error is not None:
            raise _changed(item.where)
        try:
            ready = prepare(item, spec)
        except RecordError:
            raise _changed(item.where) from None
        if groups.find(ready) != group_of[seq]:
            raise _changed(item.where)
        _annotate(ready, int(tokens[seq]))
        if ready.record.get("images"):
            ready.record["images"] = [relocate(entry, item.image_root, image_folder)
                                      for entry in ready.record["images"]]
        for copy in range(count):
            ready.record["aloe"]["mix"]["copy"] = copy
            spool.add(int(positions[next_copy]), dumps(ready.record))
            next_copy += 1
    if seen != len(copies):
        raise AloeError("the input changed between the counting and the writing pass "
                        f"({len(copies)} records, then {seen}); run again")


def output_positions(total: int, seed: int) -> np.ndarray:
    """A seeded random permutation of 0..total-1 (4 bytes a sample below 2**32 samples)."""
    positions = np.arange(total, dtype=np.uint32 if total < 2 ** 32 else np.uint64)
    output_rng(seed).shuffle(positions)
    return positions


def _annotate(ready: Prepared, tokens: int) -> None:
    record = ready.record
    record["domain"] = ready.domain
    if not record.get("source"):
        record["source"] = ready.source
    aloe = record.get("aloe") if isinstance(record.get("aloe"), dict) else {}
    aloe["mix"] = {"loss_tokens": tokens, "source": ready.source, "cell": ready.cell, "copy": 0}
    record["aloe"] = aloe
