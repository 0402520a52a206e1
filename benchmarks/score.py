"""Benchmark: `aloe score --backend openai` throughput, --concurrency 32 vs 1.

Starts the fake OpenAI-compatible judge (tests/fake_openai_server.py) in its
own process, answering every request after a fixed delay (default 50 ms, a
stand-in for a judge server's latency), and runs the real score stage (prompt
rendering, image encoding to data URLs, HTTP, parsing, thresholds, writing)
over synthetic records, once per concurrency (`benchmarks/backends.py`
measures the client alone). The baseline is measured in the
same run.

    python benchmarks/score.py                        # concurrency 32 vs 1, 50 ms per request
    python benchmarks/score.py --concurrency 64 --delay 0.1

Prints records/s for both and the ratio (target: >= 15x for 32 vs 1 at 50 ms).
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import tempfile
import time
from pathlib import Path

from _fake_server import start_server  # benchmarks/_fake_server.py

ROOT = Path(__file__).resolve().parents[1]


def synthetic_records(count: int) -> list[dict]:
    """Half with a small PNG (as a data URI), each with a [score=N] marker the fake judge echoes."""
    from PIL import Image

    records = []
    for index in range(count):
        images = []
        if index % 2 == 0:
            buffer = io.BytesIO()
            Image.new("RGB", (96, 96), (index % 256, 80, 160)).save(buffer, format="PNG")
            images.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
        user = [{"type": "image"} for _ in images] + [{"type": "text", "text": f"What is finding {index}?"}]
        answer = f"Finding {index} is a small nodule. [score={1 + index % 5}]"
        records.append({"id": str(index), "source": "bench", "images": images,
                        "messages": [{"role": "user", "content": user},
                                     {"role": "assistant", "content": [{"type": "text", "text": answer}]}]})
    return records


def run_score(url: str, records: list[dict], concurrency: int, scratch: Path) -> float:
    """Seconds for the whole stage over `records`, as `aloe score` runs it."""
    from aloe_cli.data.io import Item, RecordWriter
    from aloe_cli.data.stage import RunConfig, run_stage
    from aloe_cli.filters.judge import Rubric, ScoreConfig, ScoreStage
    from aloe_cli.modeling.backends.openai import OpenAIBackend, OpenAIConfig

    backend = OpenAIBackend(OpenAIConfig(model="fake", base_url=url, concurrency=concurrency))
    stage = ScoreStage(backend, ScoreConfig(judge="fake"), Rubric())
    items = [Item(record, record["id"], "bench") for record in records]
    config = RunConfig(batch_size=max(8, concurrency * 4))
    start = time.perf_counter()
    with RecordWriter(scratch / f"kept.{concurrency}.jsonl") as kept, \
            RecordWriter(scratch / f"rejected.{concurrency}.jsonl") as rejected:
        summary = run_stage(stage, items, kept, rejected, config)
    elapsed = time.perf_counter() - start
    stage.close()
    if summary.extra["request_failures"] or summary.extra["unparseable"]:
        raise SystemExit(f"concurrency {concurrency}: {summary.extra}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--delay", type=float, default=0.05, help="server latency per request, seconds")
    parser.add_argument("--seconds", type=float, default=3.0, help="rough duration of each measurement")
    args = parser.parse_args(argv)

    server, url = start_server(args.delay)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            run_score(url, synthetic_records(args.concurrency), args.concurrency, Path(scratch))  # warm-up
            serial_count = max(10, int(args.seconds / args.delay))
            parallel_count = serial_count * args.concurrency
            serial_s = run_score(url, synthetic_records(serial_count), 1, Path(scratch))
            parallel_s = run_score(url, synthetic_records(parallel_count), args.concurrency, Path(scratch))
    finally:
        server.terminate()
        server.wait()
    serial_rate, parallel_rate = serial_count / serial_s, parallel_count / parallel_s
    ideal = 1 / args.delay
    print(f"fake judge: {args.delay * 1000:.0f} ms per request (ideal: {ideal:.0f} records/s per request in flight)")
    print(f"--concurrency 1:   {serial_rate:8.1f} records/s  ({serial_count} records, {serial_s:.2f} s)")
    print(f"--concurrency {args.concurrency:<3}: {parallel_rate:8.1f} records/s  ({parallel_count} records, "
          f"{parallel_s:.2f} s)")
    print(f"speed-up: {parallel_rate / serial_rate:.1f}x (target >= 15x for 32 vs 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
