"""Glue shared by the data commands: open outputs, run the stage, print and save the summary."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

from aloe_cli import console
from aloe_cli.data.io import Item, RecordWriter
from aloe_cli.data.stage import RunConfig, RunSummary, Shard, Stage, run_stage
from aloe_cli.errors import AloeError


def resolve_shard(text: str | None) -> Shard:
    return Shard.parse(text) if text else Shard.from_env()


def write_report(path: Path | None, report: dict) -> None:
    if path is None:
        return
    tmp = Path(f"{path}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise AloeError(f"cannot write report {path}: {exc.strerror}") from None


def run_data_command(stage: Stage, items: Iterable[Item], *, output: str, rejects: Path | None,
                     report: Path | None, config: RunConfig) -> RunSummary:
    """Run `stage` over `items`, writing kept records to `output` and the rest to `rejects`."""
    if rejects is not None and str(rejects) == output and output != "-":
        raise AloeError("--rejects and --output must be different files")
    rejects_target = RecordWriter(rejects) if rejects is not None else nullcontext()
    with RecordWriter(output) as writer, rejects_target as rejects_writer, console.progress(stage.name) as bar:
        summary = run_stage(stage, items, writer, rejects_writer, config, progress=bar)
    print_summary(summary)
    write_report(report, summary.to_dict())
    return summary


def print_summary(summary: RunSummary) -> None:
    rows = [[name, c.read, c.kept, c.rejected] for name, c in summary.inputs.items()]
    if len(rows) != 1:
        rows.append(["total", summary.read, summary.kept, summary.rejected])
    console.print_table(f"aloe {summary.stage} (shard {summary.shard})", ["input", "read", "kept", "rejected"], rows)
    if summary.reasons:
        verb = "flagged" if summary.flagged and not summary.rejected else "rejected"
        console.log("  " + verb + " by reason: " + ", ".join(f"{r}={n}" for r, n in sorted(summary.reasons.items())))
    if summary.flagged:
        console.log(f"  {summary.flagged} record(s) flagged but kept (--keep-all)")
    if summary.rejected and not summary.rejects_written:
        console.log(f"  {summary.rejected} rejected record(s) were not saved; pass --rejects FILE to keep them")
    console.log(f"  {summary.read} read = {summary.kept} kept + {summary.rejected} rejected")


def run_thresholded_command(stage: Stage, items: Iterable[Item], bounds, *, output: str, rejects: Path | None,
                            report: Path | None, config: RunConfig) -> RunSummary:
    """`run_data_command` for a stage whose thresholds may be percentiles of its own values.

    Percentiles need every value before the first decision, so the stage
    annotates (and spools) the whole shard first, then the runner decides.
    """
    if bounds is not None and bounds.needs_distribution():
        from aloe_cli.filters.thresholds import annotate_ahead

        with console.progress(f"{stage.name} (measuring)") as bar:
            items = annotate_ahead(items, stage.annotate, config=config, distribution=stage.distribution,
                                   on_progress=bar.advance)
        console.log(f"aloe {stage.name}: distribution measured; applying percentile thresholds")
    return run_data_command(stage, items, output=output, rejects=rejects, report=report, config=config)
