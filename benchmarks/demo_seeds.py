"""Does `aloe demo` meet the recipe's claims for every seed, and how long does it take? One run per seed.

    python benchmarks/demo_seeds.py --seeds 0 1 2 --out demo_reports/

Runs `aloe demo --seed S --report OUT/seed-S.json` one seed after another (each alone on the machine),
then prints one row per seed: clean accuracy of the three models on demo-med, stage 1 and stage 2
under pmt and syc, the claims, and the run's wall time, which the README's ten-minute budget is about.
Exits 1 when a claim fails for any seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, help="keep the reports here (default: a temporary folder)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        reports = {}
        for seed in args.seeds:
            path = out / f"seed-{seed}.json"
            subprocess.run([sys.executable, "-m", "aloe_cli", "demo", "--seed", str(seed), "--report", str(path)],
                           check=True, stderr=subprocess.DEVNULL)
            reports[seed] = json.loads(path.read_text())

    print("seed | untrained | stage1 | stage2 | s1 pmt | s1 syc | s2 pmt | s2 syc | claims | seconds")
    passed = True
    for seed, report in reports.items():
        accuracy, robust = report["accuracy"], report["robustness"]
        ok = all(report["claims"].values())
        passed &= ok
        print(f"{seed:4d} | {accuracy['untrained']['demo-med']:9.1f} | {robust['stage1']['base']:6.1f} | "
              f"{robust['stage2']['base']:6.1f} | {robust['stage1']['pmt']:6.1f} | {robust['stage1']['syc']:6.1f} | "
              f"{robust['stage2']['pmt']:6.1f} | {robust['stage2']['syc']:6.1f} | {'met' if ok else 'FAILED'} | "
              f"{report['seconds']:7.0f}")
    print(f"every claim met for every seed: {passed}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
