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
`DatasetDict.save_to_disk`), and VLMEvalKit TSV. `-` is stdin/stdout (JSONL,
gzip detected on input).
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import glob
import gzip
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import orjson

from aloe_cli.data.images import image_mime, to_data_uri
from aloe_cli.data.records import RecordDefaults, normalize
from aloe_cli.errors import AloeError, OutputClosed, RecordError

STDIO = "-"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_GZIP_MAGIC = b"\x1f\x8b"
# VLMEvalKit stores an image once and refers to it from other rows by index:
# an `image` value this short is a reference, not base64 data.
_TSV_REFERENCE_MAX_LEN = 64
_TSV_OPTION_COLUMNS = tuple("ABCDEFGHIJ")


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
               defaults: RecordDefaults | None = None) -> Iterator[Item]:
    """Stream items from every input in order (stdin when there is none)."""
    for path in expand_inputs(inputs):
        yield from read_file(path, image_root, defaults=defaults)


def read_file(path: str, image_root: str | os.PathLike | None = None, *,
              require_images: bool = False, defaults: RecordDefaults | None = None) -> Iterator[Item]:
    """Items of one input, normalised; `defaults.source` defaults to the input's name."""
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
        items = _read_jsonl(path)
    elif fmt == "parquet":
        items = _read_rows(path, _parquet_rows(path), "row")
    elif fmt == "hf_dataset":
        items = _read_rows(path, _hf_dataset_rows(path), "row")
    else:
        items = _read_tsv(path, require_images=require_images)
    for item in items:
        item.image_root = root
        if item.error is None:
            try:
                item.record = normalize(item.raw, defaults, root)
            except RecordError as error:
                item.error = error.located(item.where)
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


def _read_jsonl(path: str) -> Iterator[Item]:
    """Parsed, not yet normalised items (read_file normalises)."""
    display = _display(path)
    stream = _open_binary(path)
    try:
        line_no = 0
        while True:
            try:
                line = stream.readline()
            except (OSError, EOFError) as exc:  # truncated gzip
                raise AloeError(f"{display}:{line_no + 1}: cannot read input ({exc})") from None
            if not line:
                break
            line_no += 1
            if not line.strip():
                continue
            where = f"{display}:{line_no}"
            try:
                raw = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                error = RecordError("invalid_json", f"invalid JSON ({exc})", where=where)
                yield Item(None, where, display, error=error, raw=line.decode("utf-8", "replace").rstrip("\n"))
                continue
            yield Item(None, where, display, raw=raw)
    finally:
        if path != STDIO:
            stream.close()


def _read_rows(path: str, rows: Iterator[dict], unit: str) -> Iterator[Item]:
    for index, row in enumerate(rows):
        yield Item(None, f"{path} {unit} {index}", path, raw=row)


def _parquet_rows(path: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise AloeError(f"{path}: not a readable parquet file ({exc})") from None
    for batch in parquet.iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _hf_dataset_rows(path: str) -> Iterator[dict]:
    """Rows of a `save_to_disk` folder, read as Arrow without decoding images."""
    import pyarrow as pa

    folder = Path(path)
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        for split in splits:
            yield from _hf_dataset_rows(str(folder / split))
        return
    try:
        state = json.loads((folder / "state.json").read_text())
        files = [folder / entry["filename"] for entry in state["_data_files"]]
    except (OSError, KeyError, ValueError) as exc:
        raise AloeError(f"{path}: unreadable dataset folder state.json ({exc})") from None
    for file in files:
        try:
            with pa.memory_map(str(file)) as source:
                reader = pa.ipc.open_stream(source)
                for batch in reader:
                    yield from batch.to_pylist()
        except (OSError, pa.ArrowInvalid) as exc:
            raise AloeError(f"{file}: unreadable Arrow data ({exc})") from None


# ----------------------------------------------------------------------------- VLMEvalKit TSV

def _tsv_reader(path: str) -> tuple[csv.DictReader, TextIO]:
    csv.field_size_limit(sys.maxsize)
    handle = open(path, encoding="utf-8", newline="")
    return csv.DictReader(handle, delimiter="\t"), handle


def _tsv_image_list(value: str) -> list[str]:
    """`image` holds base64 data, or a Python/JSON list of them (multi-image benchmarks)."""
    value = value.strip()
    if value.startswith("["):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, list):
            return [str(v) for v in parsed]
    return [value] if value else []


def _read_tsv(path: str, *, require_images: bool = False) -> Iterator[Item]:
    reader, handle = _tsv_reader(path)
    with handle:
        columns = reader.fieldnames or []
        missing = [c for c in ("index", "question") if c not in columns]
        if require_images and not {"image", "image_path"} & set(columns):
            missing.append("image (or image_path)")
        if missing:
            raise AloeError(f"{path}: VLMEvalKit TSV is missing column(s): {', '.join(missing)} "
                            f"(has: {', '.join(columns) or 'none'})")
        # First pass: keep only the images that other rows refer to.
        referenced = {row["image"] for row in reader if 0 < len(row.get("image") or "") <= _TSV_REFERENCE_MAX_LEN}
        handle.seek(0)
        reader = csv.DictReader(handle, delimiter="\t")
        shared: dict[str, str] = {}
        if referenced:
            for row in reader:
                image = row.get("image") or ""
                if row.get("index") in referenced and len(image) > _TSV_REFERENCE_MAX_LEN:
                    shared[row["index"]] = image
            handle.seek(0)
            reader = csv.DictReader(handle, delimiter="\t")
        source = source_name(path)
        for row_no, row in enumerate(reader, start=2):  # line 1 is the header
            where = f"{path}:{row_no}"
            try:
                record = tsv_row_to_record(row, source, shared)
            except RecordError as error:
                yield Item(None, where, path, error=error.located(where), raw=row)
                continue
            yield Item(None, where, path, raw=record)


def tsv_row_to_record(row: dict, source: str, shared_images: dict[str, str]) -> dict:
    """One VLMEvalKit row -> a record; options A..J are appended to the question."""
    if None in row:
        raise RecordError("invalid_row", "row has more fields than the header")
    index = row.get("index") or ""
    images: list[str] = []
    image_value = (row.get("image") or "").strip()
    if image_value and len(image_value) <= _TSV_REFERENCE_MAX_LEN:
        if image_value not in shared_images:
            raise RecordError("image_missing", f"refers to the image of row index {image_value}, which has none",
                              field="image")
        image_value = shared_images[image_value]
    if image_value:
        images = [to_data_uri_from_base64(b64) for b64 in _tsv_image_list(image_value)]
    elif (row.get("image_path") or "").strip():
        images = _tsv_image_list(row["image_path"])
    options = {letter: row[letter] for letter in _TSV_OPTION_COLUMNS
               if letter in row and row[letter] is not None and row[letter].strip() not in ("", "nan")}
    question = row.get("question") or ""
    hint = (row.get("hint") or "").strip()
    text = (f"Hint: {hint}\n" if hint and hint != "nan" else "") + question
    if options:
        text += "\nOptions:\n" + "\n".join(f"{letter}. {value}" for letter, value in options.items())
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    answer = row.get("answer")
    if answer not in (None, "", "nan"):
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    meta = {k: v for k, v in row.items() if k not in ("image", "image_path", "question") + _TSV_OPTION_COLUMNS}
    if options:
        meta["options"] = options
    return {"id": index, "source": source, "messages": messages, "images": images, "meta": meta}


def to_data_uri_from_base64(b64: str) -> str:
    """Wrap a TSV's base64 image as a data URI; the MIME type comes from the first decoded bytes."""
    try:
        head = base64.b64decode(b64[:64] + "=" * (-len(b64[:64]) % 4))
    except (binascii.Error, ValueError):
        raise RecordError("image_invalid", "image column is not valid base64", field="image") from None
    return f"data:{image_mime(head)};base64,{b64}"


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


class RecordWriter:
    """Write records to a file (atomically: temp file + rename on success) or stdout.

    Use as a context manager: the file appears only if the block ends without
    an exception.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = STDIO if path in (None, STDIO) else str(path)
        self.count = 0
        self._tmp: str | None = None
        name = self.path.lower()
        self.format = ("parquet" if name.endswith(".parquet") else
                       "jsonl.gz" if name.endswith(".gz") else "jsonl")
        if self.path != STDIO and not name.endswith((".parquet", ".gz") + JSONL_SUFFIXES):
            raise AloeError(f"{self.path}: unknown output format (expected .jsonl, .jsonl.gz or .parquet)")
        self._stream: Any = None

    def __enter__(self) -> RecordWriter:
        if self.path == STDIO:
            sys.stdout.flush()  # nothing written through the text layer may come after our bytes
            # Our own large buffer: sys.stdout.buffer can be unbuffered (python -u, PYTHONUNBUFFERED).
            self._stream = open(sys.stdout.fileno(), "wb", buffering=1 << 16, closefd=False)
            return self
        target = Path(self.path)
        if not target.parent.exists():
            raise AloeError(f"output folder does not exist: {target.parent}")
        fd, self._tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        if self.format == "jsonl.gz":
            self._stream = gzip.open(self._tmp, "wb")
        else:  # parquet is spooled as JSONL, then converted with one unified schema on close
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
        self._stream.close()
        if exc_type is not None:
            os.unlink(self._tmp)
            return
        try:
            if self.format == "parquet":
                final_tmp = self._tmp + ".parquet"
                _jsonl_to_parquet(self._tmp, final_tmp)
                os.unlink(self._tmp)
                self._tmp = final_tmp
            os.replace(self._tmp, self.path)
        except BaseException:
            if self._tmp and os.path.exists(self._tmp):
                os.unlink(self._tmp)
            raise


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
