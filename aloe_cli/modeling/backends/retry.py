"""Ask until the reply parses: the loop every judge runs on top of a generation backend.

    outcomes = ask_until_parsed(backend, requests, GenerationParams(max_new_tokens=256), parse_verdict,
                                parse_retries=2, retry_temperature=0.7, counters=counters)

Every request is sent once, greedily; each reply goes through `parse` (which raises ValueError when it cannot
read it). The requests whose reply did not parse are sent again, sampling at `retry_temperature` with a seed
per attempt (`seed + attempt`), so the retry can differ, up to `parse_retries` more times. Each request ends
as one outcome:

- `Parsed(value, reply, attempts)`: `parse` read the reply;
- `Unparsed(reply, attempts)`: no reply parsed, after every attempt (the last reply is kept, for people);
- `Failed(failure, attempts)`: the backend could not serve it: after its own retries (`failure.reason` is
  `REQUEST_FAILED`, the request was sent), or before sending (an image that does not load).

`counters` counts what reached the backend: requests sent (parse retries included, cache hits not), cache
hits, parse retries, unparseable outcomes, failed requests, and requests that failed before they were sent.
A response cache in front of the backend (`cache.CachedBackend`) should keep only replies that parse, so a
rerun asks again exactly for those; `key` gives a request its cache key for each attempt when the key must
differ per attempt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from aloe_cli.modeling.backends import (
    REQUEST_FAILED,
    Completion,
    Failure,
    GenerationBackend,
    GenerationParams,
    GenerationRequest,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Parsed(Generic[T]):
    value: T
    reply: str
    attempts: int


@dataclass(frozen=True)
class Unparsed:
    reply: str  # the last reply
    attempts: int


@dataclass(frozen=True)
class Failed:
    failure: Failure
    attempts: int

    @property
    def sent(self) -> bool:
        """The request reached the backend (and failed after its retries), rather than failing while built."""
        return self.failure.reason == REQUEST_FAILED


Outcome = Parsed | Unparsed | Failed


@dataclass
class AskCounters:
    requests: int = 0  # requests sent to the backend (parse retries included; not cache hits, not failed to build)
    cached: int = 0  # replies served from a response cache
    parse_retries: int = 0  # requests sent again because the reply did not parse
    unparseable: int = 0  # requests whose every reply failed to parse
    failed: int = 0  # requests sent that failed after the backend's retries
    not_sent: int = 0  # requests that failed before they could be sent (a bad image)


def ask_until_parsed(backend: GenerationBackend, requests: Sequence[GenerationRequest], params: GenerationParams,
                     parse: Callable[[str], T], *, parse_retries: int, retry_temperature: float, seed: int = 0,
                     key: Callable[[int, int], str | None] | None = None,
                     counters: AskCounters | None = None) -> list[Outcome]:
    """One outcome per request, in the requests' order; see the module docstring."""
    counters = counters if counters is not None else AskCounters()
    outcomes: list[Outcome | None] = [None] * len(requests)
    last_reply: dict[int, str] = {}
    pending = list(range(len(requests)))
    for attempt in range(parse_retries + 1):
        if not pending:
            break
        asked = pending
        unparsed: list[int] = []

        def on_done(position: int, completion: Completion, asked=asked, unparsed=unparsed, attempt=attempt) -> None:
            index = asked[position]
            if getattr(completion, "cached", False):
                counters.cached += 1
            elif not isinstance(completion, Failure) or completion.reason == REQUEST_FAILED:
                counters.requests += 1
                counters.parse_retries += attempt > 0
            if isinstance(completion, Failure):
                if completion.reason == REQUEST_FAILED:
                    counters.failed += 1
                else:
                    counters.not_sent += 1
                outcomes[index] = Failed(completion, attempt + 1)
                return
            try:
                outcomes[index] = Parsed(parse(completion.text), completion.text, attempt + 1)
            except ValueError:
                last_reply[index] = completion.text
                unparsed.append(index)

        sampling = replace(params, temperature=0.0 if attempt == 0 else retry_temperature, seed=seed + attempt)
        batch = [requests[index] if key is None else replace(requests[index], key=key(index, attempt))
                 for index in asked]
        backend.generate(batch, sampling, on_done)
        pending = sorted(unparsed)
    for index in pending:
        counters.unparseable += 1
        outcomes[index] = Unparsed(last_reply.get(index, ""), parse_retries + 1)
    return outcomes  # type: ignore[return-value]


__all__ = ["AskCounters", "Failed", "Outcome", "Parsed", "Unparsed", "ask_until_parsed"]
