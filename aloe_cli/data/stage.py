"""The loop every data stage shares: read -> annotate a batch -> keep or reject -> write.

A stage supplies `annotate(batch)` and `decide(item)`; `run_stage` owns
batching, order, sharding, `--keep-all`, `--on-error`, rejects, counters per
reason and per input, and the summary. Nothing is dropped silently:
records read = records written + records rejected, always.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from aloe_cli.data.io import Item, RecordWriter
from aloe_cli.errors import AloeError, RecordError


@dataclass(frozen=True)
class Shard:
    """Shard K of N (0-based): this process handles records whose index % N == K."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise AloeError(f"--shard must look like K/N (e.g. 3/64), got {text!r}") from None
        if count < 1 or not 0 <= index < count:
            raise AloeError(f"--shard {text}: need 0 <= K < N")
        return cls(index, count)

    @classmethod
    def from_env(cls) -> Shard:
        """SLURM job arrays: SLURM_ARRAY_TASK_ID relative to SLURM_ARRAY_TASK_MIN, of SLURM_ARRAY_TASK_COUNT."""
        task, count = os.environ.get("SLURM_ARRAY_TASK_ID"), os.environ.get("SLURM_ARRAY_TASK_COUNT")
        if task is None or count is None:
            return cls()
        first = os.environ.get("SLURM_ARRAY_TASK_MIN", "0")
        try:
            return cls.parse(f"{int(task) - int(first)}/{int(count)}")
        except ValueError:
            raise AloeError(f"cannot read the SLURM array task from the environment "
                            f"(SLURM_ARRAY_TASK_ID={task}, SLURM_ARRAY_TASK_COUNT={count})") from None

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class Reject:
    """A stage's verdict against a record: a stable reason code and a human detail."""

    reason: str
    detail: str = ""


class Stage:
    """Base class for a data stage. Subclasses set `name` and override the hooks."""

    name = "stage"

    def annotate(self, batch: list[Item]) -> None:
        """Compute annotations for a batch in place. Set `item.error` for a record that fails."""

    def decide(self, item: Item) -> Reject | None:
        """Return None to keep the record, or a Reject. Called in input order."""
        return None

    def summary(self) -> dict[str, Any]:
        """Stage-specific figures for the closing summary."""
        return {}


@dataclass
class RunConfig:
    batch_size: int = 256
    shard: Shard = field(default_factory=Shard)
    keep_all: bool = False
    on_error: str = "fail"  # or "skip": bad records go to the rejects


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
    reasons: Counter = field(default_factory=Counter)
    inputs: dict[str, InputCounts] = field(default_factory=dict)
    rejects_written: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "shard": self.shard,
            "read": self.read,
            "kept": self.kept,
            "rejected": self.rejected,
            "flagged": self.flagged,
            "reasons": dict(sorted(self.reasons.items())),
            "inputs": {name: vars(counts) for name, counts in self.inputs.items()},
            "rejects_written": self.rejects_written,
            **self.extra,
        }


def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _sharded(items: Iterable[Item], shard: Shard) -> Iterator[Item]:
    if shard.count == 1:
        yield from items
        return
    for position, item in enumerate(items):
        if position % shard.count == shard.index:
            yield item


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


def run_stage(stage: Stage, items: Iterable[Item], output: RecordWriter, rejects: RecordWriter | None,
              config: RunConfig, progress=None) -> RunSummary:
    summary = RunSummary(stage=stage.name, shard=str(config.shard), rejects_written=rejects is not None)

    def count_input(item: Item) -> InputCounts:
        counts = summary.inputs.get(item.input)
        if counts is None:
            counts = summary.inputs[item.input] = InputCounts()
        return counts

    def send_to_rejects(item: Item, reason: str, detail: str) -> None:
        summary.rejected += 1
        summary.reasons[reason] += 1
        count_input(item).rejected += 1
        if rejects is not None:
            rejects.write(reject_record(item, stage.name, reason, detail))

    for batch in _batches(_sharded(items, config.shard), config.batch_size):
        for item in batch:
            summary.read += 1
            count_input(item).read += 1
        valid = [item for item in batch if item.error is None]
        if valid:
            stage.annotate(valid)
        for item in batch:
            if item.error is not None:
                if config.on_error != "skip":
                    raise item.error.located(item.where)
                send_to_rejects(item, item.error.reason, item.error.format())
                continue
            verdict = stage.decide(item)
            if verdict is not None and config.keep_all:
                summary.flagged += 1
                summary.reasons[verdict.reason] += 1
                item.record.setdefault("aloe", {}).setdefault(stage.name, {})["flag"] = {
                    "reason": verdict.reason, "detail": verdict.detail}
                verdict = None
            if verdict is not None:
                send_to_rejects(item, verdict.reason, verdict.detail)
                continue
            summary.kept += 1
            count_input(item).kept += 1
            output.write(item.record)
        if progress is not None:
            progress.advance(len(batch))
    summary.extra = stage.summary()
    if summary.read != summary.kept + summary.rejected:  # the invariant every stage promises
        raise RuntimeError(f"record accounting broke: {summary.read} read != "
                           f"{summary.kept} kept + {summary.rejected} rejected")
    return summary


__all__ = ["Item", "Reject", "RecordError", "RunConfig", "RunSummary", "Shard", "Stage", "run_stage"]
