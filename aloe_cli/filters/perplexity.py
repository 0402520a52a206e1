"""Answer perplexity: how surprised a model is by a record's assistant turns, given the rest.

For each record the conversation is rendered with the chat template training
uses (`modeling.chat_template.training_chat_template`: the model's own when it
has `{% generation %}` markers, else aloe's training template for its family)
and the model's processor (images included, so the answer is conditioned on
them). Only loss tokens are scored: the tokens of the template's generation
blocks (for Qwen2-VL each assistant turn's content and its closing
`<|im_end|>\\n`), the same tokens `aloe mix` counts and training learns from.
System text, user turns and image tokens are context only; the first token is
never scored (nothing comes before it to predict it from).

    perplexity = exp(sum of answer-token NLL / number of answer tokens)

and `per_turn` is the same per assistant turn. With `ifd`, the answer is
scored a second time without its prompt (the assistant turns alone, no user
turns, no images) and `ifd = perplexity(answer | prompt) / perplexity(answer)`
(instruction-following difficulty: near or above 1 means the prompt does not
help predict the answer).

Batching: records are sorted by length inside a window, padded on the right
and run through the model under `torch.inference_mode`; results go back to
their records, so output order is input order. Right padding keeps every real
token at the same position and attention span as when run alone (see
`collate`), so values do not depend on batch size or order. Logits are computed only at the scored
positions, in float32, a chunk at a time: memory does not grow with the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aloe_cli.data.io import Item
from aloe_cli.data.records import annotate
from aloe_cli.data.stage import Reject, Stage
from aloe_cli.errors import RecordError
from aloe_cli.filters.perplexity_scoring import (  # noqa: F401 - part of this module's API
    AnswerLoss,
    ConversationEncoder,
    Encoded,
    PerplexityScorer,
    answer_only,
    collate,
    turn_ids_from_mask,
)
from aloe_cli.filters.thresholds import (
    Distribution,
    ResolvedThresholds,
    Thresholds,
    check_value,
    source_of,
)
from aloe_cli.modeling.loading import is_local_reference

STAGE = "perplexity"
SUMMARY_PERCENTILES = (1, 5, 50, 95, 99)
# Runner batches hold this many model batches, so length sorting has something to sort.
SORT_WINDOW = 8


@dataclass(frozen=True)
class PerplexityConfig:
    batch_size: int = 16  # records per forward pass
    ifd: bool = False
    max_tokens: int | None = None  # longer records are errors (reason too_long)
    reuse: bool = False  # keep values already present in aloe.perplexity


# ----------------------------------------------------------------------------- the stage

@dataclass
class PerplexityCounters:
    scored: int = 0
    reused: int = 0
    recomputed_other_model: int = 0  # --reuse, but the value was computed by another model (or none recorded)
    tokens: int = 0


def same_model(recorded: Any, current: str) -> bool:
    """Whether a value recorded under `aloe.perplexity.model` was computed by `current` (the --model given):
    the same Hub id, or the same local folder however it is spelled."""
    if not isinstance(recorded, str) or not recorded or not current:
        return False
    if recorded == current:
        return True
    if not (is_local_reference(recorded) and is_local_reference(current)):
        return False
    try:
        return Path(recorded).expanduser().resolve() == Path(current).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


class PerplexityStage(Stage):
    """`aloe perplexity`: annotate aloe.perplexity and reject outside the per-source thresholds."""

    name = STAGE
    additive = ("records_scored", "records_reused", "records_recomputed_other_model", "tokens_scored")

    def __init__(self, model_loader: Callable[[], Any], config: PerplexityConfig, thresholds: Thresholds | None = None,
                 model_name: str = ""):
        self._model_loader = model_loader
        self._loaded = None
        self._encoder: ConversationEncoder | None = None
        self._scorer: PerplexityScorer | None = None
        self.config = config
        self.thresholds = thresholds
        self.model_name = model_name
        self.distribution = Distribution()
        self.ifd_distribution = Distribution()
        self.counters = PerplexityCounters()
        self._resolved: ResolvedThresholds | None = None

    # -- model, loaded on first need (a run that only re-applies thresholds with --reuse never loads it)
    def _ensure_model(self) -> None:
        if self._loaded is not None:
            return
        self._loaded = self._model_loader()
        self._encoder = ConversationEncoder(self._loaded.processor, self.config.max_tokens)
        self._scorer = PerplexityScorer(self._loaded, self.config.batch_size)

    @property
    def measure_first(self) -> bool:  # percentile thresholds need every value before the first decision
        return self.thresholds is not None and self.thresholds.needs_distribution()

    def runner_batch_size(self) -> int:
        return self.config.batch_size * SORT_WINDOW

    def annotate(self, batch: list[Item]) -> None:
        todo = batch
        if self.config.reuse:
            todo = [item for item in todo if not self._reuse(item)]
        if not todo:
            return
        self._ensure_model()
        examples, slots = self._encode(todo)
        losses = self._scorer.score(examples) if examples else []
        for item in todo:
            if item.error is None and id(item) in slots:
                self._annotate_item(item, slots[id(item)], losses)

    def _encode(self, items: list[Item]) -> tuple[list[Encoded], dict[int, dict[str, int]]]:
        """Encode every item's conversation (and its answer alone, for IFD) in one processor call.

        Returns the examples and, per item, where its "conditioned" (and "alone")
        example sits in that list; items that fail get `item.error` instead.
        """
        conversations: list[list[dict]] = []
        owners: list[tuple[Item, str]] = []
        for item in items:
            try:
                conversation = self._encoder.conversation(item.record, item.image_root)
            except RecordError as error:
                item.error = error.located(item.where)
                continue
            conversations.append(conversation)
            owners.append((item, "conditioned"))
            if self.config.ifd:
                conversations.append(answer_only(conversation))
                owners.append((item, "alone"))
        examples: list[Encoded] = []
        slots: dict[int, dict[str, int]] = {}
        for (item, role), result in zip(owners, self._encoder.encode_many(conversations)):
            if isinstance(result, RecordError):
                item.error = item.error or result.located(item.where)
                continue
            slots.setdefault(id(item), {})[role] = len(examples)
            examples.append(result)
        return examples, slots

    def _annotate_item(self, item: Item, slots: dict[str, int], losses: list[AnswerLoss]) -> None:
        loss = losses[slots["conditioned"]]
        value = loss.perplexity
        if not math.isfinite(value):
            item.error = RecordError("perplexity_not_finite", f"the model gave a non-finite loss ({value})")
            return
        values: dict[str, Any] = {"value": value, "tokens": loss.tokens, "per_turn": loss.per_turn,
                                  "model": self.model_name}
        if "alone" in slots:
            alone = losses[slots["alone"]].perplexity
            values["value_alone"] = alone
            values["ifd"] = value / alone if alone > 0 else None
        annotate(item.record, self.name, values)
        self.counters.scored += 1
        self.counters.tokens += loss.tokens
        self._count(item, values)

    def _reuse(self, item: Item) -> bool:
        """--reuse: keep a value already in the record when this run's model computed it."""
        previous = (item.record.get("aloe") or {}).get(self.name)
        if not isinstance(previous, dict) or not _is_number(previous.get("value")):
            return False
        if not same_model(previous.get("model"), self.model_name):
            self.counters.recomputed_other_model += 1  # perplexities of two models are not comparable
            return False
        if self.config.ifd and not _is_number(previous.get("ifd")):
            return False
        previous.pop("flag", None)  # an old --keep-all flag; this run decides afresh
        self.counters.reused += 1
        self._count(item, previous)
        return True

    def _count(self, item: Item, values: dict) -> None:
        source = source_of(item)
        self.distribution.add(source, values["value"])
        if _is_number(values.get("ifd")):
            self.ifd_distribution.add(source, values["ifd"])

    def decide(self, item: Item) -> Reject | None:
        if self.thresholds is None:
            return None
        if self._resolved is None:
            self._resolved = self.thresholds.resolve(self.distribution)
        value = item.record["aloe"][self.name]["value"]
        source = source_of(item)
        limits = self._resolved.limits_for(source)
        side = check_value(value, limits)
        if side == "below":
            return Reject("trivial_answer", f"perplexity {value:.4g} below min {limits.min:.4g} for {source}")
        if side == "above":
            return Reject("noisy_answer", f"perplexity {value:.4g} above max {limits.max:.4g} for {source}")
        return None

    def resolved_thresholds(self) -> ResolvedThresholds | None:
        if self.thresholds is None:
            return None
        if self._resolved is None:  # after the run: the runner marked the distribution complete
            self._resolved = self.thresholds.resolve(self.distribution)
        return self._resolved

    def summary(self) -> dict[str, Any]:
        resolved = self.resolved_thresholds()
        sources = self.distribution.sources()
        return {
            "model": self._loaded.describe() if self._loaded is not None else self.model_name,
            "records_scored": self.counters.scored,
            "records_reused": self.counters.reused,
            "records_recomputed_other_model": self.counters.recomputed_other_model,
            "tokens_scored": self.counters.tokens,
            "percentiles": {source: {"count": self.distribution.count(source),
                                     **self.distribution.percentiles(source, SUMMARY_PERCENTILES)}
                            for source in sources},
            **({"ifd_percentiles": {source: self.ifd_distribution.percentiles(source, SUMMARY_PERCENTILES)
                                    for source in self.ifd_distribution.sources()}} if self.config.ifd else {}),
            "thresholds": {source: resolved.limits_for(source).to_dict() for source in sources} if resolved else {},
        }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def percentile_rows(summary: dict[str, Any]) -> list[list[str]]:
    """Rows of the closing table: source, n, p1..p99, min, max."""
    rows = []
    for source, stats in summary.get("percentiles", {}).items():
        limits = summary.get("thresholds", {}).get(source, {})
        rows.append([source, str(stats["count"])] + [_fmt(stats[f"p{q}"]) for q in SUMMARY_PERCENTILES]
                    + [_fmt(limits.get("min")), _fmt(limits.get("max"))])
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


__all__ = ["AnswerLoss", "ConversationEncoder", "Encoded", "PerplexityConfig", "PerplexityScorer",
           "PerplexityStage", "collate", "percentile_rows", "turn_ids_from_mask"]
