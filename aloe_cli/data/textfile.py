"""Reading the small text files a command is pointed at (recipes, chat templates, thresholds, prompts).

A binary file given where text belongs (an image as a chat template, a parquet file as thresholds) is one
line naming the file and what it was meant to be, never a `UnicodeDecodeError` traceback, and never text
full of NUL bytes that reaches a template engine or a judge.
"""

from __future__ import annotations

import os

from aloe_cli.errors import AloeError


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of `path` (a leading BOM dropped); AloeError naming `what` and the file otherwise."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise AloeError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise AloeError(f"{what} {path} is a folder, not a file") from None
    except OSError as exc:
        raise AloeError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise AloeError(f"{what} {path} is not a text file (a NUL byte at offset {nul}); give a UTF-8 text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AloeError(f"{what} {path} is not a UTF-8 text file (byte 0x{data[exc.start]:02x} at offset "
                        f"{exc.start})") from None
