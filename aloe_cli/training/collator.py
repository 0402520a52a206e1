"""The training collator: decode a micro batch's images, render it with the training chat template, label it.

For each example the images are decoded (`aloe_cli.data.images`: paths, data
URIs, parquet image structs, DICOM), the conversation is encoded by
`modeling.encoding.ChatEncoder` (the training chat template and its loss mask),
and the labels are the input ids where that mask is 1 and -100 elsewhere: the
loss covers exactly the tokens `aloe mix` balanced on.

A sample longer than `max_length` (image tokens included) is dropped, or with
`truncate_text` its text is cut at `max_length` provided the cut falls after
its last image token and leaves some answer tokens; image tokens are never cut.
A sample whose image is missing or broken is skipped (or, with
`on_error="fail"`, stops the run naming the record). A dropped or skipped
sample is replaced by the next usable row of the dataset, so every rank always
gets a full micro batch (ZeRO-3 ranks must step together). What was dropped is
returned with the batch under `aloe_skipped` (reason -> count): the collator
runs in data-loader workers, so counters cannot live in it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aloe_cli.data.images import load_image
from aloe_cli.errors import AloeError, RecordError
from aloe_cli.modeling.encoding import ChatEncoder, chat_messages

SKIPPED_KEY = "aloe_skipped"
# How many following rows are tried in place of an unusable one before giving up.
MAX_REPLACEMENTS = 64
IGNORE_INDEX = -100


class Unusable(Exception):
    """A sample that cannot be trained on; `reason` is the counter it goes to."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    mm_token_type_ids: list[int] | None
    pixel_values: Any | None  # tensor
    image_grid_thw: Any | None  # tensor


@dataclass
class TrainingCollator:
    """Collates rows of the training dataset (`training.data`) into a padded, labelled batch."""

    processor: Any
    max_length: int
    truncate_text: bool = False
    on_error: str = "skip"
    dataset: Any = None  # rows to draw replacements from; None: an unusable sample is an error
    _protected: frozenset = field(default=frozenset(), init=False, repr=False)
    _chats: ChatEncoder | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._chats = ChatEncoder(self.processor)  # the training template and its loss mask
        tokenizer = self.processor.tokenizer
        names = [getattr(self.processor, "image_token", None), getattr(self.processor, "video_token", None),
                 "<|vision_start|>", "<|vision_end|>"]
        vocab = tokenizer.get_vocab()
        self._protected = frozenset(vocab[name] for name in names if name and name in vocab)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ------------------------------------------------------------------ one sample

    def encode(self, example: dict) -> Encoded:
        """One row -> input ids and labels (and its images' pixels); Unusable if it cannot be trained on."""
        try:
            chat = self._chats.encode(self._conversation(example))
        except RecordError as error:  # the template rejects the conversation (raise_exception, bad roles)
            if self.on_error == "fail":
                raise AloeError(f"{example.get('where', '?')}: {error.message}") from None
            raise Unusable(error.reason, error.message) from None
        return self._labelled(chat)

    def _conversation(self, example: dict) -> list[dict]:
        """The row's messages with its images decoded; Unusable (or, with --on-error fail, the error) if one
        cannot be read."""
        try:
            images = [load_image(entry) for entry in example["images"]]
        except RecordError as error:
            if self.on_error == "fail":
                where = example.get("where", "?")
                raise AloeError(f"{where}: {error.message} (--on-error skip would skip it)") from None
            raise Unusable(error.reason, error.message) from None
        return chat_messages(example["messages"], images)

    def _labelled(self, chat) -> Encoded:
        """An encoded conversation -> labels on its loss tokens, cut or refused when over-long."""
        input_ids = chat.input_ids
        labels = [token if learned else IGNORE_INDEX for token, learned in zip(input_ids, chat.loss_mask)]
        mm_types = chat.mm_token_type_ids
        if len(input_ids) > self.max_length:
            cut = self._text_cut(input_ids, labels)
            input_ids, labels = input_ids[:cut], labels[:cut]
            mm_types = mm_types[:cut] if mm_types is not None else None
        if all(label == IGNORE_INDEX for label in labels):
            raise Unusable("no_loss_tokens", "no answer token left to learn from")
        return Encoded(input_ids, labels, mm_types, chat.pixel_values, chat.image_grid_thw)

    def _text_cut(self, input_ids: list[int], labels: list[int]) -> int:
        """Where an over-long sample may be cut (text only), or Unusable('too_long')."""
        length = len(input_ids)
        if not self.truncate_text:
            raise Unusable("too_long", f"{length} tokens > max_length {self.max_length}")
        positions = [i for i, token in enumerate(input_ids) if token in self._protected]
        if positions and positions[-1] >= self.max_length:
            raise Unusable("too_long", f"{length} tokens and its image tokens reach past max_length "
                                       f"{self.max_length}; image tokens are never cut")
        if all(label == IGNORE_INDEX for label in labels[: self.max_length]):
            raise Unusable("too_long", f"{length} tokens; cutting at max_length {self.max_length} leaves no answer")
        return self.max_length

    def encode_or_replace(self, example: dict, skipped: Counter) -> Encoded:
        """Encode `example`, or the next usable row after it, counting every one that was passed over."""
        candidate = example
        for attempt in range(MAX_REPLACEMENTS + 1):
            try:
                return self.encode(candidate)
            except Unusable as unusable:
                skipped[unusable.reason] += 1
                if self.dataset is None:
                    raise AloeError(f"{candidate.get('where', '?')}: {unusable}") from None
                candidate = self.dataset[(int(example["index"]) + attempt + 1) % len(self.dataset)]
        raise AloeError(f"{MAX_REPLACEMENTS + 1} consecutive records after {example.get('where', '?')} cannot be "
                        f"trained on ({', '.join(f'{k}={v}' for k, v in skipped.items())}); check --max-length, "
                        "--truncate and the images")

    def _encode_all(self, examples: list[dict], skipped: Counter) -> list[Encoded]:
        """Every row of a micro batch in one processor call (one call per row costs more than the step itself on
        small samples); a row that cannot be used goes the one-row way (`encode_or_replace`), which counts it,
        replaces it or stops the run exactly as alone."""
        conversations: dict[int, list[dict]] = {}
        for index, example in enumerate(examples):
            try:
                conversations[index] = self._conversation(example)
            except Unusable:
                pass
        chats = dict(zip(conversations, self._chats.encode_many(list(conversations.values()))))
        encoded = []
        for index, example in enumerate(examples):
            chat = chats.get(index)
            try:
                if chat is None or isinstance(chat, RecordError):
                    raise Unusable("", "")
                encoded.append(self._labelled(chat))
            except Unusable:
                encoded.append(self.encode_or_replace(example, skipped))
        return encoded

    # ------------------------------------------------------------------ the batch

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        import torch

        skipped: Counter = Counter()
        encoded = self._encode_all(examples, skipped)
        width = max(len(e.input_ids) for e in encoded)
        batch_size = len(encoded)
        input_ids = torch.full((batch_size, width), self.pad_id, dtype=torch.long)
        labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        mm_token_type_ids = torch.zeros((batch_size, width), dtype=torch.long)
        for row, sample in enumerate(encoded):  # right padding: every real token keeps its position
            n = len(sample.input_ids)
            input_ids[row, :n] = torch.tensor(sample.input_ids)
            labels[row, :n] = torch.tensor(sample.labels)
            attention_mask[row, :n] = 1
            if sample.mm_token_type_ids is not None:
                mm_token_type_ids[row, :n] = torch.tensor(sample.mm_token_type_ids)
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                                 "mm_token_type_ids": mm_token_type_ids}
        pixels = [e.pixel_values for e in encoded if e.pixel_values is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels, dim=0)
            batch["image_grid_thw"] = torch.cat([e.image_grid_thw for e in encoded if e.image_grid_thw is not None])
        batch[SKIPPED_KEY] = dict(skipped)
        return batch


__all__ = ["IGNORE_INDEX", "SKIPPED_KEY", "TrainingCollator", "Unusable"]
