"""Benchmark: `aloe eval` throughput, each figure against a baseline measured in the same run.

1. hf backend, batched greedy generation (batch 16) vs one item at a time, on the tiny offline
   Qwen2-VL, through the real evaluation stage (prompts, images, generation, extraction, scoring,
   predictions file). The two runs must give identical predictions.
2. openai backend, --concurrency 32 vs 1, against the test server (tests/fake_openai_server.py) in its
   own process answering every request after 50 ms (a stand-in for a served model's latency).

    python benchmarks/eval.py                          # both
    python benchmarks/eval.py --served-items 1024 --delay 0.05 --skip-hf

Prints items/s for each run and the ratios (targets: >= 3x for batching, >= 15x for concurrency 32).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import time
from pathlib import Path

from _fake_server import start_server  # benchmarks/_fake_server.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ORGANS = ("Liver", "Spleen", "Kidney", "Lung")


def write_benchmark(path: Path, count: int, marker: bool = False) -> Path:
    """Multiple-choice items, every other one with a small PNG; `marker`: the test server's [answer=X]."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for index in range(count):
        images = []
        if index % 2 == 0:
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
            images.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
        question = f"Case {index}: which organ shows the lesion" + " in this scan" * (index % 5) + "?"
        if marker:
            question += f" [answer={'ABCD'[index % 4]}]"
        lines.append({"id": str(index), "question": question, "options": dict(zip("ABCD", ORGANS)),
                      "answer": "ABCD"[index % 4], "images": images})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run(backend, bench: Path, out: Path, batch: int, max_new_tokens: int) -> tuple[float, list[str]]:
    """Seconds for the whole benchmark through `evaluate_model`, and the predictions in item order."""
    from aloe_cli.evaluation.benchmarks import parse_benchmark_spec
    from aloe_cli.evaluation.evaluate import EvalPlan, evaluate_model
    from aloe_cli.modeling.backends import GenerationParams

    plan = EvalPlan(benchmarks=[parse_benchmark_spec(f"bench={bench}")], output=out, batch_size=batch,
                    params=GenerationParams(max_new_tokens=max_new_tokens))
    start = time.perf_counter()
    evaluate_model("m", lambda: backend, plan)
    elapsed = time.perf_counter() - start
    lines = [json.loads(line) for line in (out / "m" / "bench" / "predictions.jsonl").read_text().splitlines()]
    return elapsed, [line["prediction"] for line in lines]


def bench_hf(args, scratch: Path) -> float:
    from aloe_cli.modeling.backends.hf import HFBackend
    from aloe_cli.modeling.loading import ModelSpec, load_model
    from aloe_cli.modeling.tiny import build_tiny_qwen2vl

    loaded = load_model(ModelSpec(str(build_tiny_qwen2vl(scratch / "tiny", seed=0)), device="cpu"))
    bench = write_benchmark(scratch / "hf.jsonl", args.items)
    run(HFBackend(loaded, batch_size=args.batch_size), bench, scratch / "warm", 64, 4)  # warm-up
    batched_s, batched = run(HFBackend(loaded, batch_size=args.batch_size), bench, scratch / "batched",
                             args.batch_size * 4, args.max_new_tokens)
    single_s, single = run(HFBackend(loaded, batch_size=1), bench, scratch / "single", 4, args.max_new_tokens)
    same = sum(a == b for a, b in zip(batched, single))
    print(f"hf, tiny Qwen2-VL on CPU, {args.items} items, max_new_tokens {args.max_new_tokens}:")
    print(f"  batch {args.batch_size:>3}: {args.items / batched_s:8.1f} items/s ({batched_s:.2f} s)")
    print(f"  batch   1: {args.items / single_s:8.1f} items/s ({single_s:.2f} s)")
    print(f"  identical predictions: {same}/{args.items}")
    ratio = single_s / batched_s
    print(f"  ratio: {ratio:.1f}x (target >= 3x)")
    if same != args.items:
        raise SystemExit("batched and one-at-a-time predictions differ")
    return ratio


def bench_openai(args, scratch: Path) -> float:
    from aloe_cli.modeling.backends.factory import BackendConfig, build_backend

    server, url = start_server(args.delay)
    try:
        items = args.served_items
        bench = write_benchmark(scratch / "served.jsonl", items, marker=True)
        rates = {}
        for concurrency in (args.concurrency, 1):
            backend = build_backend(BackendConfig(model="m", base_url=url, concurrency=concurrency))
            seconds, predictions = run(backend, bench, scratch / f"c{concurrency}", max(64, concurrency * 4), 16)
            backend.close()
            if predictions != ["ABCD"[i % 4] for i in range(items)]:
                raise SystemExit(f"concurrency {concurrency}: unexpected answers")
            rates[concurrency] = items / seconds
    finally:
        server.terminate()
        server.wait()
    print(f"openai, test server answering after {args.delay * 1000:.0f} ms, {items} items:")
    for concurrency, rate in rates.items():
        print(f"  concurrency {concurrency:>3}: {rate:8.1f} items/s")
    ratio = rates[args.concurrency] / rates[1]
    print(f"  ratio: {ratio:.1f}x (target >= 15x)")
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=128, help="items for the hf measurement")
    parser.add_argument("--served-items", type=int, default=512, help="items for the openai measurement")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-openai", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        if not args.skip_hf:
            bench_hf(args, scratch)
        if not args.skip_openai:
            bench_openai(args, scratch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
