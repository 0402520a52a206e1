"""How many records a read will hand out, known before it starts: the total a progress bar needs.

    expected_records(paths, shard)   # an int, or None where it cannot be known cheaply

JSONL files count their lines (a buffered byte count, about a second per gigabyte); files over
`_COUNT_LIMIT` are estimated from their size and the line length of their first megabyte. Parquet files
read the row count in their footer. Streams (stdin, pipes), compressed files, JSON arrays, TSV and dataset
folders give None: the bar then counts without a total. A shard's figure is its share of the whole; the
count is for the progress display only and never decides anything.
"""

from __future__ import annotations

import os

from aloe_cli.data.shard import Shard

_BLOCK = 1 << 22
_COUNT_LIMIT = 4 << 30  # bytes; larger files are estimated from their size
_SAMPLE = 1 << 20


def expected_records(paths: list[str], shard: Shard) -> int | None:
    own = shard.files(paths)
    total = 0
    for path in own if own is not None else paths:
        count = _records_in(path)
        if count is None:
            return None
        total += count
    if own is not None or shard.whole:
        return total
    return total // shard.count + (1 if shard.index < total % shard.count else 0)


def _records_in(path: str) -> int | None:
    from aloe_cli.data.io import input_format
    from aloe_cli.data.streams import STDIO, device_path, is_stream

    try:
        if path == STDIO or is_stream(path) or device_path(path) or path.lower().endswith(".gz"):
            return None
        fmt = input_format(path)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if fmt == "jsonl":
            return _jsonl_lines(path)
    except Exception:  # the read itself reports an unreadable input, with its own message
        return None
    return None


def _jsonl_lines(path: str) -> int | None:
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(_SAMPLE)
        if head.lstrip()[:1] == b"[":  # one JSON array: counted as it is read
            return None
        if size > _COUNT_LIMIT:
            lines = head.count(b"\n")
            return round(size * lines / len(head)) if lines else None
        lines = head.count(b"\n")
        last = head[-1:]
        while block := handle.read(_BLOCK):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (1 if last and last != b"\n" else 0)
