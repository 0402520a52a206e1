"""What the reliability tests share: the data commands as argument lists, real FIFOs, small filesystems,
and the checks every hostile case ends with (exit code, one-line error, nothing lost, nothing left behind)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support import ROOT

# The data commands that read records and write them (the model-backed ones against the tiny model and the
# fake judge); `mix` samples, so its invariant is checked through its report.
STAGES = ("dedup", "score", "perplexity", "mix")


def stage_args(name: str, ctx: dict) -> list[str]:
    """The command line of a data command over the demo data, without inputs and outputs."""
    demo = str(ctx["demo"])
    if name == "dedup":
        return ["dedup", "--against", str(ctx["demo"] / "eval.tsv"), "--image-root", demo]
    if name == "score":
        return ["score", "--judge", "fake-judge", "--base-url", ctx["judge"].url, "--keep-all", "--max-retries", "0",
                "--image-root", demo]
    if name == "perplexity":
        return ["perplexity", "--model", str(ctx["model"]), "--keep-all", "--device", "cpu", "--image-root", demo]
    if name == "mix":
        return ["mix", "--tokenizer", str(ctx["model"]), "--no-cache", "--image-root", demo,
                "--share", "medical/multimodal=0.4", "--share", "medical/text=0.2",
                "--share", "general/multimodal=0.25", "--share", "general/text=0.15"]
    raise ValueError(name)


def environment(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run(args: list[str], *, stdin=None, input: bytes | None = None, env: dict | None = None, cwd: Path | None = None,
        timeout: float = 180, shell_prefix: str | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (text output). `stdin` may be a file object or subprocess.DEVNULL."""
    command = [sys.executable, "-m", "aloe_cli", *args]
    if shell_prefix is not None:  # run through bash, for <(...), <&- and > /dev/full
        command = ["bash", "-c", shell_prefix.replace("ALOE", " ".join(map(_quote, command)))]
    proc = subprocess.run(command, stdin=stdin, input=input, capture_output=True, env=env or environment(),
                          cwd=cwd or ROOT, timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def start(args: list[str], *, env: dict | None = None, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
          new_session: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "aloe_cli", *args], stdin=stdin, stdout=stdout,
                            stderr=subprocess.PIPE, env=env or environment(), cwd=ROOT,
                            start_new_session=new_session)


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The run failed with `code`, printed no traceback, and its error line holds every fragment."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert lines, result.stderr
    line = lines[-1]
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def assert_accounted(report: Path, read: int, output: Path | None = None, rejects: Path | None = None) -> dict:
    """Nothing lost: the report read every record, read = kept + rejected, and the files hold them."""
    summary = json.loads(report.read_text())
    assert summary["read"] == read, summary
    assert summary["read"] == summary["kept"] + summary["rejected"], summary
    if output is not None and summary["stage"] != "mix":
        assert len(lines_of(output)) == summary["emitted"], summary
    if rejects is not None:
        assert len(lines_of(rejects)) == summary["rejected"], summary
    return summary


# ----------------------------------------------------------------------------- FIFOs

class FifoWriter:
    """Makes a FIFO and writes `data` into it from a thread, in small pieces, as a producer process would."""

    def __init__(self, path: Path, data: bytes, *, chunk: int = 4096):
        os.mkfifo(path)
        self.path, self.data, self.chunk = path, data, chunk
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, daemon=True)
        self._thread.start()

    def _write(self) -> None:
        try:
            with open(self.path, "wb") as fifo:  # blocks until the reader opens it
                for start in range(0, len(self.data), self.chunk):
                    fifo.write(self.data[start:start + self.chunk])
                    fifo.flush()
        except BrokenPipeError:
            pass  # the reader went away: the test's assertions say whether that was right
        except BaseException as exc:  # noqa: BLE001 - reported by close()
            self.error = exc

    def close(self) -> None:
        if self._thread.is_alive():
            # A reader that never opened the FIFO leaves the writer blocked in open(): open it to free it.
            with contextlib.suppress(OSError):
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
                os.close(fd)
        self._thread.join(30)
        assert self.error is None, self.error


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Poll until `condition()` holds (failing if `proc` exits first or the time runs out)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the command to get to work")
        time.sleep(0.05)


def terminate_when(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120,
                   grace: float = 60, signum: int = signal.SIGTERM, to_group: bool = False,
                   feed: bytes | None = None) -> str:
    """Write `feed` to stdin (left open), wait for `condition`, send `signum` (to the process, or its whole
    group), wait for the exit; returns stderr. The process never outlives it."""
    try:
        if feed is not None:
            proc.stdin.write(feed)
            proc.stdin.flush()
        wait_for(condition, proc, timeout=timeout)
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        proc.wait(timeout=grace)
        return proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):  # stdin whose reader is gone
                    stream.close()


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def leftovers(folder: Path, keep: tuple[str, ...] = ()) -> list[str]:
    """Everything in `folder` (hidden files included) except the names in `keep`."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep) if folder.exists() else []


# ----------------------------------------------------------------------------- small and read-only filesystems

@contextlib.contextmanager
def mounted_tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted on `folder` (e.g. "size=64k" for a disk that fills, "ro" for a read-only one).
    Skips the test, saying why, where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small or read-only filesystem")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip() or made.returncode}); needs root or "
                    "CAP_SYS_ADMIN")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
