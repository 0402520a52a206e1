"""Glue shared by the data commands: read the shard, run the stage, print and save the summary."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from aloe_cli import console
from aloe_cli.data.counting import expected_records
from aloe_cli.data.io import STDIO, expand_inputs, output_folder, print_stdout, read_paths, record_writers
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
    if report is None or str(report) == STDIO:
        raise typer.BadParameter("needs --report FILE: the completion marker is FILE.done", param_hint="--resume")
    if not finished(report, stage_name, shard):
        return False
    console.log(f"aloe {stage_name}: shard {shard} already done ({marker_path(report)} exists); skipped")
    return True


PathLike = str | os.PathLike | None


def check_io(inputs: Iterable[str] | None, *, output: PathLike = STDIO, rejects: PathLike = None,
             report: PathLike = None, read: Iterable[tuple[str, PathLike]] = (),
             written: Iterable[tuple[str, PathLike]] = (), records: bool = True) -> list[str]:
    """Expand the inputs and check every destination before any work (see data.destinations): a path
    named twice, or an output that is an input, is a usage error (exit 2); a folder, a missing or
    read-only folder, a missing input is a one-line error (exit 1). `read`/`written`: other (option, path)
    pairs the command reads or writes (--against, --cache, --save-index); `records=False` when no records
    are read or written (building an index only). Returns the expanded input paths."""
    from aloe_cli.data.destinations import Named, PathConflict, check_destinations

    paths = expand_inputs(inputs) if records else []
    sources = [Named("-i", path) for path in paths]
    for option, path in read:
        if path is not None and str(path) != STDIO and not os.path.exists(path):
            raise AloeError(f"{option} {path}: no such file or folder")
        if path is not None:
            sources.append(Named(option, str(path)))
    pairs = [("-o", output), ("--rejects", rejects)] if records else []
    targets = [Named(option, str(path)) for option, path in [*pairs, ("--report", report), *written]
               if path is not None]
    try:
        check_destinations(sources, targets)
    except PathConflict as conflict:
        raise typer.BadParameter(str(conflict), param_hint=conflict.option) from None
    return paths


def write_summary_report(report: Path | str, result: dict[str, Any], *, mark_done: bool = False) -> None:
    """`--report FILE` (atomically, with its completion marker), or `--report -`: the JSON on stdout
    (allowed only when records do not go there, see check_io)."""
    from aloe_cli.data.reports import write_report

    if str(report) == STDIO:
        print_stdout(json.dumps(result, indent=2))
    else:
        write_report(report, result, mark_done=mark_done)


def run_data_command(stage: Stage, inputs: Iterable[str] | None, *, image_root: Path | None, output: str,
                     rejects: Path | None, report: Path | None, config: RunConfig,
                     defaults: RecordDefaults | None = None, images_first: bool = False,
                     absolute_image_paths: bool = False) -> RunSummary:
    """Run `stage` over this shard of `inputs`, writing kept records to `output` and the rest to `rejects`.

    The command should have called `check_io` before any expensive set-up; it is checked here again,
    before anything is read. With `images_first` (a stage that loads a model), every image path is checked
    to resolve before the first record is processed (`check_image_paths`). Image paths are written to resolve
    from the output's folder (absolute on stdout, or everywhere with `absolute_image_paths`)."""
    try:
        paths = check_io(inputs, output=output, rejects=rejects, report=report)
        if images_first:
            check_image_paths(stage.name, paths, image_root, config.on_error, config.shard)
        if stage.measure_first:
            console.log(f"aloe {stage.name}: percentile thresholds: measuring the whole shard before deciding")
        # Records from inputs in several folders (or read with --image-root) keep images the next command finds.
        config = replace(config, relocate_images=True,
                         image_folder=None if absolute_image_paths else output_folder(output),
                         rejects_image_folder=output_folder(str(rejects)) if rejects is not None else None,
                         expected=expected_records(paths, config.shard))
        with record_writers(output, rejects) as (writer, rejects_writer):  # both appear, or neither
            items = read_paths(paths, image_root, config.shard, defaults)
            summary = run_stage(stage, items, writer, rejects_writer, config, progress=console.progress)
    finally:
        stage.close()
    result = {**summary.to_dict(), "input_files": ["<stdin>" if path == STDIO else path for path in paths]}
    print_summary(result)
    if report is not None:
        write_summary_report(report, result, mark_done=True)
    return summary


def check_image_paths(command: str, paths: list[str], image_root: str | os.PathLike | None, on_error: str,
                      shard: Shard | None = None) -> None:
    """Before work: records whose image paths do not resolve are one error under --on-error fail, else a
    warning with their count (the run then skips and counts each as image_missing)."""
    from aloe_cli.data.preflight import unresolved_images
    from aloe_cli.data.shard import ALL

    check = unresolved_images(paths, image_root, shard or ALL)
    if check.ok:
        return
    if on_error == "fail":
        raise AloeError(check.message())
    console.warn(f"{command}: {check.message()}; --on-error skip: each is skipped as image_missing")


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
