"""Open-ended answers graded by an LLM judge on {0, 0.5, 1} against the reference answer.

The judge reads the question, the reference and the model's answer in `JUDGE_RUBRIC` (printed by
`aloe eval --show-judge-prompt`) and replies `{"score": 0 | 0.5 | 1, "reason": ...}` (a `Score: 0.5`
line is read too). A reply with no valid score is asked again with sampling, up to `parse_retries`
times; after that the item is unjudged: its score is null, it is counted and reported, and it never
counts as right or wrong. An empty model answer scores 0 without asking.

A vision-language judge (the recipe's is Qwen2.5-VL-72B-Instruct) also sees the item's images: they
come first in its turn, as in the model's, and `IMAGE_NOTE` opens the rubric. `judge_vision` decides
whether a judge is one (see its docstring); the images are part of the cache key of every request
that carries them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aloe_cli.errors import AloeError
from aloe_cli.modeling.backends import GenerationBackend, GenerationParams, GenerationRequest
from aloe_cli.modeling.backends.cache import request_key
from aloe_cli.modeling.backends.retry import AskCounters, Parsed, Unparsed, ask_until_parsed

SCORES = (0.0, 0.5, 1.0)

JUDGE_RUBRIC = """\
You are grading a model's answer to a medical question against the reference answer.

Question: {question}
Reference answer: {reference}
Model's answer: {prediction}

Score the model's answer:
1 - correct: it states the same finding, entity or value as the reference (wording, synonyms, \
abbreviations and extra correct detail are fine).
0.5 - partially correct: it is incomplete (e.g. names one of two findings, the organ but not the side) or \
less specific than the reference, but contains nothing that contradicts it.
0 - wrong: it contradicts the reference, names something else, hedges between several answers, refuses \
or does not answer.

Judge only the meaning, not the style or the length.
Reply with one line of JSON and nothing else:
{"score": <0, 0.5 or 1>, "reason": "<one sentence>"}
"""


IMAGE_NOTE = ("The image(s) above are the ones the question asks about: use them to understand the question "
              "and the answers, and grade against the reference answer.\n\n")


@dataclass(frozen=True)
class JudgeCase:
    question: str
    reference: str  # as the judge reads it (`open_answers.judge_reference` lists alternatives)
    prediction: str
    images: tuple = ()  # the item's images, shown to a vision judge
    image_root: Path | None = None


@dataclass
class JudgeResult:
    score: float | None  # 0, 0.5, 1, or None when no reply could be parsed (or the request failed)
    reason: str = ""
    attempts: int = 0
    reply: str = ""  # the last reply, when unparseable
    error: str | None = None
    request_failed: bool = False  # the judge was asked and did not answer (after its retries): not a verdict at all

    def to_dict(self) -> dict:
        values = {"score": self.score, "reason": self.reason, "attempts": self.attempts}
        if self.score is None:
            values.update(reply=self.reply, error=self.error)
        return values


class UnparseableVerdict(ValueError):
    pass


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)
_SCORE_LINE = re.compile(r"\bscore\b\**\s*[:=]\s*\**\s*(1(?:\.0+)?|0?\.5|0(?:\.[05]0*)?)(?![\d.])", re.IGNORECASE)
_LONE = re.compile(r"^\W*(1(?:\.0+)?|0?\.5|0(?:\.[05]0*)?)\W*$")


def parse_verdict(reply: str) -> tuple[float, str]:
    """(score, reason) from a judge reply; raises UnparseableVerdict."""
    if not isinstance(reply, str) or not reply.strip():
        raise UnparseableVerdict("empty reply")
    for candidate in [*_FENCE.findall(reply), reply]:
        for match in _OBJECT.finditer(candidate):
            try:
                data = json.loads(match.group(0))
            except ValueError:
                continue
            lowered = {str(k).lower(): v for k, v in data.items()} if isinstance(data, dict) else {}
            score = _score(lowered.get("score"))
            if score is not None:
                return score, str(lowered.get("reason") or lowered.get("explanation") or "").strip()
    for pattern in (_SCORE_LINE, _LONE):
        match = pattern.search(reply)
        if match:
            reason = " ".join((reply[:match.start()] + " " + reply[match.end():]).split()).strip(" *-:")
            return float(match.group(1)), re.sub(r"^reason\s*[:=]\s*", "", reason, flags=re.IGNORECASE)
    raise UnparseableVerdict("no score 0, 0.5 or 1 in the reply")


def _score(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number in SCORES else None


def judge_prompt(case: JudgeCase, rubric: str = JUDGE_RUBRIC, *, with_images: bool = False) -> str:
    text = (rubric.replace("{question}", case.question).replace("{reference}", case.reference)
            .replace("{prediction}", case.prediction))
    return IMAGE_NOTE + text if with_images else text


def judge_vision(kind: str, model: str, flag: bool | None, *, trust_remote_code: bool = False) -> Callable[[], bool]:
    """Whether the judge sees images, decided when it first grades (returned as a function).

    `--judge-backend hf`: when the judge model's config has a vision part (`vision_config`, what its vision
    tower is built from); `--no-judge-vision` makes it text only, `--judge-vision` on a model without one is
    an error. `--judge-backend openai`: the flag, default on (the recipe's judge is a vision-language model
    served by vLLM; a text-only server answers image requests with an error: give `--no-judge-vision`)."""
    if kind != "hf":
        return lambda: True if flag is None else flag
    decided: list[bool] = []

    def sees_images() -> bool:
        if not decided:
            has_vision = False if flag is False else _has_vision_part(model, trust_remote_code)
            if flag and not has_vision:
                raise AloeError(f"--judge-vision: the judge {model} has no vision part (no vision_config)")
            decided.append(has_vision)
        return decided[0]

    return sees_images


def _has_vision_part(model: str, trust_remote_code: bool) -> bool:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as exc:  # a folder without a config, a Hub id not reachable: the load would fail too
        raise AloeError(f"cannot read the judge's config {model}: {' '.join(str(exc).split())[:300]}") from None
    return getattr(config, "vision_config", None) is not None


@dataclass
class OpenJudge:
    """Grades open-ended answers through any generation backend (local model or served)."""

    backend: Callable[[], GenerationBackend]  # returns the judge's backend (created on first call)
    name: str  # the judge model, part of every cache key
    parse_retries: int = 2
    max_new_tokens: int = 256
    retry_temperature: float = 0.7
    rubric: str = JUDGE_RUBRIC
    keyed: bool = False  # give requests cache keys (when a response cache is in front of the backend)
    vision: Callable[[], bool] = lambda: False  # whether the judge is shown the items' images (`judge_vision`)
    counters: AskCounters = field(default_factory=AskCounters)

    def grade(self, cases: list[JudgeCase]) -> list[JudgeResult]:
        """One result per case; an empty answer scores 0 without asking (`backends.retry` asks the rest)."""
        results = [JudgeResult(0.0, "empty answer") if not case.prediction.strip() else JudgeResult(None)
                   for case in cases]
        asked = [index for index, case in enumerate(cases) if case.prediction.strip()]
        if not asked:
            return results
        requests = [self._request(cases[index], self.vision()) for index in asked]
        key = (lambda position, attempt: self._key(requests[position], attempt)) if self.keyed else None
        outcomes = ask_until_parsed(self.backend(), requests,
                                    GenerationParams(max_new_tokens=self.max_new_tokens), parse_verdict,
                                    parse_retries=self.parse_retries, retry_temperature=self.retry_temperature,
                                    key=key, counters=self.counters)
        for index, outcome in zip(asked, outcomes):
            result = results[index]
            result.attempts = outcome.attempts
            if isinstance(outcome, Parsed):
                result.score, result.reason = outcome.value
            elif isinstance(outcome, Unparsed):
                result.reply = " ".join(outcome.reply.split())[:300]
                result.error = f"unparseable reply after {outcome.attempts} attempt(s)"
            else:
                shown = " (the request carried the item's images: a text-only judge needs --no-judge-vision)"
                result.error = (f"judge request failed: {outcome.failure.message}"
                                + (shown if cases[index].images and self.vision() else ""))
                result.request_failed = outcome.sent
        return results

    def _request(self, case: JudgeCase, vision: bool) -> GenerationRequest:
        images = list(case.images) if vision else []
        content = [*({"type": "image"} for _ in images),
                   {"type": "text", "text": judge_prompt(case, self.rubric, with_images=bool(images))}]
        return GenerationRequest(messages=[{"role": "user", "content": content}], images=images,
                                 image_root=case.image_root)

    def _key(self, request: GenerationRequest, attempt: int) -> str:
        """The judge, the prompt, the bytes of the images sent, the attempt and the reply's length."""
        return request_key(self.name, request.messages, request.images, request.image_root,
                           salt=f"judge attempt={attempt} max_new_tokens={self.max_new_tokens}")


def verdict_parses(reply: str) -> bool:
    """Whether a reply holds a verdict (only those are worth caching: others are asked again)."""
    try:
        parse_verdict(reply)
    except UnparseableVerdict:
        return False
    return True


__all__ = ["IMAGE_NOTE", "JUDGE_RUBRIC", "JudgeCase", "JudgeResult", "OpenJudge", "UnparseableVerdict", "judge_prompt",
           "judge_vision", "parse_verdict", "verdict_parses"]
