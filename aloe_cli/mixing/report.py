"""What a mix did, as a JSON-ready dict, as table rows, and as plots.

Every record read is accounted for: read = rejected + available, and
available = selected (unique) + not selected. Shares are shares of loss tokens
unless named `sample_share_*`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aloe_cli.errors import AloeError
from aloe_cli.mixing.passes import MixResult
from aloe_cli.mixing.plan import Tally
from aloe_cli.mixing.recipe import CELLS
from aloe_cli.plotting import plot_folder, pyplot

PLOT_FILES = ("mix_cells.png", "mix_sources.png")


def _share(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 0.0


def _tally_fields(tally: Tally) -> dict[str, Any]:
    return {
        "samples_available": tally.samples_available,
        "samples_selected": tally.samples_selected,
        "unique_selected": tally.unique_selected,
        "tokens_available": tally.tokens_available,
        "tokens_selected": tally.tokens_selected,
        "repeat_factor": round(tally.repeat_factor, 4),
    }


def build_report(result: MixResult) -> dict[str, Any]:
    plan, recipe = result.plan, result.recipe
    totals = Tally()
    for tally in plan.cell_tallies.values():
        totals.add(tally)
    if result.read != result.rejected + totals.samples_available:  # the promise every stage keeps
        raise RuntimeError(f"record accounting broke: {result.read} read != {result.rejected} rejected + "
                           f"{totals.samples_available} available")
    cells = {}
    missed = {miss.cell: miss for miss in plan.misses}
    for cell in CELLS:
        tally = plan.cell_tallies[cell]
        share_after = _share(tally.tokens_selected, totals.tokens_selected)
        cells[cell] = {
            "target_share": plan.targets.get(cell, 0.0),
            "target_met": cell not in missed,
            "miss": round(missed[cell].difference, 6) if cell in missed else 0.0,
            "share_before": _share(tally.tokens_available, totals.tokens_available),
            "share_after": share_after,
            "sample_share_before": _share(tally.samples_available, totals.samples_available),
            "sample_share_after": _share(tally.samples_selected, totals.samples_selected),
            **_tally_fields(tally),
        }
    sources = []
    for group, tally in zip(plan.groups, plan.group_tallies):
        sources.append({
            "source": group.source, "cell": group.cell, "weight": group.weight, "max_repeats": group.max_repeats,
            "share_before": _share(tally.tokens_available, totals.tokens_available),
            "share_after": _share(tally.tokens_selected, totals.tokens_selected),
            **_tally_fields(tally),
        })
    return {
        "stage": "mix",
        "recipe": recipe.origin,
        "tokenizer": recipe.tokenizer,
        "seed": recipe.seed,
        "balance": recipe.balance,
        "requested": {"total_samples": recipe.total_samples, "total_tokens": recipe.total_tokens},
        "dry_run": result.dry_run,
        "read": result.read,
        "kept": totals.samples_available,  # kept by the reading pass = available to the plan
        "rejected": result.rejected,
        "available": totals.samples_available,
        "selected_unique": totals.unique_selected,
        "not_selected": totals.samples_available - totals.unique_selected,
        "samples": totals.samples_selected,
        "written": result.written,
        "tokens_available": totals.tokens_available,
        "tokens_selected": totals.tokens_selected,
        "reasons": dict(sorted(result.reasons.items())),
        "rejects_written": result.rejects_written,
        "inputs": {name: vars(tally) for name, tally in result.inputs.items()},
        "cells": cells,
        "sources": sources,
        "targets": {
            "unit": "loss_tokens" if plan.unit == "tokens" else "samples",
            "tolerance": plan.tolerance,
            "strict": recipe.strict,
            "met": plan.targets_met,
            "missed": [miss.to_dict(plan.unit) for miss in plan.misses],
        },
        "notes": list(plan.notes),
        "token_cache": result.cache,
        "counting": result.counting,
        "seconds": result.seconds,
    }


# ----------------------------------------------------------------------------- tables

def _pct(value: float) -> str:
    return f"{value:.1%}"


def _repeat(value: float) -> str:
    return f"{value:.2f}x"


def _miss(cell: dict[str, Any]) -> str:
    """Blank when the cell is within the tolerance of its target, else e.g. `-35.7 pt` (percentage points)."""
    return "" if cell["target_met"] else f"{cell['miss'] * 100:+.1f} pt"


CELL_HEADERS = ["cell", "target", "before", "after", "miss", "samples", "selected", "loss tokens", "selected",
                "repeat"]
SOURCE_HEADERS = ["source", "cell", "samples", "selected", "loss tokens", "selected", "before", "after", "repeat"]


def cell_rows(report: dict[str, Any]) -> list[list[object]]:
    rows = []
    for cell, c in report["cells"].items():
        rows.append([cell, _pct(c["target_share"]), _pct(c["share_before"]), _pct(c["share_after"]), _miss(c),
                     f"{c['samples_available']:,}", f"{c['samples_selected']:,}", f"{c['tokens_available']:,}",
                     f"{c['tokens_selected']:,}", _repeat(c["repeat_factor"])])
    rows.append(["total", _pct(1.0), "", "", "", f"{report['available']:,}", f"{report['samples']:,}",
                 f"{report['tokens_available']:,}", f"{report['tokens_selected']:,}",
                 _repeat(report["tokens_selected"] / report["tokens_available"] if report["tokens_available"] else 0)])
    return rows


def source_rows(report: dict[str, Any]) -> list[list[object]]:
    return [[s["source"], s["cell"], f"{s['samples_available']:,}", f"{s['samples_selected']:,}",
             f"{s['tokens_available']:,}", f"{s['tokens_selected']:,}", _pct(s["share_before"]),
             _pct(s["share_after"]), _repeat(s["repeat_factor"])] for s in report["sources"]]


# ----------------------------------------------------------------------------- plots

def plot_shares(report: dict[str, Any], folder: str | Path) -> list[Path]:
    """Bar charts of the loss-token shares before and after mixing (cells vs targets; sources)."""
    plt = pyplot()
    folder = plot_folder(folder)
    paths = [folder / name for name in PLOT_FILES]
    cells = list(report["cells"])
    series = [("target", [report["cells"][c]["target_share"] for c in cells]),
              ("before", [report["cells"][c]["share_before"] for c in cells]),
              ("after", [report["cells"][c]["share_after"] for c in cells])]
    _grouped_bars(plt, cells, series, "Loss-token share per cell", paths[0])
    labels = [f"{s['source']}\n{s['cell']}" for s in report["sources"]]
    series = [("before", [s["share_before"] for s in report["sources"]]),
              ("after", [s["share_after"] for s in report["sources"]])]
    _grouped_bars(plt, labels, series, "Loss-token share per source", paths[1])
    return paths


def _grouped_bars(plt, labels: list[str], series: list[tuple[str, list[float]]], title: str, path: Path) -> None:
    width = 0.8 / len(series)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.5))
    try:
        for i, (name, values) in enumerate(series):
            positions = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
            axes.bar(positions, values, width=width, label=name)
        axes.set_xticks(range(len(labels)))
        axes.set_xticklabels(labels, rotation=30 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center",
                             fontsize=8)
        axes.set_ylabel("share of loss tokens")
        axes.set_title(title)
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=110)
    except OSError as exc:
        raise AloeError(f"cannot write plot {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(figure)
