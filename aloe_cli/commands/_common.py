"""Glue shared by the data commands: read the shard, run the stage, print and save the summary."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import typer

from aloe_cli import console
from aloe_cli.data.io import STDIO, RecordWriter, expand_inputs, read_paths
from aloe_cli.data.records import RecordDefaults
from aloe_cli.data.shard import Shard
from aloe_cli.data.stage import RunConfig, RunSummary, Stage, run_stage
from aloe_cli.errors import AloeError


def resolve_shard(text: str | None) -> Shard:
    return Shard.parse(text) if text else Shard.from_env()


def shard_done(stage_name: str, shard: Shard, report: Path | None, resume: bool) -> bool:
    """--resume: True (and a log line) when this shard already finished; call before any real work."""
    from aloe_cli.data.reports import finished, marker_path

    if not resume:
        return False
    if report is None:
        raise typer.BadParameter("needs --report FILE: the completion marker is FILE.done", param_hint="--resume")
    if not finished(report, stage_name, shard):
        return False
    console.log(f"aloe {stage_name}: shard {shard} already done ({marker_path(report)} exists); skipped")
    return True


def run_data_command(stage: Stage, inputs: Iterable[str] | None, *, image_root: Path | None, output: str,
                     rejects: Path | None, report: Path | None, config: RunConfig,
                     defaults: RecordDefaults | None = None) -> RunSummary:
    """Run `stage` over this shard of `inputs`, writing kept records to `output` and the rest to `rejects`."""
    from aloe_cli.data.reports import write_report

    try:
        if rejects is not None and str(rejects) == output and output != STDIO:
            raise AloeError("--rejects and --output must be different files")
        paths = expand_inputs(inputs)
        if stage.measure_first:
            console.log(f"aloe {stage.name}: percentile thresholds: measuring the whole shard before deciding")
        rejects_target = RecordWriter(rejects) if rejects is not None else nullcontext()
        with RecordWriter(output) as writer, rejects_target as rejects_writer:
            items = read_paths(paths, image_root, config.shard, defaults)
            summary = run_stage(stage, items, writer, rejects_writer, config, progress=console.progress)
    finally:
        stage.close()
    result = {**summary.to_dict(), "input_files": ["<stdin>" if path == STDIO else path for path in paths]}
    print_summary(result)
    if report is not None:
        write_report(report, result, mark_done=True)
    return summary


def print_summary(report: dict[str, Any], title: str | None = None) -> None:
    """The closing summary of a run (or of merged shard reports): per input, per reason, the invariant."""
    kept, rejected = report["kept"], report["rejected"]
    rows = [[name, c["read"], c["kept"], c["rejected"]] for name, c in report["inputs"].items()]
    if len(rows) != 1:
        rows.append(["total", report["read"], kept, rejected])
    title = title or f"aloe {report['stage']} (shard {report['shard']})"
    console.print_table(title, ["input", "read", "kept", "rejected"], rows)
    reasons, flagged = report.get("reasons") or {}, report.get("flagged", 0)
    if reasons:
        verb = "flagged" if flagged and not rejected else "rejected"
        console.log("  " + verb + " by reason: " + ", ".join(f"{r}={n}" for r, n in sorted(reasons.items())))
    if flagged:
        console.log(f"  {flagged} record(s) flagged but kept (--keep-all)")
    if rejected and not report.get("rejects_written"):
        console.log(f"  {rejected} rejected record(s) were not saved; pass --rejects FILE to keep them")
    emitted = report.get("emitted", kept)
    if emitted != kept:
        console.log(f"  {emitted} record(s) written for the {kept} kept")
    console.log(f"  {report['read']} read = {kept} kept + {rejected} rejected")
