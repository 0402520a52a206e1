"""Datasets named by a Hugging Face Hub id (`-i HuggingFaceH4/llava-instruct-mix-vsft`), or a dataset repository
folder (a clone or download of one: data files, a README with its configs), read through `datasets.load_dataset`.

    rows = hub_dataset_rows("org/name:test", units)   # (row index, row) of the split named, else `train`

`ID[:SPLIT]` picks a split; without one, the `train` split when there is one, else every split in order. The
Hub's cache and offline mode are datasets' own (`HF_HOME`, `HF_DATASETS_OFFLINE=1`). Image features stay
undecoded `{bytes, path}` structs, as in every other reader.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from aloe_cli.errors import AloeError

# `name` or `org/name`: letters, digits, '-', '_', '.'; not starting with '.' or '-'. Models and datasets alike.
HUB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?$")
_FILE_SUFFIXES = (".jsonl", ".json", ".ndjson", ".gz", ".parquet", ".tsv", ".csv", ".arrow")


def split_reference(reference: str) -> tuple[str, str | None]:
    """`org/name:split` -> (`org/name`, `split`); a reference without `:` has no split."""
    name, _, split = reference.partition(":")
    return name, (split or None)


def is_dataset_id(reference: str) -> bool:
    """`org/name[:split]` that is no local path: an owner, a name and no file suffix (so a mistyped
    `data/train.jsonl` stays "not found" instead of going to the Hub)."""
    if os.path.exists(reference):
        return False
    name, split = split_reference(reference)
    if name.count("/") != 1 or not HUB_ID.match(name) or name.lower().endswith(_FILE_SUFFIXES):
        return False
    return split is None or re.fullmatch(r"[A-Za-z0-9_.-]+", split) is not None


def hub_dataset_rows(reference: str, units=None) -> Iterator[tuple[int, dict]]:
    """Rows of a Hub dataset id or a dataset repository folder, loaded with `datasets.load_dataset`."""
    try:
        import datasets
    except ImportError:
        raise AloeError(f"{reference}: reading a Hub dataset needs the datasets package "
                        "(pip install 'aloe-cli[datasets]')") from None
    from datasets.utils import logging as datasets_logging

    datasets_logging.set_verbosity_error()  # no "using the cached version" lines among ours
    datasets_logging.disable_progress_bar()
    name, split = (reference, None) if Path(reference).is_dir() else split_reference(reference)
    try:
        loaded = datasets.load_dataset(name)
    except Exception as exc:  # datasets raises many kinds: offline, not found, no data files, gated
        where = "dataset folder" if Path(name).is_dir() else "Hub dataset"
        offline = " (HF_DATASETS_OFFLINE is set and it is not in the cache)" if _offline() and not Path(
            name).is_dir() else ""
        raise AloeError(f"cannot load {where} {name}{offline}: {_first_line(exc)}") from None
    if split is not None:
        if split not in loaded:
            raise AloeError(f"{reference}: no split {split!r} (it has {', '.join(loaded)})")
        splits = [loaded[split]]
    else:
        splits = [loaded["train"]] if "train" in loaded else list(loaded.values())
    yield from dataset_rows(splits, units)


def dataset_rows(splits, units=None) -> Iterator[tuple[int, dict]]:
    """(row index, row) of every split in order, counted across them; with `units`, only this shard's rows."""
    first_row = 0
    for split in splits:
        table = split.with_format("arrow")  # Arrow rows: Image features stay {bytes, path} structs
        rows = len(split)
        picks = range(rows) if units is None else units.take_many(rows)
        for start in range(0, len(picks), 1024):
            chunk = picks[start:start + 1024]
            batch = table[chunk.start:chunk.stop] if isinstance(chunk, range) else table[chunk]
            yield from zip((first_row + pick for pick in chunk), batch.to_pylist())
        first_row += rows


def _offline() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes", "on") or os.environ.get(
        "HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


__all__ = ["HUB_ID", "dataset_rows", "hub_dataset_rows", "is_dataset_id", "split_reference"]
