"""VLMEvalKit TSV: reading the file the way VLMEvalKit writes it, and one row -> one record.

Columns: `index`, `question`, base64 `image` (or a Python/JSON list of them,
or a short value naming another row's `index` whose image it shares) or
`image_path`, options `A`..`J`, `answer`, `hint`, `category`. Options are
appended to the question and kept under `meta`.

VLMEvalKit writes its TSVs with pandas, every field quoted (`"..."`, a quote
inside doubled), and reads them back with pandas' default dialect. We read
such a field the same way. A field that merely starts with a quote, written
by a tool that does not quote, would make pandas (and the csv module) read on
to the next quote, over tabs and line ends, so the rows in between would be
swallowed into one question. Here no row can swallow another: a quoted field
may span lines only when it holds no tab after its first line end and its row
has the header's number of fields; otherwise the line is read literally,
split on tabs, and its quotes survive. A line that fits neither reading is an
error naming the line. The file may be gzipped and may start with a UTF-8
byte-order mark; a row that is not UTF-8 is a record error naming its line.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from aloe_cli.data.images import image_mime
from aloe_cli.data.streams import display_name, open_seekable
from aloe_cli.errors import AloeError, RecordError

# VLMEvalKit stores an image once and refers to it from other rows by index:
# an `image` value this short is a reference, not base64 data.
REFERENCE_MAX_LEN = 64
OPTION_COLUMNS = tuple("ABCDEFGHIJ")
# A quoted field longer than this many lines is not believed (it would be a quote left open).
MAX_LINES_PER_ROW = 10_000


@dataclass
class _Line:
    number: int
    text: str
    bad_encoding: str | None = None  # why the line is not UTF-8


@dataclass
class TsvRow:
    """One row: the line it starts on, its fields by column, or why it cannot be used."""

    line: int
    fields: dict | None
    error: RecordError | None = None
    text: str | None = None  # the row as read (undecodable bytes replaced), for the rejects of a bad row


class TsvFile:
    """A VLMEvalKit TSV opened for reading: `columns`, `rows()` (any number of times), `shared_images()`."""

    def __init__(self, path: str, *, require_images: bool = False):
        self.path = path
        self.display = display_name(path)
        csv.field_size_limit(sys.maxsize)  # base64 images are long fields
        self._handle: BinaryIO = open_seekable(path)  # gunzipped; a pipe is copied first
        try:
            header = next(self._lines(), None)
            if header is not None and header.bad_encoding:
                raise AloeError(f"{self.display}:1: the header is not UTF-8 ({header.bad_encoding})")
            # pandas writes the header quoted too (VLMEvalKit's dump: QUOTE_ALL)
            self.columns = next(csv.reader([header.text.rstrip("\r\n")], delimiter="\t")) if header is not None else []
            self._check_columns(require_images)
        except BaseException:
            self.close()
            raise

    def _check_columns(self, require_images: bool) -> None:
        missing = [c for c in ("index", "question") if c not in self.columns]
        if require_images and not {"image", "image_path"} & set(self.columns):
            missing.append("image (or image_path)")
        if missing:
            raise AloeError(f"{self.display}: VLMEvalKit TSV is missing column(s): {', '.join(missing)} "
                            f"(has: {', '.join(self.columns) or 'none'})")

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> TsvFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _lines(self) -> Iterator[_Line]:
        self._handle.seek(0)
        for number, raw in enumerate(self._handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                text = raw.decode("utf-8", "replace")
                bad = f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1} is not UTF-8; convert the file to UTF-8"
                yield _Line(number, text, bad)
                continue
            if number == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark (Excel, some Windows tools)
            yield _Line(number, text)

    def rows(self) -> Iterator[TsvRow]:
        """Every row after the header, in order; raises AloeError for a line that cannot be read either way."""
        lines = self._lines()
        next(lines, None)  # the header
        pending: deque[_Line] = deque()

        def next_line() -> _Line | None:
            return pending.popleft() if pending else next(lines, None)

        while (first := next_line()) is not None:
            if not first.text.strip("\r\n"):
                continue  # blank line (pandas skips them too)
            taken = [first]
            fields = self._quoted(first, taken, next_line)
            if fields is None:  # not a well-quoted row: the line as written
                pending.extendleft(reversed(taken[1:]))
                taken = [first]
                fields = first.text.rstrip("\r\n").split("\t")
                if len(fields) != len(self.columns):
                    raise AloeError(
                        f"{self.display}:{first.number}: {len(fields)} tab-separated field(s) where the header has "
                        f"{len(self.columns)}, and no quoting makes it a row (a quote left open or a stray tab?)")
            bad = next((line for line in taken if line.bad_encoding), None)
            if bad is not None:
                where = f"line {bad.number}: " if bad.number != first.number else ""
                error = RecordError("invalid_encoding", where + bad.bad_encoding,
                                    where=f"{self.display}:{first.number}")
                yield TsvRow(first.number, None, error, "".join(line.text for line in taken))
                continue
            yield TsvRow(first.number, self._by_column(fields))

    def _quoted(self, first: _Line, taken: list[_Line], next_line) -> list[str] | None:
        """The row read with VLMEvalKit's quoting, starting at `first`; None if that reading is not believable."""
        def feed() -> Iterator[str]:
            yield first.text
            while len(taken) < MAX_LINES_PER_ROW:
                line = next_line()
                if line is None:
                    return
                taken.append(line)
                yield line.text

        try:
            fields = next(csv.reader(feed(), delimiter="\t", strict=True))
        except (csv.Error, StopIteration):
            return None
        if len(taken) > 1 and (len(fields) != len(self.columns)
                               or any("\t" in field.partition("\n")[2] for field in fields if "\n" in field)):
            return None  # a quote that ran over other rows
        return fields

    def _by_column(self, fields: list[str]) -> dict:
        row: dict = dict(zip(self.columns, fields))
        if len(fields) > len(self.columns):
            row[None] = fields[len(self.columns):]  # csv.DictReader's convention: flagged by tsv_row_to_record
        for column in self.columns[len(fields):]:
            row[column] = None
        return row

    def shared_images(self) -> dict[str, str]:
        """index -> base64 image, for the rows whose image other rows refer to (every row, whatever the shard)."""
        referenced = {row.fields["image"] for row in self.rows()
                      if row.fields is not None and 0 < len(row.fields.get("image") or "") <= REFERENCE_MAX_LEN}
        shared: dict[str, str] = {}
        if referenced:
            for row in self.rows():
                if row.fields is None:
                    continue
                image = row.fields.get("image") or ""
                if row.fields.get("index") in referenced and len(image) > REFERENCE_MAX_LEN:
                    shared[row.fields["index"]] = image
        return shared


def _image_list(value: str) -> list[str]:
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


def tsv_row_to_record(row: dict, source: str, shared: dict[str, str]) -> dict:
    """One VLMEvalKit row -> a record; options A..J are appended to the question."""
    if None in row:
        raise RecordError("invalid_row", "row has more fields than the header")
    index = row.get("index") or ""
    images: list[str] = []
    image_value = (row.get("image") or "").strip()
    if image_value and len(image_value) <= REFERENCE_MAX_LEN:
        if image_value not in shared:
            raise RecordError("image_missing", f"refers to the image of row index {image_value}, which has none",
                              field="image")
        image_value = shared[image_value]
    if image_value:
        images = [to_data_uri_from_base64(b64) for b64 in _image_list(image_value)]
    elif (row.get("image_path") or "").strip():
        images = _image_list(row["image_path"])
    options = {letter: row[letter] for letter in OPTION_COLUMNS
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
    meta = {k: v for k, v in row.items() if k not in ("image", "image_path", "question") + OPTION_COLUMNS}
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
