"""Scoring answer tokens: records -> encoded tensors -> per-record and per-turn answer NLL.

`ConversationEncoder` renders a record with the chat template training uses
(through the shared `modeling.encoding.ChatEncoder`: loss mask, images
loaded) and keeps only what scoring needs; `PerplexityScorer` runs
length-sorted, right-padded batches under `torch.inference_mode` and sums the
negative log-likelihood of the loss tokens, in float32, `LOGIT_CHUNK` scored
positions at a time (memory does not grow with the vocabulary). See
`filters.perplexity` for what the values mean and how a run uses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from aloe_cli.data.images import load_image
from aloe_cli.errors import RecordError
from aloe_cli.modeling.encoding import ChatEncoder, EncodedChat, chat_messages, length_sorted_batches

# Tokens whose logits are materialised at once (x vocabulary x 4 bytes).
LOGIT_CHUNK = 1024


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


__all__ = ["AnswerLoss", "ConversationEncoder", "Encoded", "LOGIT_CHUNK", "PerplexityScorer", "answer_only", "collate",
           "turn_ids_from_mask"]
