"""The one record loop: read -> annotate a batch -> keep or reject -> write, counting everything.

A stage supplies `annotate(batch)` and `decide(item)` (and optionally
`expand(item)` to emit several records per input); `run_stage` owns batching,
order, `--keep-all`, `--on-error`, rejects, counters per reason and per input,
progress and the summary. Nothing is dropped silently: records read = records
kept + records rejected, always; `emitted` counts what was written.

Two modes a stage declares:

- `measure_first = True`: the stage must see every value before its first
  decision (percentile thresholds). The runner annotates the whole shard
  first, spooling the annotated items to a temporary file (memory stays flat),
  marks the stage's `distribution` complete, then replays the spool through
  the decisions.
- `expand(item)` returning several records: every one is written (1 -> N, for
  perturbations); the input still counts once as kept.

Sharding happens in the reader (`data.io.read_items`), never here.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from aloe_cli.console import ProgressFactory, null_progress
from aloe_cli.data.images import relocate
from aloe_cli.data.io import Item, RecordWriter
from aloe_cli.data.shard import Shard
from aloe_cli.errors import AloeError, RecordError

DEFAULT_BATCH_SIZE = 256


class Distribution:
    """Values per source, 8 bytes each: enough for percentiles, plots and summaries."""

    def __init__(self) -> None:
        self._values: dict[str, array] = {}
        self.complete = False  # set by the runner once every value of the run has been added

    def add(self, source: str, value: float) -> None:
        self._values.setdefault(source, array("d")).append(float(value))

    def sources(self) -> list[str]:
        return sorted(self._values)

    def values(self, source: str):
        import numpy as np

        return np.frombuffer(self._values.get(source, array("d")), dtype=np.float64)

    def count(self, source: str) -> int:
        return len(self._values.get(source, ()))

    def percentile(self, source: str, q: float) -> float | None:
        import numpy as np

        values = self.values(source)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            return None
        return float(np.percentile(finite, q))

    def percentiles(self, source: str, qs: Iterable[float] = (1, 5, 50, 95, 99)) -> dict[str, float | None]:
        return {f"p{q:g}": self.percentile(source, q) for q in qs}


@dataclass(frozen=True)
class Reject:
    """A stage's verdict against a record: a stable reason code and a human detail."""

    reason: str
    detail: str = ""


class Stage:
    """Base class for a data stage. Subclasses set `name` and override the hooks they need."""

    name = "stage"
    # True when the stage must measure the whole shard before its first decision (percentiles).
    measure_first = False
    # Values the stage collects per source; the runner marks it complete once every item is annotated.
    distribution: Distribution | None = None
    # Keys of summary() that add up across shards (`aloe report merge`); `*` matches any key at its level.
    additive: tuple[str, ...] = ()

    def runner_batch_size(self) -> int:
        """How many items the runner hands to `annotate` at once, unless the command says otherwise."""
        return DEFAULT_BATCH_SIZE

    def annotate(self, batch: list[Item]) -> None:
        """Compute annotations for a batch in place. Set `item.error` for a record that fails."""

    def annotate_stream(self, batches: Iterator[list[Item]]) -> Iterator[list[Item]]:
        """Annotate batches as they come and hand each one back, in order.

        The default annotates each batch's valid items. A stage that overlaps
        work across batches (tokenizing one while the next is read) overrides this.
        """
        for batch in batches:
            valid = [item for item in batch if item.error is None]
            if valid:
                self.annotate(valid)
            yield batch

    def decide(self, item: Item) -> Reject | None:
        """Return None to keep the record, or a Reject. Called in input order."""
        return None

    def expand(self, item: Item) -> list[dict]:
        """The records a kept item becomes in the output (default: itself). May raise RecordError."""
        return [item.record]

    def settled(self, item: Item, kept: bool) -> None:
        """Called once for every item read, in input order, when its fate is known (errors included)."""

    def summary(self) -> dict[str, Any]:
        """Stage-specific figures for the closing summary."""
        return {}

    def close(self) -> None:
        """Release models, clients and caches; the command calls it when the run ends."""


@dataclass
class RunConfig:
    batch_size: int | None = None  # None: the stage's runner_batch_size()
    shard: Shard = field(default_factory=Shard)  # the shard the items were read for (reported, not applied)
    keep_all: bool = False
    on_error: str = "fail"  # or "skip": bad records go to the rejects
    spool_dir: str | None = None  # measure-first spool; default: the system temporary folder ($TMPDIR)
    # Written records' image paths are rewritten to resolve from `image_folder` (the output's folder; None:
    # absolute), so the next command finds them whichever folder each input came from (`io.output_folder`).
    relocate_images: bool = False
    image_folder: str | None = None
    rejects_image_folder: str | None = None  # the same for the rejects file
    expected: int | None = None  # records this shard should hold (`io.expected_records`), for progress; None: unknown


@dataclass
class InputCounts:
    read: int = 0
    kept: int = 0
    rejected: int = 0


@dataclass
class RunSummary:
    stage: str
    shard: str
    read: int = 0
    kept: int = 0
    rejected: int = 0
    flagged: int = 0  # would have been rejected, kept because of --keep-all
    emitted: int = 0  # records written for the kept ones (more than kept when a stage expands)
    reasons: Counter = field(default_factory=Counter)
    inputs: dict[str, InputCounts] = field(default_factory=dict)
    rejects_written: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    additive: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "shard": self.shard,
            "read": self.read,
            "kept": self.kept,
            "rejected": self.rejected,
            "flagged": self.flagged,
            "emitted": self.emitted,
            "reasons": dict(sorted(self.reasons.items())),
            "inputs": {name: vars(counts) for name, counts in self.inputs.items()},
            "rejects_written": self.rejects_written,
            **self.extra,
            "additive": list(self.additive),
        }


def reject_record(item: Item, stage: str, reason: str, detail: str) -> dict:
    """The record as it will appear in the rejects file, with `aloe.reject` set."""
    if item.record is not None:
        record = item.record
    elif isinstance(item.raw, dict):
        record = dict(item.raw)
    else:
        record = {"raw": item.raw}
    aloe = record.get("aloe") if isinstance(record.get("aloe"), dict) else {}
    record["aloe"] = {**aloe, "reject": {"stage": stage, "reason": reason, "detail": detail, "where": item.where}}
    return record


def run_stage(stage: Stage, items: Iterable[Item], output: RecordWriter | None, rejects: RecordWriter | None,
              config: RunConfig, progress: ProgressFactory | None = None) -> RunSummary:
    """Run `stage` over `items`. `output=None` counts and decides but writes nothing (a counting pass)."""
    progress = progress or null_progress
    fail_fast = config.on_error != "skip"
    batches = _batches(items, config.batch_size or stage.runner_batch_size())
    spool: _Spool | None = None
    try:
        if stage.measure_first:
            spool = _measure(stage, batches, fail_fast, config.spool_dir, progress, config.expected)
            annotated = spool.replay()
        else:
            annotated = stage.annotate_stream(batches)
        with progress(f"aloe {stage.name}", config.expected) as bar:
            summary = _decide_all(stage, annotated, output, rejects, config, bar)
    finally:
        if spool is not None:
            spool.close()
    if stage.distribution is not None:
        stage.distribution.complete = True  # every value is in
    summary.extra = stage.summary()
    summary.additive = stage.additive
    if summary.read != summary.kept + summary.rejected:  # the invariant every stage promises
        raise RuntimeError(f"record accounting broke: {summary.read} read != "
                           f"{summary.kept} kept + {summary.rejected} rejected")
    return summary


def _decide_all(stage: Stage, batches: Iterable[list[Item]], output: RecordWriter | None,
                rejects: RecordWriter | None, config: RunConfig, bar: Any) -> RunSummary:
    summary = RunSummary(stage=stage.name, shard=str(config.shard), rejects_written=rejects is not None)

    def reject(item: Item, counts: InputCounts, reason: str, detail: str) -> None:
        summary.rejected += 1
        summary.reasons[reason] += 1
        counts.rejected += 1
        if rejects is not None:
            if config.relocate_images and item.record is not None and item.record.get("images"):
                _relocate_images(item.record, item, config.rejects_image_folder)
            rejects.write(reject_record(item, stage.name, reason, detail))
        stage.settled(item, False)

    for batch in batches:
        for item in batch:
            summary.read += 1
            counts = summary.inputs.get(item.input)
            if counts is None:
                counts = summary.inputs[item.input] = InputCounts()
            counts.read += 1
            verdict, records = None, []
            if item.error is None:
                verdict = stage.decide(item)
                if verdict is not None and config.keep_all:
                    summary.flagged += 1
                    summary.reasons[verdict.reason] += 1
                    item.record.setdefault("aloe", {}).setdefault(stage.name, {})["flag"] = {
                        "reason": verdict.reason, "detail": verdict.detail}
                    verdict = None
                if verdict is None and output is not None:
                    try:
                        records = stage.expand(item)
                    except RecordError as error:
                        item.error = error.located(item.where)
            if item.error is not None:
                if config.on_error != "skip":
                    raise item.error.located(item.where)
                reject(item, counts, item.error.reason, item.error.format())
            elif verdict is not None:
                reject(item, counts, verdict.reason, verdict.detail)
            else:
                summary.kept += 1
                counts.kept += 1
                for record in records:
                    if config.relocate_images and record.get("images"):
                        _relocate_images(record, item, config.image_folder)
                    output.write(record)
                summary.emitted += len(records)
                stage.settled(item, True)
        bar.advance(len(batch))
    return summary


def _relocate_images(record: dict, item: Item, folder: str | None) -> None:
    if isinstance(record["images"], list):
        record["images"] = [relocate(entry, item.image_root, folder) for entry in record["images"]]


def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


# ----------------------------------------------------------------------------- measure first

def _measure(stage: Stage, batches: Iterator[list[Item]], fail_fast: bool, spool_dir: str | None,
             progress: ProgressFactory, expected: int | None) -> _Spool:
    """Annotate every batch now and spool it; with --on-error fail the first bad record raises here."""
    spool = _Spool(spool_dir)
    try:
        with progress(f"aloe {stage.name} (measuring)", expected) as bar:
            for batch in stage.annotate_stream(_failing_fast(batches) if fail_fast else batches):
                if fail_fast:
                    _raise_first_error(batch)
                spool.add(batch)
                bar.advance(len(batch))
    except BaseException:
        spool.close()
        raise
    if stage.distribution is not None:
        stage.distribution.complete = True
    return spool


def _failing_fast(batches: Iterator[list[Item]]) -> Iterator[list[Item]]:
    """A bad record stops the run before the stage spends work on its batch."""
    for batch in batches:
        _raise_first_error(batch)
        yield batch


def _raise_first_error(batch: list[Item]) -> None:
    for item in batch:
        if item.error is not None:
            raise item.error.located(item.where)


class _Spool:
    """Annotated batches in a temporary file, replayed once in the same order and batching."""

    def __init__(self, folder: str | os.PathLike | None):
        self._directory = tempfile.TemporaryDirectory(prefix="aloe-spool-", dir=folder)
        self._path = Path(self._directory.name) / "items.pickle"
        self._handle = open(self._path, "wb")
        self._batches = 0

    def add(self, batch: list[Item]) -> None:
        try:
            pickle.dump([_item_to_spool(item) for item in batch], self._handle, protocol=pickle.HIGHEST_PROTOCOL)
        except OSError as exc:  # a full $TMPDIR
            raise AloeError(f"cannot write the measuring spool in {self._directory.name}: "
                            f"{exc.strerror or exc} (set TMPDIR to a folder with room)") from None
        self._batches += 1

    def replay(self) -> Iterator[list[Item]]:
        try:
            self._handle.close()
        except OSError as exc:
            raise AloeError(f"cannot write the measuring spool in {self._directory.name}: "
                            f"{exc.strerror or exc} (set TMPDIR to a folder with room)") from None
        with open(self._path, "rb") as handle:
            for _ in range(self._batches):
                yield [_item_from_spool(data) for data in pickle.load(handle)]

    def close(self) -> None:
        with suppress(OSError):  # closing flushes; after a full disk that fails again
            self._handle.close()
        self._directory.cleanup()


def _item_to_spool(item: Item) -> dict:
    error = item.error  # RecordError does not pickle by itself (its constructor takes keywords)
    return {"record": item.record, "where": item.where, "input": item.input, "image_root": item.image_root,
            "raw": item.raw if item.record is None else None, "annotations": item.annotations,
            "error": None if error is None else (error.reason, error.message, error.where, error.field)}


def _item_from_spool(data: dict) -> Item:
    error = data["error"]
    return Item(record=data["record"], where=data["where"], input=data["input"], image_root=data["image_root"],
                raw=data["raw"], annotations=data["annotations"],
                error=None if error is None else RecordError(error[0], error[1], where=error[2], field=error[3]))


__all__ = ["AloeError", "Distribution", "InputCounts", "Item", "Reject", "RecordError", "RunConfig", "RunSummary",
           "Shard", "Stage", "reject_record", "run_stage"]
