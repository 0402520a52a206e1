"""Generation backends shared by every command that generates (`score`, `eval`, `infer`).

The contract (implementations: `hf.py`, a local model with batched greedy generation; `openai.py`, an
OpenAI-compatible server such as vLLM, SGLang or TGI; `cache.CachedBackend` puts a resumable response cache
in front of either; `factory.build_backend` builds one from the shared command-line options):

    backend.generate(requests, params, on_done)   # on_done(index, Reply | Failure), in the caller's thread
    backend.close()

A request is one chat in the record schema (TRL's conversational format: the n-th `{"type": "image"}`
placeholder is the n-th entry of `images`), so a judge prompt, an evaluation item and an inference record
all go through the same code. Backends never print and never raise for one bad request: a request that
cannot be served comes back as a `Failure` with a stable reason code; only a fatal condition (a server that
refuses the credentials, a model that cannot load) raises `AloeError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aloe_cli.data.records import image_placeholder_count
from aloe_cli.errors import RecordError

# The reason of a Failure for a request the server would not answer (after its retries).
REQUEST_FAILED = "request_failed"


@dataclass
class GenerationRequest:
    """One chat to continue: messages in the record schema plus the images they refer to."""

    messages: list[dict]
    images: list = field(default_factory=list)  # path | data URI | {"bytes", "path"} | raw bytes
    image_root: Path | None = None
    key: str | None = None  # a stable cache key (see `cache.request_key`), or None for no caching
    response_format: dict | None = None  # a JSON schema the reply must follow, where the server supports it
    id: str | None = None  # the record or item id, written beside a cached reply for people; not part of the key


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Reply:
    text: str
    cached: bool = False  # served from a response cache, not generated in this run


@dataclass(frozen=True)
class Failure:
    """The request could not be served (a bad image, a request that failed after its retries)."""

    reason: str
    message: str


Completion = Reply | Failure
OnDone = Callable[[int, Completion], None]


class GenerationBackend(Protocol):
    name: str

    def generate(self, requests: list[GenerationRequest], params: GenerationParams, on_done: OnDone) -> None:
        """Serve every request; call on_done(index, completion) as each finishes (any order)."""

    def close(self) -> None: ...


def check_image_count(request: GenerationRequest) -> None:
    """RecordError unless the request has exactly one image per `{"type": "image"}` placeholder."""
    placeholders = image_placeholder_count(request.messages)
    if placeholders != len(request.images):
        raise RecordError("image_count_mismatch", f"{placeholders} image placeholder(s) in messages but "
                          f"{len(request.images)} image(s)", field="images")


def indexed(error: RecordError, position: int) -> RecordError:
    """The error of one image entry, naming `images[position]`."""
    return RecordError(error.reason, error.message, field=f"images[{position}]")


__all__ = ["REQUEST_FAILED", "Completion", "Failure", "GenerationBackend", "GenerationParams", "GenerationRequest",
           "OnDone", "Reply", "check_image_count", "indexed"]
