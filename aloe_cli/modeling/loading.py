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

from aloe_cli.data.hub import HUB_ID
from aloe_cli.errors import AloeError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter folder
# One precision vocabulary for every command: torch's names; the short ones (train's former --precision values,
# TRL's bf16/fp16 switches) are read as aliases.
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def canonical_dtype(name: str | None) -> str | None:
    """`bf16` -> `bfloat16` (any case); a name of DTYPES as it is; None for anything else."""
    normal = (name or "").strip().lower()
    normal = DTYPE_ALIASES.get(normal, normal)
    return normal if normal in DTYPES else None


def check_dtype_name(name: str) -> None:
    """`--dtype` spelled right (no torch import)."""
    if canonical_dtype(name) is None:
        raise AloeError(f"--dtype must be one of {', '.join(DTYPES)} (or bf16, fp16, fp32), got {name!r}")


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
    if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        raise AloeError(f"model folder has no config.json (nor a LoRA adapter's {ADAPTER_CONFIG}): {name}")


def adapter_base(name: str) -> str | None:
    """The base model a PEFT adapter folder (`aloe train --lora`'s run folder) names; None for a whole model."""
    import json

    path = Path(name).expanduser() / ADAPTER_CONFIG
    if (Path(name).expanduser() / "config.json").is_file() or not path.is_file():
        return None
    try:
        base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise AloeError(f"{path}: unreadable adapter config ({exc})") from None
    if not base:
        raise AloeError(f"{path}: names no base model (base_model_name_or_path)")
    return base


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

    check_dtype_name(name or "auto")
    name = canonical_dtype(name or "auto")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


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

    base = adapter_base(spec.name)
    # An adapter folder aloe wrote holds the processor; a bare one takes its base model's.
    source = base if base and not (Path(spec.name).expanduser() / "preprocessor_config.json").is_file() and not (
        Path(spec.name).expanduser() / "processor_config.json").is_file() else spec.name
    try:
        return AutoProcessor.from_pretrained(source, trust_remote_code=spec.trust_remote_code)
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
    base = adapter_base(spec.name)
    try:
        model = AutoModelForImageTextToText.from_pretrained(base or spec.name, **kwargs)
    except Exception as exc:
        what = f"the base model {base} of the adapter {spec.name}" if base else f"model {spec.name}"
        raise AloeError(f"cannot load {what}{_where(base or spec.name)}: {_one_line(exc)}") from None
    if base:
        model = _with_adapter(model, spec.name)
    if device.type != "cuda":
        model = model.to(device)
    model.eval()
    return LoadedModel(spec=spec, model=model, processor=processor, device=device, dtype=dtype,
                       attn_implementation=attn)


def _with_adapter(model, folder: str):
    """The base model with a PEFT adapter folder's weights merged in (generation then runs at the base's speed)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise AloeError(f"{folder} is a LoRA adapter: loading it needs the peft package "
                        "(pip install 'aloe-cli[train]')") from None
    try:
        return PeftModel.from_pretrained(model, folder).merge_and_unload()
    except Exception as exc:  # peft raises several kinds for a mismatched or damaged adapter
        raise AloeError(f"cannot load the adapter {folder}: {_one_line(exc)}") from None


__all__ = ["DEVICES", "DTYPES", "LoadedModel", "ModelSpec", "check_device_name", "check_model_reference", "load_model",
           "load_processor", "resolve_attn_implementation", "resolve_device", "resolve_dtype"]
