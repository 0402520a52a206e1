"""Generation backends shared by every command that generates (`score`, `eval`, `infer`).

The contract (implementations: `hf.py`, a local model with batched greedy generation; `openai.py`, an
OpenAI-compatible server such as vLLM, SGLang or TGI):

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


@dataclass
class GenerationRequest:
    """One chat to continue: messages in the record schema plus the images they refer to."""

    messages: list[dict]
    images: list = field(default_factory=list)  # path | data URI | {"bytes", "path"} | PIL image
    image_root: Path | None = None
    key: str | None = None  # a stable cache key (see `request_key`), or None for no caching
    response_format: dict | None = None  # a JSON schema the reply must follow, where the server supports it


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Reply:
    text: str


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


__all__ = ["Completion", "Failure", "GenerationBackend", "GenerationParams", "GenerationRequest", "OnDone", "Reply"]
