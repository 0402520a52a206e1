"""Writing records and files: atomically, all outputs of a run together, one-line errors, nothing left behind.

A file is written under a temporary name in its own folder, flushed and
synced, then renamed into place (`PendingFile`). A run's outputs (records and
rejects) are committed together by `record_writers`: every one is finished
first, and only when all of them were written completely are they renamed, so
a full disk met while flushing the last one leaves none of them, and never a
temporary file. A write that fails is an AloeError naming the file
("cannot write out.jsonl: No space left on device").

Destinations that are not regular files (a FIFO, /dev/null, /dev/stderr) are
written in place. `-` is standard output. The final files get the usual mode
for the umask (mkstemp makes them private).

`data.io` re-exports everything here: it is the one record reader/writer.
"""

from __future__ import annotations

import gzip
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import orjson

from aloe_cli.data.images import to_data_uri
from aloe_cli.data.parquet import jsonl_to_parquet
from aloe_cli.data.streams import STDIO
from aloe_cli.errors import AloeError, OutputClosed

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def _json_images(record: dict) -> dict:
    """Embedded image bytes cannot go into JSON: write them as data URIs."""
    images = record.get("images")
    if not isinstance(images, list) or all(isinstance(entry, str) for entry in images):
        return record
    converted = []
    for entry in images:
        if isinstance(entry, dict) and ("bytes" in entry or "path" in entry):
            entry = to_data_uri(bytes(entry["bytes"])) if entry.get("bytes") else entry.get("path")
        elif isinstance(entry, (bytes, bytearray, memoryview)):
            entry = to_data_uri(bytes(entry))
        converted.append(entry)
    return {**record, "images": converted}


def dumps(record: dict) -> bytes:
    """One JSONL line (with its newline) as UTF-8 bytes."""
    try:
        return orjson.dumps(_json_images(record), option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # a value orjson does not take (e.g. an int over 64 bits): fall back to json
        return (json.dumps(_json_images(record), ensure_ascii=False, default=str) + "\n").encode()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once, at import: os.umask can only be read by setting it


def write_error(path: str | os.PathLike, exc: OSError) -> AloeError:
    """The one-line error for a write that failed (a full disk, a vanished folder, a closed device)."""
    where = "standard output" if str(path) == STDIO else str(path)
    return AloeError(f"cannot write {where}: {exc.strerror or exc}")


def print_stdout(text: str) -> None:
    """A line of data (a path, a JSON document) on stdout, flushed: a full device is a one-line error and a
    closed pipe ends the run quietly, like record output."""
    if sys.stdout is None:
        raise AloeError("standard output is closed")
    try:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        raise OutputClosed() from None
    except OSError as exc:
        raise write_error(STDIO, exc) from None


def _remove_quietly(path: str) -> None:
    with suppress(OSError):
        os.unlink(path)


def _close_quietly(stream: Any) -> None:
    """Close after a failure: buffered bytes that cannot be written any more are dropped, not raised."""
    with suppress(OSError, ValueError):
        stream.close()


def _point_at_devnull(stream: Any) -> None:
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class PendingFile:
    """A temporary file beside `target` (`tmp`) that becomes `target` on commit(), or disappears on discard()."""

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        if not self.target.parent.is_dir():
            raise AloeError(f"output folder does not exist: {self.target.parent}")
        if self.target.is_dir():
            raise AloeError(f"{self.target} is a folder; name a file to write")
        try:
            fd, self.tmp = tempfile.mkstemp(dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".tmp")
        except OSError as exc:
            raise AloeError(f"cannot write {self.target}: {self.target.parent} does not take new files "
                            f"({exc.strerror or exc})") from None
        os.close(fd)

    def finish(self) -> None:
        """Give it the usual mode and sync it to disk (the data is complete)."""
        try:
            os.chmod(self.tmp, 0o666 & ~_UMASK)
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise write_error(self.target, exc) from None

    def commit(self) -> None:
        try:
            os.replace(self.tmp, self.target)
        except OSError as exc:
            raise write_error(self.target, exc) from None

    def discard(self) -> None:
        _remove_quietly(self.tmp)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path in `path`'s folder to write to; on success it is synced and renamed to `path`.

    If the block raises, the temporary file is removed and `path` is left as
    it was: a reader never sees a half-written file under the real name.
    """
    pending = PendingFile(path)
    try:
        yield pending.tmp
        pending.finish()
        pending.commit()
    except BaseException:
        pending.discard()
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through `atomic_path`."""
    write_atomic_many({path: data})


def write_atomic_many(files: dict[str | os.PathLike, bytes]) -> None:
    """Write several files that appear together or not at all: every one is written and synced under its
    temporary name before the first is renamed into place (e.g. the two tables of a results folder)."""
    pending: list[PendingFile] = []
    try:
        for path, data in files.items():
            pending.append(PendingFile(path))
            try:
                with open(pending[-1].tmp, "wb") as handle:
                    handle.write(data)
            except OSError as exc:
                raise write_error(path, exc) from None
            pending[-1].finish()
        for file in pending:
            file.commit()
    except BaseException:
        for file in pending:
            file.discard()
        raise


@contextmanager
def folders_made() -> Iterator[Any]:
    """`make(folder)` inside the block creates a folder and its missing parents; if the block fails, the
    folders it created are removed again, when they are empty (a failed run leaves no empty folders)."""
    created: list[Path] = []

    def make(folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        missing = []
        current = folder
        while not current.exists() and current != current.parent:
            missing.append(current)
            current = current.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(folder, exc) from None
        created.extend(reversed(missing))
        return folder

    try:
        yield make
    except BaseException:
        for folder in reversed(created):
            with suppress(OSError):
                folder.rmdir()
        raise


def _in_place(path: str) -> bool:
    """A FIFO or a device (/dev/null, /dev/stderr): written to directly, there is no file to replace."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


class RecordWriter:
    """Write records to a file (atomically), a pipe or device, or stdout.

    As a context manager, the file appears only if the block ends without an
    exception. `record_writers` opens several that appear together. A write
    that fails (a full disk) raises a one-line AloeError and the temporary file
    is removed.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = STDIO if path in (None, STDIO) else str(path)
        self.count = 0
        name = self.path.lower()
        self.in_place = self.path != STDIO and _in_place(self.path)
        self.format = ("parquet" if name.endswith(".parquet") else
                       "jsonl.gz" if name.endswith(".gz") else "jsonl")
        if self.path != STDIO and not self.in_place and not name.endswith((".parquet", ".gz") + JSONL_SUFFIXES):
            raise AloeError(f"{self.path}: unknown output format (expected .jsonl, .jsonl.gz or .parquet)")
        if self.in_place and self.format == "parquet":
            raise AloeError(f"{self.path}: parquet needs a regular file (it is written in two passes), "
                            "not a pipe or device")
        self._stream: Any = None
        self._raw: Any = None  # the file under a gzip stream written in place
        self._pending: PendingFile | None = None
        self._spool: str | None = None

    # -- the phases: open, write..., then finish + commit, or discard
    def open(self) -> RecordWriter:
        if self.path == STDIO:
            if sys.stdout is None:
                raise AloeError("standard output is closed: give -o FILE")
            sys.stdout.flush()  # nothing written through the text layer may come after our bytes
            # Our own large buffer: sys.stdout.buffer can be unbuffered (python -u, PYTHONUNBUFFERED).
            self._stream = open(sys.stdout.fileno(), "wb", buffering=1 << 16, closefd=False)
        elif self.in_place:
            try:
                self._raw = open(self.path, "wb", buffering=1 << 16)
            except OSError as exc:
                raise write_error(self.path, exc) from None
            self._stream = gzip.GzipFile(fileobj=self._raw, mode="wb") if self.format == "jsonl.gz" else self._raw
        else:
            self._pending = PendingFile(self.path)
            tmp = self._pending.tmp
            try:
                if self.format == "jsonl.gz":
                    self._stream = gzip.open(tmp, "wb")
                elif self.format == "parquet":  # spooled as JSONL, converted with one schema at the end
                    self._spool = tmp + ".jsonl"
                    self._stream = open(self._spool, "wb", buffering=1 << 20)
                else:
                    self._stream = open(tmp, "wb", buffering=1 << 20)
            except OSError as exc:
                self.discard()
                raise write_error(self.path, exc) from None
        return self

    def write(self, record: dict) -> None:
        try:
            self._stream.write(dumps(record))
        except BrokenPipeError:
            raise OutputClosed() from None
        except OSError as exc:
            raise write_error(self.path, exc) from None
        self.count += 1

    def finish(self) -> None:
        """Flush everything; afterwards the data is complete (under the temporary name for a file)."""
        try:
            self._stream.close()  # stdout: closefd=False leaves fd 1 open
            if self._raw is not None:
                self._raw.close()
            if self._spool is not None:
                jsonl_to_parquet(self._spool, self._pending.tmp)
                _remove_quietly(self._spool)
            if self._pending is not None:
                self._pending.finish()
        except BrokenPipeError:
            if self.path == STDIO:
                raise OutputClosed() from None
            raise write_error(self.path, BrokenPipeError(32, "Broken pipe")) from None
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def commit(self) -> None:
        if self._pending is not None:
            self._pending.commit()

    def discard(self) -> None:
        """After a failure: drop what is buffered and remove the temporary files."""
        if self.path == STDIO or self.in_place:
            # Closing flushes: a reader that stopped reading (a full pipe) would block it for ever.
            _point_at_devnull(self._raw if self._raw is not None else self._stream)
        for stream in (self._stream, self._raw):
            if stream is not None:
                _close_quietly(stream)
        if self._spool is not None:
            _remove_quietly(self._spool)
        if self._pending is not None:
            self._pending.discard()

    def __enter__(self) -> RecordWriter:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
            return
        try:
            self.finish()
            self.commit()
        except BaseException:
            self.discard()
            raise


@contextmanager
def record_writers(*paths: str | os.PathLike | None) -> Iterator[list[RecordWriter | None]]:
    """Writers for several outputs (None where a path is None) that appear together or not at all:
    all are finished before the first is renamed into place."""
    writers = [RecordWriter(path) if path is not None else None for path in paths]
    opened: list[RecordWriter] = []
    try:
        for writer in writers:
            if writer is not None:
                opened.append(writer.open())
        yield writers
        for writer in opened:
            writer.finish()
        for writer in opened:
            writer.commit()
    except BaseException:
        for writer in opened:
            writer.discard()
        raise
