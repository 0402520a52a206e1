"""Helpers shared by the tests: run the real CLI in a subprocess, write records and images."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def aloe(*args: str, stdin: str | bytes | None = None, env: dict | None = None, cwd: Path | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m aloe_cli ARGS` and capture stdout/stderr as text."""
    # A test runs outside any SLURM array unless it says otherwise.
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY")}
    full_env.update(env or {})
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run([sys.executable, "-m", "aloe_cli", *args], input=data, capture_output=True,
                          env=full_env, cwd=cwd or ROOT, timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())



def aloe_on_terminal(*args: str, env: dict | None = None, timeout: float = 120,
                     columns: int = 160) -> subprocess.CompletedProcess:
    """Run `python -m aloe_cli ARGS` with stderr on a pseudo-terminal (as in an interactive shell); stdout is
    captured apart. `stderr` is what the terminal received, escape sequences included."""
    import pty
    import threading

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY")}
    full_env.update({"COLUMNS": str(columns), "TERM": "xterm-256color", **(env or {})})
    full_env.pop("NO_COLOR", None)
    master, slave = pty.openpty()
    received: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal closed: the process and its children have exited
                return
            if not chunk:
                return
            received.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "aloe_cli", *args], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=slave, env=full_env, cwd=ROOT, timeout=timeout)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    text = b"".join(received).decode("utf-8", "replace")
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), text)

def read_jsonl(path_or_text: str | Path) -> list[dict]:
    text = Path(path_or_text).read_text() if isinstance(path_or_text, Path) else path_or_text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat(question: str, answer: str, images: list | None = None, **extra) -> dict:
    images = images or []
    user = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "images": images, **extra}


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def scan(seed: int, size: int = 128) -> Image.Image:
    """A distinct synthetic image per seed (same generator the demo data uses)."""
    import numpy as np

    from aloe_cli.demo.images import synthetic_scan

    return synthetic_scan(np.random.default_rng(seed), size=size)
