"""The demo's closing tables: what curation dropped and why, the benchmark and robustness tables, the claims."""

from __future__ import annotations

from aloe_cli.console import log, print_table
from aloe_cli.demo.run import GENERAL, MODELS, PERTURBATIONS, TABLE_COLUMNS


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_demo_summary(report: dict) -> None:
    rows = []
    for stage, counts in report["curation"].items():
        reasons = ", ".join(f"{reason} {n}" for reason, n in counts["reasons"].items()) or "-"
        rows.append([stage, counts["read"], counts["kept"], counts["rejected"], reasons])
    print_table("Curation", ["stage", "read", "kept", "rejected", "why"], rows)
    planted = report["planted"]
    log("planted faults caught: " + ", ".join(
        f"{kind} {entry['caught']}/{entry['planted']}" for kind, entry in planted.items() if isinstance(entry, dict))
        + f"; clean records rejected: {planted['clean_rejected']}")
    benchmarks = list(next(iter(report["accuracy"].values())))
    print_table("Accuracy (%)", ["model", *benchmarks],
                [[model, *(_cell(report["accuracy"][model][b]) for b in benchmarks)] for model in MODELS])
    print_table("Robustness on demo-med (%)", ["model", *(p.capitalize() for p in PERTURBATIONS)],
                [[model, *(_cell(report["robustness"][model][p]) for p in PERTURBATIONS)] for model in MODELS])
    columns = [f"{part}_{kind}" for part, kinds in TABLE_COLUMNS for kind in kinds]
    print_table("The published table in miniature (%): demo-med classification and detection, demo-general",
                ["model", *(" ".join(c.split("_")).title() for c in columns), "General"],
                [[model, *(_cell(report["robustness"][model][c]) for c in columns),
                  _cell(report["accuracy"][model][GENERAL])] for model in MODELS])
    print_table("The recipe's claims", ["claim", "holds"],
                [[claim, "yes" if holds else "NO"] for claim, holds in report["claims"].items()])
    infer = report["infer"]
    log(f"inference on scan.png: {infer['text']!r}; drawn: {', '.join(infer['drawn']) or 'nothing'}")
    log(f"total {report['seconds']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in report["steps"].items()) + ")")
