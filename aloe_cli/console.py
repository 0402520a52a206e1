"""Everything that talks to people goes to stderr, through here.

stdout is reserved for records. When stderr is a terminal we use rich
(progress bars, tables); otherwise plain lines, so SLURM logs stay readable.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from rich.console import Console

_console: Console | None = None


def ensure_stderr() -> None:
    """Give a run started with stderr closed (`2>&-`) a stderr that discards what it is told.

    Python then sets `sys.stderr` to None, and `print(..., file=None)` would write the summary into the
    data on stdout; worse, the next file the run opens would get descriptor 2 and every message would land
    in it. Descriptor 2 is pointed at the null device before anything is opened, so the run writes its data
    and exits as it would with stderr open.
    """
    try:
        os.fstat(2)
        if sys.stderr is not None:
            return
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        if devnull != 2:
            os.dup2(devnull, 2)
            os.close(devnull)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)


def console() -> Console:
    global _console
    if _console is None:
        _console = Console(stderr=True, highlight=False, soft_wrap=True)
    return _console


def interactive() -> bool:
    return sys.stderr.isatty()


def log(message: str) -> None:
    if interactive():
        console().print(message)
    else:
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    log(f"aloe: warning: {message}")


# ----------------------------------------------------------------------------- progress
#
# One facility for every long command: `progress(description, total, unit=...)` is a context manager whose value
# has `advance(n, **figures)` and `update(completed=None, **figures)`. On a terminal it is a rich bar with the
# rate and the ETA; otherwise (a pipe, a SLURM log) a timestamped heartbeat line every PROGRESS_INTERVAL seconds,
# and a closing line when at least one heartbeat was written. Figures (loss, lr, accuracy, ...) follow the counts.

# Seconds between heartbeat lines; ALOE_PROGRESS_INTERVAL overrides it (0: a line at every advance).
PROGRESS_INTERVAL = 30.0

REDRAWS_PER_SECOND = 2  # the rich bar's

# (description, total or None) -> a context manager whose value has advance(n); `progress` is the one in use.
ProgressFactory = Callable[..., AbstractContextManager[Any]]


class NullProgress:
    """Progress that shows nothing (no one is watching)."""

    def advance(self, n: int = 1, **figures: Any) -> None:
        pass

    def update(self, completed: int | None = None, **figures: Any) -> None:
        pass


@contextmanager
def null_progress(description: str = "", total: int | None = None, **options: Any) -> Iterator[NullProgress]:
    """`progress`'s stand-in for the core's default: same signature, shows nothing."""
    yield NullProgress()


def format_figures(figures: dict[str, Any]) -> str:
    """`loss 0.5123, lr 3.75e-05`: floats to four significant digits, the rest as given."""
    return ", ".join(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
                     for name, value in figures.items() if value is not None)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class _Heartbeat:
    """Counts and figures, written as one timestamped line at most every `interval` seconds."""

    def __init__(self, description: str, total: int | None, unit: str, interval: float, completed: int = 0):
        self.description, self.total, self.unit, self.interval = description, total, unit, interval
        self.start_count = self.completed = completed
        self.figures: dict[str, Any] = {}
        self.start = self.last = time.monotonic()
        self.beats = 0

    def advance(self, n: int = 1, **figures: Any) -> None:
        self.update(self.completed + n, **figures)

    def update(self, completed: int | None = None, **figures: Any) -> None:
        if completed is not None:
            self.completed = completed
        if figures:
            self.figures.update(figures)
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._beat(now)

    def close(self) -> None:
        if self.beats:
            self._beat(time.monotonic(), closing=True)

    def _beat(self, now: float, closing: bool = False) -> None:
        self.beats += 1
        elapsed = now - self.start
        rate = (self.completed - self.start_count) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.completed}/{self.total} {self.unit} ({100 * self.completed / self.total:.0f}%)"
                 if self.total else f"{self.completed} {self.unit}", f"{rate:.3g} {self.unit}/s"]
        if closing:
            parts.append(f"done in {format_duration(elapsed)}")
        else:
            parts.append(f"elapsed {format_duration(elapsed)}")
            if self.total and rate > 0 and self.completed < self.total:
                parts.append(f"ETA {format_duration((self.total - self.completed) / rate)}")
        figures = format_figures(self.figures)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"[{stamp}] {self.description}: {', '.join(parts)}" + (f", {figures}" if figures else ""),
              file=sys.stderr, flush=True)


_HEARTBEAT = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] (.+)$")


def heartbeat_text(line: str) -> str | None:
    """What a heartbeat line (as `_Heartbeat` writes it) says, without its time stamp; None for other lines."""
    found = _HEARTBEAT.match(line.rstrip("\r\n"))
    return found.group(1) if found else None


class _RichProgress:
    def __init__(self, progress, task):
        self._progress = progress
        self._task = task
        self._figures: dict[str, Any] = {}

    def advance(self, n: int = 1, **figures: Any) -> None:
        if figures:
            self._figures.update(figures)
            self._progress.update(self._task, advance=n, figures=format_figures(self._figures))
        else:
            self._progress.advance(self._task, n)

    def update(self, completed: int | None = None, **figures: Any) -> None:
        self._figures.update(figures)
        self._progress.update(self._task, completed=completed, figures=format_figures(self._figures))


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("ALOE_PROGRESS_INTERVAL", PROGRESS_INTERVAL)))
    except ValueError:
        return PROGRESS_INTERVAL


@contextmanager
def progress(description: str, total: int | None = None, *, unit: str = "records",
             completed: int = 0) -> Iterator[_Heartbeat | _RichProgress]:
    """A rich bar (count, rate, ETA, figures) on a terminal; heartbeat lines otherwise."""
    if not interactive():
        beat = _Heartbeat(description, total, unit, _interval(), completed)
        try:
            yield beat
        finally:
            beat.close()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    counts = [MofNCompleteColumn(), TaskProgressColumn()] if total else [TextColumn(f"{{task.completed}} {unit}")]
    columns = [TextColumn("{task.description}"), BarColumn(), *counts, _RateColumn(unit), TimeElapsedColumn(),
               *([TimeRemainingColumn()] if total else []), TextColumn("{task.fields[figures]}")]
    # Two redraws a second: each costs about a millisecond of CPU, taken from the work it shows.
    with Progress(*columns, console=console(), transient=True, refresh_per_second=REDRAWS_PER_SECOND) as bar:
        yield _RichProgress(bar, bar.add_task(description, total=total, completed=completed, figures=""))


def _rate_column_class():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        """Units per second, as rich measures them (over the last half minute)."""

        def __init__(self, unit: str):
            super().__init__()
            self.unit = unit

        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.3g} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")

    return RateColumn


def _RateColumn(unit: str):  # noqa: N802 - a column; rich.progress is imported only when a bar is drawn
    return _rate_column_class()(unit)


@contextmanager
def live_line(interval: float | None = None) -> Iterator[Callable[[str], None]]:
    """One line that follows a job someone waits for (a subprocess's newest heartbeat): its value, show(text),
    redraws it in place on a terminal; otherwise prints it when it has changed and the last one printed is at
    least `interval` seconds old (the heartbeat interval by default), so a log gets a line now and then."""
    if interactive():
        from rich.live import Live
        from rich.text import Text

        with Live(Text(""), console=console(), transient=True, refresh_per_second=REDRAWS_PER_SECOND) as live:
            yield lambda text: live.update(Text(text, no_wrap=True, overflow="ellipsis"))
        return
    every = _interval() if interval is None else interval
    last = {"at": -math.inf, "text": ""}

    def show(text: str) -> None:
        now = time.monotonic()
        if text != last["text"] and now - last["at"] >= every:
            last.update(at=now, text=text)
            print(text, file=sys.stderr, flush=True)

    yield show


def print_table(title: str, headers: list[str], rows: list[list[object]]) -> None:
    """A table on a terminal, aligned plain text otherwise."""
    if interactive():
        from rich.table import Table

        table = Table(title=title)
        for header in headers:
            table.add_column(header, justify="left" if header == headers[0] else "right")
        for row in rows:
            table.add_row(*(str(cell) for cell in row))
        console().print(table)
        return
    cells = [headers] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [title]
    for row in cells:
        cells_aligned = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        lines.append("  ".join(cells_aligned))
    print("\n".join(lines), file=sys.stderr, flush=True)


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """For work that writes no data (training, building a model): whatever the libraries print to stdout
    (DeepSpeed's logger, compiler output, C extensions) goes to stderr, at the file-descriptor level."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)

