"""Local generation with a loaded model: batched, greedy by default, order-independent.

    backend = HFBackend(load_model(ModelSpec("Qwen/Qwen2-VL-2B-Instruct")), batch_size=8)
    backend = HFBackend(lambda: load_model(spec))       # loaded on the first request that needs it
    backend.generate(requests, GenerationParams(max_new_tokens=64), on_done)

Each request is rendered with the model's own chat template (through its processor, with the generation
prompt appended) and its images decoded with `data.images.load_image`. Requests are sorted by estimated
length and generated `batch_size` at a time with left padding, so every row continues from its own last
token; `on_done` gets each reply under its original index. Temperature 0 is greedy decoding, so a reply
does not depend on which other requests shared its batch (the tests hold batched == one at a time);
temperature > 0 samples with top-p, seeded from `params.seed` at each call. `response_format` is not
enforced here (the reply parsers of the callers cope without it).
"""

from __future__ import annotations

from collections.abc import Callable

from aloe_cli.data.images import load_image
from aloe_cli.errors import RecordError
from aloe_cli.modeling.backends import (
    Failure,
    GenerationParams,
    GenerationRequest,
    OnDone,
    Reply,
    check_image_count,
    indexed,
)
from aloe_cli.modeling.encoding import chat_messages, check_image_shapes, length_sorted_batches
from aloe_cli.modeling.loading import LoadedModel

# Qwen2-VL turns each 28x28 pixel patch into one token: an estimate of an image's share of the length.
PIXELS_PER_IMAGE_TOKEN = 28 * 28
CHARS_PER_TOKEN = 3


class HFBackend:
    """`generate` on a local model; `model` is a LoadedModel or a function that loads one when first needed."""

    name = "hf"

    def __init__(self, model: LoadedModel | Callable[[], LoadedModel], *, batch_size: int = 8):
        self._model = model if isinstance(model, LoadedModel) else None
        self._load = None if isinstance(model, LoadedModel) else model
        self.batch_size = batch_size

    @property
    def loaded(self) -> LoadedModel:
        if self._model is None:
            self._model = self._load()
        return self._model

    def describe(self) -> str:
        return self.loaded.describe()

    def generate(self, requests: list[GenerationRequest], params: GenerationParams, on_done: OnDone) -> None:
        if not requests:
            return
        processor = self.loaded.processor
        ready: list[tuple[int, int, str, list]] = []  # (estimated length, index, prompt text, images)
        for index, request in enumerate(requests):
            try:
                images = self._images(request)
                check_image_shapes(processor, images)
                text = processor.apply_chat_template(chat_messages(request.messages), tokenize=False,
                                                     add_generation_prompt=True)
            except RecordError as error:
                on_done(index, Failure(error.reason, error.format()))
                continue
            except Exception as exc:  # noqa: BLE001 - a template that rejects one chat must not stop the others
                on_done(index, Failure("template_error", "the chat template cannot render this request "
                                                         f"({type(exc).__name__}: {exc})"))
                continue
            estimate = len(text) // CHARS_PER_TOKEN + sum(i.width * i.height for i in images) // PIXELS_PER_IMAGE_TOKEN
            ready.append((estimate, index, text, images))
        if params.temperature > 0:
            import torch

            torch.manual_seed(params.seed)
        for batch in length_sorted_batches([row[0] for row in ready], self.batch_size):
            chunk = [ready[i] for i in batch]
            for (_, index, _, _), text in zip(chunk, self._generate_batch(chunk, params)):
                on_done(index, Reply(text))

    def _images(self, request: GenerationRequest) -> list:
        check_image_count(request)
        images = []
        for position, entry in enumerate(request.images):
            try:
                images.append(load_image(entry, request.image_root).convert("RGB"))
            except RecordError as error:
                raise indexed(error, position) from None
        return images

    def _generate_batch(self, chunk: list[tuple[int, int, str, list]], params: GenerationParams) -> list[str]:
        import torch
        from transformers import GenerationConfig

        loaded = self.loaded
        tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
        if tokenizer.pad_token_id is None:  # left padding needs some token; it is masked out anyway
            tokenizer.pad_token = tokenizer.eos_token
        images = [image for *_, row_images in chunk for image in row_images]
        inputs = loaded.processor(text=[text for _, _, text, _ in chunk], images=images or None, padding=True,
                                  padding_side="left", return_tensors="pt")
        inputs = {key: value.to(loaded.device) for key, value in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
        sampling = params.temperature > 0
        generation = GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=sampling,
            temperature=params.temperature if sampling else None, top_p=params.top_p if sampling else None,
            top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=loaded.model.generation_config.eos_token_id)
        with torch.inference_mode():
            output = loaded.model.generate(**inputs, generation_config=generation)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return decode_replies(tokenizer, new_tokens.tolist(), generation.eos_token_id)

    def close(self) -> None:
        pass


def decode_replies(tokenizer, rows: list[list[int]], eos_token_id: int | list[int] | None) -> list[str]:
    """Generated ids -> text, without the end-of-turn and padding tokens but with every other special token.

    `skip_special_tokens=True` would also drop Qwen2-VL's grounding markers (`<|object_ref_start|>`,
    `<|box_start|>`, ...), which are special tokens: a grounded answer would lose its labels and boxes.
    """
    stops = set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])
    stops.add(tokenizer.pad_token_id)
    stops.discard(None)
    return tokenizer.batch_decode([[token for token in row if token not in stops] for row in rows],
                                  skip_special_tokens=False)


__all__ = ["HFBackend", "decode_replies"]
