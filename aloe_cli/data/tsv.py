"""VLMEvalKit TSV: opening the file, and one row -> one record.

Columns: `index`, `question`, base64 `image` (or a Python/JSON list of them,
or a short value naming another row's `index` whose image it shares) or
`image_path`, options `A`..`J`, `answer`, `hint`, `category`. Options are
appended to the question and kept under `meta`. `data.io` streams the rows.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import sys
from typing import TextIO

from aloe_cli.data.images import image_mime
from aloe_cli.errors import AloeError, RecordError

# VLMEvalKit stores an image once and refers to it from other rows by index:
# an `image` value this short is a reference, not base64 data.
REFERENCE_MAX_LEN = 64
OPTION_COLUMNS = tuple("ABCDEFGHIJ")


def open_tsv(path: str, *, require_images: bool = False) -> tuple[csv.DictReader, TextIO]:
    """A row reader and its handle, after checking the columns a benchmark needs."""
    csv.field_size_limit(sys.maxsize)
    handle = open(path, encoding="utf-8", newline="")
    reader = csv.DictReader(handle, delimiter="\t")
    columns = reader.fieldnames or []
    missing = [c for c in ("index", "question") if c not in columns]
    if require_images and not {"image", "image_path"} & set(columns):
        missing.append("image (or image_path)")
    if missing:
        handle.close()
        raise AloeError(f"{path}: VLMEvalKit TSV is missing column(s): {', '.join(missing)} "
                        f"(has: {', '.join(columns) or 'none'})")
    return reader, handle


def shared_images(handle: TextIO) -> dict[str, str]:
    """index -> base64 image, for the rows whose image other rows refer to (reads the file, then rewinds)."""
    handle.seek(0)
    referenced = {row["image"] for row in csv.DictReader(handle, delimiter="\t")
                  if 0 < len(row.get("image") or "") <= REFERENCE_MAX_LEN}
    shared: dict[str, str] = {}
    if referenced:
        handle.seek(0)
        for row in csv.DictReader(handle, delimiter="\t"):
            image = row.get("image") or ""
            if row.get("index") in referenced and len(image) > REFERENCE_MAX_LEN:
                shared[row["index"]] = image
    handle.seek(0)
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
