"""Checks a command makes over its whole input before the work starts.

`unresolved_images` finds the records whose image paths do not resolve to a file: a mixture moved away
from its images, or written by a tool that kept paths relative to each source's own folder. Commands that
load a model (score, perplexity, train, eval) call it first, so a run fails in seconds, with the count and
the first records named, instead of after the model has loaded; or, under `--on-error skip`, says loudly how
many records will be skipped before it starts. Only file paths are checked (a `stat` each); data URIs and
embedded bytes need no file. Inputs that can be read only once (stdin, pipes) are left to the per-record
checks of the run itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from aloe_cli.data.images import resolve_path
from aloe_cli.data.io import Item, read_paths
from aloe_cli.data.shard import ALL, Shard
from aloe_cli.data.streams import is_stream

_EXAMPLES = 3


@dataclass
class ImagePathCheck:
    """What `unresolved_images` found: records read, records with a path that does not resolve, the first few."""

    records: int = 0
    missing: int = 0
    examples: list[str] = field(default_factory=list)
    roots: set[str] = field(default_factory=set)  # the folders relative paths were resolved against

    @property
    def ok(self) -> bool:
        return self.missing == 0

    def message(self) -> str:
        """One line: how many, where the first is, and what the paths were resolved against."""
        roots = ", ".join(sorted(self.roots)) or "their input's folder"
        return (f"{self.missing} of {self.records} record(s) have image paths that do not resolve (first: "
                f"{self.examples[0]}); relative paths resolve against {roots}: pass --image-root, or keep the "
                "file beside its images (aloe mix writes paths relative to its output)")


def unresolved_images(paths: Iterable[str], image_root: str | os.PathLike | None = None,
                      shard: Shard = ALL) -> ImagePathCheck:
    """Read the regular-file inputs among `paths` (this shard of them) and stat every image path entry."""
    files = [path for path in paths if not is_stream(path)]
    return check_items(read_paths(files, image_root, shard)) if files else ImagePathCheck()


def check_items(items: Iterable[Item]) -> ImagePathCheck:
    """`unresolved_images` over items already read (each resolves against its own `image_root`)."""
    check = ImagePathCheck()
    for item in items:
        if item.record is None or item.error is not None:
            continue  # a broken record is the run's to report, with its own reason
        check.records += 1
        for position, entry in enumerate(item.record.get("images") or []):
            path = _path_of(entry)
            if path is None:
                continue
            resolved = resolve_path(path, item.image_root)
            if not resolved.is_file():
                if not Path(path).expanduser().is_absolute():
                    check.roots.add(str(item.image_root))
                check.missing += 1
                if len(check.examples) < _EXAMPLES:
                    check.examples.append(f"{item.where}: field 'images[{position}]': image file not found: "
                                          f"{resolved}")
                break
    return check


def _path_of(entry: object) -> str | None:
    if isinstance(entry, dict):
        return None if entry.get("bytes") or not isinstance(entry.get("path"), str) else entry["path"]
    if isinstance(entry, str) and entry.strip() and not entry.startswith("data:"):
        return entry
    return None
