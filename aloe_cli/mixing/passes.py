"""The two streaming passes of `aloe mix`.

Pass 1 (count) runs on the stage runner (`CountingStage`): it reads every
input once (the reader normalises the records, grounding text included),
checks each image entry from its header (`images.check_images`: type, data
URI, that a path is a non-empty file, a known format within the
decompression-bomb limit, DICOM with pixel data and a decoder; no pixel is
decoded), counts each record's loss tokens (cache first, then the tokenizer in batches)
and keeps only two numbers per record: its group (source x cell, or
NOT_AVAILABLE when rejected) and its loss-token count. That is 8 bytes a
record, ~30 MB for 3.5 M records. The runner counts read/kept/rejected per
input and per reason and sends rejected records to the rejects file.

The plan (plan.py) turns those arrays into copies per record.

Pass 2 (write) reads the inputs again in the same order and sends each copy
of a selected record to a spool bucket chosen by its position in the shuffled
output; the buckets are then written out one by one in position order. Memory
stays bounded by one bucket's index, whatever the size of the records.

Standard input, FIFOs and process substitutions cannot be read twice, so
each is copied to a temporary file during pass 1. The copies and the buckets
live in hidden temporary folders (beside the output, or in $TMPDIR when the
output is stdout) that are removed however the run ends: success, an error,
a full disk, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from aloe_cli.console import null_progress
from aloe_cli.data.images import check_images
from aloe_cli.data.io import (
    STDIO,
    Item,
    RecordWriter,
    dumps,
    read_file,
    record_writers,
    source_name,
    write_error,
)
from aloe_cli.data.records import DOMAINS, RecordDefaults, modality
from aloe_cli.data.stage import InputCounts, ProgressFactory, Reject, RunConfig, Stage, run_stage
from aloe_cli.data.streams import device_path, display_name, is_stream, loads, open_raw
from aloe_cli.errors import AloeError, RecordError
from aloe_cli.mixing.plan import NOT_AVAILABLE, Group, Plan, make_plan, output_rng
from aloe_cli.mixing.recipe import MAX_SAMPLES, Recipe, SourceSpec
from aloe_cli.modeling.loss_tokens import LossTokenCounter
from aloe_cli.modeling.token_cache import TokenCache, conversation_key, default_cache_path

STAGE = "mix"
_STDIN_DISPLAY = "<stdin>"
_RECORDS_PER_BUCKET = 4096
_MAX_BUCKETS = 256
_PROGRESS_STEP = 1024


@dataclass
class MixOptions:
    """How to run a recipe (everything that does not change which records are chosen)."""

    output: str = STDIO
    rejects: str | None = None
    dry_run: bool = False
    on_error: str = "fail"  # or "skip": bad records go to the rejects
    batch_size: int = 1024
    cache: bool = True
    cache_path: str | None = None  # default: the recipe's `cache`, else token_cache.default_cache_path()
    keep_dicom_bytes: bool = False  # pass embedded DICOM through with its header (default: re-encoded on read)
    spool_dir: str | None = None  # default: the output's folder (the system temp folder for stdout)


@dataclass
class MixResult:
    recipe: Recipe
    plan: Plan
    read: int
    rejected: int
    reasons: Counter
    inputs: dict[str, InputCounts]
    written: int
    dry_run: bool
    rejects_written: bool
    cache: dict | None
    counting: dict
    seconds: dict

    @property
    def available(self) -> int:
        return self.read - self.rejected


class TargetsMissed(AloeError):
    """A strict recipe's plan misses targets: nothing was written; `result` holds the plan for the report."""

    def __init__(self, result: MixResult):
        self.result = result
        plan = result.plan
        cells = ", ".join(f"{m.cell} {m.achieved:.1%} for a {m.target:.1%} target" for m in plan.misses)
        super().__init__(f"{len(plan.misses)} cell(s) miss their target by more than the tolerance of "
                         f"{plan.tolerance * 100:g} percentage point(s) ({cells}); strict mixture: nothing written")


# ----------------------------------------------------------------------------- reading

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


class StreamCopies:
    """Inputs that can be read once only (stdin, FIFOs, `<(...)`), each copied to a temporary file on
    first use so that both passes read the same records."""

    def __init__(self, folder: str | None):
        self._folder = folder
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._copies: dict[str, str] = {}

    def get(self, path: str) -> str:
        copy = self._copies.get(path)
        if copy is None:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix=".aloe-mix-stdin-", dir=self._folder)
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
                raise AloeError(f"cannot copy {display_name(path)} (read once, needed twice) to "
                                f"{self._tmp.name}: {exc.strerror or exc}") from None
            self._copies[path] = copy
        return copy

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _as_original(item: Item, copy_path: str, display: str) -> Item:
    item.where = item.where.replace(copy_path, display, 1)
    item.input = display
    if item.error is not None:
        error = item.error
        item.error = RecordError(error.reason, error.message, where=item.where, field=error.field)
    return item


def iter_items(recipe: Recipe, streams: StreamCopies, keep_dicom_bytes: bool = False
               ) -> Iterator[tuple[SourceSpec, Item]]:
    """Every item of every source, always in the same order."""
    for spec in recipe.sources:
        defaults = read_defaults(spec, recipe.default_domain, keep_dicom_bytes)
        for path in spec.paths:
            if is_stream(path):
                copy = streams.get(path)
                display = _STDIN_DISPLAY if path == STDIO else path
                root = spec.image_root or (os.getcwd() if path == STDIO or device_path(path)
                                           else os.path.dirname(os.path.abspath(path)))
                copy_defaults = defaults if defaults.source else replace(defaults, source=source_name(path))
                for item in read_file(copy, root, defaults=copy_defaults):
                    yield spec, _as_original(item, copy, display)
            else:
                for item in read_file(path, spec.image_root, defaults=defaults):
                    yield spec, item


def _items_with_spec(recipe: Recipe, streams: StreamCopies, keep_dicom_bytes: bool) -> Iterator[Item]:
    """`iter_items` for the stage runner: each item carries its source spec."""
    for spec, item in iter_items(recipe, streams, keep_dicom_bytes):
        item.annotations["spec"] = spec
        yield item


# ----------------------------------------------------------------------------- per-record state

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


# ----------------------------------------------------------------------------- pass 1

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


# ----------------------------------------------------------------------------- pass 2

class ShuffleSpool:
    """Writes records in a given random order without holding them in memory.

    Each copy goes to the bucket file of its output position; a bucket is
    then read back in position order (only positions and file offsets are
    held in memory) and written out.
    """

    def __init__(self, total: int, folder: str):
        self.total = total
        buckets = min(_MAX_BUCKETS, max(1, math.ceil(total / _RECORDS_PER_BUCKET)))
        self.per_bucket = max(1, math.ceil(total / buckets))
        self.folder = folder
        self._files = [open(os.path.join(folder, f"bucket-{b:04d}"), "wb") for b in range(buckets)]

    def add(self, position: int, line: bytes) -> None:
        """`line` is one JSONL line (with its newline), as io.dumps writes it."""
        try:
            self._files[position // self.per_bucket].write(b"%d\t%s" % (position, line))
        except OSError as exc:
            raise write_error(self.folder, exc) from None

    def close(self) -> None:
        for handle in self._files:
            handle.close()

    def drain(self, writer: RecordWriter) -> int:
        """Write every bucket, in position order, to `writer`; return the number of records."""
        self.close()
        written = 0
        for handle in self._files:
            written += self._drain_bucket(handle.name, writer)
            os.unlink(handle.name)
        return written

    @staticmethod
    def _drain_bucket(path: str, writer: RecordWriter) -> int:
        positions, offsets = array("q"), array("q")
        with open(path, "rb") as bucket:
            offset = 0
            for line in bucket:
                tab = line.index(b"\t")
                positions.append(int(line[:tab]))
                offsets.append(offset + tab + 1)
                offset += len(line)
            for index in np.argsort(np.frombuffer(positions, dtype=np.int64), kind="stable"):
                bucket.seek(offsets[index])
                writer.write(loads(bucket.readline()))
        return len(positions)


def _changed(where: str) -> AloeError:
    return AloeError(f"{where}: the input changed between the counting and the writing pass; run again")


def _write_pass(items: Iterator[tuple[SourceSpec, Item]], plan: Plan, group_of: np.ndarray, tokens: np.ndarray,
                groups: GroupIndex, recipe: Recipe, spool: ShuffleSpool, progress: Any) -> None:
    copies = plan.copies
    positions = output_positions(plan.samples, recipe.seed)
    next_copy = 0  # copies are numbered in reading order; copy k of the mixture goes to positions[k]
    seen = 0
    for seq, (spec, item) in enumerate(items):
        seen = seq + 1
        if seq >= len(copies):
            raise _changed(item.where)
        if seen % _PROGRESS_STEP == 0:
            progress.advance(_PROGRESS_STEP)
        count = int(copies[seq])
        if count == 0:
            continue
        if item.error is not None:
            raise _changed(item.where)
        try:
            ready = prepare(item, spec)
        except RecordError:
            raise _changed(item.where) from None
        if groups.find(ready) != group_of[seq]:
            raise _changed(item.where)
        _annotate(ready, int(tokens[seq]))
        for copy in range(count):
            ready.record["aloe"]["mix"]["copy"] = copy
            spool.add(int(positions[next_copy]), dumps(ready.record))
            next_copy += 1
    if seen != len(copies):
        raise AloeError("the input changed between the counting and the writing pass "
                        f"({len(copies)} records, then {seen}); run again")


def output_positions(total: int, seed: int) -> np.ndarray:
    """A seeded random permutation of 0..total-1 (4 bytes a sample below 2**32 samples)."""
    positions = np.arange(total, dtype=np.uint32 if total < 2 ** 32 else np.uint64)
    output_rng(seed).shuffle(positions)
    return positions


def _annotate(ready: Prepared, tokens: int) -> None:
    record = ready.record
    record["domain"] = ready.domain
    if not record.get("source"):
        record["source"] = ready.source
    aloe = record.get("aloe") if isinstance(record.get("aloe"), dict) else {}
    aloe["mix"] = {"loss_tokens": tokens, "source": ready.source, "cell": ready.cell, "copy": 0}
    record["aloe"] = aloe


# ----------------------------------------------------------------------------- the run

@contextmanager
def _open_cache(recipe: Recipe, options: MixOptions) -> Iterator[TokenCache | None]:
    if not options.cache:
        yield None
        return
    cache = TokenCache(options.cache_path or recipe.cache or default_cache_path())
    try:
        yield cache
    finally:
        cache.close()


def run_mix(recipe: Recipe, options: MixOptions, counter: LossTokenCounter | None = None,
            progress: ProgressFactory | None = None) -> MixResult:
    """Count, plan and (unless dry_run) write a mixture. Raises AloeError for unusable input."""
    from aloe_cli.modeling.loss_tokens import load_counter

    if options.rejects is not None and options.rejects == options.output and options.output != STDIO:
        raise AloeError("--rejects and --output must be different files")
    # Spools beside a file output (same disk as the result); for stdout, a pipe or a device, in $TMPDIR.
    to_file = options.output != STDIO and not is_stream(options.output) and not device_path(options.output)
    spool_dir = options.spool_dir or (str(Path(options.output).resolve().parent) if to_file else None)
    counter = counter or load_counter(recipe.tokenizer, recipe.chat_template)
    seconds: dict[str, float] = {}
    with ExitStack() as stack:
        streams = StreamCopies(spool_dir)
        stack.callback(streams.close)
        output, rejects = (None, None) if options.dry_run else stack.enter_context(
            record_writers(options.output, options.rejects))  # both appear, or neither
        cache = stack.enter_context(_open_cache(recipe, options))
        counting = CountingStage(recipe, counter, cache, options.batch_size)
        with _timed(seconds, "count"):
            reading = run_stage(counting, _items_with_spec(recipe, streams, options.keep_dicom_bytes), None, rejects,
                                RunConfig(on_error=options.on_error), progress=progress)
        if not counting.groups.groups:
            raise AloeError(f"nothing to mix: none of the {reading.read} record(s) read is usable"
                            + (f" ({_reason_list(reading.reasons)})" if reading.reasons else ""))
        group_of, tokens = counting.state.arrays()
        with _timed(seconds, "plan"):
            plan = make_plan(group_of, tokens, counting.groups.groups, recipe.targets, seed=recipe.seed,
                             balance=recipe.balance, total_samples=recipe.total_samples,
                             total_tokens=recipe.total_tokens, tolerance=recipe.tolerance)
        if plan.samples > MAX_SAMPLES:
            raise AloeError(f"the plan holds {plan.samples:,} samples, more than aloe mix writes ({MAX_SAMPLES:,}); "
                            "lower max_repeats or ask for a smaller total_samples/total_tokens")

        def result(written: int) -> MixResult:
            return MixResult(
                recipe=recipe, plan=plan, read=reading.read, rejected=reading.rejected, reasons=reading.reasons,
                inputs=reading.inputs, written=written, dry_run=options.dry_run,
                rejects_written=rejects is not None,
                cache=None if cache is None else {"path": str(cache.path), "hits": cache.hits, "misses": cache.misses},
                counting={"records_counted": counter.stats.records, "texts_tokenized": counter.stats.tokenized_texts,
                          "repeats_reused": counter.stats.memo_hits},
                seconds={k: round(v, 3) for k, v in seconds.items()},
            )

        if recipe.strict and plan.misses:
            raise TargetsMissed(result(0))  # leaving the with-block discards the unwritten output
        written = 0
        if output is not None:
            with _timed(seconds, "write"):
                spool = ShuffleSpool(plan.samples, stack.enter_context(
                    tempfile.TemporaryDirectory(prefix=".aloe-mix-", dir=spool_dir)))
                stack.callback(spool.close)
                with (progress or null_progress)("mix: writing", len(group_of)) as bar:
                    _write_pass(iter_items(recipe, streams, options.keep_dicom_bytes), plan, group_of, tokens,
                                counting.groups, recipe, spool, bar)
                written = spool.drain(output)
        return result(written)


@contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = time.perf_counter() - started


def _reason_list(reasons: Counter) -> str:
    return ", ".join(f"{reason}={count}" for reason, count in sorted(reasons.items()))
