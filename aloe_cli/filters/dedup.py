"""Evaluation-leak control: drop training records whose images appear in an evaluation set.

Every image of every evaluation set is hashed into a `HashIndex` (or loaded
from a saved one); every image of every training record is hashed the same
way, and a record with any image within `max_distance` bits of an evaluation
image is rejected as `eval_leak`. With `within`, a record whose image repeats
an image of an earlier kept training record is rejected as `duplicate_within`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aloe_cli.data.io import Item, read_file
from aloe_cli.data.records import annotate
from aloe_cli.data.stage import Reject, RunConfig, Stage, run_stage
from aloe_cli.errors import AloeError, RecordError
from aloe_cli.filters.hash_index import HashIndex
from aloe_cli.filters.hashing import Hasher, HashResult, to_hex

INDEX_SUFFIX = ".idx"


@dataclass
class EvalSetStats:
    records: int = 0
    images: int = 0
    unreadable: int = 0  # images (or rows) that could not be hashed; they cannot be checked for leaks
    leaked_records: int = 0
    index_file: str | None = None  # set when the set's hashes came from a saved index


@dataclass
class EvalIndex:
    """The hashes of all evaluation images, with (eval set, row id) for each."""

    index: HashIndex
    kind: str
    fast: bool
    sets: dict[str, EvalSetStats] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        self.index.save(path, {"kind": self.kind, "fast": self.fast,
                               "sets": {name: vars(stats) for name, stats in self.sets.items()}})


def _row_id(item: Item) -> str:
    record_id = item.record.get("id") if item.record else None
    return str(record_id) if record_id not in (None, "") else item.where


def build_eval_index(against: Iterable[str], hasher: Hasher, *, max_distance: int, on_error: str = "fail",
                     batch_size: int = 256) -> EvalIndex:
    """Hash every image of every evaluation input; saved indexes (`.idx`) are merged in as they are.

    Each evaluation file runs through the stage runner (never sharded: every
    task needs the whole index). With on_error "skip", unreadable rows and
    images are counted as unreadable (they cannot be checked for leaks).
    """
    result = EvalIndex(HashIndex(max_distance), hasher.kind, hasher.fast)
    config = RunConfig(batch_size=batch_size, on_error=on_error)
    for path in against:
        if str(path).endswith(INDEX_SUFFIX):
            _merge_saved(result, path, max_distance)
            continue
        stats = result.sets.setdefault(str(path), EvalSetStats())
        stage = _EvalIndexStage(hasher, result.index, str(path), stats, fail_fast=on_error != "skip")
        run_stage(stage, read_file(str(path), require_images=True), None, None, config)
    return result


class _EvalIndexStage(Stage):
    """Hashes one evaluation file's images into the index; keeps (indexes) every readable image."""

    name = "dedup"

    def __init__(self, hasher: Hasher, index: HashIndex, set_name: str, stats: EvalSetStats, fail_fast: bool):
        self.hasher = hasher
        self.index = index
        self.set_name = set_name
        self.stats = stats
        self.fail_fast = fail_fast

    def annotate(self, batch: list[Item]) -> None:
        for item, results in hash_batch(self.hasher, batch):
            if self.fail_fast:
                item.error = _first_failure(item, results)
            item.annotations["hashes"] = results

    def decide(self, item: Item) -> Reject | None:
        # An image that cannot be hashed does not drop the row's other images from the index.
        for value, _, _ in item.annotations["hashes"]:
            if value is None:
                self.stats.unreadable += 1
                continue
            self.stats.images += 1
            self.index.add(value, (self.set_name, _row_id(item)))
        return None

    def settled(self, item: Item, kept: bool) -> None:
        self.stats.records += 1
        if not kept:  # a row that could not be read at all
            self.stats.unreadable += 1


def hash_batch(hasher: Hasher, batch: list[Item]) -> Iterator[tuple[Item, list[HashResult]]]:
    """Hash every image of a batch in one pool call; yield each item with its images' results, in order."""
    tasks = [(entry, item.image_root) for item in batch for entry in item.record.get("images") or []]
    results = iter(hasher.hash_many(tasks) if tasks else ())
    for item in batch:
        yield item, [next(results) for _ in item.record.get("images") or []]


def _first_failure(item: Item, results: list[HashResult]) -> RecordError | None:
    for position, (value, reason, message) in enumerate(results):
        if value is None:
            return RecordError(reason, message, where=item.where, field=f"images[{position}]")
    return None


def _merge_saved(result: EvalIndex, path: str, max_distance: int) -> None:
    saved, meta = HashIndex.load(path, max_distance=max_distance)
    if meta.get("kind") != result.kind or bool(meta.get("fast")) != result.fast:
        raise AloeError(f"{path}: index was built with --hash {meta.get('kind')}"
                        f"{' --fast' if meta.get('fast') else ''}, but this run uses --hash {result.kind}"
                        f"{' --fast' if result.fast else ''}; rebuild it or match the options")
    for name, stats in (meta.get("sets") or {}).items():
        known = {k: v for k, v in stats.items() if k in ("records", "images", "unreadable")}
        result.sets[name] = EvalSetStats(**known, index_file=str(path))
    if len(result.index) == 0:
        result.index = saved  # the common case (one saved index): no copy
        return
    for value, payload in saved:
        result.index.add(value, payload)


class DedupStage(Stage):
    name = "dedup"
    additive = ("images_hashed", "within_duplicates", "eval_sets.*.leaked_records")

    def __init__(self, hasher: Hasher, eval_index: EvalIndex | None, *, max_distance: int = 0,
                 within: bool = False):
        self.hasher = hasher
        self.eval_index = eval_index
        self.max_distance = max_distance
        self.within = HashIndex(max_distance) if within else None
        self.images_hashed = 0
        self.within_duplicates = 0

    def annotate(self, batch: list[Item]) -> None:
        for item, results in hash_batch(self.hasher, batch):
            item.error = _first_failure(item, results)
            if item.error is None:
                hashes = [result.hash for result in results]
                self.images_hashed += len(hashes)
                item.annotations["hashes"] = hashes
                annotate(item.record, self.name, {self.hasher.kind: [to_hex(h) for h in hashes]})

    def _matches(self, index: HashIndex, value: int) -> list[tuple[Any, int]]:
        if self.max_distance == 0:
            return [(payload, 0) for payload in index.exact(value)]
        return index.search(value, self.max_distance)

    def decide(self, item: Item) -> Reject | None:
        hashes: list[int] = item.annotations.get("hashes") or []
        if not hashes:
            return None
        if self.eval_index is not None:
            leaks = [{"image": position, "against": name, "id": row_id, "distance": distance}
                     for position, value in enumerate(hashes)
                     for (name, row_id), distance in self._matches(self.eval_index.index, value)]
            if leaks:
                item.record["aloe"][self.name]["leaks"] = leaks
                for name in {leak["against"] for leak in leaks}:
                    self.eval_index.sets.setdefault(name, EvalSetStats()).leaked_records += 1
                first = leaks[0]
                more = f" (+{len(leaks) - 1} more match(es))" if len(leaks) > 1 else ""
                return Reject("eval_leak", f"image {first['image']} matches {first['against']} row {first['id']} "
                                           f"(distance {first['distance']}){more}")
        if self.within is not None:
            for position, value in enumerate(hashes):
                matches = self._matches(self.within, value)
                if matches:
                    self.within_duplicates += 1
                    (first_id, first_position), distance = matches[0]
                    item.record["aloe"][self.name]["duplicate_of"] = {"id": first_id, "image": first_position,
                                                                      "distance": distance}
                    return Reject("duplicate_within", f"image {position} repeats image {first_position} of "
                                                      f"earlier record {first_id} (distance {distance})")
            for position, value in enumerate(hashes):
                self.within.add(value, (_row_id(item), position))
        return None

    def summary(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"hash": self.hasher.kind, "fast": self.hasher.fast,
                                 "max_distance": self.max_distance, "images_hashed": self.images_hashed}
        if self.eval_index is not None:
            extra["eval_index_size"] = len(self.eval_index.index)
            extra["eval_sets"] = {name: vars(stats) for name, stats in self.eval_index.sets.items()}
        if self.within is not None:
            extra["within_duplicates"] = self.within_duplicates
        return extra
