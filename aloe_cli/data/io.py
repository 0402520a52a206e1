"""Reading and writing records.

Readers stream `Item`s: a record plus where it came from. Every record is
normalised here, once, for every command (`records.normalize`: other shapes,
grounding text, `source` / `domain` defaults). A record that cannot be
parsed, normalised or validated is still yielded, with `error` set, so the
stage runner can fail with a precise message or send it to the rejects; a
reader only raises for problems with a whole input (missing file, unknown
format, a TSV without a required column).

Formats, chosen by suffix: JSONL (`.jsonl`, `.json`, `.ndjson`, optionally
`.gz`; an input whose first character is `[` is one JSON array of records,
as LLaVA and LLaMA-Factory write `.json` files), parquet, a folder written by `datasets.Dataset.save_to_disk` (or
`DatasetDict.save_to_disk`), and VLMEvalKit TSV (rows -> records in
`data.tsv`). A Hub dataset id (`org/name[:split]`) or any other folder (a
dataset repository) is read through `datasets.load_dataset` (`data.hub`).
`-` is stdin/stdout (JSONL, gzip detected on input). Pipes, FIFOs,
`/dev/stdin` and process substitutions are read exactly once
(`data.streams`); a stream without a known suffix is JSONL.

`read_items(..., shard=Shard(K, N))` reads only shard K: whole files when
there are at least N files, else the lines/rows/row groups of shard K, skipped
before parsing (`data.shard`). Every file written goes through `atomic_path`;
a write that fails (a full disk) is a one-line error and leaves nothing behind.
Integers beyond 64 bits are read and written exactly (`streams.loads`).
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from aloe_cli.data.dicom import scrub_embedded_dicom
from aloe_cli.data.hub import dataset_rows, hub_dataset_rows, is_dataset_id
from aloe_cli.data.parquet import parquet_rows
from aloe_cli.data.records import RecordDefaults, normalize
from aloe_cli.data.shard import ALL, Shard, Units, shard_lines
from aloe_cli.data.streams import STDIO, device_path, display_name, is_stream, loads, open_input, open_raw
from aloe_cli.data.tsv import TsvFile, tsv_row_to_record
from aloe_cli.data.writing import (  # noqa: F401 - the writing half of this module's API
    RecordWriter,
    atomic_path,
    dumps,
    print_stdout,
    record_writers,
    write_atomic,
    write_error,
)
from aloe_cli.errors import AloeError, RecordError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


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
        elif not os.path.exists(pattern) and not is_dataset_id(pattern):
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
        return "hub_dataset"  # a dataset repository folder: load_dataset finds its data files
    if is_dataset_id(path):
        return "hub_dataset"
    name = p.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".tsv"):
        return "tsv"
    if is_stream(path) or device_path(path):  # a pipe, FIFO, /dev/stdin, <(...): records as JSON lines
        return "jsonl"
    raise AloeError(f"{path}: unknown input format (expected .jsonl, .jsonl.gz, .parquet, .tsv or a dataset folder)")


def source_name(path: str) -> str:
    """The default `source` for records that do not name one: the file's stem."""
    if path in (STDIO, "/dev/stdin", "/dev/fd/0", "/proc/self/fd/0"):
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
    # Relative image paths resolve against --image-root, else the input's folder (the working directory
    # for stdin and the like: /dev/fd/63's folder means nothing).
    if image_root is not None:
        root = Path(image_root)
    else:
        root = Path.cwd() if path == STDIO or device_path(path) else Path(path).resolve().parent
    if fmt == "jsonl":
        items = _read_jsonl(path, units)
    elif fmt == "parquet":
        items = _read_rows(path, parquet_rows(path, units))
    elif fmt == "hf_dataset":
        items = _read_rows(path, _hf_dataset_rows(path, units))
    elif fmt == "hub_dataset":
        items = _read_rows(path, hub_dataset_rows(path, units))
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


def output_folder(output: str) -> str | None:
    """The folder relative image paths in `output` resolve from when it is read again, symlinks followed as a
    reader follows them; None for stdout, a pipe or a device (whoever reads it resolves against their own
    working directory, or --image-root: records written there carry absolute paths)."""
    if output == STDIO or is_stream(output) or device_path(output):
        return None
    return str(Path(output).resolve().parent)


class StreamCopies:
    """Inputs that can be read once only (stdin, FIFOs, `<(...)`) for a command that reads them more than once
    (`mix`: count, then write; `eval`: once per model): each is copied on first use into a hidden temporary
    folder (`prefix...`) in `folder` ($TMPDIR when None), removed by `close()` however the run ends.
    `read` reads any input like `read_file`, a stream from its copy, its items named after the original."""

    def __init__(self, folder: str | os.PathLike | None, prefix: str = ".aloe-stdin-"):
        self._folder = None if folder is None else str(folder)
        self._prefix = prefix
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._copies: dict[str, str] = {}

    def get(self, path: str) -> str:
        """The path to read `path` from: itself for a regular file or folder, else its copy."""
        if not is_stream(path):
            return path
        copy = self._copies.get(path)
        if copy is None:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix=self._prefix, dir=self._folder)
            # The copy keeps the input's format: a name like the input's own (stdin is JSONL, gzip is sniffed).
            name = "stdin.jsonl" if path == STDIO else os.path.basename(path) or "input"
            folder = os.path.join(self._tmp.name, str(len(self._copies)))
            os.mkdir(folder)
            copy = os.path.join(folder, name if "." in name else name + ".jsonl")
            source = open_raw(path)
            try:
                with source, open(copy, "wb") as handle:
                    shutil.copyfileobj(source, handle, 1 << 20)
            except OSError as exc:
                raise AloeError(f"cannot copy {display_name(path)} (read once, needed again) to "
                                f"{self._tmp.name}: {exc.strerror or exc}") from None
            self._copies[path] = copy
        return copy

    def read(self, path: str, image_root: str | os.PathLike | None = None, *,
             defaults: RecordDefaults | None = None, **options: Any) -> Iterator[Item]:
        """`read_file(path, ...)`; a stream is read from its copy, with the original's name, source and folder."""
        if not is_stream(path):
            yield from read_file(path, image_root, defaults=defaults, **options)
            return
        copy = self.get(path)
        display = display_name(path)
        root = image_root if image_root is not None else (
            os.getcwd() if path == STDIO or device_path(path) else os.path.dirname(os.path.abspath(path)))
        defaults = defaults or RecordDefaults()
        if not defaults.source:
            defaults = replace(defaults, source=source_name(path))
        for item in read_file(copy, root, defaults=defaults, **options):
            item.where = item.where.replace(copy, display, 1)
            item.input = display
            if item.error is not None:
                error = item.error
                item.error = RecordError(error.reason, error.message, where=item.where, field=error.field)
            yield item

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _read_jsonl(path: str, units: Units | None) -> Iterator[Item]:
    """Parsed, not yet normalised items (read_file normalises). A file that holds one JSON array of records
    (LLaVA's and LLaMA-Factory's `.json`) is read as that array."""
    display = display_name(path)
    stream = open_input(path)
    try:
        if _holds_array(stream):
            yield from _array_items(stream, display, units)
            return
        lines = _lines(stream, display) if units is None else shard_lines(path, stream, display, units)
        first = True
        for line_no, line in lines:
            if not line or line.isspace():
                continue
            where = f"{display}:{line_no}"
            try:
                raw = loads(line)
            except orjson.JSONDecodeError as exc:
                if first and units is None and line.lstrip(_LEADING_SPACE).startswith(b"{"):
                    # Perhaps one record written over several lines (a pretty-printed .json file).
                    whole = _one_object(line, stream, line_no, display)
                    if isinstance(whole, Item):
                        yield whole
                        return
                    for number, text in whole:  # not one object: its lines as JSONL, from memory
                        yield from _jsonl_item(text, number, display)
                    return
                error = RecordError("invalid_json", f"invalid JSON ({exc})", where=where)
                yield Item(None, where, display, error=error, raw=line.decode("utf-8", "replace").rstrip("\r\n"))
                continue
            first = False
            yield Item(None, where, display, raw=raw)
    finally:
        stream.close()


def _jsonl_item(line: bytes, line_no: int, display: str) -> Iterator[Item]:
    if not line or line.isspace():
        return
    where = f"{display}:{line_no}"
    try:
        yield Item(None, where, display, raw=loads(line))
    except orjson.JSONDecodeError as exc:
        error = RecordError("invalid_json", f"invalid JSON ({exc})", where=where)
        yield Item(None, where, display, error=error, raw=line.decode("utf-8", "replace").rstrip("\r\n"))


def _one_object(first_line: bytes, stream: BinaryIO, line_no: int, display: str) -> Item | list[tuple[int, bytes]]:
    """The rest of an input whose first line is not JSON but opens an object: one record when the whole input is
    one JSON object (named `file`, no line), else its lines (numbered from `line_no`) to be read as JSONL."""
    try:
        rest = stream.read()
    except (OSError, EOFError) as exc:  # truncated gzip
        raise AloeError(f"{display}:{line_no + 1}: cannot read input ({exc})") from None
    data = first_line + rest
    try:
        value = loads(data)
    except orjson.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        return Item(None, display, display, raw=value)
    return [(line_no + offset, line) for offset, line in enumerate(data.splitlines(keepends=True))]


_LEADING_SPACE = b" \t\r\n\xef\xbb\xbf"  # whitespace, and a UTF-8 byte-order mark


def _holds_array(stream: BinaryIO) -> bool:
    """True when the input's first character (past whitespace) opens a JSON array: no JSON line is a record
    then, so the input is one array. Looks without consuming (the buffered stream's peek)."""
    head = stream.peek(4096)[:4096]  # type: ignore[attr-defined]
    stripped = head.lstrip(_LEADING_SPACE)
    return stripped[:1] == b"["


def _array_items(stream: BinaryIO, display: str, units: Units | None) -> Iterator[Item]:
    """One item per element of a JSON array, named `file[index]`. The array is parsed whole: a syntax error
    anywhere loses every record in it, so it is an error for the whole input (line and column named)."""
    try:
        data = stream.read()
    except (OSError, EOFError) as exc:  # truncated gzip
        raise AloeError(f"{display}: cannot read input ({exc})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        elements = loads(data)
    except orjson.JSONDecodeError as exc:
        raise AloeError(f"{display}:{exc.lineno}: invalid JSON array (column {exc.colno}: {exc.msg}); a .json "
                        "input holds one array of records, a .jsonl input one record per line") from None
    for index, element in enumerate(elements):
        if units is not None and not units.take():
            continue
        yield Item(None, f"{display}[{index}]", display, raw=element)


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


def _read_rows(path: str, rows: Iterator[tuple[int, dict | RecordError]]) -> Iterator[Item]:
    for index, row in rows:
        where = f"{path} row {index}"
        if isinstance(row, RecordError):
            yield Item(None, where, path, error=row.located(where))
        else:
            yield Item(None, where, path, raw=row)


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
    yield from dataset_rows(splits, units)


# ----------------------------------------------------------------------------- VLMEvalKit TSV

def _read_tsv(path: str, *, require_images: bool = False, units: Units | None = None) -> Iterator[Item]:
    display = display_name(path)
    with TsvFile(path, require_images=require_images) as tsv:
        shared = tsv.shared_images()  # every row, whatever the shard: references cross shards
        source = source_name(path)
        for row in tsv.rows():
            if units is not None and not units.take():
                continue  # another shard's row: not converted
            where = f"{display}:{row.line}"
            if row.error is not None:
                yield Item(None, where, display, error=row.error.located(where), raw=row.text)
                continue
            try:
                record = tsv_row_to_record(row.fields, source, shared)
            except RecordError as error:
                yield Item(None, where, display, error=error.located(where), raw=row.fields)
                continue
            yield Item(None, where, display, raw=record)
