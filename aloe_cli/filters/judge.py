"""LVLM-as-judge: rate each image-question-answer sample 1-5 for coherence and relevance.

The judge sees the record's images and its conversation, rendered into a
rubric (the default is `DEFAULT_RUBRIC`, replaceable with a prompt file that
uses the `{conversation}`, `{question}` and `{answer}` placeholders), and
replies with an integer score and a one-sentence reason. Where the server
supports structured output the reply is asked for as JSON following
`JUDGE_SCHEMA`, so it parses on the first try. Replies are parsed from JSON
(`{"score": 4, "reason": "..."}`) or from a "Score: 4" line; an unparseable
reply is asked again (sampling, so the retry can differ), then recorded as
`aloe.score = {"value": null, "error": ...}` and rejected as
`judge_unparseable`.

Generation itself is `aloe_cli.modeling.backends` (a local model or an
OpenAI-compatible server, the same backends `eval` and `infer` use); with a
`ResponseCache`, every reply that parses is stored as it arrives, so a rerun
asks only for what is missing.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aloe_cli.data.io import Item
from aloe_cli.data.records import annotate, text_of
from aloe_cli.data.stage import Reject, Stage
from aloe_cli.errors import AloeError, RecordError
from aloe_cli.filters.thresholds import Bounds, Distribution, ResolvedThresholds, Thresholds, source_of
from aloe_cli.modeling.backends import GenerationBackend, GenerationParams, GenerationRequest
from aloe_cli.modeling.backends.cache import CachedBackend, ResponseCache, request_key
from aloe_cli.modeling.backends.retry import AskCounters, Parsed, Unparsed, ask_until_parsed

STAGE = "score"
MIN_SCORE, MAX_SCORE = 1, 5
DEFAULT_MIN_SCORE = 3.0
PLACEHOLDERS = ("{conversation}", "{question}", "{answer}")
REPLY_EXCERPT = 300
# What the judge is asked to reply with, where the server can enforce a JSON schema.
JUDGE_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": MIN_SCORE, "maximum": MAX_SCORE},
                   "reason": {"type": "string"}},
    "required": ["score", "reason"],
    "additionalProperties": False,
}

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
    from aloe_cli.data.textfile import read_text_file

    template = read_text_file(path, "prompt file")
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


# ----------------------------------------------------------------------------- requests

def judge_request(record: dict, image_root: Any, rubric: Rubric, judge: str, *,
                  keyed: bool = False) -> GenerationRequest:
    """The judge's one user turn: the record's images, then the rubric; keyed for a response cache."""
    text = rubric.render(record)
    images = list(record.get("images") or [])
    messages = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": text}]}]
    key = request_key(judge, messages, images, image_root, response_format=JUDGE_SCHEMA) if keyed else None
    return GenerationRequest(messages, images, image_root, key=key, response_format=JUDGE_SCHEMA,
                             id=None if record.get("id") is None else str(record["id"]))


def parses(reply: str) -> bool:
    """Whether a reply holds a verdict (only those are worth caching)."""
    try:
        parse_judge_reply(reply)
    except UnparseableReply:
        return False
    return True


# ----------------------------------------------------------------------------- the stage

@dataclass(frozen=True)
class ScoreConfig:
    judge: str  # model name (hf: folder or Hub id; openai: the served model name)
    parse_retries: int = 2  # extra attempts for an unparseable reply
    retry_temperature: float = 0.7
    max_new_tokens: int = 256
    seed: int = 0  # sampling seed of the first retry; each later retry adds one


@dataclass
class ScoreCounters(AskCounters):
    """The asking loop's counters (requests, cached, parse_retries, unparseable, failed, not_sent), and more."""

    failed_before_request: int = 0  # records with no request to send (no answer to judge, ...)
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)

    def count_score(self, source: str, score: int | None) -> None:
        histogram = self.by_source.setdefault(source, {str(s): 0 for s in range(MIN_SCORE, MAX_SCORE + 1)})
        label = "unparseable" if score is None else str(score)
        histogram[label] = histogram.get(label, 0) + 1


class ScoreStage(Stage):
    """`aloe score`: annotate aloe.score and reject below the per-source min (or unparseable).

    With a cache, replies that parse are stored as they arrive and reused on the next run (keyed by judge,
    prompt, image bytes and schema); the backend is only woken for what the cache does not hold.
    """

    name = STAGE
    additive = ("requests", "cached", "parse_retries", "unparseable", "request_failures", "failed_before_request",
                "scores.*.*")

    def __init__(self, backend: GenerationBackend, config: ScoreConfig, rubric: Rubric,
                 thresholds: Thresholds | None = None, cache: ResponseCache | None = None):
        self.backend = CachedBackend(backend, cache, accept=parses) if cache is not None else backend
        self.keyed = cache is not None
        self.config = config
        self.rubric = rubric
        self.thresholds = thresholds or default_score_thresholds()
        self.distribution = Distribution()
        self.counters = ScoreCounters()
        self._resolved: ResolvedThresholds | None = None

    @property
    def measure_first(self) -> bool:  # percentile thresholds need every score before the first decision
        return self.thresholds.needs_distribution()

    def close(self) -> None:
        self.backend.close()

    def annotate(self, batch: list[Item]) -> None:
        pending: list[tuple[Item, GenerationRequest]] = []
        for item in batch:
            try:
                request = judge_request(item.record, item.image_root, self.rubric, self.config.judge,
                                        keyed=self.keyed)
            except RecordError as error:
                item.error = error.located(item.where)
                self.counters.failed_before_request += 1
                continue
            pending.append((item, request))
        if pending:
            self._judge(pending)

    def _judge(self, pending: list[tuple[Item, GenerationRequest]]) -> None:
        """Ask, then ask again (sampling) for replies that did not parse (`backends.retry`)."""
        params = GenerationParams(max_new_tokens=self.config.max_new_tokens)
        outcomes = ask_until_parsed(self.backend, [request for _, request in pending], params, parse_judge_reply,
                                    parse_retries=self.config.parse_retries,
                                    retry_temperature=self.config.retry_temperature, seed=self.config.seed,
                                    counters=self.counters)
        for (item, _), outcome in zip(pending, outcomes):
            if isinstance(outcome, Parsed):
                self._record_verdict(item, outcome.value)
            elif isinstance(outcome, Unparsed):
                self._record_unparseable(item, outcome.reply)
            elif outcome.sent:
                item.error = RecordError("judge_request_failed", f"judge request failed: {outcome.failure.message}",
                                         where=item.where)
            else:  # failed while the request was built (an image that does not load): nothing was sent
                item.error = RecordError(outcome.failure.reason, outcome.failure.message, where=item.where)

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
            "backend": self.backend.name,
            "requests": self.counters.requests,
            "cached": self.counters.cached,
            "parse_retries": self.counters.parse_retries,
            "unparseable": self.counters.unparseable,
            "request_failures": self.counters.failed,
            # never reached the judge: no request could be made, or it failed while built (a bad image)
            "failed_before_request": self.counters.failed_before_request + self.counters.not_sent,
            "scores": {source: self.counters.by_source[source] for source in sources},
            "thresholds": {source: self._resolved.limits_for(source).to_dict() for source in sources},
            **self._client_summary(),
        }

    def _client_summary(self) -> dict[str, Any]:
        counters = getattr(self.backend, "counters", None)
        return {"client": counters.to_dict()} if counters is not None else {}


__all__ = ["DEFAULT_RUBRIC", "JUDGE_SCHEMA", "Rubric", "ScoreConfig", "ScoreStage", "UnparseableReply", "Verdict",
           "default_score_thresholds", "judge_request", "load_rubric", "parse_judge_reply", "parses", "transcript"]
