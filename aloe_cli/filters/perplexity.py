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

from aloe_cli.data.images import load_image
from aloe_cli.data.io import Item
from aloe_cli.data.records import annotate
from aloe_cli.data.stage import Reject, Stage
from aloe_cli.errors import RecordError
from aloe_cli.filters.thresholds import (
    Distribution,
    ResolvedThresholds,
    Thresholds,
    check_value,
    source_of,
)
from aloe_cli.modeling.encoding import ChatEncoder, EncodedChat, chat_messages, length_sorted_batches
from aloe_cli.modeling.loading import is_local_reference

STAGE = "perplexity"
SUMMARY_PERCENTILES = (1, 5, 50, 95, 99)
# Tokens whose logits are materialised at once (x vocabulary x 4 bytes).
LOGIT_CHUNK = 1024
# Runner batches hold this many model batches, so length sorting has something to sort.
SORT_WINDOW = 8


@dataclass(frozen=True)
class PerplexityConfig:
    batch_size: int = 16  # records per forward pass
    ifd: bool = False
    max_tokens: int | None = None  # longer records are errors (reason too_long)
    reuse: bool = False  # keep values already present in aloe.perplexity


# ----------------------------------------------------------------------------- encoding

@dataclass
class Encoded:
    """One conversation as model inputs, with the turn index of every scored token (-1: context)."""

    input_ids: Any  # 1-D LongTensor
    turn_ids: Any  # 1-D LongTensor, same length
    mm_token_type_ids: Any | None = None
    pixel_values: Any | None = None
    image_grid_thw: Any | None = None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def turn_ids_from_mask(mask: list[int]) -> list[int]:
    """Number the contiguous runs of 1s: [0,1,1,0,1] -> [-1,0,0,-1,1]."""
    turns, current, previous = [], -1, 0
    for bit in mask:
        if bit and not previous:
            current += 1
        turns.append(current if bit else -1)
        previous = bit
    return turns


def answer_only(messages: list[dict]) -> list[dict]:
    """The assistant turns alone (for IFD): no system or user turns, no images."""
    kept = []
    for message in messages:
        if message["role"] != "assistant":
            continue
        content = message["content"]
        if isinstance(content, list):
            content = [part for part in content if part.get("type") != "image"]
        kept.append({"role": "assistant", "content": content})
    return kept


class ConversationEncoder:
    """Record -> `Encoded`: the shared `ChatEncoder` (training template, loss mask), then tensors and turns."""

    def __init__(self, processor, max_tokens: int | None = None):
        self.chats = ChatEncoder(processor)
        self.max_tokens = max_tokens

    def conversation(self, record: dict, image_root) -> list[dict]:
        """The record's conversation with its images loaded (RecordError for a bad image or no answer)."""
        if not any(message.get("role") == "assistant" for message in record["messages"]):
            raise RecordError("no_answer", "record has no assistant turn to score", field="messages")
        images = []
        for position, entry in enumerate(record.get("images") or []):
            try:
                images.append(load_image(entry, image_root).convert("RGB"))
            except RecordError as error:
                raise RecordError(error.reason, error.message, field=f"images[{position}]") from None
        return chat_messages(record["messages"], images)

    def encode_many(self, conversations: list[list[dict]]) -> list[Encoded | RecordError]:
        """Encode conversations in one processor call; only the ones the template rejects fail."""
        return [chat if isinstance(chat, RecordError) else self._encoded(chat)
                for chat in self.chats.encode_many(conversations)]

    def encode(self, conversation: list[dict]) -> Encoded:
        result = self.encode_many([conversation])[0]
        if isinstance(result, RecordError):
            raise result
        return result

    def _encoded(self, chat: EncodedChat) -> Encoded | RecordError:
        import torch

        if self.max_tokens is not None and len(chat) > self.max_tokens:
            return RecordError("too_long", f"{len(chat)} tokens, more than --max-tokens {self.max_tokens}")
        mask = list(chat.loss_mask)
        mask[0] = 0  # the first token has nothing to be predicted from
        if not any(mask):
            return RecordError("no_answer", "the chat template marks no assistant tokens in this record",
                               field="messages")
        types = chat.mm_token_type_ids
        return Encoded(
            input_ids=torch.tensor(chat.input_ids, dtype=torch.long),
            turn_ids=torch.tensor(turn_ids_from_mask(mask), dtype=torch.long),
            mm_token_type_ids=torch.tensor(types, dtype=torch.long) if types is not None else None,
            pixel_values=chat.pixel_values,
            image_grid_thw=chat.image_grid_thw,
        )


# ----------------------------------------------------------------------------- scoring

@dataclass
class AnswerLoss:
    """Summed negative log-likelihood and token count per assistant turn."""

    turn_nll: list[float]
    turn_tokens: list[int]

    @property
    def tokens(self) -> int:
        return sum(self.turn_tokens)

    @property
    def perplexity(self) -> float:
        return _exp_mean(sum(self.turn_nll), self.tokens)

    @property
    def per_turn(self) -> list[float]:
        return [_exp_mean(nll, n) for nll, n in zip(self.turn_nll, self.turn_tokens)]


def _exp_mean(total: float, count: int) -> float:
    if count == 0:
        return float("nan")
    return math.exp(min(total / count, 709.0))  # beyond e^709 a float overflows


def collate(examples: list[Encoded], pad_token_id: int) -> dict[str, Any]:
    """A right-padded batch.

    Real tokens keep the positions and attention they have alone: pads come
    after every real token, so under causal attention no real token ever sees
    one, and Qwen2-VL's rope positions for the real tokens do not change. That
    is also why no attention mask is passed: the plain causal mask is exact for
    every scored token, and SDPA can take its fast causal path. Pad positions
    produce garbage that is never scored.
    """
    import torch

    width = max(example.length for example in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    turn_ids = torch.full((batch, width), -1, dtype=torch.long)
    has_types = any(example.mm_token_type_ids is not None for example in examples)
    token_types = torch.zeros((batch, width), dtype=torch.long) if has_types else None
    for row, example in enumerate(examples):
        n = example.length
        input_ids[row, :n] = example.input_ids
        turn_ids[row, :n] = example.turn_ids
        if token_types is not None and example.mm_token_type_ids is not None:
            token_types[row, :n] = example.mm_token_type_ids
    inputs: dict[str, Any] = {"input_ids": input_ids}
    if token_types is not None:
        inputs["mm_token_type_ids"] = token_types
    pixels = [example.pixel_values for example in examples if example.pixel_values is not None]
    if pixels:
        inputs["pixel_values"] = torch.cat(pixels, dim=0)
        inputs["image_grid_thw"] = torch.cat([e.image_grid_thw for e in examples if e.image_grid_thw is not None])
    return {"inputs": inputs, "turn_ids": turn_ids}


class PerplexityScorer:
    """Scores encoded conversations with a loaded model, in length-sorted padded batches."""

    def __init__(self, loaded, batch_size: int = 16):
        self.loaded = loaded
        self.batch_size = batch_size
        tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def score(self, examples: list[Encoded]) -> list[AnswerLoss]:
        results: list[AnswerLoss | None] = [None] * len(examples)
        for indices in length_sorted_batches([e.length for e in examples], self.batch_size):
            for index, loss in zip(indices, self._score_batch([examples[i] for i in indices])):
                results[index] = loss
        return results  # type: ignore[return-value]

    def _score_batch(self, examples: list[Encoded]) -> list[AnswerLoss]:
        import torch

        batch = collate(examples, self.pad_token_id)
        with torch.inference_mode():
            nll, rows, turns = self._token_nll(batch["inputs"], batch["turn_ids"])
        return _sum_per_turn(nll, rows, turns, len(examples))

    def _token_nll(self, inputs: dict, turn_ids):
        """NLL of every scored token, with its row and turn."""
        import torch
        import torch.nn.functional as F

        model, device = self.loaded.model, self.loaded.device
        inputs = {key: value.to(device) for key, value in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.loaded.dtype)
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
        turn_ids = turn_ids.to(device)
        scored = turn_ids[:, 1:] >= 0  # token t is predicted from the hidden state at t - 1
        predictors = hidden[:, :-1][scored]
        targets = inputs["input_ids"][:, 1:][scored]
        rows = torch.arange(turn_ids.shape[0], device=device)[:, None].expand_as(scored)[scored]
        turns = turn_ids[:, 1:][scored]
        head = model.get_output_embeddings()
        pieces = []
        for start in range(0, predictors.shape[0], LOGIT_CHUNK):
            logits = head(predictors[start:start + LOGIT_CHUNK]).float()
            pieces.append(F.cross_entropy(logits, targets[start:start + LOGIT_CHUNK], reduction="none"))
        nll = torch.cat(pieces) if pieces else torch.zeros(0, device=device)
        return nll.double().cpu(), rows.cpu(), turns.cpu()


def _sum_per_turn(nll, rows, turns, batch: int) -> list[AnswerLoss]:
    import torch

    n_turns = int(turns.max()) + 1 if turns.numel() else 0
    key = rows * max(n_turns, 1) + turns
    sums = torch.zeros(batch * max(n_turns, 1), dtype=torch.float64).index_add_(0, key, nll)
    counts = torch.zeros(batch * max(n_turns, 1), dtype=torch.long).index_add_(0, key, torch.ones_like(key))
    losses = []
    for row in range(batch):
        row_counts = counts[row * n_turns:(row + 1) * n_turns].tolist() if n_turns else []
        row_sums = sums[row * n_turns:(row + 1) * n_turns].tolist() if n_turns else []
        present = [i for i, count in enumerate(row_counts) if count > 0]
        losses.append(AnswerLoss([row_sums[i] for i in present], [row_counts[i] for i in present]))
    return losses


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
