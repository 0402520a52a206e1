"""Benchmark `aloe dedup` against a plain imagehash loop measured in the same run.

    python benchmarks/dedup.py [--images 2000] [--text-records 200000] [--workdir bench_out/dedup]

Prints, each as a ratio against its baseline:
- images/s of `aloe dedup --workers 2` (exact pHash) and `--workers 2 --fast` vs a
  single-process loop of `imagehash.phash(Image.open(p))`, on realistic 512x512 JPEGs
  (crops of a real photograph and synthetic scans), with the hashes checked identical;
- how often the --fast hash equals the exact one, and that planted leaks are still
  caught when both sides use --fast;
- text-only records/s through `aloe dedup`;
- `aloe --help` wall time;
- peak RSS for a small and an 8x larger training input (streaming: should stay flat).
Timings of the CLI include its start-up; nothing here is a pass/fail assert except
hash identity and leak detection.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[1]
LEAKS = 20


def photo_source() -> Image.Image:
    import matplotlib

    return Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Half crops of a real photograph (random scale, rotation, colour), half synthetic scans."""
    from aloe_cli.demo.images import synthetic_scan

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i:05d}.jpg" for i in range(count)]
    if all(p.exists() for p in paths):
        return paths
    rng = np.random.default_rng(seed)
    photo = photo_source()
    for i, path in enumerate(paths):
        if i % 2 == 0:
            side = int(rng.integers(200, min(photo.size)))
            x, y = (int(rng.integers(0, photo.size[d] - side + 1)) for d in (0, 1))
            image = photo.crop((x, y, x + side, y + side)).rotate(float(rng.uniform(-20, 20)))
            image = ImageEnhance.Color(image).enhance(float(rng.uniform(0.5, 1.5)))
            image = image.resize((512, 512), Image.Resampling.BICUBIC)
        else:
            image = synthetic_scan(rng, size=512, color=bool(i % 4 == 1))
        image.save(path, quality=int(rng.integers(80, 96)))
    return paths


def write_records(path: Path, paths: list[Path]) -> None:
    with path.open("w") as handle:
        for i, image in enumerate(paths):
            handle.write(json.dumps({"id": f"t{i}", "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "An image."}]}],
                "images": [str(image)]}) + "\n")


def run_cli(args: list[str], stdout_path: Path | None = None) -> tuple[float, int]:
    """Run `python -m aloe_cli ARGS`; return (wall seconds, peak RSS in MiB of the child)."""
    start = time.perf_counter()
    with open(stdout_path or os.devnull, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "aloe_cli", *args], stdout=out, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"aloe {' '.join(args)} failed:\n{stderr}")
    return elapsed, usage.ru_maxrss // 1024


def hashes_from(path: Path) -> dict[str, str]:
    hashes = {}
    with path.open() as handle:
        for line in handle:
            record = json.loads(line)
            hashes[record["id"]] = record["aloe"]["dedup"]["phash"][0]
    return hashes


def bench_hashing(work: Path, count: int) -> None:
    import imagehash

    paths = make_images(work / "images", count)
    train = work / "train.jsonl"
    write_records(train, paths)
    # The benchmark set: byte copies of LEAKS training images, plus unrelated ones.
    write_records(work / "eval.jsonl", paths[:LEAKS])

    start = time.perf_counter()
    baseline = {f"t{i}": str(imagehash.phash(Image.open(p))) for i, p in enumerate(paths)}
    loop_s = time.perf_counter() - start
    loop_rate = count / loop_s
    print(f"baseline loop imagehash.phash(Image.open(p)): {count} images in {loop_s:.2f} s = {loop_rate:.0f} images/s")

    from aloe_cli.filters.hashing import Hasher, to_hex

    for fast in (False, True):
        start = time.perf_counter()
        with Hasher("phash", fast=fast, workers=2) as hasher:  # the engine `aloe dedup --workers 2` runs
            results = hasher.hash_many([(str(p), None) for p in paths])
        elapsed = time.perf_counter() - start
        same = sum(to_hex(r.hash) == baseline[f"t{i}"] for i, r in enumerate(results))
        print(f"hashing engine, 2 worker processes{' --fast' if fast else ''} (pool start included): "
              f"{count / elapsed:.0f} images/s -> {loop_s / elapsed:.2f}x the loop; equal to the loop's hash: "
              f"{same}/{count}")

    common = ["dedup", "-i", str(train), "--against", str(work / "eval.jsonl"), "--keep-all"]
    for label, extra in (("--workers 2", ["--workers", "2"]), ("--workers 2 --fast", ["--workers", "2", "--fast"])):
        out = work / f"out{'_fast' if '--fast' in extra else ''}.jsonl"
        elapsed, _ = run_cli(common + extra, out)
        hashes = hashes_from(out)
        flagged = sum(1 for line in out.open() if '"flag"' in line)
        rate = count / elapsed
        print(f"aloe dedup {label}: {elapsed:.2f} s = {rate:.0f} images/s -> {rate / loop_rate:.2f}x the loop "
              f"(CLI start-up and evaluation-set hashing included); leaks caught: {flagged}/{LEAKS}")
        if flagged < LEAKS:
            raise SystemExit("a planted leak was missed")
        equal = sum(hashes[k] == baseline[k] for k in baseline)
        if "--fast" in extra:
            distances = [bin(int(hashes[k], 16) ^ int(baseline[k], 16)).count("1") for k in baseline]
            print(f"  --fast hash equals the exact pHash for {equal}/{count} images ({100 * equal / count:.1f}%); "
                  f"Hamming distance to exact: median {statistics.median(distances):.0f}, max {max(distances)}, "
                  f"<= 4 for {100 * sum(d <= 4 for d in distances) / count:.1f}%")
        elif equal != count:
            raise SystemExit(f"exact hashes differ from imagehash.phash for {count - equal} images")
        else:
            print(f"  hashes identical to the loop's for {equal}/{count} images")


def bench_text(work: Path, records: int) -> None:
    text = work / "text.jsonl"
    line = {"id": "", "source": "s", "domain": "general", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of France? Answer briefly."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Paris is the capital of France."}]}], "images": []}
    with text.open("w") as handle:
        for i in range(records):
            line["id"] = f"r{i}"
            handle.write(json.dumps(line) + "\n")
    empty_eval = work / "eval.jsonl"
    elapsed, rss_big = run_cli(["dedup", "-i", str(text), "--against", str(empty_eval)])
    print(f"text-only pass-through: {records} records in {elapsed:.2f} s = {records / elapsed:,.0f} records/s "
          f"(target >= 50,000)")
    small = work / "text_small.jsonl"
    with text.open() as src, small.open("w") as dst:
        for i, row in enumerate(src):
            if i >= records // 8:
                break
            dst.write(row)
    _, rss_small = run_cli(["dedup", "-i", str(small), "--against", str(empty_eval)])
    print(f"peak RSS: {rss_small} MiB for {records // 8} records, {rss_big} MiB for {records} records "
          f"(ratio {rss_big / rss_small:.2f}: streaming keeps it flat)")


def bench_help(repeats: int = 7) -> None:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "aloe_cli", "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    print(f"aloe --help: median {statistics.median(times):.3f} s over {repeats} runs (target < 0.5 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--text-records", type=int, default=200_000)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench_out" / "dedup")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    bench_hashing(args.workdir, args.images)
    bench_text(args.workdir, args.text_records)
    bench_help()


if __name__ == "__main__":
    main()
