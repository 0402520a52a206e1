"""A record's conversation as model inputs, with THE loss-token mask.

Every model-side stage that needs token ids and the loss mask of a record (`perplexity` scores the masked
tokens, `train` learns them) goes through `ChatEncoder`: the conversation is rendered by the model's processor
with the training chat template (`chat_template.training_chat_template`) and
`return_assistant_tokens_mask=True`, so the mask covers exactly the tokens of the template's
`{% generation %}` blocks. `aloe mix` counts the same tokens without torch (`loss_tokens.py`);
tests/test_loss_agreement.py holds the two equal record by record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aloe_cli.errors import RecordError, first_line
from aloe_cli.modeling.chat_template import template_of, training_chat_template


def chat_messages(messages: list[dict], images: list | None = None) -> list[dict]:
    """Messages as chat templates take them: role and content only (provenance keys dropped).

    With `images`, the n-th `{"type": "image"}` placeholder carries the n-th image, which is how processors'
    `apply_chat_template` receives pixels.
    """
    remaining = iter(images) if images is not None else None
    chat = []
    for message in messages:
        content = message.get("content")
        if remaining is not None and isinstance(content, list):
            content = [{"type": "image", "image": next(remaining)} if part.get("type") == "image" else part
                       for part in content]
        chat.append({"role": message["role"], "content": content if content is not None else ""})
    return chat


def check_image_shapes(processor: Any, images: list) -> None:
    """RecordError (`image_invalid`, naming `images[n]`) for the first image the processor cannot resize, asked
    before any batch is built: Qwen2-VL's processor refuses aspect ratios of 200:1 and beyond (a 1x1000 strip)
    with a ValueError that would otherwise stop the whole batch, or be blamed on the chat template."""
    import sys

    image_processor = getattr(processor, "image_processor", None)
    resize = getattr(sys.modules.get(type(image_processor).__module__), "smart_resize", None)
    if resize is None:
        return  # a processor without Qwen2-VL's resizing rule: nothing known to refuse
    factor = getattr(image_processor, "patch_size", 14) * getattr(image_processor, "merge_size", 2)
    for position, image in enumerate(images):
        if not hasattr(image, "size"):
            continue
        width, height = image.size
        try:
            resize(height, width, factor=factor)
        except ValueError as exc:
            raise RecordError("image_invalid", f"the model's processor cannot take a {width}x{height} image "
                              f"({exc}); crop or pad it", field=f"images[{position}]") from None


def _conversation_images(conversation: list[dict]) -> list:
    return [part.get("image") for message in conversation if isinstance(message["content"], list)
            for part in message["content"] if part.get("type") == "image"]


def image_count(conversation: list[dict]) -> int:
    return sum(1 for message in conversation if isinstance(message["content"], list)
               for part in message["content"] if part.get("type") == "image")


@dataclass
class EncodedChat:
    """One conversation as the model sees it; `loss_mask[i]` is 1 where token i is a loss token."""

    input_ids: list[int]
    loss_mask: list[int]
    mm_token_type_ids: list[int] | None = None
    pixel_values: Any | None = None  # tensor (patches x features), None for text-only
    image_grid_thw: Any | None = None  # tensor (images x 3)

    def __len__(self) -> int:
        return len(self.input_ids)


class ChatEncoder:
    """Conversations -> `EncodedChat`, through a processor and the training chat template."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.chat_template = training_chat_template(template_of(processor))

    def encode(self, conversation: list[dict]) -> EncodedChat:
        """One conversation; RecordError('template_error') when the template or processor rejects it."""
        result = self.encode_many([conversation])[0]
        if isinstance(result, RecordError):
            raise result
        return result

    def encode_many(self, conversations: list[list[dict]]) -> list[EncodedChat | RecordError]:
        """Several conversations in one processor call (much faster than one call each).

        If the processor rejects the batch, each conversation is encoded on its own, so only the offending
        ones fail.
        """
        if not conversations:
            return []
        results: list[EncodedChat | RecordError | None] = [None] * len(conversations)
        usable = []
        for index, conversation in enumerate(conversations):
            try:
                check_image_shapes(self.processor, _conversation_images(conversation))
                usable.append(index)
            except RecordError as error:
                results[index] = error
        for index, result in zip(usable, self._encode_batch([conversations[i] for i in usable])):
            results[index] = result
        return results  # type: ignore[return-value]

    def _encode_batch(self, conversations: list[list[dict]]) -> list[EncodedChat | RecordError]:
        if not conversations:
            return []
        try:
            # Token lists, not tensors: transformers maps the generation spans to tokens several times faster
            # over lists (the pixels come back as a tensor either way).
            out = self.processor.apply_chat_template(conversations, chat_template=self.chat_template,
                                                     tokenize=True, return_dict=True,
                                                     return_assistant_tokens_mask=True)
        except Exception as exc:  # the template (raise_exception, bad roles) or the processor rejects something
            if len(conversations) == 1:
                return [RecordError("template_error", f"the chat template cannot render this record "
                                                      f"({type(exc).__name__}: {first_line(exc)})")]
            return [result for conversation in conversations for result in self._encode_batch([conversation])]
        return _split(out, [image_count(conversation) for conversation in conversations])


def _split(out: Any, image_counts: list[int]) -> list[EncodedChat]:
    """Per-conversation pieces of one batched processor output (token lists + concatenated pixels)."""
    grids, pixels, types = out.get("image_grid_thw"), out.get("pixel_values"), out.get("mm_token_type_ids")
    next_image = next_patch = 0
    results = []
    for row, n_images in enumerate(image_counts):
        row_grids = grids[next_image:next_image + n_images] if n_images else None
        patches = int(row_grids.prod(dim=-1).sum()) if n_images else 0
        results.append(EncodedChat(
            input_ids=list(out["input_ids"][row]),
            loss_mask=list(out["assistant_masks"][row]),
            mm_token_type_ids=list(types[row]) if types is not None else None,
            pixel_values=pixels[next_patch:next_patch + patches] if n_images else None,
            image_grid_thw=row_grids,
        ))
        next_image += n_images
        next_patch += patches
    return results


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (padding stays small, and an
    out-of-memory error shows up on the first batch); ties keep input order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


__all__ = ["ChatEncoder", "EncodedChat", "chat_messages", "check_image_shapes", "image_count",
           "length_sorted_batches"]
