"""Checking where a command will write before it reads anything.

Every data command names its inputs and its outputs (`-o`, `--rejects`,
`--report`, index and cache files) and calls `check_destinations` first:

- two outputs, or an output and an input, that are the same file are
  refused (`PathConflict`, a usage error): same inode (hard links, `./x` and
  `x`, symlinks), or the same path for a file that does not exist yet.
  Standard output counts as the file or pipe it is connected to, so
  `--rejects /dev/stdout` while records go to stdout is a conflict, and so is
  `-i x.jsonl > x.jsonl` (the shell has already emptied x.jsonl);
- `-` may be named by one output only (records, rejects or report);
- every output file must be writable where it is going: not a folder, in a
  folder that exists, is a folder and accepts a new file (tried, not guessed
  from mode bits, which root ignores; a read-only mount or an immutable
  folder says no). A full disk cannot be known before; writes that fail
  later are one-line errors and leave no partial or temporary file
  (`io.atomic_path`).

Terminals and devices such as /dev/null are not files: they never conflict.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aloe_cli.errors import AloeError, UsageError

STDIO = "-"


class PathConflict(UsageError):
    """Two options name the same file, or `-` twice: a usage error (exit 2). The message reads on from
    the option's name ("--rejects: ...")."""


@dataclass(frozen=True)
class Named:
    """A path and the option (or argument) that named it, for messages."""

    option: str
    path: str


def _identity(path: str) -> tuple | None:
    """What makes two names the same file: (device, inode) for files and pipes that exist, the resolved
    path for files still to be made, None for terminals, devices and folders (they never conflict)."""
    try:
        info = os.stat(path) if path != STDIO else None
    except OSError:
        return ("path", os.path.realpath(path))
    if info is None:
        return None
    if stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode) or stat.S_ISSOCK(info.st_mode):
        return ("inode", info.st_dev, info.st_ino)
    return None


def _fd_identity(fd: int) -> tuple | None:
    try:
        info = os.fstat(fd)
    except OSError:
        return None
    if stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode) or stat.S_ISSOCK(info.st_mode):
        return ("inode", info.st_dev, info.st_ino)
    return None


def _describe(named: Named) -> str:
    if named.path == STDIO:
        return f"{named.option} - (standard {'input' if named.option in ('-i', '--input') else 'output'})"
    return f"{named.option} {named.path}"


def check_destinations(inputs: Sequence[Named], outputs: Sequence[Named]) -> None:
    """Refuse colliding paths (PathConflict) and outputs that cannot be written (AloeError); see the module."""
    check_conflicts(inputs, outputs)
    for named in outputs:
        check_writable(named)


def check_conflicts(inputs: Sequence[Named], outputs: Sequence[Named]) -> None:
    """PathConflict when two outputs, or an output and an input, are the same file, or `-` is named by two
    outputs; AloeError when an input is standard input and it is closed. Nothing is created or probed."""
    from_stdin = [named for named in inputs if named.path == STDIO]
    if sys.stdin is None and from_stdin:
        raise AloeError(f"standard input is closed: give the input with {from_stdin[0].option} FILE")
    to_stdout = [named for named in outputs if named.path == STDIO]
    if len(to_stdout) > 1:
        names = " and ".join(named.option for named in to_stdout)
        raise PathConflict(f"{names} both write to standard output, which would mix them into one stream: "
                           "name a file for all but one of them", to_stdout[-1].option)
    stdout_identity = _fd_identity(1) if to_stdout and sys.stdout is not None else None
    stdin_identity = _fd_identity(0) if any(n.path == STDIO for n in inputs) and sys.stdin is not None else None
    seen: list[tuple[tuple, Named]] = []
    if stdout_identity is not None:
        seen.append((stdout_identity, to_stdout[0]))
    for named in outputs:
        if named.path == STDIO:
            continue
        identity = _identity(named.path)
        if identity is None:
            continue
        for other_identity, other in seen:
            if identity == other_identity:
                raise PathConflict(f"{named.path} is the same file as {_describe(other)}: "
                                   "one would overwrite the other", named.option)
        seen.append((identity, named))
    for named in inputs:
        identity = stdin_identity if named.path == STDIO else _identity(named.path)
        if identity is None:
            continue
        for other_identity, other in seen:
            if identity == other_identity:
                where = "standard output" if other.path == STDIO else other.path
                raise PathConflict(f"{where} is the same file as the input {_describe(named)}: "
                                   "writing it would destroy the input (name another output file)", other.option)


def check_folder(named: Named) -> None:
    """An AloeError unless `named.path` can be an output folder: an existing folder that takes new files, or
    a folder still to be made whose nearest existing ancestor is a folder that takes new files."""
    path = named.path
    try:
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    except OSError as exc:  # e.g. a path through a regular file: ENOTDIR
        raise AloeError(f"cannot write {named.option} {path}: {_first_file(path)} is a file, not a folder "
                        f"({exc.strerror})") from None
    if info is not None and not stat.S_ISDIR(info.st_mode):
        raise AloeError(f"{named.option} {path} is a file; name a folder")
    existing = path if info is not None else _first_file(os.path.abspath(path))
    if not os.path.isdir(existing):
        raise AloeError(f"cannot write {named.option} {path}: {existing} is a file, not a folder")
    _probe(existing, named)


def check_writable(named: Named) -> None:
    """An AloeError unless `named.path` can be written: not a folder, in a folder that takes a new file."""
    path = named.path
    if path == STDIO:
        if sys.stdout is None:
            raise AloeError(f"{named.option}: standard output is closed; name a file")
        return
    try:
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    except OSError as exc:  # e.g. a path through a regular file: ENOTDIR
        raise AloeError(f"cannot write {named.option} {path}: {exc.strerror}") from None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise AloeError(f"{named.option} {path} is a folder; name a file (e.g. {os.path.join(path, 'out.jsonl')})")
    if info is not None and not stat.S_ISREG(info.st_mode):
        return  # a FIFO or a device (/dev/null): written in place, nothing to create beside it
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(folder):
        raise AloeError(f"output folder does not exist: {folder} (for {named.option} {path})")
    if not os.path.isdir(folder):
        raise AloeError(f"cannot write {named.option} {path}: {_first_file(folder)} is a file, not a folder")
    _probe(folder, named)


def _probe(folder: str, named: Named) -> None:
    """Create and remove a file in `folder`: the one sure test (root ignores mode bits; a read-only mount or
    an immutable folder says no)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".aloe-probe-")
    except OSError as exc:
        raise AloeError(f"cannot write {named.option} {named.path}: {folder} does not take new files "
                        f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def _first_file(folder: str) -> str:
    """The deepest existing ancestor of `folder` (the regular file a path runs through)."""
    current = folder
    while current and not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current or "."


def named(option: str, paths: Iterable[str | os.PathLike | None]) -> list[Named]:
    """`Named` entries for the paths that are given (None skipped)."""
    return [Named(option, str(path)) for path in paths if path is not None]
