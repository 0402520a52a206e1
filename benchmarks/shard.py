"""Benchmark one shard of a job array against the whole input, through the real CLI.

    python benchmarks/shard.py [--records 200000] [--shards 64] [--repeats 3] [--workdir bench_out/shard]

Runs `aloe dedup -i INPUT --against EMPTY_EVAL -o OUT` (the cheapest real stage:
it reads, validates and writes every text-only record) on the whole input and
with `--shard 0/N` and `--shard N-1/N`, for a JSONL and a JSONL.gz input. The start-up time (the
same command on an empty input) is subtracted from both; the figure is

    ratio = (one shard - start-up) / (whole input - start-up)

in CPU time of the CLI process (user + system), the fastest of --repeats runs:
on a machine shared with other jobs CPU time is far steadier than wall time
(both are printed). Ideal is 1/N; the goal is under 1/20 for N = 64. Nothing
here is a pass/fail assert.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_inputs(work: Path, records: int) -> dict[str, Path]:
    plain, zipped = work / f"train-{records}.jsonl", work / f"train-{records}.jsonl.gz"
    if not plain.exists():
        record = {"id": "", "source": "s", "domain": "general", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is the capital of France? Answer briefly."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Paris is the capital of France."}]}],
            "images": []}
        with plain.open("w") as handle:
            for i in range(records):
                record["id"] = f"r{i}"
                handle.write(json.dumps(record) + "\n")
    if not zipped.exists():
        zipped.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=6))
    (work / "empty.jsonl").write_text("")
    (work / "eval.jsonl").write_text("")
    return {"jsonl": plain, "jsonl.gz": zipped}


def run_cli(args: list[str]) -> tuple[float, float, str]:
    """(CPU seconds, wall seconds) of `python -m aloe_cli ARGS`, and its stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY")}
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "aloe_cli", *args], stdout=subprocess.DEVNULL, stderr=err,
                                env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        err.seek(0)
        stderr = err.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"aloe {' '.join(args)} failed:\n{stderr}")
    return usage.ru_utime + usage.ru_stime, wall, stderr


def best_run(args: list[str], repeats: int) -> tuple[float, float, str]:
    """The fastest of `repeats` runs by CPU time (CPU time barely moves when other jobs share the machine)."""
    return min((run_cli(args) for _ in range(repeats)), key=lambda run: run[0])


def read_count(stderr: str) -> str:
    return next(line.strip() for line in stderr.splitlines() if " read = " in line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench_out" / "shard")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    inputs = write_inputs(work, args.records)
    against = ["--against", str(work / "eval.jsonl"), "-o", str(work / "out.jsonl")]
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; {args.records:,} text-only records, "
          f"{args.shards} shards; each timing the fastest of {args.repeats} run(s) by CPU time")
    startup, startup_wall, _ = best_run(["dedup", "-i", str(work / "empty.jsonl"), *against], args.repeats)
    print(f"start-up (empty input): {startup:.3f} s CPU ({startup_wall:.3f} s wall)")
    for kind, path in inputs.items():
        whole, whole_wall, whole_log = best_run(["dedup", "-i", str(path), *against], args.repeats)
        print(f"{kind}: whole input {whole:.3f} s CPU ({whole_wall:.3f} s wall; {read_count(whole_log)})")
        for index in (0, args.shards - 1):  # the first and the last shard: every shard scans the whole file
            shard, shard_wall, shard_log = best_run(
                ["dedup", "-i", str(path), "--shard", f"{index}/{args.shards}", *against], args.repeats)
            ratio = (shard - startup) / (whole - startup)
            print(f"{kind}: shard {index}/{args.shards} {shard:.3f} s CPU ({shard_wall:.3f} s wall; "
                  f"{read_count(shard_log)}); start-up excluded, {shard - startup:.3f} s / {whole - startup:.3f} s "
                  f"= {ratio:.4f} = 1/{1 / ratio:.1f} (ideal 1/{args.shards}, goal < 1/20)")


if __name__ == "__main__":
    main()
