"""Loss-token counts remembered in SQLite, so that re-running a mix with another recipe does not tokenize again.

A count is keyed by a hash of the counter's fingerprint (tokenizer, training
chat template, template variables, counting-rule version) and the record's
messages: entries of different tokenizers or templates never collide, and a
change of the counting rule never reads an old count.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

import orjson

from aloe_cli.errors import AloeError

Messages = list[dict]


def default_cache_path() -> Path:
    """$ALOE_CACHE_DIR, else $XDG_CACHE_HOME/aloe, else ~/.cache/aloe; the file is loss_tokens.sqlite."""
    root = os.environ.get("ALOE_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "aloe")
    return Path(root) / "loss_tokens.sqlite"


def conversation_key(namespace: str, messages: Messages) -> bytes:
    """16-byte key of one conversation under a counter's fingerprint."""
    canonical = orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=16, key=namespace.encode("ascii")[:64]).digest()


class TokenCache:
    """Loss-token counts in SQLite: one table (key BLOB PRIMARY KEY, tokens INTEGER).

    Keys come from `conversation_key`, so entries of different tokenizers or
    templates never collide and one file serves every recipe. Safe to share
    between processes (WAL journal, busy timeout).
    """

    _QUERY_CHUNK = 500

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.hits = 0
        self.misses = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS loss_tokens (key BLOB PRIMARY KEY, tokens INTEGER NOT NULL)"
                             " WITHOUT ROWID")
        except (OSError, sqlite3.Error) as exc:
            raise AloeError(f"cannot open the token cache {self.path}: {exc}") from None

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, int]:
        found: dict[bytes, int] = {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), self._QUERY_CHUNK):
            chunk = unique[i:i + self._QUERY_CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(self._db.execute(f"SELECT key, tokens FROM loss_tokens WHERE key IN ({marks})", chunk))
        self.hits += sum(1 for key in keys if key in found)
        self.misses += sum(1 for key in keys if key not in found)
        return found

    def put_many(self, entries: Iterable[tuple[bytes, int]]) -> None:
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO loss_tokens (key, tokens) VALUES (?, ?)", entries)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> TokenCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
