"""Does `aloe demo` meet the published card's claims for every seed, and how long does it take? One run per seed.

    python benchmarks/demo_seeds.py --seeds 0 1 2 --out demo_reports/
    python benchmarks/demo_seeds.py --seeds 0 1 2 --out demo_reports/ --no-run   # print tables of kept reports

Runs `aloe demo --seed S --report OUT/seed-S.json` one seed after another (each alone on the machine),
then prints, per seed, the robustness table in the published layout (Cls Base/Cap/Pmt/Syc, Det
Base/Cap/Pmt/Syc/Leg, General; one row per model), the claims that fail, and the run's wall time,
which the README's six-minute budget is about. Exits 1 when a claim fails for any seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

COLUMNS = ("cls_base", "cls_cap", "cls_pmt", "cls_syc", "det_base", "det_cap", "det_pmt", "det_syc", "det_leg")
MODELS = ("untrained", "stage1", "stage2")


def table(report: dict) -> list[str]:
    """The seed's published-layout table as Markdown rows."""
    heads = [" ".join(c.split("_")).title() for c in COLUMNS]
    rows = ["| model | " + " | ".join(heads) + " | General |", "|---" * (len(COLUMNS) + 2) + "|"]
    for model in MODELS:
        robust = report["robustness"][model]
        cells = [f"{robust[c]:.1f}" for c in COLUMNS] + [f"{report['accuracy'][model]['demo-general']:.1f}"]
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, help="keep the reports here (default: a temporary folder)")
    parser.add_argument("--no-run", action="store_true", help="only print the tables of the reports in --out")
    args = parser.parse_args(argv)
    if args.no_run and args.out is None:
        parser.error("--no-run needs --out")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        reports = {}
        for seed in args.seeds:
            path = out / f"seed-{seed}.json"
            if not args.no_run:
                subprocess.run([sys.executable, "-m", "aloe_cli", "demo", "--seed", str(seed), "--report", str(path)],
                               check=True, stderr=subprocess.DEVNULL)
            reports[seed] = json.loads(path.read_text())

    passed = True
    for seed, report in reports.items():
        failed = [claim for claim, holds in report["claims"].items() if not holds]
        passed &= not failed
        print(f"seed {seed}: {report['seconds']:.0f} s, "
              + ("every claim met" if not failed else "FAILED: " + "; ".join(failed)))
        print("\n".join(table(report)) + "\n")
    print(f"every claim met for every seed: {passed}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
