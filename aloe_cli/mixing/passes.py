"""The two streaming passes of `aloe mix`, run one after the other: count, plan, write.

Pass 1 (count, `mixing.counting`) reads every input once on the stage runner
and keeps 8 bytes a record: its group (source x cell) and its loss-token
count. The plan (`mixing.plan`) turns those arrays into copies per record.
Pass 2 (write, `mixing.spool`) reads the inputs again in the same order and
writes the selected copies in a seeded random order through a spool of bucket
files.

Standard input, FIFOs and process substitutions cannot be read twice, so
each is copied to a temporary file during pass 1 (`io.StreamCopies`). The
copies and the buckets live in hidden temporary folders (beside the output,
or in $TMPDIR when the output is stdout) that are removed however the run
ends: success, an error, a full disk, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from aloe_cli.console import null_progress
from aloe_cli.data.io import STDIO, StreamCopies, output_folder, record_writers
from aloe_cli.data.stage import InputCounts, ProgressFactory, RunConfig, run_stage
from aloe_cli.data.streams import device_path, is_stream
from aloe_cli.errors import AloeError
from aloe_cli.mixing.counting import CountingStage, items_with_spec, iter_items
from aloe_cli.mixing.plan import Plan, make_plan
from aloe_cli.mixing.recipe import MAX_SAMPLES, Recipe
from aloe_cli.mixing.spool import ShuffleSpool, write_pass
from aloe_cli.modeling.loss_tokens import LossTokenCounter
from aloe_cli.modeling.token_cache import TokenCache, default_cache_path

STAGE = "mix"


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
    # Image paths in the mixture: relative to the output's folder, or absolute (always, for stdout).
    absolute_paths: bool = False


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
    image_folder = None if options.absolute_paths else output_folder(options.output)
    counter = counter or load_counter(recipe.tokenizer, recipe.chat_template)
    seconds: dict[str, float] = {}
    with ExitStack() as stack:
        streams = StreamCopies(spool_dir, prefix=".aloe-mix-stdin-")
        stack.callback(streams.close)
        output, rejects = (None, None) if options.dry_run else stack.enter_context(
            record_writers(options.output, options.rejects))  # both appear, or neither
        cache = stack.enter_context(_open_cache(recipe, options))
        counting = CountingStage(recipe, counter, cache, options.batch_size)
        with _timed(seconds, "count"):
            reading = run_stage(counting, items_with_spec(recipe, streams, options.keep_dicom_bytes), None, rejects,
                                RunConfig(on_error=options.on_error, relocate_images=True,
                                          rejects_image_folder=output_folder(options.rejects)
                                          if options.rejects else None), progress=progress)
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
                    write_pass(iter_items(recipe, streams, options.keep_dicom_bytes), plan, group_of, tokens,
                                counting.groups, recipe, spool, bar, image_folder)
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
