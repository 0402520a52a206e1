"""A resumable response cache shared by every command that generates.

    cache = ResponseCache("replies.jsonl")                   # loads what an earlier run wrote
    backend = CachedBackend(build_backend(...), cache)       # hits are answered at once, misses generated
    request = GenerationRequest(messages, images, key=request_key(model, messages, images, root))

The file is append-only JSONL, one `{"key": ..., "reply": ..., "id": ...}` per line, flushed line by
line, so a killed run keeps every reply that arrived and a rerun generates only the rest. A torn last line
(the process died mid-write) is skipped and counted. Keys are SHA-256 digests of the model, the messages,
the bytes of every image and the requested reply format, so a reply is reused exactly when the same model
would be asked the same thing (moving the images elsewhere does not invalidate it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aloe_cli.data.images import read_source
from aloe_cli.errors import AloeError, RecordError
from aloe_cli.modeling.backends import (
    Completion,
    GenerationBackend,
    GenerationParams,
    GenerationRequest,
    OnDone,
    Reply,
    indexed,
)


def image_bytes(entry: Any, image_root: Any) -> bytes:
    """The stored bytes of one image entry (not decoded): what a cache key hashes."""
    source, _ = read_source(entry, image_root)
    if isinstance(source, bytes):
        return source
    try:
        return source.read_bytes()
    except OSError as exc:
        raise RecordError("image_unreadable", f"cannot read image {source}: {exc.strerror}") from None


def request_key(model: str, messages: list[dict], images: Sequence = (), image_root: Any = None, *,
                response_format: dict | None = None, salt: str = "") -> str:
    """A stable key for one request; RecordError naming `images[n]` when an image cannot be read.

    `salt` separates replies that differ by more than the request (e.g. max_new_tokens for evaluation).
    """
    digest = hashlib.sha256()
    image_digests = []
    for position, entry in enumerate(images):
        try:
            image_digests.append(hashlib.sha256(image_bytes(entry, image_root)).hexdigest())
        except RecordError as error:
            raise indexed(error, position) from None
    for part in (model, json.dumps(messages, sort_keys=True, ensure_ascii=False), *image_digests,
                 json.dumps(response_format, sort_keys=True), salt):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


class ResponseCache:
    """key -> reply text, backed by an append-only JSONL file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.replies: dict[str, str] = {}
        self.bad_lines = 0
        self._handle = None
        if self.path.exists():
            self._load()
        elif not self.path.parent.exists():
            raise AloeError(f"cache folder does not exist: {self.path.parent}")

    def _load(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        self._load_line(line)
        except (OSError, UnicodeDecodeError) as exc:
            raise AloeError(f"cannot read cache {self.path}: {exc}") from None

    def _load_line(self, line: str) -> None:
        try:
            entry = json.loads(line)
            key, reply = entry["key"], entry["reply"]
        except (ValueError, KeyError, TypeError):  # e.g. the half-written last line of a killed run
            self.bad_lines += 1
            return
        if not isinstance(key, str) or not isinstance(reply, str):
            self.bad_lines += 1
            return
        self.replies[key] = reply

    def __len__(self) -> int:
        return len(self.replies)

    def get(self, key: str) -> str | None:
        return self.replies.get(key)

    def put(self, key: str, reply: str, **extra: Any) -> None:
        """Store a reply now (flushed): `extra` (e.g. the record id) is written beside it for people."""
        self.replies[key] = reply
        if self._handle is None:
            self._handle = self._open_for_append()
        entry = {"key": key, "reply": reply, **{k: v for k, v in extra.items() if v is not None}}
        try:
            self._handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self._handle.flush()
        except OSError as exc:  # a full disk: one line (a torn last line is skipped when the cache is read)
            raise AloeError(f"cannot write cache {self.path}: {exc.strerror or exc}") from None

    def _open_for_append(self):
        try:
            handle = open(self.path, "a+", encoding="utf-8")
            handle.seek(0, 2)
            if handle.tell() > 0:
                handle.seek(handle.tell() - 1)
                if handle.read(1) != "\n":  # a torn last line must not swallow the next entry
                    handle.write("\n")
            return handle
        except OSError as exc:
            raise AloeError(f"cannot write cache {self.path}: {exc.strerror}") from None

    def close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            with contextlib.suppress(OSError):  # after a failed write: what could not be flushed is lost anyway
                handle.close()


class CachedBackend:
    """A backend behind a `ResponseCache`: requests with a cached reply are not generated again.

    `accept(text)` decides which replies are worth keeping (the judge keeps only replies it could parse, so
    an unparseable one is asked again on the next run); a cached reply it refuses counts as a miss.
    Requests without a key always go to the backend. Closing closes the backend and the cache.
    """

    def __init__(self, backend: GenerationBackend, cache: ResponseCache,
                 accept: Callable[[str], bool] | None = None):
        self.backend = backend
        self.cache = cache
        self.accept = accept or (lambda text: True)
        self.name = backend.name

    def generate(self, requests: list[GenerationRequest], params: GenerationParams, on_done: OnDone) -> None:
        misses: list[int] = []
        for index, request in enumerate(requests):
            text = self.cache.get(request.key) if request.key else None
            if text is not None and self.accept(text):
                on_done(index, Reply(text, cached=True))
            else:
                misses.append(index)
        if not misses:
            return  # a fully cached batch never wakes the backend (a local model is not even loaded)

        def store(position: int, completion: Completion) -> None:
            index = misses[position]
            request = requests[index]
            if isinstance(completion, Reply) and request.key and self.accept(completion.text):
                self.cache.put(request.key, completion.text, id=request.id)
            on_done(index, completion)

        self.backend.generate([requests[index] for index in misses], params, store)

    @property
    def counters(self) -> Any:
        """The backend's own counters (the openai backend counts attempts and retries), if any."""
        return getattr(self.backend, "counters", None)

    def close(self) -> None:
        try:
            self.backend.close()
        finally:
            self.cache.close()


__all__ = ["CachedBackend", "ResponseCache", "image_bytes", "request_key"]
