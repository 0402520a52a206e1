"""Which part of the input one task of a job array reads.

A shard is chosen in the reader, before anything is parsed (see
`data.io.read_items`): whole files when there are at least as many files as
shards, else units inside the files (JSONL lines, TSV rows, parquet row
groups or rows, dataset rows), numbered across all inputs so that small files
do not all land on shard 0. Every unit belongs to exactly one shard.
"""

from __future__ import annotations

import gzip
import mmap
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from aloe_cli.errors import AloeError


@dataclass(frozen=True)
class Shard:
    """Shard K of N (0-based)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise AloeError(f"--shard must look like K/N (e.g. 3/64), got {text!r}") from None
        if count < 1 or not 0 <= index < count:
            raise AloeError(f"--shard {text}: need 0 <= K < N")
        return cls(index, count)

    @classmethod
    def from_env(cls) -> Shard:
        """SLURM job arrays: SLURM_ARRAY_TASK_ID relative to SLURM_ARRAY_TASK_MIN, of SLURM_ARRAY_TASK_COUNT."""
        task, count = os.environ.get("SLURM_ARRAY_TASK_ID"), os.environ.get("SLURM_ARRAY_TASK_COUNT")
        if task is None:
            return cls()
        if count is None:
            # Guessing 0/1 here would make every task of the array process the whole input.
            raise AloeError(f"SLURM_ARRAY_TASK_ID={task} is set but SLURM_ARRAY_TASK_COUNT is not: "
                            "pass --shard K/N explicitly")
        first = os.environ.get("SLURM_ARRAY_TASK_MIN", "0")
        try:
            return cls.parse(f"{int(task) - int(first)}/{int(count)}")
        except ValueError:
            raise AloeError(f"cannot read the SLURM array task from the environment "
                            f"(SLURM_ARRAY_TASK_ID={task}, SLURM_ARRAY_TASK_COUNT={count})") from None

    @property
    def whole(self) -> bool:
        return self.count == 1

    def files(self, paths: list[str]) -> list[str] | None:
        """This shard's files when sharding by file, else None (there are fewer files than shards)."""
        if self.whole or len(paths) < self.count:
            return None
        return paths[self.index::self.count]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class Units:
    """Hands out unit numbers across all inputs of a read and says which units are this shard's."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self.next = 0

    def take(self) -> bool:
        """Number the next unit; True when it belongs to this shard."""
        mine = self.next % self.shard.count == self.shard.index
        self.next += 1
        return mine

    def take_many(self, n: int) -> list[int]:
        """Number the next `n` units; the offsets (0..n-1) of those that belong to this shard."""
        first = (self.shard.index - self.next) % self.shard.count
        self.next += n
        return list(range(first, n, self.shard.count))


ALL = Shard()


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the platform has one (SLURM's --cpus-per-task,
    taskset, cgroups' cpusets), else the machine's count. `--workers` is capped at this."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- JSONL lines

# A sharded JSONL read cuts each file into ~32 chunks per shard, of at most 1 MiB.
CHUNKS_PER_SHARD = 32
MAX_CHUNK = 1 << 20
_STREAM_CHUNK = 1 << 16  # when the size is unknown (stdin, pipes)


def shard_lines(path: str, stream: BinaryIO, display: str, units: Units) -> Iterator[tuple[int, bytes]]:
    """(line number, line) for the lines `units` gives this shard, from an open JSONL input.

    The unit is a chunk of bytes of the (decompressed) file: a line belongs to
    the chunk its first byte is in, so a shard takes runs of whole lines.
    Another shard's chunk is only counted (its newlines, for the line numbers
    of later lines); its lines are never cut out or decoded. A plain file is
    memory-mapped, so counting does not even copy it.
    """
    regular = path != "-" and stat.S_ISREG(os.stat(path).st_mode)
    size = os.path.getsize(path) if regular else 0
    if regular and isinstance(stream, gzip.GzipFile):
        with open(path, "rb") as raw:  # the gzip trailer holds the uncompressed size (mod 2**32): a guess will do
            raw.seek(max(0, size - 4))
            size = max(2 * size, int.from_bytes(raw.read(4), "little"))
    chunk = max(1, min(MAX_CHUNK, size // (units.shard.count * CHUNKS_PER_SHARD))) if regular else _STREAM_CHUNK
    if not regular or isinstance(stream, gzip.GzipFile):
        yield from _lines_of_chunks(_stream_chunks(stream, chunk), display, units)
        return
    if size == 0:
        return
    with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        chunks = _mapped_chunks(mapped, chunk)
        try:
            yield from _lines_of_chunks(chunks, display, units)
        finally:
            chunks.close()  # releases the numpy view before the map closes


def _lines_of_chunks(chunks: Iterator[_Chunk], display: str, units: Units) -> Iterator[tuple[int, bytes]]:
    line_no = 0
    in_line = False  # a line that started in an earlier chunk is still running
    carry: list[bytes] | None = None  # its bytes so far, when that line is ours
    while True:
        try:
            chunk = next(chunks, None)
        except (OSError, EOFError) as exc:  # truncated gzip
            raise AloeError(f"{display}:{line_no + 1}: cannot read input ({exc})") from None
        if chunk is None:
            break
        start = 0
        if in_line:  # finish the running line first: it belongs to the chunk it started in
            end = chunk.find_newline()
            if end < 0:
                if carry is not None:
                    carry.append(chunk.bytes(0, len(chunk)))
                continue
            if carry is not None:
                yield line_no + 1, b"".join(carry) + chunk.bytes(0, end)
            line_no, start, in_line, carry = line_no + 1, end + 1, False, None
        if start == len(chunk):
            continue
        if units.take():
            lines = chunk.bytes(start, len(chunk)).split(b"\n")
            last = lines.pop()  # b"" when the chunk ends a line
            yield from enumerate(lines, start=line_no + 1)
            line_no += len(lines)
            in_line, carry = bool(last), [last] if last else None
        else:
            line_no += chunk.count_newlines(start)
            in_line = not chunk.ends_line()
    if in_line and carry is not None:
        yield line_no + 1, b"".join(carry)


class _Chunk:
    """Bytes [begin, end) of a file, read or mapped."""

    def __init__(self, data: bytes | mmap.mmap, begin: int, end: int, array: Any = None):
        self.data, self.begin, self.end, self.array = data, begin, end, array

    def __len__(self) -> int:
        return self.end - self.begin

    def find_newline(self) -> int:
        found = self.data.find(b"\n", self.begin, self.end)
        return found - self.begin if found >= 0 else -1

    def count_newlines(self, start: int) -> int:
        import numpy as np

        if self.array is None:
            return self.data.count(b"\n", self.begin + start, self.end)
        return int(np.count_nonzero(self.array[self.begin + start:self.end] == 10))  # a map has no count()

    def ends_line(self) -> bool:
        return self.data[self.end - 1] == 10  # b"\n"

    def bytes(self, start: int, stop: int) -> bytes:
        return self.data[self.begin + start:self.begin + stop]


def _stream_chunks(stream: BinaryIO, size: int) -> Iterator[_Chunk]:
    while True:
        data = stream.read(size)
        while 0 < len(data) < size:  # chunk boundaries must be the same in every task
            more = stream.read(size - len(data))
            if not more:
                break
            data += more
        if not data:
            return
        yield _Chunk(data, 0, len(data))


def _mapped_chunks(mapped: mmap.mmap, size: int) -> Iterator[_Chunk]:
    import numpy as np

    array = np.frombuffer(mapped, dtype=np.uint8)
    try:
        for begin in range(0, len(mapped), size):
            yield _Chunk(mapped, begin, min(begin + size, len(mapped)), array)
    finally:
        del array
