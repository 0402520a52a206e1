"""Reading and writing records.

Readers stream `Item`s: a record plus where it came from. Every record is
normalised here, once, for every command (`records.normalize`: other shapes,
grounding text, `source` / `domain` defaults). A record that cannot be
parsed, normalised or validated is still yielded, with `error` set, so the
stage runner can fail with a precise message or send it to the rejects; a
reader only raises for problems with a whole input (missing file, unknown
format, a TSV without a required column).

Formats, chosen by suffix: JSONL (`.jsonl`, `.json`, `.ndjson`, optionally
`.gz`), parquet, a folder written by `datasets.Dataset.save_to_disk` (or
`DatasetDict.save_to_disk`), and VLMEvalKit TSV (rows -> records in
`data.tsv`). `-` is stdin/stdout (JSONL, gzip detected on input).

`read_items(..., shard=Shard(K, N))` reads only shard K: whole files when
there are at least N files, else the lines/rows/row groups of shard K, skipped
before parsing (`data.shard`). Every file written goes through `atomic_path`.
"""

from __future__ import annotations

import base64
import csv
import glob
import gzip
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from aloe_cli.data.dicom import scrub_embedded_dicom
from aloe_cli.data.images import to_data_uri
from aloe_cli.data.records import RecordDefaults, normalize
from aloe_cli.data.shard import ALL, Shard, Units, shard_lines
from aloe_cli.data.tsv import open_tsv, shared_images, tsv_row_to_record
from aloe_cli.errors import AloeError, OutputClosed, RecordError

STDIO = "-"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class Item:
    """One record on its way through a stage."""

    record: dict | None
    where: str
    input: str
    image_root: Path | None = None
    error: RecordError | None = None
    raw: Any = None
    annotations: dict = field(default_factory=dict)  # scratch space for a stage between annotate and decide


def expand_inputs(patterns: Iterable[str] | None) -> list[str]:
    """Expand globs; no input means stdin. A pattern that matches nothing is an error."""
    patterns = list(patterns or []) or [STDIO]
    paths: list[str] = []
    for pattern in patterns:
        if pattern == STDIO:
            paths.append(STDIO)
            continue
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
            if not matches:
                raise AloeError(f"input pattern matches no file: {pattern}")
            paths.extend(matches)
        elif not os.path.exists(pattern):
            raise AloeError(f"input not found: {pattern}")
        else:
            paths.append(pattern)
    return paths


def input_format(path: str) -> str:
    if path == STDIO:
        return "jsonl"
    p = Path(path)
    if p.is_dir():
        if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return "hf_dataset"
        raise AloeError(f"{path}: a folder must be a dataset saved with datasets' save_to_disk "
                        "(no state.json or dataset_dict.json found)")
    name = p.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".tsv"):
        return "tsv"
    raise AloeError(f"{path}: unknown input format (expected .jsonl, .jsonl.gz, .parquet, .tsv or a dataset folder)")


def source_name(path: str) -> str:
    """The default `source` for records that do not name one: the file's stem."""
    if path == STDIO:
        return "stdin"
    name = Path(path.rstrip("/")).name
    for suffix in (".gz", ".jsonl", ".json", ".ndjson", ".parquet", ".tsv"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def read_items(inputs: Iterable[str] | None, image_root: str | os.PathLike | None = None,
               shard: Shard = ALL, defaults: RecordDefaults | None = None) -> Iterator[Item]:
    """Stream items from every input in order (stdin when there is none), only those of `shard`.

    With at least as many files as shards each shard reads whole files;
    otherwise every file is read and the units of other shards (lines, rows,
    row groups) are skipped before they are parsed. Every record is normalised
    on read (see `records.normalize`); `defaults` fill what a record leaves out.
    """
    return read_paths(expand_inputs(inputs), image_root, shard, defaults)


def read_paths(paths: list[str], image_root: str | os.PathLike | None = None, shard: Shard = ALL,
               defaults: RecordDefaults | None = None) -> Iterator[Item]:
    """`read_items` over inputs already expanded by `expand_inputs`."""
    own_files = shard.files(paths)
    if shard.whole or own_files is not None:
        for path in paths if own_files is None else own_files:
            yield from read_file(path, image_root, defaults=defaults)
        return
    units = Units(shard)
    for path in paths:
        yield from read_file(path, image_root, units=units, defaults=defaults)


def read_file(path: str, image_root: str | os.PathLike | None = None, *, require_images: bool = False,
              units: Units | None = None, defaults: RecordDefaults | None = None) -> Iterator[Item]:
    """Items of one input, normalised; with `units`, only the lines/rows `units` assigns to its shard.
    `defaults.source` defaults to the input's name."""
    fmt = input_format(path)
    defaults = defaults or RecordDefaults()
    if defaults.source is None:
        defaults = replace(defaults, source=source_name(path))
    # Relative image paths resolve against --image-root, else the input's folder.
    if image_root is not None:
        root = Path(image_root)
    else:
        root = Path.cwd() if path == STDIO else Path(path).resolve().parent
    if fmt == "jsonl":
        items = _read_jsonl(path, units)
    elif fmt == "parquet":
        items = _read_rows(path, _parquet_rows(path, units))
    elif fmt == "hf_dataset":
        items = _read_rows(path, _hf_dataset_rows(path, units))
    else:
        items = _read_tsv(path, require_images=require_images, units=units)
    for item in items:
        item.image_root = root
        if item.error is None:
            try:
                item.record = normalize(item.raw, defaults, root)
            except RecordError as error:
                item.error = error.located(item.where)
        if item.error is not None and not defaults.keep_dicom_bytes:
            item.raw = scrub_embedded_dicom(item.raw)  # it goes to the rejects as read: never with a DICOM header
        yield item


def _display(path: str) -> str:
    return "<stdin>" if path == STDIO else path


def _open_binary(path: str) -> BinaryIO:
    if path == STDIO:
        buffer = sys.stdin.buffer
        if buffer.peek(2)[:2] == _GZIP_MAGIC:  # type: ignore[attr-defined]
            return gzip.GzipFile(fileobj=buffer)
        return buffer
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if gzipped else open(path, "rb", buffering=1 << 20)


def _read_jsonl(path: str, units: Units | None) -> Iterator[Item]:
    """Parsed, not yet normalised items (read_file normalises)."""
    display = _display(path)
    stream = _open_binary(path)
    try:
        lines = _lines(stream, display) if units is None else shard_lines(path, stream, display, units)
        for line_no, line in lines:
            if not line or line.isspace():
                continue
            where = f"{display}:{line_no}"
            try:
                raw = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                error = RecordError("invalid_json", f"invalid JSON ({exc})", where=where)
                yield Item(None, where, display, error=error, raw=line.decode("utf-8", "replace").rstrip("\r\n"))
                continue
            yield Item(None, where, display, raw=raw)
    finally:
        if path != STDIO:
            stream.close()


def _lines(stream: BinaryIO, display: str) -> Iterator[tuple[int, bytes]]:
    """(line number, line) for every line."""
    line_no = 0
    while True:
        try:
            line = stream.readline()
        except (OSError, EOFError) as exc:  # truncated gzip
            raise AloeError(f"{display}:{line_no + 1}: cannot read input ({exc})") from None
        if not line:
            return
        line_no += 1
        yield line_no, line


def _read_rows(path: str, rows: Iterator[tuple[int, dict]]) -> Iterator[Item]:
    for index, row in rows:
        yield Item(None, f"{path} row {index}", path, raw=row)


def _parquet_rows(path: str, units: Units | None) -> Iterator[tuple[int, dict]]:
    """(row number, row). A shard takes whole row groups when there are enough, else rows inside them."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise AloeError(f"{path}: not a readable parquet file ({exc})") from None
    groups = parquet.num_row_groups
    by_group = units is not None and groups >= units.shard.count
    first_row = 0
    for group in range(groups):
        rows_in_group = parquet.metadata.row_group(group).num_rows
        if by_group and not units.take():
            first_row += rows_in_group
            continue
        for batch in parquet.iter_batches(batch_size=1024, row_groups=[group]):
            picks = None if units is None or by_group else units.take_many(batch.num_rows)
            yield from _rows_of(batch, first_row, picks)
            first_row += batch.num_rows


def _rows_of(batch, first_row: int, picks: list[int] | None) -> Iterator[tuple[int, dict]]:
    """Rows of an Arrow batch (all, or only the offsets in `picks`), numbered from `first_row`."""
    if picks is None:
        yield from enumerate(batch.to_pylist(), start=first_row)
    elif picks:
        yield from zip((first_row + pick for pick in picks), batch.take(picks).to_pylist())


def _hf_dataset_rows(path: str, units: Units | None) -> Iterator[tuple[int, dict]]:
    """Rows of a `save_to_disk` folder (Dataset, or every split of a DatasetDict), images left undecoded."""
    try:
        import datasets
    except ImportError:
        raise AloeError(f"{path}: reading a dataset folder needs the datasets package "
                        "(pip install 'aloe-cli[datasets]')") from None
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as exc:  # datasets raises several kinds for a damaged folder
        raise AloeError(f"{path}: unreadable dataset folder ({exc})") from None
    splits = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
    first_row = 0
    for split in splits:
        table = split.with_format("arrow")  # Arrow rows: Image features stay {bytes, path} structs
        rows = len(split)
        picks = range(rows) if units is None else units.take_many(rows)
        for start in range(0, len(picks), 1024):
            chunk = picks[start:start + 1024]
            batch = table[chunk.start:chunk.stop] if isinstance(chunk, range) else table[chunk]
            yield from zip((first_row + pick for pick in chunk), batch.to_pylist())
        first_row += rows


# ----------------------------------------------------------------------------- VLMEvalKit TSV

def _read_tsv(path: str, *, require_images: bool = False, units: Units | None = None) -> Iterator[Item]:
    _, handle = open_tsv(path, require_images=require_images)
    with handle:
        shared = shared_images(handle)  # every row, whatever the shard: references cross shards
        source = source_name(path)
        for row_no, row in enumerate(csv.DictReader(handle, delimiter="\t"), start=2):  # line 1 is the header
            if units is not None and not units.take():
                continue  # another shard's row: not converted
            where = f"{path}:{row_no}"
            try:
                record = tsv_row_to_record(row, source, shared)
            except RecordError as error:
                yield Item(None, where, path, error=error.located(where), raw=row)
                continue
            yield Item(None, where, path, raw=record)


# ----------------------------------------------------------------------------- writing

def _json_images(record: dict) -> dict:
    """Embedded image bytes cannot go into JSON: write them as data URIs."""
    images = record.get("images")
    if not images or not any(not isinstance(entry, str) for entry in images):
        return record
    converted = []
    for entry in images:
        if isinstance(entry, dict):
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


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path in `path`'s folder to write to; on success it is synced and renamed to `path`.

    If the block raises, the temporary file is removed and `path` is left as
    it was: a reader never sees a half-written file under the real name.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise AloeError(f"output folder does not exist: {target.parent}")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the final file gets the usual mode
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str) -> None:
    with suppress(OSError):
        os.unlink(path)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through `atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


class RecordWriter:
    """Write records to a file (atomically, see `atomic_path`) or stdout.

    Use as a context manager: the file appears only if the block ends without
    an exception.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = STDIO if path in (None, STDIO) else str(path)
        self.count = 0
        name = self.path.lower()
        self.format = ("parquet" if name.endswith(".parquet") else
                       "jsonl.gz" if name.endswith(".gz") else "jsonl")
        if self.path != STDIO and not name.endswith((".parquet", ".gz") + JSONL_SUFFIXES):
            raise AloeError(f"{self.path}: unknown output format (expected .jsonl, .jsonl.gz or .parquet)")
        self._stream: Any = None
        self._files = ExitStack()
        self._tmp: str | None = None
        self._spool: str | None = None

    def __enter__(self) -> RecordWriter:
        if self.path == STDIO:
            sys.stdout.flush()  # nothing written through the text layer may come after our bytes
            # Our own large buffer: sys.stdout.buffer can be unbuffered (python -u, PYTHONUNBUFFERED).
            self._stream = open(sys.stdout.fileno(), "wb", buffering=1 << 16, closefd=False)
            return self
        self._tmp = self._files.enter_context(atomic_path(self.path))
        if self.format == "jsonl.gz":
            self._stream = gzip.open(self._tmp, "wb")
        elif self.format == "parquet":  # spooled as JSONL, then converted with one unified schema on close
            self._spool = self._tmp + ".jsonl"
            self._files.callback(_remove_quietly, self._spool)  # runs before the commit: LIFO
            self._stream = open(self._spool, "wb", buffering=1 << 20)
        else:
            self._stream = open(self._tmp, "wb", buffering=1 << 20)
        return self

    def write(self, record: dict) -> None:
        try:
            self._stream.write(dumps(record))
        except BrokenPipeError:
            raise OutputClosed() from None
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.path == STDIO:
            try:
                self._stream.close()  # flushes; closefd=False leaves fd 1 open
            except BrokenPipeError:
                if exc_type is None:
                    raise OutputClosed() from None
            return
        try:
            self._stream.close()
            if exc_type is None and self._spool is not None:
                _jsonl_to_parquet(self._spool, self._tmp)
        except BaseException:
            self._files.__exit__(*sys.exc_info())
            raise
        self._files.__exit__(exc_type, exc, tb)


def _parquet_images(record: dict) -> dict:
    """Images as HF `Image` structs {bytes, path}, so `datasets` can read them back."""
    images = record.get("images")
    if images is None:
        return record
    structs = []
    for entry in images:
        if isinstance(entry, str) and entry.startswith("data:"):
            structs.append({"bytes": base64.b64decode(entry.partition(",")[2]), "path": None})
        elif isinstance(entry, str):
            structs.append({"bytes": None, "path": entry})
        else:
            structs.append({"bytes": entry.get("bytes"), "path": entry.get("path")})
    return {**record, "images": structs}


def _jsonl_to_parquet(jsonl_path: str, parquet_path: str, chunk: int = 2048) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def chunks() -> Iterator[list[dict]]:
        with open(jsonl_path, "rb") as handle:
            batch: list[dict] = []
            for line in handle:
                batch.append(_parquet_images(orjson.loads(line)))
                if len(batch) == chunk:
                    yield batch
                    batch = []
            if batch:
                yield batch

    def table(batch: list[dict], schema: pa.Schema | None = None) -> pa.Table:
        # from_pylist alone takes its columns from the first row; every key of the chunk must count.
        keys = list(dict.fromkeys(key for row in batch for key in row))
        if schema is None:
            return pa.table({key: pa.array([row.get(key) for row in batch]) for key in keys})
        return pa.Table.from_pylist(batch, schema=schema)

    schemas = [table(batch).schema for batch in chunks()]
    if not schemas:
        pq.write_table(pa.table({}), parquet_path)
        return
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    with pq.ParquetWriter(parquet_path, schema) as writer:
        for batch in chunks():
            writer.write_table(table(batch, schema))
