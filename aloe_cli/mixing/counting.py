"""Pass 1 of `aloe mix` (count), on the stage runner.

`CountingStage` reads every input once (the reader normalises the records,
grounding text included), checks each image entry from its header
(`images.check_images`: type, data URI, that a path is a non-empty file, a
known format within the decompression-bomb limit, DICOM with pixel data and a
decoder; no pixel is decoded), counts each record's loss tokens (cache first,
then the tokenizer in batches) and keeps only two numbers per record: its
group (source x cell, or NOT_AVAILABLE when rejected) and its loss-token
count. That is 8 bytes a record, ~30 MB for 3.5 M records. The runner counts
read/kept/rejected per input and per reason and sends rejected records to the
rejects file. `iter_items` is the reading order both passes share.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from aloe_cli.data.images import check_images
from aloe_cli.data.io import Item, StreamCopies
from aloe_cli.data.records import DOMAINS, RecordDefaults, modality
from aloe_cli.data.stage import Reject, Stage
from aloe_cli.errors import RecordError
from aloe_cli.mixing.plan import NOT_AVAILABLE, Group
from aloe_cli.mixing.recipe import Recipe, SourceSpec
from aloe_cli.modeling.loss_tokens import LossTokenCounter
from aloe_cli.modeling.token_cache import TokenCache, conversation_key

STAGE = "mix"


@dataclass
class Prepared:
    """A record ready to be counted or written: source and cell known."""

    record: dict
    source: str
    domain: str
    cell: str


def prepare(item: Item, spec: SourceSpec) -> Prepared:
    """Decide a record's source and cell; a recipe source's name and domain win over the record's own."""
    record = item.record
    domain = spec.domain or record.get("domain")
    if domain is None:
        raise RecordError("missing_domain", f"has no domain; set 'domain' ({' or '.join(DOMAINS)}) on the record, "
                          "the source's domain in the recipe, or --domain", field="domain")
    source = spec.name or record["source"]  # the reader gave every record one
    return Prepared(record, str(source), domain, f"{domain}/{modality(record)}")


def read_defaults(spec: SourceSpec, default_domain: str | None, keep_dicom_bytes: bool = False) -> RecordDefaults:
    """What the reader fills in for a source's records (the grounding box format included)."""
    return RecordDefaults(source=spec.name, domain=spec.domain or default_domain, bbox_format=spec.bbox_format,
                          keep_dicom_bytes=keep_dicom_bytes)


def iter_items(recipe: Recipe, streams: StreamCopies, keep_dicom_bytes: bool = False
               ) -> Iterator[tuple[SourceSpec, Item]]:
    """Every item of every source, always in the same order (read-once inputs from their copies)."""
    for spec in recipe.sources:
        defaults = read_defaults(spec, recipe.default_domain, keep_dicom_bytes)
        for path in spec.paths:
            for item in streams.read(path, spec.image_root, defaults=defaults):
                yield spec, item


def items_with_spec(recipe: Recipe, streams: StreamCopies, keep_dicom_bytes: bool) -> Iterator[Item]:
    """`iter_items` for the stage runner: each item carries its source spec."""
    for spec, item in iter_items(recipe, streams, keep_dicom_bytes):
        item.annotations["spec"] = spec
        yield item


class GroupIndex:
    """(source, cell) -> group number, created as records arrive."""

    def __init__(self) -> None:
        self.groups: list[Group] = []
        self._numbers: dict[tuple[str, str], int] = {}

    def number(self, prepared: Prepared, spec: SourceSpec) -> int:
        key = (prepared.source, prepared.cell)
        number = self._numbers.get(key)
        if number is None:
            number = self._numbers[key] = len(self.groups)
            self.groups.append(Group(prepared.source, prepared.cell, spec.weight, spec.max_repeats))
        return number

    def find(self, prepared: Prepared) -> int | None:
        return self._numbers.get((prepared.source, prepared.cell))


class RecordState:
    """Group number and loss tokens of every record read, 8 bytes a record."""

    def __init__(self) -> None:
        self.group = array("i")
        self.tokens = array("I")

    def add(self, group: int, tokens: int) -> None:
        self.group.append(group)
        self.tokens.append(tokens)

    def __len__(self) -> int:
        return len(self.group)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """numpy views (no copy) of the group numbers and the loss-token counts."""
        return (np.frombuffer(self.group, dtype=np.dtype(f"i{self.group.itemsize}")),
                np.frombuffer(self.tokens, dtype=np.dtype(f"u{self.tokens.itemsize}")))


@dataclass
class _Batch:
    """One batch of pass 1 between preparing and counting."""

    items: list[Item]
    prepared: list[Prepared | None]
    counts: list[int]  # -1 = still to be counted
    keys: dict[int, bytes]  # batch index -> cache key (when there is a cache)
    todo: list[int]  # batch indices sent to the tokenizer


class CountingStage(Stage):
    """Pass 1 on the stage runner: prepare, count loss tokens (cache first), keep 8 bytes a record.

    The runner owns the counting of read/kept/rejected, --on-error and the
    rejects; this stage rejects records without loss tokens and remembers each
    record's group and count, in reading order, for the plan and pass 2.
    """

    name = STAGE

    def __init__(self, recipe: Recipe, counter: LossTokenCounter, cache: TokenCache | None, batch_size: int):
        self.recipe = recipe
        self.counter = counter
        self.cache = cache
        self.batch_size = batch_size
        self.groups = GroupIndex()
        self.state = RecordState()

    def runner_batch_size(self) -> int:
        return self.batch_size

    def annotate_stream(self, batches: Iterator[list[Item]]) -> Iterator[list[Item]]:
        # Tokenizing batch k overlaps reading and rendering batch k + 1 (see LossTokenCounter.count_pipelined).
        for batch, results in self.counter.count_pipelined(self._start(items) for items in batches):
            self._finish(batch, results)
            yield batch.items

    def _start(self, items: list[Item]) -> tuple[_Batch, list[list[dict]]]:
        """Prepare a batch and look its records up in the cache; return what is left to count."""
        prepared = [self._prepare(item) for item in items]
        batch = _Batch(items, prepared, [0] * len(items), {}, [])
        todo = [i for i, ready in enumerate(prepared) if ready is not None]
        if self.cache is not None and todo:
            namespace = self.counter.fingerprint
            batch.keys = {i: conversation_key(namespace, prepared[i].record["messages"]) for i in todo}
            known = self.cache.get_many(list(batch.keys.values()))
            for i in todo:
                batch.counts[i] = known.get(batch.keys[i], -1)
            todo = [i for i in todo if batch.counts[i] < 0]
        batch.todo = todo
        return batch, [prepared[i].record["messages"] for i in todo]

    def _prepare(self, item: Item) -> Prepared | None:
        if item.error is not None:
            return None
        try:
            # Mix decodes no image: a header check keeps unusable entries out of the mixture.
            check_images(item.record.get("images") or [], item.image_root)
            return prepare(item, item.annotations["spec"])
        except RecordError as error:
            item.error = error.located(item.where)
            return None

    def _finish(self, batch: _Batch, results: list[int | RecordError]) -> None:
        fresh = []
        for i, result in zip(batch.todo, results):
            item = batch.items[i]
            if isinstance(result, RecordError):
                item.error = result.located(item.where)
                batch.counts[i] = 0
            else:
                batch.counts[i] = result
                if i in batch.keys:
                    fresh.append((batch.keys[i], result))
        if fresh:
            self.cache.put_many(fresh)
        for item, ready, count in zip(batch.items, batch.prepared, batch.counts):
            item.annotations["prepared"] = ready
            item.annotations["tokens"] = count

    def decide(self, item: Item) -> Reject | None:
        if item.annotations["tokens"] == 0:
            return Reject("no_loss_tokens", "no assistant token contributes to the loss (no answer to train on)")
        return None

    def settled(self, item: Item, kept: bool) -> None:
        if kept:
            self.state.add(self.groups.number(item.annotations["prepared"], item.annotations["spec"]),
                           item.annotations["tokens"])
        else:
            self.state.add(NOT_AVAILABLE, 0)
