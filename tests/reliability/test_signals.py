"""Signals, through the real CLI: SIGTERM (SLURM preemption, `timeout`, `docker stop`) mid-run ends every data
command like Ctrl-C does: exit 143, no output file, no hidden temporary file, no spool or bucket folder in
$TMPDIR or beside the output, and no traceback from the worker processes."""

from __future__ import annotations

import signal
import subprocess

import pytest

from reliability.hostile import (
    STAGES,
    children,
    environment,
    leftovers,
    stage_args,
    start,
    terminate_when,
    wait_for,
)
from support import chat, write_jsonl


def _hidden(folder, prefix: str) -> bool:
    return any(name.startswith(prefix) for name in leftovers(folder))


def _signal_while_reading(proc: subprocess.Popen, data: bytes, signum: int, to_group: bool, working) -> str:
    """Feed `data` on stdin and keep it open; once `working()` holds, send the signal; return stderr."""
    return terminate_when(working, proc, signum=signum, to_group=to_group, feed=data)


def _working(stage: str, proc: subprocess.Popen, out_dir, scratch, judge, asked_before: int):
    """When the command is under way: its temporary output exists, and what the stage does first has begun
    (dedup: workers started; score: the judge was asked; perplexity: the measuring spool exists in
    $TMPDIR; mix: the copy of its read-once input is being made)."""
    def check() -> bool:
        if stage == "mix":
            return _hidden(out_dir, ".aloe-mix-stdin-")
        if not _hidden(out_dir, ".out.jsonl."):
            return False
        if stage == "dedup":
            return bool(children(proc.pid))
        if stage == "score":
            return len(judge.requests) > asked_before
        return _hidden(scratch, "aloe-spool-")
    return check


# The whole process group matters where there are worker processes (dedup --workers 2): SLURM signals them all.
@pytest.mark.parametrize(("stage", "to_group"), [*((stage, False) for stage in STAGES), ("dedup", True)],
                         ids=[*STAGES, "dedup-to-the-process-group"])
def test_sigterm_mid_run_leaves_nothing_behind(stage, to_group, ctx, train_lines, tmp_path):
    out_dir, scratch = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    scratch.mkdir()
    args = stage_args(stage, ctx)
    if stage == "dedup":
        args += ["--workers", "2", "--batch-size", "4"]
    if stage == "score":
        args += ["--batch-size", "1", "--concurrency", "1"]
    if stage == "perplexity":  # percentile thresholds: everything is measured (and spooled) before deciding
        (tmp_path / "t.yaml").write_text("default: {min: p1, max: p99}\n")
        args = [a for a in args if a != "--keep-all"] + ["--thresholds", str(tmp_path / "t.yaml")]
    asked_before = len(ctx["judge"].requests)
    proc = start([*args, "-o", str(out_dir / "out.jsonl"), "--rejects", str(out_dir / "rejects.jsonl"),
                  "--report", str(out_dir / "report.json")],
                 env=environment(TMPDIR=str(scratch)), stdin=subprocess.PIPE, new_session=to_group)
    # stdin stays open: the run is still reading (and working on what it read) when the signal comes.
    stderr = _signal_while_reading(proc, b"".join(train_lines[:20]), signal.SIGTERM, to_group,
                                   _working(stage, proc, out_dir, scratch, ctx["judge"], asked_before))
    assert proc.returncode == 143, stderr[-3000:]
    assert "aloe: terminated by SIGTERM" in stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "KeyboardInterrupt" not in stderr
    assert leftovers(out_dir) == [], "partial output or temporary files left beside the output"
    assert leftovers(scratch) == [], "files left in $TMPDIR"
    if stage == "dedup":
        wait_for(lambda: not children(proc.pid), timeout=10)  # no worker outlives the run


def test_ctrl_c_to_the_process_group_stops_the_workers_quietly(ctx, train_lines, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = start([*stage_args("dedup", ctx), "--workers", "2", "--batch-size", "4", "-o", str(out_dir / "out.jsonl")],
                 stdin=subprocess.PIPE, new_session=True)
    stderr = _signal_while_reading(proc, b"".join(train_lines[:20]), signal.SIGINT, True,
                                   lambda: _hidden(out_dir, ".out.jsonl.") and bool(children(proc.pid)))
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert leftovers(out_dir) == []


def test_sigterm_while_mix_writes_removes_its_buckets(ctx, tmp_path):
    """The mixture goes to a pipe nobody reads: the run blocks while writing its shuffled buckets, with
    the bucket folder in $TMPDIR. SIGTERM then must remove it, and not hang on the full pipe."""
    records = [chat(f"Question {i}?", "A long answer. " * 20, id=f"r{i}", source="text",
                    domain="medical" if i % 2 else "general") for i in range(1500)]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    args = ["mix", "--tokenizer", str(ctx["model"]), "--no-cache", "--share", "medical/text=0.5",
            "--share", "general/text=0.5", "-i", str(data)]
    proc = start(args, env=environment(TMPDIR=str(scratch)), stdout=subprocess.PIPE)
    stderr = terminate_when(lambda: any(name.startswith(".aloe-mix-") and not name.startswith(".aloe-mix-stdin-")
                                        for name in leftovers(scratch)), proc, grace=60)
    assert proc.returncode == 143, stderr[-3000:]
    assert "aloe: terminated by SIGTERM" in stderr and "Traceback" not in stderr
    assert leftovers(scratch) == []
