"""Chat completions against an OpenAI-compatible server (vLLM, SGLang, TGI, hosted APIs), on httpx's async client.

    backend = OpenAIBackend(OpenAIConfig(model="Qwen/Qwen2-VL-72B-Instruct", base_url="http://judge:8000/v1",
                                         concurrency=256), api_key=None)
    backend.generate(requests, GenerationParams(max_new_tokens=256), on_done)

- **Concurrency**: `generate` runs an event loop in the calling thread; `concurrency` worker coroutines,
  each with its own keep-alive connection, take requests off one queue, so exactly that many are in
  flight and 512 in flight cost no threads (only image encoding runs in the loop's small thread pool).
  `on_done` is called in the calling thread as each request finishes.
- **Images** are decoded locally first (a broken image fails its request as a record error, never as a
  server error) and re-encoded from their pixels alone: EXIF, XMP, ICC profiles and PNG text chunks can
  hold patient text, so none of it is ever sent. JPEGs go as JPEG (quality 95), everything else (DICOM
  included: never its own bytes) as PNG.
- **Deadline**: every attempt has an overall deadline of `timeout` seconds from sending to the last byte of
  the reply, so a server that trickles bytes cannot hold a request forever.
- **Retries**: timeouts, network errors, malformed 200 replies, HTTP 408, 429 and 5xx are retried up to
  `max_retries` times with exponential backoff (from `retry_backoff` seconds, doubling, jittered, capped
  at 60 s), waiting at least what `Retry-After` asks. Other 4xx answers fail that request; 401/403
  (credentials) and 404 (wrong URL or model) stop the run, since no retry can help.
- **Structured output**: a request with `response_format` (a JSON schema) asks for it both the OpenAI way
  (`response_format: {"type": "json_schema", ...}`) and vLLM's (`guided_json`). A server that answers
  400/422 to that is asked again with `response_format` alone, then without either; once a lower level
  works it is used for the rest of the run (`counters.structured_output` says which).
- **API key**: read from an environment variable by the caller, sent as a bearer token, and redacted
  (`***`) from every reply and message this module returns, even when a server echoes it back. Keys
  shorter than 8 characters are placeholders (`EMPTY`, `-`) that local servers ignore; masking those would
  corrupt ordinary words in replies, so they are not masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import io
import os
import random
import signal
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from PIL import Image

from aloe_cli.data.images import load_image, to_data_uri
from aloe_cli.errors import AloeError, RecordError
from aloe_cli.modeling.backends import (
    REQUEST_FAILED,
    Completion,
    Failure,
    GenerationParams,
    GenerationRequest,
    OnDone,
    Reply,
    check_image_count,
    indexed,
)

DEFAULT_BASE_URL = "http://localhost:8000/v1"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
MAX_BACKOFF = 60.0
MIN_SECRET_LENGTH = 8
ERROR_EXCERPT = 200
# How a JSON schema is asked for, from most to least insistent; a server that refuses one gets the next.
STRUCTURED_MODES = ("json_schema+guided_json", "json_schema", "off")
_STRUCTURED_OFF = len(STRUCTURED_MODES) - 1
_STRUCTURED_REFUSED = (400, 422)  # 422: pydantic-based servers (TGI) refuse unknown fields with it
_RETRYABLE = (408, 429)


class ServerRefused(AloeError):
    """The server refuses every request (wrong URL, model or key): stop the run."""


@dataclass(frozen=True)
class OpenAIConfig:
    model: str  # the model name the server serves
    base_url: str = DEFAULT_BASE_URL
    concurrency: int = 64
    timeout: float = 60.0  # seconds one attempt may take, from sending to the last byte
    max_retries: int = 5  # after the first attempt
    retry_backoff: float = 1.0  # first wait; doubles each retry, capped at MAX_BACKOFF
    api_key_env: str | None = None  # the variable's name (for messages); the key itself is never stored here


@dataclass
class ClientCounters:
    attempts: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    retry_wait_s: float = 0.0  # total back-off scheduled before retries
    structured_output: str = STRUCTURED_MODES[0]

    def to_dict(self) -> dict:
        values = asdict(self)
        values["retry_wait_s"] = round(self.retry_wait_s, 3)
        return values


def chat_completions_url(base_url: str) -> str:
    """`{base_url}/chat/completions`; AloeError for anything but an http(s) URL with a host."""
    text = (base_url or "").strip()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise AloeError(f"--base-url must be an http(s) URL such as {DEFAULT_BASE_URL}, got {base_url!r}")
    base = text.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


def api_key_from_env(variable: str | None) -> tuple[str | None, str | None]:
    """(variable name, key). A named variable must be set; without one, $OPENAI_API_KEY is used when set."""
    if variable is None:
        key = os.environ.get(DEFAULT_API_KEY_ENV) or None
        return (DEFAULT_API_KEY_ENV if key else None), key
    key = os.environ.get(variable)
    if not key:
        raise AloeError(f"--api-key-env {variable}: that environment variable is not set or empty")
    return variable, key


class Redactor:
    """Masks the API key in any text about to be returned, stored or printed."""

    def __init__(self, secret: str | None):
        self._secret = secret if secret and len(secret) >= MIN_SECRET_LENGTH else None

    def __call__(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret and text else text


# ----------------------------------------------------------------------------- the request body

def image_data_uri(entry, image_root) -> str:
    """A data URI holding the image's pixels and nothing else (no EXIF, ICC profile or text chunks)."""
    image = load_image(entry, image_root)
    as_jpeg = image.format == "JPEG"
    pixels_only = Image.frombytes(image.mode, image.size, image.tobytes())  # a new image: empty .info
    buffer = io.BytesIO()
    if as_jpeg:
        pixels_only.save(buffer, format="JPEG", quality=95)
    else:
        pixels_only.save(buffer, format="PNG", compress_level=3)
    return to_data_uri(buffer.getvalue())


def chat_messages(request: GenerationRequest) -> list[dict]:
    """The request's messages in the chat-completions shape, images inlined as data URIs."""
    check_image_count(request)
    uris = []
    for position, entry in enumerate(request.images):
        try:
            uris.append(image_data_uri(entry, request.image_root))
        except RecordError as error:
            raise indexed(error, position) from None
    next_uri = iter(uris)
    messages = []
    for message in request.messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = [{"type": "image_url", "image_url": {"url": next(next_uri)}} if part.get("type") == "image"
                     else part for part in content]
            if all(part.get("type") == "text" for part in parts):  # plain text is what every server takes
                content = "".join(part.get("text", "") for part in parts)
            else:
                content = parts
        messages.append({"role": message["role"], "content": "" if content is None else content})
    return messages


def reply_text(data: bytes) -> str:
    """`choices[0].message.content` of a chat-completions reply (ValueError when there is none)."""
    try:
        content = orjson.loads(data)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError("no choices[0].message.content") from None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_seconds(attempt: int, base: float, retry_after: float | None = None) -> float:
    """Exponential back-off with jitter, at least what the server asked for (both capped at MAX_BACKOFF)."""
    wait_s = min(base * 2 ** attempt, MAX_BACKOFF) * (0.5 + random.random() / 2)
    if retry_after is not None:
        wait_s = max(wait_s, min(retry_after, MAX_BACKOFF))
    return wait_s


def _excerpt(text: str, limit: int = ERROR_EXCERPT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------- the backend

class OpenAIBackend:
    """`generate` over HTTP, `concurrency` requests in flight; see the module docstring."""

    name = "openai"

    def __init__(self, config: OpenAIConfig, api_key: str | None = None):
        self.config = config
        self.url = chat_completions_url(config.base_url)  # a bad URL fails here, before any record is read
        self._api_key = api_key or None
        self._redact = Redactor(self._api_key)
        self._structured = 0  # index into STRUCTURED_MODES: the most insistent level the server accepted
        self.counters = ClientCounters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: list[httpx.AsyncClient] = []  # one per worker, kept across calls (keep-alive)
        self._ssl: ssl.SSLContext | None = None

    def __repr__(self) -> str:  # no key in reprs, ever
        return f"OpenAIBackend({self.config.model!r} at {self.url!r})"

    def describe(self) -> str:
        key = f"API key from ${self.config.api_key_env}" if self._api_key else "no API key"
        return f"{self.config.model} at {self.url}, {self.config.concurrency} request(s) in flight, {key}"

    def generate(self, requests: list[GenerationRequest], params: GenerationParams, on_done: OnDone) -> None:
        if not requests:
            return
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        main = self._loop.create_task(self._serve(requests, params, on_done))
        received: list[int] = []
        restore = _cancel_on_signals(self._loop, main, received)
        try:
            self._loop.run_until_complete(main)
        except asyncio.CancelledError:
            if not received:
                raise
        except BaseException:
            # An error (or a signal where the loop could not take it) can land here with requests still pending:
            # cancel them so none runs on or retries.
            if not main.done():
                main.cancel()
                with contextlib.suppress(BaseException):
                    self._loop.run_until_complete(main)
            raise
        finally:
            restore()
        if received:  # stopped by a signal: hand it to the handler it stood in for (Terminated, Ctrl-C...)
            signal.raise_signal(received[0])

    async def _serve(self, requests: list[GenerationRequest], params: GenerationParams, on_done: OnDone) -> None:
        """`concurrency` workers, each with its own keep-alive connection, take requests off one queue.

        One small connection pool per worker rather than one shared pool: httpcore's pool scans every
        connection and every waiting request on each event, which at hundreds in flight costs more CPU
        than the requests themselves.
        """
        waiting = deque(enumerate(requests))

        async def work(client: httpx.AsyncClient) -> None:
            while waiting:
                index, request = waiting.popleft()
                on_done(index, await self._complete(client, request, params))

        clients = self._http_clients(min(self.config.concurrency, len(requests)))
        workers = [asyncio.ensure_future(work(client)) for client in clients]
        try:
            done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
            for worker in done:
                worker.result()  # a ServerRefused, or an error raised by on_done, stops the run here
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    def _http_clients(self, count: int) -> list[httpx.AsyncClient]:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()  # loaded once, shared by every connection
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        while len(self._clients) < count:
            self._clients.append(httpx.AsyncClient(
                headers=headers, verify=self._ssl, timeout=None,  # the deadline below covers connect, send and read
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)))
        return self._clients[:count]

    async def _complete(self, client: httpx.AsyncClient, request: GenerationRequest,
                        params: GenerationParams) -> Completion:
        try:  # decoding and re-encoding images is CPU work: off the event loop
            messages = await asyncio.to_thread(chat_messages, request) if request.images else chat_messages(request)
        except RecordError as error:
            return Failure(error.reason, error.format())
        schema = request.response_format
        mode = self._structured if schema is not None else _STRUCTURED_OFF
        attempt = 0
        while True:
            body = self._body(messages, params, schema, mode)
            self.counters.attempts += 1
            retry_after, detail = None, ""
            try:
                response = await self._post(client, body)
            except (asyncio.TimeoutError, TimeoutError, httpx.TimeoutException):
                problem = f"timed out after {self.config.timeout:g} s"
            except httpx.HTTPError as exc:  # refused connections, resets, protocol errors
                problem = self._redact(f"{type(exc).__name__}: {exc}")
            else:
                status = response.status_code
                if status == 200:
                    try:
                        text = reply_text(response.content)
                    except ValueError as exc:
                        problem = f"malformed reply ({exc})"
                    else:
                        if schema is not None:
                            self._accepted(mode)
                        return Reply(self._redact(text))
                elif status in _STRUCTURED_REFUSED and mode < _STRUCTURED_OFF:
                    mode += 1  # maybe the server does not know this way of asking for a schema
                    continue
                elif status in _RETRYABLE or status >= 500:
                    problem, detail = f"HTTP {status}", self._detail(response.content)
                    retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                else:
                    return self._refused(status, response.content)
            if attempt >= self.config.max_retries:
                return Failure(REQUEST_FAILED, f"{problem} after {attempt + 1} attempt(s)"
                               + (f" (last answer: {detail})" if detail else ""))
            wait_s = backoff_seconds(attempt, self.config.retry_backoff, retry_after)
            self.counters.retries += 1
            self.counters.retry_wait_s += wait_s
            await asyncio.sleep(wait_s)
            attempt += 1

    async def _post(self, client: httpx.AsyncClient, body: bytes) -> httpx.Response:
        """One attempt under an overall deadline: connecting, sending and reading the whole reply."""
        if hasattr(asyncio, "timeout"):  # Python >= 3.11: no extra task per attempt
            async with asyncio.timeout(self.config.timeout):
                return await client.post(self.url, content=body)
        return await asyncio.wait_for(client.post(self.url, content=body), self.config.timeout)

    def _body(self, messages: list[dict], params: GenerationParams, schema: dict | None, mode: int) -> bytes:
        payload: dict = {"model": self.config.model, "messages": messages, "max_tokens": params.max_new_tokens,
                         "temperature": params.temperature}
        if params.temperature > 0:
            payload.update(top_p=params.top_p, seed=params.seed)
        if schema is not None and mode < _STRUCTURED_OFF:
            payload["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
            if mode == 0:
                payload["guided_json"] = schema  # vLLM's own field (older releases ignore response_format)
        return orjson.dumps(payload)

    def _accepted(self, mode: int) -> None:
        """A request with a schema got its reply at this level: never ask more insistently again."""
        if mode > self._structured:
            self._structured = mode
            self.counters.structured_output = STRUCTURED_MODES[mode]

    def _detail(self, content: bytes) -> str:
        """What an error answer said, shortened and without the key."""
        return self._redact(_excerpt(content.decode("utf-8", "replace")))

    def _refused(self, status: int, content: bytes) -> Failure:
        detail = self._detail(content)
        if status in (401, 403):
            hint = (f"check the key in ${self.config.api_key_env}" if self.config.api_key_env
                    else "set --api-key-env")
            raise ServerRefused(f"the server at {self.url} refused the request (HTTP {status}); {hint}")
        if status == 404:
            raise ServerRefused(f"HTTP 404 from {self.url}: wrong --base-url, or the server does not serve the "
                                f"model {self.config.model!r} ({detail})")
        return Failure(REQUEST_FAILED, f"HTTP {status}: {detail}")

    def close(self) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        try:
            for client in self._clients:
                self._loop.run_until_complete(client.aclose())
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
        finally:
            self._clients = []
            self._loop.close()


def _cancel_on_signals(loop: asyncio.AbstractEventLoop, main: asyncio.Task, received: list[int]) -> Callable[[], None]:
    """While the loop runs, SIGINT and SIGTERM cancel `main` (recording the signal in `received`, for the caller
    to raise again once the loop is out) instead of raising inside whichever coroutine happens to run: an
    exception raised there unwinds through httpx's and anyio's cancel scopes out of order and ends the run
    with anyio's RuntimeError instead of a clean stop. Ignored signals stay ignored. Returns the function
    that puts the previous handlers back. Outside the main thread: no change."""
    previous: dict[int, Any] = {}

    def stop(signum: int) -> None:
        if not received:
            received.append(signum)
            main.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            handler = signal.getsignal(signum)
            if handler is signal.SIG_IGN:
                continue
            loop.add_signal_handler(signum, stop, signum)
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread, or no such support
            continue
        previous[signum] = handler

    def restore() -> None:
        for signum, handler in previous.items():
            loop.remove_signal_handler(signum)
            signal.signal(signum, handler)

    return restore


__all__ = ["DEFAULT_API_KEY_ENV", "DEFAULT_BASE_URL", "STRUCTURED_MODES", "ClientCounters", "OpenAIBackend",
           "OpenAIConfig", "Redactor", "ServerRefused", "api_key_from_env", "backoff_seconds", "chat_completions_url",
           "chat_messages", "image_data_uri", "reply_text", "retry_after_seconds"]
