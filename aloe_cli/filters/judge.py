"""LVLM-as-judge: rate each image-question-answer sample 1-5 for coherence and relevance.

The judge sees the record's images and its conversation, rendered into a
rubric (the default is `DEFAULT_RUBRIC`, replaceable with a prompt file that
uses the `{conversation}`, `{question}` and `{answer}` placeholders), and
replies with an integer score and a one-sentence reason. Replies are parsed
from JSON (`{"score": 4, "reason": "..."}`) or from a "Score: 4" line; an
unparseable reply is asked again (sampling, so the retry can differ), then
recorded as `aloe.score = {"value": null, "error": ...}` and rejected as
`judge_unparseable`.

Backends:
- `HFJudge`: a local model, batched greedy generation (left padding).
- `OpenAIJudge`: an OpenAI-compatible chat-completions server (vLLM, SGLang,
  TGI). Images go as base64 data URLs; up to `concurrency` requests are in
  flight; each has a timeout; 429 and 5xx answers and network errors are
  retried with exponential backoff (honouring Retry-After). The API key comes
  from an environment variable and never appears in messages.

`JudgeCache` makes a run resumable: every parsed verdict is appended to a
JSONL file as soon as it arrives, keyed by a hash of the judge, the rendered
prompt and the image bytes, so a rerun asks only for what is missing.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import random
import re
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from aloe_cli.data.images import image_mime, load_image, read_source
from aloe_cli.data.io import Item
from aloe_cli.data.records import annotate, text_of
from aloe_cli.data.stage import Reject, Stage
from aloe_cli.errors import AloeError, RecordError
from aloe_cli.filters.thresholds import Bounds, Distribution, ResolvedThresholds, Thresholds, source_of

STAGE = "score"
MIN_SCORE, MAX_SCORE = 1, 5
DEFAULT_MIN_SCORE = 3.0
PLACEHOLDERS = ("{conversation}", "{question}", "{answer}")
# Image formats every OpenAI-compatible server decodes; anything else (DICOM, TIFF, ...) is sent as PNG.
WEB_IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif")
REPLY_EXCERPT = 300

DEFAULT_RUBRIC = """\
You are reviewing one sample of a training set for a medical vision-language assistant. You are shown the \
sample's image(s), if it has any, then the conversation between a user and the assistant.

Rate the sample from 1 to 5 for coherence and relevance:
5 - excellent: the question is clear and answerable (from the image(s), when there are any); the answer is \
correct, relevant, consistent with the image(s) and the question, and well formed.
4 - good: minor issues (slightly vague wording, small omissions) that would not mislead a model trained on it.
3 - acceptable: understandable and mostly relevant, but partly generic, incomplete or loosely tied to the \
question or image(s).
2 - poor: the answer is largely irrelevant, contradicts the image(s) or the question, or is badly garbled.
1 - unusable: incoherent, empty, unrelated to the question or image(s), or clearly wrong.

Judge only what you can see and read. Do not reward length.

Conversation:
{conversation}

Reply with one line of JSON and nothing else:
{"score": <integer 1-5>, "reason": "<one sentence>"}
"""


def default_score_thresholds() -> Thresholds:
    return Thresholds(stage=STAGE, default=Bounds(min=DEFAULT_MIN_SCORE), origin="built-in default (min 3)")


# ----------------------------------------------------------------------------- the prompt

@dataclass(frozen=True)
class Rubric:
    """A prompt template with {conversation}, {question} and/or {answer} placeholders."""

    template: str = DEFAULT_RUBRIC
    origin: str = "built-in rubric"

    def render(self, record: dict) -> str:
        """The prompt for one record (RecordError when it has no answer to judge)."""
        messages = record["messages"]
        users = [m for m in messages if m["role"] == "user"]
        answers = [m for m in messages if m["role"] == "assistant"]
        if not answers:
            raise RecordError("no_answer", "record has no assistant turn to judge", field="messages")
        text = self.template
        text = text.replace("{conversation}", transcript(messages))
        text = text.replace("{question}", text_of(users[0]) if users else "")
        return text.replace("{answer}", text_of(answers[-1]))


def load_rubric(path: str | Path | None) -> Rubric:
    if path is None:
        return Rubric()
    try:
        template = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AloeError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AloeError(f"cannot read prompt file {path}: {exc}") from None
    if "{conversation}" not in template and "{answer}" not in template:
        raise AloeError(f"{path}: the prompt must contain {{conversation}} or {{answer}} "
                        f"(placeholders: {', '.join(PLACEHOLDERS)})")
    return Rubric(template, str(path))


def transcript(messages: list[dict]) -> str:
    """`User: ...` / `Assistant: ...` lines; image placeholders become [image N] in order."""
    lines, image_number = [], 0
    for message in messages:
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        pieces = []
        for part in parts:
            if part.get("type") == "image":
                image_number += 1
                pieces.append(f"[image {image_number}]")
            else:
                pieces.append(part.get("text", ""))
        lines.append(f"{message['role'].capitalize()}: {' '.join(p for p in pieces if p).strip()}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- parsing replies

@dataclass(frozen=True)
class Verdict:
    score: int
    reason: str


class UnparseableReply(ValueError):
    pass


_CODE_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)
_SCORE_LINE = re.compile(r"\bscore\b\**\s*[:=]\s*\**\s*([0-9]+(?:\.0+)?)\s*(?:/\s*5|out of 5)?\b", re.IGNORECASE)
_REASON_LINE = re.compile(r"\b(?:reason|rationale|explanation)\b\**\s*[:=]\s*\**\s*(.+)", re.IGNORECASE)
_SCORE_KEYS = ("score", "rating")
_REASON_KEYS = ("reason", "rationale", "explanation")


def parse_judge_reply(reply: str) -> Verdict:
    """A JSON object with `score` (and `reason`), or a `Score: N` line. Raises UnparseableReply."""
    if not isinstance(reply, str) or not reply.strip():
        raise UnparseableReply("empty reply")
    fenced = _CODE_FENCE.findall(reply)
    for candidate in [*fenced, reply]:
        verdict = _from_json(candidate)
        if verdict is not None:
            return verdict
    verdict = _from_score_line(reply)
    if verdict is not None:
        return verdict
    raise UnparseableReply(f"no score 1-5 found in reply {_excerpt(reply)!r}")


def _from_json(text: str) -> Verdict | None:
    for match in _JSON_OBJECT.finditer(text):
        try:
            data = json.loads(match.group(0))
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        lowered = {str(k).lower(): v for k, v in data.items()}
        key = next((k for k in _SCORE_KEYS if k in lowered), None)
        if key is None:
            continue
        score = _as_score(lowered[key])
        if score is None:
            continue
        reason = next((str(lowered[k]) for k in _REASON_KEYS if lowered.get(k) not in (None, "")), "")
        return Verdict(score, reason.strip())
    return None


def _from_score_line(text: str) -> Verdict | None:
    match = _SCORE_LINE.search(text)
    if match is None:
        return None
    score = _as_score(match.group(1))
    if score is None:
        return None
    reason_match = _REASON_LINE.search(text)
    if reason_match is not None:
        reason = reason_match.group(1)
    else:  # whatever else the judge wrote, minus the score line
        reason = (text[:match.start()] + " " + text[match.end():])
    reason = " ".join(reason.split()).strip(" *-:")
    return Verdict(score, reason[:REPLY_EXCERPT])


def _as_score(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value) and float(value).is_integer():
        score = int(value)
        if MIN_SCORE <= score <= MAX_SCORE:
            return score
    return None


def _excerpt(text: str, limit: int = REPLY_EXCERPT) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------- requests and replies

@dataclass
class JudgePrompt:
    """What the judge is asked about one record."""

    text: str
    image_entries: list  # the record's image entries (decoded by the backend)
    image_root: Any
    key: str  # cache key: judge + prompt + image bytes


@dataclass(frozen=True)
class Reply:
    text: str


@dataclass(frozen=True)
class Failure:
    """The judge could not be asked (bad image, request failed after retries)."""

    reason: str
    message: str


Completion = Reply | Failure
OnDone = Callable[[int, Completion], None]


class JudgeBackend(Protocol):
    name: str

    def complete(self, prompts: list[JudgePrompt], temperature: float, on_done: OnDone) -> None:
        """Ask about every prompt; call on_done(index, completion) in the caller's thread as each finishes."""

    def close(self) -> None: ...


def prompt_key(judge: str, text: str, image_bytes: list[bytes]) -> str:
    digest = hashlib.sha256()
    for part in (judge, text, *[hashlib.sha256(data).hexdigest() for data in image_bytes]):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def raw_image_bytes(entry: Any, image_root: Any) -> bytes:
    source, _ = read_source(entry, image_root)
    if isinstance(source, bytes):
        return source
    try:
        return source.read_bytes()
    except OSError as exc:
        raise RecordError("image_unreadable", f"cannot read image {source}: {exc.strerror}") from None


def build_prompt(record: dict, image_root: Any, rubric: Rubric, judge: str) -> JudgePrompt:
    text = rubric.render(record)
    entries = list(record.get("images") or [])
    image_bytes = []
    for position, entry in enumerate(entries):
        try:
            image_bytes.append(raw_image_bytes(entry, image_root))
        except RecordError as error:
            raise RecordError(error.reason, error.message, field=f"images[{position}]") from None
    return JudgePrompt(text, entries, image_root, prompt_key(judge, text, image_bytes))


def decoded_images(prompt: JudgePrompt) -> list:
    """PIL images of a prompt (RecordError naming the bad one)."""
    images = []
    for position, entry in enumerate(prompt.image_entries):
        try:
            images.append(load_image(entry, prompt.image_root))
        except RecordError as error:
            raise RecordError(error.reason, error.message, field=f"images[{position}]") from None
    return images


# ----------------------------------------------------------------------------- hf backend

@dataclass(frozen=True)
class HFJudgeConfig:
    batch_size: int = 8
    max_new_tokens: int = 256
    seed: int = 0


class HFJudge:
    """A local model: batched generation, greedy at temperature 0, sampling for retries."""

    name = "hf"

    def __init__(self, loaded, config: HFJudgeConfig):
        self.loaded = loaded
        self.config = config
        self.processor = loaded.processor
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"  # generation continues from the right edge of every row
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def complete(self, prompts: list[JudgePrompt], temperature: float, on_done: OnDone) -> None:
        ready: list[tuple[int, str, list]] = []
        for index, prompt in enumerate(prompts):
            try:
                images = [image.convert("RGB") for image in decoded_images(prompt)]
            except RecordError as error:
                on_done(index, Failure(error.reason, error.format()))
                continue
            ready.append((index, self._chat_text(prompt.text, len(images)), images))
        ready.sort(key=lambda entry: (-len(entry[1]) - 1000 * len(entry[2]), entry[0]))
        for start in range(0, len(ready), self.config.batch_size):
            chunk = ready[start:start + self.config.batch_size]
            for (index, _, _), text in zip(chunk, self._generate(chunk, temperature)):
                on_done(index, Reply(text))

    def _chat_text(self, prompt: str, image_count: int) -> str:
        content = [{"type": "image"} for _ in range(image_count)] + [{"type": "text", "text": prompt}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def _generate(self, chunk: list[tuple[int, str, list]], temperature: float) -> list[str]:
        import torch
        from transformers import GenerationConfig

        images = [image for _, _, row_images in chunk for image in row_images]
        inputs = self.processor(text=[text for _, text, _ in chunk], images=images or None, padding=True,
                                return_tensors="pt")
        inputs = {key: value.to(self.loaded.device) for key, value in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.loaded.dtype)
        sampling = temperature > 0
        generation = GenerationConfig(
            max_new_tokens=self.config.max_new_tokens, do_sample=sampling,
            temperature=temperature if sampling else None, top_p=1.0 if sampling else None, top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.loaded.model.generation_config.eos_token_id)
        if sampling:
            torch.manual_seed(self.config.seed)
        with torch.inference_mode():
            output = self.loaded.model.generate(**inputs, generation_config=generation)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- openai backend

@dataclass(frozen=True)
class OpenAIJudgeConfig:
    base_url: str = "http://localhost:8000/v1"
    model: str = ""
    concurrency: int = 64
    timeout: float = 60.0  # seconds per request (connect, and each wait for data)
    max_retries: int = 5  # after the first attempt, for 429/5xx/network errors/timeouts
    retry_backoff: float = 1.0  # first wait; doubles each retry, capped at MAX_BACKOFF
    max_tokens: int = 256
    api_key_env: str | None = None  # the variable's name (for messages); the key itself is never stored here


MAX_BACKOFF = 60.0


class RequestFailed(Exception):
    """This request failed (after its retries); other records may still succeed."""


class JudgeServerError(AloeError):
    """The server refuses every request (wrong URL, model or key): stop the run."""


def chat_completions_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


class ChatCompletionsClient:
    """A minimal, thread-safe HTTP client for POST /chat/completions with retries.

    One keep-alive connection per thread. Never logs or returns the API key.
    """

    def __init__(self, url: str, api_key: str | None, *, timeout: float, max_retries: int, retry_backoff: float,
                 key_hint: str | None = None, stop: threading.Event | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AloeError(f"--base-url must be an http(s) URL such as http://localhost:8000/v1, got {url!r}")
        self.url = url
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._path = parts.path + (f"?{parts.query}" if parts.query else "")
        self._api_key = api_key or None
        self._key_hint = key_hint
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self._local = threading.local()
        self._stop = stop or threading.Event()

    def __repr__(self) -> str:  # no key in reprs, ever
        return f"ChatCompletionsClient({self.url!r})"

    def chat(self, payload: dict) -> str:
        body = json.dumps(payload).encode("utf-8")
        problem = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if self._stop.is_set():
                raise RequestFailed("run interrupted")
            try:
                status, retry_after, data = self._post(body)
            except (OSError, http.client.HTTPException) as exc:  # includes timeouts and refused connections
                self._drop_connection()
                problem, retry_after = self._redact(_network_problem(exc, self.timeout)), None
            else:
                if status == 200:
                    try:
                        return _reply_text(data)
                    except ValueError as exc:
                        problem = f"malformed response ({exc})"
                else:
                    self._raise_if_final(status, data)
                    problem = f"HTTP {status}"
            if attempt < self.max_retries:
                self._stop.wait(self._backoff(attempt, retry_after))
        raise RequestFailed(f"{problem} after {self.max_retries + 1} attempt(s)")

    def _raise_if_final(self, status: int, data: bytes) -> None:
        """429 and 5xx are worth retrying; other codes are not."""
        if status == 429 or status >= 500:
            return
        detail = self._redact(_excerpt(data.decode("utf-8", "replace"), 200))
        if status in (401, 403):
            hint = f"check the key in ${self._key_hint}" if self._key_hint else "set --api-key-env"
            raise JudgeServerError(f"the judge server at {self.url} refused the request (HTTP {status}); {hint}")
        if status == 404:
            raise JudgeServerError(f"HTTP 404 from {self.url}: wrong --base-url, or the server does not serve "
                                   f"this --judge model ({detail})")
        raise RequestFailed(f"HTTP {status}: {detail}")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        wait_s = min(self.retry_backoff * (2 ** attempt), MAX_BACKOFF) * (0.5 + random.random() / 2)
        if retry_after is not None:
            wait_s = max(wait_s, min(retry_after, MAX_BACKOFF))
        return wait_s

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            if self._scheme == "https":
                connection = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                                         context=ssl.create_default_context())
            else:
                connection = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            self._local.connection = connection
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def _post(self, body: bytes) -> tuple[int, float | None, bytes]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        connection = self._connection()
        connection.request("POST", self._path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        if response.getheader("Connection", "").lower() == "close":
            self._drop_connection()
        return response.status, _retry_after(response.getheader("Retry-After")), data

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text


def _network_problem(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g} s"
    return f"{type(exc).__name__}: {exc}"


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _reply_text(data: bytes) -> str:
    try:
        payload = json.loads(data)
        content = payload["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError("no choices[0].message.content") from None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def image_data_url(entry: Any, image_root: Any) -> str:
    """A data URL the server can decode: the original bytes for web formats, else a PNG re-encoding.

    The image is always decoded here first, so a broken file fails locally
    as a record error instead of as a server error.
    """
    import base64
    import io

    image = load_image(entry, image_root)
    data = raw_image_bytes(entry, image_root)
    mime = image_mime(data)
    if mime not in WEB_IMAGE_TYPES:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data, mime = buffer.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class OpenAIJudge:
    """Chat completions against an OpenAI-compatible server, `concurrency` requests in flight."""

    name = "openai"

    def __init__(self, config: OpenAIJudgeConfig, api_key: str | None = None):
        self.config = config
        self._stop = threading.Event()
        self.client = ChatCompletionsClient(chat_completions_url(config.base_url), api_key, timeout=config.timeout,
                                            max_retries=config.max_retries, retry_backoff=config.retry_backoff,
                                            key_hint=config.api_key_env, stop=self._stop)
        self._executor: ThreadPoolExecutor | None = None

    def complete(self, prompts: list[JudgePrompt], temperature: float, on_done: OnDone) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="judge")
        waiting = iter(enumerate(prompts))
        in_flight: dict[Future, int] = {}
        try:
            self._fill(in_flight, waiting, temperature)
            while in_flight:
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    index = in_flight.pop(future)
                    on_done(index, future.result())  # a JudgeServerError stops the run here
                self._fill(in_flight, waiting, temperature)
        except BaseException:
            self._stop.set()  # in-flight requests give up instead of retrying
            for future in in_flight:
                future.cancel()
            raise

    def _fill(self, in_flight: dict[Future, int], waiting, temperature: float) -> None:
        """Keep exactly `concurrency` requests in flight (never queue the whole batch)."""
        while len(in_flight) < self.config.concurrency:
            try:
                index, prompt = next(waiting)
            except StopIteration:
                return
            in_flight[self._executor.submit(self._ask, prompt, temperature)] = index

    def _ask(self, prompt: JudgePrompt, temperature: float) -> Completion:
        content: list[dict] = []
        for position, entry in enumerate(prompt.image_entries):
            try:
                content.append({"type": "image_url", "image_url": {"url": image_data_url(entry, prompt.image_root)}})
            except RecordError as error:
                return Failure(error.reason, f"field 'images[{position}]': {error.message}")
        content.append({"type": "text", "text": prompt.text})
        payload = {"model": self.config.model, "messages": [{"role": "user", "content": content}],
                   "temperature": temperature, "max_tokens": self.config.max_tokens}
        try:
            return Reply(self.client.chat(payload))
        except RequestFailed as exc:
            return Failure("judge_request_failed", f"judge request failed: {exc}")

    def close(self) -> None:
        self._stop.set()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


# ----------------------------------------------------------------------------- cache

class JudgeCache:
    """Append-only JSONL of parsed verdicts, keyed by `JudgePrompt.key`; written as verdicts arrive."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
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
                    self._load_line(line)
        except (OSError, UnicodeDecodeError) as exc:
            raise AloeError(f"cannot read cache {self.path}: {exc}") from None

    def _load_line(self, line: str) -> None:
        if not line.strip():
            return
        try:
            entry = json.loads(line)
            key, score = entry["key"], entry["value"]
        except (ValueError, KeyError, TypeError):  # e.g. the half-written last line of a killed run
            self.bad_lines += 1
            return
        if _as_score(score) is None:
            self.bad_lines += 1
            return
        self.entries[key] = entry

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict) -> None:
        entry = {"key": key, **entry}
        self.entries[key] = entry
        if self._handle is None:
            self._handle = self._open_for_append()
        self._handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._handle.flush()  # a killed run keeps every verdict written so far

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
            self._handle.close()
            self._handle = None


# ----------------------------------------------------------------------------- the stage

@dataclass(frozen=True)
class ScoreConfig:
    judge: str  # model name (hf: folder or Hub id; openai: the served model name)
    parse_retries: int = 2  # extra attempts for an unparseable reply
    retry_temperature: float = 0.7


@dataclass
class ScoreCounters:
    asked: int = 0  # requests sent (retries included)
    cached: int = 0
    parse_retries: int = 0
    unparseable: int = 0
    failed: int = 0
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)

    def count_score(self, source: str, score: int | None) -> None:
        histogram = self.by_source.setdefault(source, {str(s): 0 for s in range(MIN_SCORE, MAX_SCORE + 1)})
        label = "unparseable" if score is None else str(score)
        histogram[label] = histogram.get(label, 0) + 1


class ScoreStage(Stage):
    """`aloe score`: annotate aloe.score and reject below the per-source min (or unparseable)."""

    name = STAGE
    additive = ("requests", "cached", "parse_retries", "unparseable", "request_failures", "scores.*.*")

    def __init__(self, backend_factory: Callable[[], JudgeBackend], config: ScoreConfig, rubric: Rubric,
                 thresholds: Thresholds | None = None, cache: JudgeCache | None = None):
        self._backend_factory = backend_factory
        self._backend: JudgeBackend | None = None
        self.config = config
        self.rubric = rubric
        self.thresholds = thresholds or default_score_thresholds()
        self.cache = cache
        self.distribution = Distribution()
        self.counters = ScoreCounters()
        self._resolved: ResolvedThresholds | None = None

    @property
    def measure_first(self) -> bool:  # percentile thresholds need every score before the first decision
        return self.thresholds.needs_distribution()

    @property
    def backend(self) -> JudgeBackend:
        if self._backend is None:  # loaded on first need: a fully cached run never starts a model
            self._backend = self._backend_factory()
        return self._backend

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
        if self.cache is not None:
            self.cache.close()

    def annotate(self, batch: list[Item]) -> None:
        pending: list[tuple[Item, JudgePrompt]] = []
        for item in batch:
            try:
                prompt = build_prompt(item.record, item.image_root, self.rubric, self.config.judge)
            except RecordError as error:
                item.error = error.located(item.where)
                continue
            cached = self.cache.get(prompt.key) if self.cache is not None else None
            if cached is not None:
                self.counters.cached += 1
                self._record_verdict(item, Verdict(int(cached["value"]), str(cached.get("reason", ""))))
                continue
            pending.append((item, prompt))
        if pending:
            self._judge(pending)

    def _judge(self, pending: list[tuple[Item, JudgePrompt]]) -> None:
        """Ask, then ask again (sampling) for replies that did not parse."""
        last_reply: dict[int, str] = {}
        remaining = list(range(len(pending)))
        for attempt in range(self.config.parse_retries + 1):
            if not remaining:
                break
            if attempt > 0:
                self.counters.parse_retries += len(remaining)
            self.counters.asked += len(remaining)
            unparsed: list[int] = []
            on_done = partial(self._take_reply, pending, remaining, unparsed, last_reply)
            temperature = 0.0 if attempt == 0 else self.config.retry_temperature
            self.backend.complete([pending[i][1] for i in remaining], temperature, on_done)
            remaining = sorted(unparsed)
        for index in remaining:
            self._record_unparseable(pending[index][0], last_reply.get(index, ""))

    def _take_reply(self, pending: list[tuple[Item, JudgePrompt]], asked: list[int], unparsed: list[int],
                    last_reply: dict[int, str], position: int, completion: Completion) -> None:
        """One completion of a round: annotate and cache it, or keep it for the next round."""
        index = asked[position]
        item, prompt = pending[index]
        if isinstance(completion, Failure):
            self.counters.failed += 1
            item.error = RecordError(completion.reason, completion.message, where=item.where)
            return
        try:
            verdict = parse_judge_reply(completion.text)
        except UnparseableReply:
            last_reply[index] = completion.text
            unparsed.append(index)
            return
        self._record_verdict(item, verdict)
        if self.cache is not None:
            self.cache.put(prompt.key, {"id": item.record.get("id"), "value": verdict.score,
                                        "reason": verdict.reason, "judge": self.config.judge})

    def _record_verdict(self, item: Item, verdict: Verdict) -> None:
        annotate(item.record, self.name, {"value": verdict.score, "reason": verdict.reason,
                                          "judge": self.config.judge})
        source = source_of(item)
        self.distribution.add(source, verdict.score)
        self.counters.count_score(source, verdict.score)

    def _record_unparseable(self, item: Item, reply: str) -> None:
        attempts = self.config.parse_retries + 1
        annotate(item.record, self.name, {"value": None, "judge": self.config.judge,
                                          "error": f"unparseable reply after {attempts} attempt(s)",
                                          "reply": _excerpt(reply)})
        self.counters.unparseable += 1
        self.counters.count_score(source_of(item), None)

    def decide(self, item: Item) -> Reject | None:
        values = item.record["aloe"][self.name]
        score = values.get("value")
        if score is None:
            return Reject("judge_unparseable", f"{values.get('error')}: {values.get('reply', '')!r}")
        if self._resolved is None:
            self._resolved = self.thresholds.resolve(self.distribution)
        source = source_of(item)
        limits = self._resolved.limits_for(source)
        if limits.min is not None and score < limits.min:
            return Reject("low_score", f"score {score} below min {limits.min:g} for {source}")
        return None

    def summary(self) -> dict[str, Any]:
        if self._resolved is None:  # the runner marked the distribution complete
            self._resolved = self.thresholds.resolve(self.distribution)
        sources = sorted(self.counters.by_source)
        return {
            "judge": self.config.judge,
            "backend": getattr(self._backend, "name", None),
            "requests": self.counters.asked,
            "cached": self.counters.cached,
            "parse_retries": self.counters.parse_retries,
            "unparseable": self.counters.unparseable,
            "request_failures": self.counters.failed,
            "scores": {source: self.counters.by_source[source] for source in sources},
            "thresholds": {source: self._resolved.limits_for(source).to_dict() for source in sources},
        }


__all__ = ["DEFAULT_RUBRIC", "ChatCompletionsClient", "HFJudge", "HFJudgeConfig", "JudgeCache", "JudgePrompt",
           "JudgeServerError", "OpenAIJudge", "OpenAIJudgeConfig", "Rubric", "ScoreConfig", "ScoreStage",
           "Verdict", "UnparseableReply", "default_score_thresholds", "load_rubric", "parse_judge_reply",
           "transcript"]
