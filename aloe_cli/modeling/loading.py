"""Loading Qwen2-VL-family checkpoints: `AutoProcessor` + `AutoModelForImageTextToText`.

    spec = ModelSpec("Qwen/Qwen2-VL-2B-Instruct", device="auto", dtype="auto")
    loaded = load_model(spec)          # LoadedModel(model, processor, device, dtype, attn_implementation)

- device: `auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`.
- dtype: `auto` is bfloat16 on a GPU that supports it (else float16) and
  float32 on the CPU; or `bfloat16`, `float16`, `float32`.
- attention: `--attn-implementation` is passed through to transformers; by
  default flash_attention_2 when the flash-attn package is installed and the
  model runs in half precision on a GPU, else sdpa.
- `trust_remote_code` stays off unless asked for.

`check_model_reference` validates a local folder without importing torch, and
asks the Hub about a Hub id once with a short timeout (`hub.py`), so a command
can refuse a missing or unreachable model in seconds, before any slow import. Every loading
failure becomes a one-line `AloeError`.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aloe_cli.errors import AloeError

DEVICES = ("auto", "cpu", "cuda")
# `name` or `org/name`: letters, digits, '-', '_', '.'; not starting with '.' or '-'.
HUB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?$")
DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ModelSpec:
    """What to load and how; the values of --model, --device, --dtype, --trust-remote-code, --attn-implementation."""

    name: str
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    attn_implementation: str | None = None  # None: flash_attention_2 when usable, else sdpa


@dataclass
class LoadedModel:
    """A model in eval mode on its device, with its processor."""

    spec: ModelSpec
    model: Any
    processor: Any
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    attn_implementation: str

    def describe(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return f"{self.spec.name} on {self.device} ({dtype}, {self.attn_implementation})"


def is_local_reference(name: str) -> bool:
    """A path (exists, or cannot be a Hub id such as `org/model`) rather than a Hub id."""
    if Path(name).expanduser().exists():
        return True
    return HUB_ID.match(name) is None


def check_model_reference(name: str) -> None:
    """Refuse a missing or incomplete local model folder (no torch import), or a Hub id that cannot be loaded
    (asked once, in seconds: `hub.check_hub_model`)."""
    if not name or not name.strip():
        raise AloeError("--model is empty")
    if not is_local_reference(name):
        from aloe_cli.modeling.hub import check_hub_model

        check_hub_model(name)
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise AloeError(f"model folder not found: {name}")
    if not path.is_dir():
        raise AloeError(f"model must be a folder (with config.json) or a Hub id, got a file: {name}")
    if not (path / "config.json").is_file():
        raise AloeError(f"model folder has no config.json: {name}")


_DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(name: str) -> str:
    """`--device` spelled right (no torch import): auto, cpu, cuda or cuda:N. Whether the device exists is
    `resolve_device`'s question."""
    normal = (name or "auto").strip().lower()
    if not _DEVICE_NAME.match(normal):
        raise AloeError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return normal


def resolve_device(name: str):
    import torch

    name = check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():  # cuda or cuda:N
        raise AloeError(f"--device {name}: no CUDA device is available on this machine")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise AloeError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def resolve_dtype(name: str, device):
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    choices = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
               "float32": torch.float32, "fp32": torch.float32}
    if name not in choices:
        raise AloeError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return choices[name]


def flash_attention_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(requested: str | None, device, dtype) -> str:
    """The user's choice as given; otherwise flash_attention_2 where it can run, else sdpa."""
    import torch

    if requested and requested.strip().lower() not in ("", "auto"):
        return requested.strip()
    half = dtype in (torch.bfloat16, torch.float16)
    if device.type == "cuda" and half and flash_attention_installed():
        return "flash_attention_2"
    return "sdpa"


def _dtype_keyword() -> str:
    """transformers >= 4.56 calls it `dtype`; older releases `torch_dtype`."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _where(name: str) -> str:
    return "" if is_local_reference(name) else " (no such local folder; tried the Hugging Face Hub)"


def load_processor(spec: ModelSpec):
    check_model_reference(spec.name)
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(spec.name, trust_remote_code=spec.trust_remote_code)
    except Exception as exc:  # transformers raises many types for a bad or unreachable checkpoint
        raise AloeError(f"cannot load the processor of {spec.name}{_where(spec.name)}: {_one_line(exc)}") from None


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load processor and model, move the model to its device in eval mode."""
    check_model_reference(spec.name)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    attn = resolve_attn_implementation(spec.attn_implementation, device, dtype)
    processor = load_processor(spec)

    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress goes to stderr; keep one bar
    kwargs: dict[str, Any] = {_dtype_keyword(): dtype, "attn_implementation": attn,
                              "trust_remote_code": spec.trust_remote_code}
    if device.type == "cuda":
        kwargs["device_map"] = {"": str(device)}  # load straight onto the GPU
    try:
        model = AutoModelForImageTextToText.from_pretrained(spec.name, **kwargs)
    except Exception as exc:
        raise AloeError(f"cannot load model {spec.name}{_where(spec.name)}: {_one_line(exc)}") from None
    if device.type != "cuda":
        model = model.to(device)
    model.eval()
    return LoadedModel(spec=spec, model=model, processor=processor, device=device, dtype=dtype,
                       attn_implementation=attn)


__all__ = ["DEVICES", "DTYPES", "LoadedModel", "ModelSpec", "check_device_name", "check_model_reference", "load_model",
           "load_processor", "resolve_attn_implementation", "resolve_device", "resolve_dtype"]
