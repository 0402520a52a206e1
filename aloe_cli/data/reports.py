"""Shard reports: the JSON summary each task writes, its completion marker, and merging them.

With `--report FILE` a stage writes its summary (stage, shard K/N, input
files, read/kept/rejected per input and per reason, the stage's own figures)
to FILE, then a completion marker `FILE.done`, both atomically and in that
order: a marker exists only beside a complete report of a finished shard.
`--resume` makes a rerun of the same task skip its work when the marker is
there (a job array that died half-way reruns only what is missing).

`merge_reports` adds the reports of all shards of one run into one summary:
counts per input and per reason, and the stage figures the stage declared
additive (`Stage.additive`); other figures are kept when every shard agrees
and listed under `not_merged` otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aloe_cli.data.io import write_atomic
from aloe_cli.data.shard import Shard
from aloe_cli.errors import AloeError

MARKER_SUFFIX = ".done"
# Summary keys every stage report has; everything else is the stage's own.
COUNTS = ("read", "kept", "rejected", "flagged", "emitted")
STANDARD = ("stage", "shard", *COUNTS, "reasons", "inputs", "rejects_written", "input_files", "additive")


def marker_path(report: str | Path) -> Path:
    return Path(f"{report}{MARKER_SUFFIX}")


def write_report(path: str | Path, report: dict[str, Any], *, mark_done: bool = False) -> None:
    """Write the report (and then, for a finished shard, its completion marker), each atomically."""
    try:
        write_atomic(path, (json.dumps(report, indent=2) + "\n").encode())
        if mark_done:
            marker = {"stage": report["stage"], "shard": report["shard"], "report": Path(path).name}
            write_atomic(marker_path(path), (json.dumps(marker) + "\n").encode())
    except OSError as exc:
        raise AloeError(f"cannot write report {path}: {exc.strerror or exc}") from None


def finished(report: str | Path, stage: str, shard: Shard) -> bool:
    """True when `report`'s completion marker says this stage's shard is done.

    A marker left by another stage or shard means two tasks share one report
    path (a missing ${SLURM_ARRAY_TASK_ID}?): that is an error, not a reason to skip.
    """
    marker = marker_path(report)
    if not marker.is_file():
        return False
    try:
        done = json.loads(marker.read_text())
        written_by = (done["stage"], done["shard"])
    except (OSError, ValueError, KeyError, TypeError):
        raise AloeError(f"{marker}: unreadable completion marker; delete it to run this shard again") from None
    if written_by != (stage, str(shard)):
        raise AloeError(f"{marker} was written by {written_by[0]} shard {written_by[1]}, but this is {stage} shard "
                        f"{shard}: give every task its own --report (e.g. reports/${{SLURM_ARRAY_TASK_ID}}.json)")
    return True


# ----------------------------------------------------------------------------- merging

def merge_reports(reports: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One summary from the reports of every shard of a run. Raises AloeError naming the bad report."""
    if not reports:
        raise AloeError("no reports to merge")
    shards = [_checked(name, report) for name, report in reports]
    first_name, first = reports[0]
    count = shards[0].count
    seen: dict[int, str] = {}
    for (name, report), shard in zip(reports, shards):
        if report["stage"] != first["stage"]:
            raise AloeError(f"{name} is a {report['stage']} report but {first_name} is a {first['stage']} report: "
                            "merge the reports of one stage at a time")
        if shard.count != count:
            raise AloeError(f"{name} is shard {shard} but {first_name} is shard {shards[0]}: "
                            "the reports come from runs with different shard counts")
        if shard.index in seen:
            raise AloeError(f"shard {shard} appears twice: {seen[shard.index]} and {name}")
        seen[shard.index] = name
        if report.get("input_files") != first.get("input_files"):
            raise AloeError(f"{name} was run over other inputs than {first_name}")
    missing = [index for index in range(count) if index not in seen]
    if missing:
        listed = ", ".join(map(str, missing[:20])) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise AloeError(f"missing shard(s) {listed} of {count}: {len(missing)} report(s) not given")

    merged: dict[str, Any] = {"stage": first["stage"], "shard": f"all/{count}", "merged_from": [n for n, _ in reports]}
    for key in COUNTS:
        merged[key] = sum(report.get(key, 0) for _, report in reports)
    merged["reasons"] = dict(sorted(_sum_counts(report.get("reasons", {}) for _, report in reports).items()))
    inputs: dict[str, dict[str, int]] = {}
    for _, report in reports:
        for name, counts in report.get("inputs", {}).items():
            total = inputs.setdefault(name, {"read": 0, "kept": 0, "rejected": 0})
            for key in total:
                total[key] += counts.get(key, 0)
    merged["inputs"] = inputs
    merged["rejects_written"] = all(report.get("rejects_written") for _, report in reports)
    if "input_files" in first:
        merged["input_files"] = first["input_files"]
    additive = [tuple(pattern.split(".")) for pattern in first.get("additive", [])]
    not_merged: list[str] = []
    extras = [{k: v for k, v in report.items() if k not in STANDARD} for _, report in reports]
    for key in dict.fromkeys(k for extra in extras for k in extra):
        present = [extra[key] for extra in extras if key in extra]
        ok, value = _merge_values(present, (key,), additive, not_merged)
        if ok:
            merged[key] = value
    merged["additive"] = first.get("additive", [])
    if not_merged:
        merged["not_merged"] = not_merged
    if merged["read"] != merged["kept"] + merged["rejected"]:
        raise AloeError(f"merged counts do not add up: {merged['read']} read != {merged['kept']} kept + "
                        f"{merged['rejected']} rejected")
    return merged


def _checked(name: str, report: Any) -> Shard:
    if not isinstance(report, dict) or "stage" not in report or "shard" not in report:
        raise AloeError(f"{name}: not an aloe stage report (no 'stage' and 'shard')")
    try:
        shard = Shard.parse(str(report["shard"]))
    except AloeError:
        raise AloeError(f"{name}: 'shard' must be K/N, got {report['shard']!r}") from None
    try:
        read, kept, rejected = (int(report[key]) for key in ("read", "kept", "rejected"))
    except (KeyError, TypeError, ValueError):
        raise AloeError(f"{name}: needs numbers 'read', 'kept' and 'rejected'") from None
    if read != kept + rejected:
        raise AloeError(f"{name}: {read} read != {kept} kept + {rejected} rejected; the report is damaged")
    return shard


def _sum_counts(mappings) -> dict[str, int]:
    total: dict[str, int] = {}
    for mapping in mappings:
        for key, value in mapping.items():
            total[key] = total.get(key, 0) + value
    return total


def _matches(path: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    return len(path) == len(pattern) and all(p in ("*", k) for k, p in zip(path, pattern))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _merge_values(values: list[Any], path: tuple[str, ...], additive: list[tuple[str, ...]],
                  not_merged: list[str]) -> tuple[bool, Any]:
    """(merged?, value): summed where declared additive, recursed into dicts that hold additive keys,
    otherwise kept when every shard agrees."""
    if any(_matches(path, pattern) for pattern in additive) and all(_is_number(v) for v in values):
        return True, sum(values)
    below = [pattern for pattern in additive if len(pattern) > len(path) and _matches(path, pattern[:len(path)])]
    if below and all(isinstance(v, dict) for v in values):
        merged: dict[str, Any] = {}
        for key in dict.fromkeys(k for v in values for k in v):
            ok, value = _merge_values([v[key] for v in values if key in v], (*path, key), below, not_merged)
            if ok:
                merged[key] = value
        return True, merged
    if all(v == values[0] for v in values):
        return True, values[0]
    not_merged.append(".".join(path))
    return False, None
