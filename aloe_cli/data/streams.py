"""Opening inputs so that every byte is read exactly once, and decoding JSON without losing integers.

A regular file can be probed and rewound; a pipe cannot: what a probe reads
is gone. Standard input, FIFOs, `/dev/stdin`, `/dev/fd/N` (bash's process
substitution `<(...)`) and character devices are therefore opened once, the
gzip magic is read from that same stream and handed back in front of the
rest. A path without a known suffix that is such a stream is read as JSONL.

Formats that need to seek (parquet, and TSV, whose shared images are looked
up in a first pass) are copied from a stream into an anonymous temporary file
first: it has no name, so nothing is left behind in $TMPDIR, whatever ends
the run.

JSON: orjson turns integers beyond 64 bits into floats; `loads` notices and
parses such a document again with the standard library, which keeps them
exact (record ids, for one, must come back unchanged).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import sys
import tempfile
from typing import Any, BinaryIO

import orjson

from aloe_cli.errors import AloeError

STDIO = "-"
GZIP_MAGIC = b"\x1f\x8b"
_BUFFER = 1 << 20
# orjson parses integers up to 2**64 - 1 exactly; beyond, it returns floats at least this large.
_FLOAT_FROM_BIG_INT = float(2 ** 63)


def device_path(path: str) -> bool:
    """`/dev/stdin`, `/dev/fd/63` (a process substitution), `/proc/self/fd/0`: names of streams, not files."""
    return path.startswith(("/dev/", "/proc/"))


def is_stream(path: str) -> bool:
    """True for stdin and for inputs that are neither regular files nor folders (pipes, FIFOs, devices)."""
    if path == STDIO:
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def display_name(path: str) -> str:
    return "<stdin>" if path == STDIO else path


def open_raw(path: str) -> BinaryIO:
    """The input's bytes as they are (no gunzip), unbuffered. `-` is standard input."""
    if path == STDIO:
        if sys.stdin is None:  # started with stdin closed (`<&-`)
            raise AloeError("standard input is closed: give the input with -i FILE")
        return open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
    try:
        return open(path, "rb", buffering=0)
    except OSError as exc:
        raise AloeError(f"cannot read {path}: {exc.strerror or exc}") from None


def open_input(path: str) -> BinaryIO:
    """A buffered binary stream of the input, gunzipped when it starts with the gzip magic.

    Regular files are probed and rewound; streams are read once, the probe's
    bytes put back in front of the rest.
    """
    raw = open_raw(path)
    try:
        if raw.seekable() and path != STDIO:
            head = raw.read(2)
            raw.seek(0)
            stream: BinaryIO = io.BufferedReader(raw, _BUFFER)
        else:
            head = _read_up_to(raw, 2)
            stream = io.BufferedReader(_Rejoined(head, raw), _BUFFER)
    except OSError as exc:
        raw.close()
        raise AloeError(f"cannot read {display_name(path)}: {exc.strerror or exc}") from None
    if head == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
    return stream


def open_seekable(path: str) -> BinaryIO:
    """`open_input`, but one that can seek: a stream is first copied (decompressed) to an anonymous temp file."""
    stream = open_input(path)
    if not is_stream(path):
        return stream
    copy = tempfile.TemporaryFile()  # unlinked at once: gone when closed, or when the process dies
    try:
        with stream:
            shutil.copyfileobj(stream, copy, _BUFFER)
        copy.seek(0)
    except (OSError, EOFError) as exc:
        copy.close()
        raise AloeError(f"cannot read {display_name(path)}: {getattr(exc, 'strerror', None) or exc}") from None
    return copy  # type: ignore[return-value]


def _read_up_to(raw: BinaryIO, n: int) -> bytes:
    """Up to `n` bytes; fewer only at the end of the stream (a pipe may hand them over one at a time)."""
    data = b""
    while len(data) < n:
        more = raw.read(n - len(data))
        if not more:
            break
        data += more
    return data


class _Rejoined(io.RawIOBase):
    """A raw stream whose first bytes were already read: they come first again."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._rest.readinto(buffer)  # type: ignore[attr-defined]

    def fileno(self) -> int:
        return self._rest.fileno()

    def close(self) -> None:
        if not self.closed:
            self._rest.close()
        super().close()


def loads(data: bytes | str) -> Any:
    """orjson.loads, except that integers beyond 64 bits stay integers (the standard library parses those)."""
    value = orjson.loads(data)
    if _may_hold_big_int(value):
        return json.loads(data)
    return value


def _may_hold_big_int(value: Any) -> bool:
    """True when a float at least 2**63 in size appears: orjson's rendering of a too-large integer."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind is float and not -_FLOAT_FROM_BIG_INT < item < _FLOAT_FROM_BIG_INT:
            return True
    return False
