"""Keep every rank's vision tower in step under ZeRO-3 when a micro batch has no image.

ZeRO-3 gathers a module's parameters from all ranks when the module runs
(and again in the backward pass). A rank whose micro batch is text-only never
calls the vision tower while the other ranks do, so their collectives no
longer match: NCCL hangs, gloo dies at the first step with a size mismatch.

For a text-only training batch the guard does what the forward pass does for
images, at the same point (after the token embedding, before the language
model): it runs `get_image_features` on one blank dummy image of the smallest
grid (one merged token) and adds the dummy features times zero to the
embeddings. The result
is numerically the text-only forward pass, but every rank gathers the vision
parameters in the same order and sends them (zero) gradients in the backward
pass. Outside training (evaluation, generation) the hook does nothing.
"""

from __future__ import annotations

from typing import Any


def vision_core(model: Any) -> Any:
    """The submodule holding `visual` and `get_image_features` (Qwen2-VL: `model.model`)."""
    for module in (model, getattr(model, "model", None)):
        if module is not None and hasattr(module, "visual") and hasattr(module, "get_image_features"):
            return module
    raise ValueError(f"{type(model).__name__} has no vision tower the guard knows (expected model.model.visual)")


def dummy_image_inputs(vision_config: Any, device, dtype) -> tuple[Any, Any]:
    """pixel_values and image_grid_thw of one blank image of the smallest grid (merge x merge patches)."""
    import torch

    merge = int(getattr(vision_config, "spatial_merge_size", 2))
    patch = int(getattr(vision_config, "patch_size", 14))
    temporal = int(getattr(vision_config, "temporal_patch_size", 2))
    channels = int(getattr(vision_config, "in_channels", getattr(vision_config, "in_chans", 3)))
    pixels = torch.zeros((merge * merge, channels * temporal * patch * patch), device=device, dtype=dtype)
    grid = torch.tensor([[1, merge, merge]], device=device, dtype=torch.long)
    return pixels, grid


class VisionGuard:
    """Installed with `install`; `calls` counts the text-only batches it covered.

    Two hooks: one on the core model notes whether the batch has images, one
    on its language model adds the zero-weighted dummy features to the
    embeddings right where image features would have been merged in, so the
    module order (which ZeRO-3 traces and checks across ranks) is the same
    with and without images.
    """

    def __init__(self, model: Any):
        self.core = vision_core(model)
        self.calls = 0
        self._text_only = False
        self._handles: list = []

    def install(self) -> VisionGuard:
        self._handles = [
            self.core.register_forward_pre_hook(self._note_batch, with_kwargs=True),
            self.core.language_model.register_forward_pre_hook(self._add_dummy_image, with_kwargs=True),
        ]
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _note_batch(self, module, args, kwargs) -> None:
        self._text_only = module.training and not any(
            kwargs.get(key) is not None for key in ("pixel_values", "pixel_values_videos", "mm_encoder_outputs"))

    def _add_dummy_image(self, module, args, kwargs):
        if not self._text_only or kwargs.get("inputs_embeds") is None:
            return None
        self._text_only = False
        embeds = kwargs["inputs_embeds"]
        pixels, grid = dummy_image_inputs(self.core.config.vision_config, embeds.device, _dtype_of(self.core.visual))
        pooled = self.core.get_image_features(pixels, grid, return_dict=True).pooler_output
        pooled = torch_cat(pooled)
        kwargs["inputs_embeds"] = embeds + pooled.to(embeds.dtype).sum() * 0.0
        self.calls += 1
        return args, kwargs


def torch_cat(features: Any):
    """`pooler_output` is a tensor or a tuple of per-image tensors, depending on the transformers version."""
    import torch

    return torch.cat(list(features), dim=0) if isinstance(features, (list, tuple)) else features


def _dtype_of(module: Any):
    for parameter in module.parameters():
        return parameter.dtype
    import torch

    return torch.float32


__all__ = ["VisionGuard", "dummy_image_inputs", "vision_core"]
