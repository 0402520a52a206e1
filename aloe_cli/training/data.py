"""Training records -> a memory-mapped `datasets.Dataset` holding only what training reads.

Records are read once (every format `aloe` reads, through the stage runner, so
bad records are counted or stop the run as everywhere else) and written as an
Arrow stream file that `datasets` memory-maps: a multi-million-record mixture
costs page cache, not resident memory. Only the training columns are kept:

    index     int64    row number (the collator's replacement sampling uses it)
    messages  string   the conversation as JSON
    images    list<struct<bytes: binary, path: string>>   absolute paths or embedded bytes
    where     string   file:line, for error messages

The messages are stored as JSON text because records carry heterogeneous
`aloe.*` annotations and content lists that mix strings and parts, on which
Arrow's schema inference fails; `load_dataset` decodes them on access. Images
are never decoded here: relative paths are resolved against the record's image
root, data URIs become bytes, and the collator decodes them batch by batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from aloe_cli.data.images import read_source, resolve_path
from aloe_cli.data.io import Item
from aloe_cli.data.records import text_of
from aloe_cli.data.stage import Reject, RunConfig, RunSummary, Stage, run_stage
from aloe_cli.errors import AloeError, RecordError

DATASET_DIR = "dataset"
DATASET_FILE = "train.arrow"
_WRITE_CHUNK = 1024
_WHERE = "_aloe_train_where"


def _schema():
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.schema([("index", pa.int64()), ("messages", pa.string()), ("images", pa.list_(image)),
                      ("where", pa.string())])


class TrainingRows(Stage):
    """Keeps records that have something to learn and puts their images in a form any rank can open."""

    name = "train"

    def annotate(self, batch: list[Item]) -> None:
        for item in batch:
            try:
                images = [_image_ref(entry, item.image_root) for entry in item.record.get("images") or []]
            except RecordError as error:  # an undecodable data URI
                item.error = error.located(item.where)
                continue
            # The row writer gets only the record: hand it the resolved images and where the record came from.
            item.record = {"messages": item.record["messages"], "images": images, _WHERE: item.where}

    def decide(self, item: Item) -> Reject | None:
        answers = [m for m in item.record["messages"] if m.get("role") == "assistant"]
        if not any(text_of(m).strip() for m in answers):
            return Reject("no_answer", "no assistant turn with text: nothing to learn")
        return None


def _image_ref(entry: Any, image_root: str | os.PathLike | None) -> dict:
    """{bytes, path} for one image entry; paths become absolute so every rank and worker can open them.
    A path that names no file is a missing image now, counted with the records, not a sample lost mid-run."""
    if isinstance(entry, dict) and not entry.get("bytes") and entry.get("path"):
        entry = entry["path"]
    if isinstance(entry, str) and not entry.startswith("data:"):
        path = resolve_path(entry, image_root).absolute()
        if not path.is_file():
            raise RecordError("image_missing", f"image file not found: {path}")
        return {"bytes": None, "path": str(path)}
    data, _ = read_source(entry, image_root)
    return {"bytes": bytes(data), "path": None}


class ArrowRowWriter:
    """The stage runner's output: kept records become rows of an Arrow stream file (atomic rename on success)."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self._rows: dict[str, list] = {"index": [], "messages": [], "images": [], "where": []}
        self._tmp = path.with_name(f".{path.name}.tmp")

    def __enter__(self) -> ArrowRowWriter:
        import pyarrow as pa

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(self._tmp), "wb")
        self._writer = pa.ipc.new_stream(self._sink, _schema())
        return self

    def write(self, record: dict) -> None:
        self._rows["index"].append(self.count)
        self._rows["messages"].append(orjson.dumps(record["messages"]).decode())
        self._rows["images"].append(record["images"])
        self._rows["where"].append(record[_WHERE])
        self.count += 1
        if len(self._rows["index"]) >= _WRITE_CHUNK:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows["index"]:
            self._writer.write_batch(pa.RecordBatch.from_pydict(self._rows, schema=_schema()))
            self._rows = {key: [] for key in self._rows}

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._flush()
            self._writer.close()
            self._sink.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        finally:
            if self._tmp.exists():
                self._tmp.unlink()


def build_dataset(items: Iterable[Item], output_dir: str | os.PathLike, *, on_error: str = "skip") -> RunSummary:
    """Read every record once into `<output_dir>/dataset/train.arrow`; return the runner's counts."""
    path = dataset_path(output_dir)
    with ArrowRowWriter(path) as writer:
        summary = run_stage(TrainingRows(), items, writer, None, RunConfig(batch_size=256, on_error=on_error))
    if summary.kept == 0:
        path.unlink(missing_ok=True)
        reasons = ", ".join(f"{reason}={n}" for reason, n in sorted(summary.reasons.items()))
        raise AloeError(f"no trainable records: {summary.read} read, 0 kept" + (f" ({reasons})" if reasons else ""))
    return summary


# Samples skipped while training that count as lost (the data could not be used); samples dropped for their length
# (too_long, no_loss_tokens) follow --max-length and --truncate, and are counted but not held against --max-skipped.
LOST_WHILE_TRAINING = ("image_missing", "image_corrupt", "image_truncated", "image_too_large", "image_invalid",
                       "template_error", "other")


def lost_allowed(read: int, max_skipped: float) -> int:
    """How many of `read` records may be lost under --max-skipped (a fraction)."""
    return int(read * max_skipped + 1e-9)


def lost_message(lost: dict[str, int], read: int, max_skipped: float) -> tuple[bool, str] | None:
    """(over the limit, words) for the records lost so far, or None when none is lost."""
    total = sum(lost.values())
    if not total:
        return None
    allowed = lost_allowed(read, max_skipped)
    reasons = ", ".join(f"{reason}={n}" for reason, n in sorted(lost.items()) if n)
    share = f"--max-skipped {max_skipped * 100:g}% of {read} = {allowed}"
    if total > allowed:
        return True, (f"{total} of {read} records lost ({reasons}): more than {share} allows; fix the inputs "
                      "(image paths, files) or raise --max-skipped")
    return False, f"{total} of {read} records lost ({reasons}): not trained on (within {share})"


def dataset_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / DATASET_DIR / DATASET_FILE


def decode_rows(batch: dict[str, list]) -> dict[str, list]:
    """`with_transform` hook: messages back from JSON (the rest is already in its final form)."""
    return {**batch, "messages": [orjson.loads(text) for text in batch["messages"]]}


def load_dataset(output_dir: str | os.PathLike):
    """The memory-mapped training dataset written by `build_dataset`, decoding messages on access."""
    from datasets import Dataset

    path = dataset_path(output_dir)
    if not path.is_file():
        raise AloeError(f"training dataset not found: {path}")
    return Dataset.from_file(str(path)).with_transform(decode_rows)


__all__ = ["LOST_WHILE_TRAINING", "ArrowRowWriter", "lost_allowed", "lost_message", "TrainingRows",
           "build_dataset", "dataset_path", "decode_rows", "load_dataset"]
