"""Benchmark: the openai generation backend (httpx, async) against a local server with a fixed latency.

Starts the fake OpenAI-compatible server (tests/fake_openai_server.py) in its own process, answering every
request after `--delay` seconds (default 50 ms, a stand-in for a model server's latency), and measures, in
the same run:

1. `OpenAIBackend` at `--concurrency` (default 32) vs 1: records/s and the ratio (target >= 15x).
2. The same backend vs a thread-based client built like the one aloe used before (a pool of `concurrency`
   threads, one keep-alive `http.client` connection each) at `--concurrency` and at `--high` (default
   128): records/s, client CPU per request and threads used. The fake server answers from one thread per
   connection on the same machine, so at high concurrency it, not the client, sets the pace.

    python benchmarks/backends.py
    python benchmarks/backends.py --delay 0.1 --concurrency 64 --high 256
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from _fake_server import start_server  # benchmarks/_fake_server.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompts(count: int) -> list[str]:
    return [f"Rate sample {index}: is the answer 'the liver' right? [score={1 + index % 5}]" for index in range(count)]


class Measured:
    def __init__(self, count: int, seconds: float, cpu_s: float, threads: int):
        self.count, self.seconds, self.cpu_s, self.threads = count, seconds, cpu_s, threads

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def line(self, label: str) -> str:
        return (f"{label:<34} {self.rate:8.1f} records/s  {1000 * self.cpu_s / self.count:6.2f} ms CPU/request  "
                f"{self.threads:4d} thread(s)  ({self.count} requests, {self.seconds:.2f} s)")


def run_backend(url: str, texts: list[str], concurrency: int) -> Measured:
    from aloe_cli.modeling.backends import GenerationParams, GenerationRequest, Reply
    from aloe_cli.modeling.backends.openai import OpenAIBackend, OpenAIConfig

    backend = OpenAIBackend(OpenAIConfig(model="fake", base_url=url, concurrency=concurrency))
    requests = [GenerationRequest([{"role": "user", "content": [{"type": "text", "text": text}]}]) for text in texts]
    failures, threads = [], [threading.active_count()]

    def on_done(index: int, completion) -> None:
        threads.append(threading.active_count())
        if not isinstance(completion, Reply):
            failures.append(completion)

    start, cpu = time.perf_counter(), time.process_time()
    backend.generate(requests, GenerationParams(max_new_tokens=64), on_done)
    measured = Measured(len(texts), time.perf_counter() - start, time.process_time() - cpu, max(threads))
    backend.close()
    if failures:
        raise SystemExit(f"backend, concurrency {concurrency}: {failures[:3]}")
    return measured


def run_threaded(url: str, texts: list[str], concurrency: int) -> Measured:
    """The baseline: one thread per request in flight, each with its own keep-alive connection."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/") + "/chat/completions"
    local = threading.local()

    def ask(text: str) -> str:
        connection = getattr(local, "connection", None)
        if connection is None:
            connection = local.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        body = json.dumps({"model": "fake", "messages": [{"role": "user", "content": text}],
                           "temperature": 0.0, "max_tokens": 64}).encode()
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise SystemExit(f"threaded client: HTTP {response.status}")
        return json.loads(data)["choices"][0]["message"]["content"]

    threads = [threading.active_count()]
    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for _ in pool.map(ask, texts):
            threads.append(threading.active_count())
    return Measured(len(texts), time.perf_counter() - start, time.process_time() - cpu, max(threads))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--high", type=int, default=128, help="a second concurrency for the client comparison")
    parser.add_argument("--delay", type=float, default=0.05, help="server latency per request, seconds")
    parser.add_argument("--seconds", type=float, default=3.0, help="rough duration of the serial measurement")
    args = parser.parse_args(argv)

    server, url = start_server(args.delay)
    try:
        run_backend(url, prompts(args.concurrency), args.concurrency)  # warm-up: imports, connections
        serial_count = max(10, int(args.seconds / args.delay))
        serial = run_backend(url, prompts(serial_count), 1)
        rows = []
        for concurrency in (args.concurrency, args.high):
            texts = prompts(serial_count * concurrency // 2 if concurrency > args.concurrency
                            else serial_count * concurrency)
            rows.append((concurrency, run_backend(url, texts, concurrency), run_threaded(url, texts, concurrency)))
    finally:
        server.terminate()
        server.wait()

    print(f"fake server: {args.delay * 1000:.0f} ms per request; ideal {1 / args.delay:.0f} records/s per request "
          f"in flight")
    print(serial.line("backend, concurrency 1"))
    for concurrency, backend, threaded in rows:
        print(backend.line(f"backend, concurrency {concurrency}"))
        print(threaded.line(f"threaded client, concurrency {concurrency}"))
    first = rows[0][1]
    print(f"speed-up, concurrency {args.concurrency} vs 1: {first.rate / serial.rate:.1f}x (target >= 15x)")
    for concurrency, backend, threaded in rows:
        print(f"concurrency {concurrency}: backend / threaded client: {backend.rate / threaded.rate:.2f}x records/s, "
              f"{(backend.cpu_s / backend.count) / (threaded.cpu_s / threaded.count):.1f}x the CPU per request, "
              f"{backend.threads} vs {threaded.threads} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
