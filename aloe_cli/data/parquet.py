"""Parquet: reading rows (by row group, damaged groups counted, not lost) and writing records without loss.

Reading: each row group is read on its own. A row group that cannot be
decoded (a damaged page) yields one error per row it holds, naming the group,
so `--on-error skip` counts them as rejects and still reads the other groups;
`--on-error fail` stops at the first with a one-line error.

Writing: records are spooled as JSONL while the stage runs, then converted
with one schema for the whole file. A top-level field is a typed column when
Arrow can hold every value of it faithfully: all values of one type (nested
objects may differ in which keys they have; a missing key reads back as
null). A field whose values cannot share a type (a number in one record and
a string in another, integers mixed with floats, integers beyond 64 bits, an
empty object) is stored as JSON text instead, and its name is listed in the
file's metadata (`aloe.json_columns`); aloe's reader decodes those columns
back into the values that were written. Images become HF `Image` structs
`{bytes, path}` when every record's `images` is a list of paths or data URIs;
otherwise `images` is a JSON column too. So a run's output is never lost to a
type it did not expect.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from typing import Any, BinaryIO

import orjson

from aloe_cli.data.shard import Units
from aloe_cli.data.streams import is_stream, loads, open_seekable
from aloe_cli.errors import AloeError, RecordError, first_line

JSON_COLUMNS_KEY = b"aloe.json_columns"
_READ_BATCH = 1024
_WRITE_CHUNK = 2048


# ----------------------------------------------------------------------------- reading

def parquet_rows(path: str, units: Units | None) -> Iterator[tuple[int, dict | RecordError]]:
    """(row number, row or the error that makes it unreadable). A shard takes whole row groups when there
    are enough, else rows inside them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source: str | BinaryIO = open_seekable(path) if is_stream(path) else path
    try:
        parquet = pq.ParquetFile(source)
    except Exception as exc:  # pyarrow raises several kinds for a file that is not parquet
        raise AloeError(f"{path}: not a readable parquet file ({first_line(exc)})") from None
    metadata = parquet.schema_arrow.metadata or {}
    json_columns = json.loads(metadata[JSON_COLUMNS_KEY]) if JSON_COLUMNS_KEY in metadata else []
    groups = parquet.num_row_groups
    by_group = units is not None and groups >= units.shard.count
    first_row = 0
    try:
        for group in range(groups):
            size = parquet.metadata.row_group(group).num_rows
            if by_group and not units.take():
                first_row += size
                continue
            picks = None if units is None or by_group else units.take_many(size)
            done = 0  # rows of the group already handed out
            try:
                for batch in parquet.iter_batches(batch_size=_READ_BATCH, row_groups=[group]):
                    yield from _rows_of(batch, first_row + done, _within(picks, done, batch.num_rows),
                                        json_columns)
                    done += batch.num_rows
            except (OSError, pa.ArrowException) as exc:
                error = (f"row group {group} (rows {first_row}-{first_row + size - 1}) cannot be read "
                         f"({first_line(exc)})")
                for offset in range(done, size) if picks is None else (p for p in picks if p >= done):
                    yield first_row + offset, RecordError("unreadable_row_group", error)
            first_row += size
    finally:
        if not isinstance(source, str):
            source.close()


def _within(picks: list[int] | None, start: int, count: int) -> list[int] | None:
    """The picks (offsets in the group) that fall in rows [start, start + count), relative to `start`."""
    if picks is None:
        return None
    return [pick - start for pick in picks if start <= pick < start + count]


def _rows_of(batch, first_row: int, picks: list[int] | None, json_columns: list[str]
             ) -> Iterator[tuple[int, dict]]:
    """Rows of an Arrow batch (all, or only the offsets in `picks`), numbered from `first_row`."""
    if picks is None:
        numbered = enumerate(batch.to_pylist(), start=first_row)
    elif picks:
        numbered = zip((first_row + pick for pick in picks), batch.take(picks).to_pylist())
    else:
        return
    for number, row in numbered:
        for column in json_columns:
            if row.get(column) is not None:
                row[column] = loads(row[column])
        yield number, row


# ----------------------------------------------------------------------------- writing

def jsonl_to_parquet(jsonl_path: str, parquet_path: str) -> None:
    """Convert a JSONL spool (as `io.dumps` writes it) into one parquet file; see the module docstring."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    plan = _ColumnPlan()
    for chunk in _chunks(jsonl_path):
        plan.add(chunk)
    if not plan.order:
        pq.write_table(pa.table({}), parquet_path)
        return
    schema = plan.schema()
    with pq.ParquetWriter(parquet_path, schema) as writer:
        for chunk in _chunks(jsonl_path):
            writer.write_table(plan.table(chunk, schema))


def _chunks(jsonl_path: str) -> Iterator[list[dict]]:
    with open(jsonl_path, "rb") as handle:
        batch: list[dict] = []
        for line in handle:
            batch.append(loads(line))
            if len(batch) == _WRITE_CHUNK:
                yield batch
                batch = []
        if batch:
            yield batch


class _ColumnPlan:
    """Per top-level field: the Arrow type every chunk agrees on, or JSON text when there is none."""

    def __init__(self) -> None:
        self.order: dict[str, None] = {}  # first-seen order of the fields
        self.types: dict[str, Any] = {}
        self.json: set[str] = set()
        self.image_structs = True

    def add(self, chunk: list[dict]) -> None:
        import pyarrow as pa

        for row in chunk:
            self.order.update(dict.fromkeys(row))
        if self.image_structs and not _images_struct_able(chunk):
            self.image_structs = False
            self.json.add("images")
            self.types.pop("images", None)
        for name in self.order:
            if name in self.json:
                continue
            try:
                values = self._values(name, chunk)
            except (binascii.Error, ValueError):  # images: a data URI that is not base64 stays text
                values = None
            arrow_type = None if values is None else _faithful_type(values)
            if arrow_type is not None and name in self.types:
                try:
                    arrow_type = pa.unify_schemas([pa.schema([(name, self.types[name])]),
                                                   pa.schema([(name, arrow_type)])],
                                                  promote_options="default").field(name).type
                except (pa.ArrowException, TypeError, ValueError):  # different types: no common one
                    arrow_type = None
            if arrow_type is None:
                self.json.add(name)
                self.types.pop(name, None)
            else:
                self.types[name] = arrow_type

    def _values(self, name: str, chunk: list[dict]) -> list:
        if name == "images" and self.image_structs:
            return [_image_structs(row.get("images")) for row in chunk]
        return [row.get(name) for row in chunk]

    def schema(self):
        import pyarrow as pa

        fields = [pa.field(name, pa.string() if name in self.json else self.types[name]) for name in self.order]
        json_columns = [name for name in self.order if name in self.json]
        return pa.schema(fields, metadata={JSON_COLUMNS_KEY: json.dumps(json_columns)} if json_columns else None)

    def table(self, chunk: list[dict], schema):
        import pyarrow as pa

        columns = []
        for field in schema:
            if field.name in self.json:
                columns.append(pa.array([_json_text(row[field.name]) if field.name in row else None
                                         for row in chunk], type=pa.string()))
            else:
                columns.append(pa.array(self._values(field.name, chunk), type=field.type))
        return pa.Table.from_arrays(columns, schema=schema)


def _faithful_type(values: list):
    """The Arrow type that holds these values exactly, or None (mixed types, >64-bit ints, empty objects)."""
    import pyarrow as pa

    try:
        array = pa.array(values)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        return None
    if not _storable(array.type):
        return None
    if _has_float(array.type) and _canonical(array.to_pylist()) != _canonical(values):
        return None  # integers that Arrow would have turned into floats
    return array.type


def _storable(arrow_type) -> bool:
    """Parquet cannot write a struct without fields (an empty object in every record)."""
    import pyarrow as pa

    if pa.types.is_struct(arrow_type):
        return arrow_type.num_fields > 0 and all(_storable(arrow_type.field(i).type)
                                                  for i in range(arrow_type.num_fields))
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return _storable(arrow_type.value_type)
    return True


def _has_float(arrow_type) -> bool:
    import pyarrow as pa

    if pa.types.is_floating(arrow_type):
        return True
    if pa.types.is_struct(arrow_type):
        return any(_has_float(arrow_type.field(i).type) for i in range(arrow_type.num_fields))
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return _has_float(arrow_type.value_type)
    return False


def _canonical(values: Any) -> bytes:
    """JSON with sorted keys, absent and null object members alike: how Arrow structs read back."""
    return orjson.dumps(_without_nulls(values), option=orjson.OPT_SORT_KEYS)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # an integer beyond 64 bits
        return json.dumps(value, ensure_ascii=False)


def _images_struct_able(chunk: list[dict]) -> bool:
    """Every `images` is a list of paths / data URIs (or absent): they can be HF Image structs."""
    return all(images is None or (isinstance(images, list)
                                  and all(entry is None or isinstance(entry, str) for entry in images))
               for images in (row.get("images") for row in chunk))


def _image_structs(images: list | None) -> list | None:
    """Images as HF `Image` structs {bytes, path}, so `datasets` can read them back."""
    if images is None:
        return None
    structs: list[dict | None] = []
    for entry in images:
        if entry is None:
            structs.append(None)
        elif entry.startswith("data:"):
            structs.append({"bytes": base64.b64decode(entry.partition(",")[2], validate=True), "path": None})
        else:
            structs.append({"bytes": None, "path": entry})
    return structs
