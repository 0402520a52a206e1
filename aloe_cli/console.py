"""Everything that talks to people goes to stderr, through here.

stdout is reserved for records. When stderr is a terminal we use rich
(progress bars, tables); otherwise plain lines, so SLURM logs stay readable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

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


class NullProgress:
    """Progress that shows nothing (stderr is not a terminal, or no one is watching)."""

    def advance(self, n: int = 1) -> None:
        pass


@contextmanager
def null_progress(description: str = "", total: int | None = None) -> Iterator[NullProgress]:
    """`progress`'s stand-in for the core's default: same signature, shows nothing."""
    yield NullProgress()


class _RichProgress:
    def __init__(self, progress, task):
        self._progress = progress
        self._task = task

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)


@contextmanager
def progress(description: str, total: int | None = None) -> Iterator[NullProgress | _RichProgress]:
    """A progress bar on a terminal, nothing otherwise."""
    if not interactive():
        yield NullProgress()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console(), transient=True) as bar:
        yield _RichProgress(bar, bar.add_task(description, total=total))


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

