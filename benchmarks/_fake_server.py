"""The tests' OpenAI-compatible server (tests/fake_openai_server.py) in a process of its own, for the
benchmarks that time a client against it: the server's work is not counted as the client's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(delay: float) -> tuple[subprocess.Popen, str]:
    """Start the server answering after `delay` seconds; returns the process and its base URL."""
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai_server.py"), "--delay", str(delay)],
                              stdout=subprocess.PIPE, text=True)
    url = server.stdout.readline().strip()
    if not url.startswith("http"):
        server.kill()
        raise SystemExit("the fake server did not start")
    return server, url
