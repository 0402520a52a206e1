"""The DeepSpeed section of a training run: a shipped config (zero3, zero2) or the user's JSON file, with the
batch sizes and precision filled in from the training flags (explicit values must agree with them).

Nothing here imports DeepSpeed: `--dry-run` and `--slurm` resolve it from this module alone.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from aloe_cli.errors import AloeError, ConfigValueError

SHIPPED_DEEPSPEED = ("zero3", "zero2")


def shipped_deepspeed_config(name: str) -> dict:
    """One of the DeepSpeed configs that ship in the package (`"auto"` values for transformers to fill)."""
    text = resources.files("aloe_cli.training").joinpath("deepspeed", f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def deepspeed_config(choice: str, *, micro_batch_size: int, precision: str, accumulation: int,
                     world: int) -> dict | None:
    """The DeepSpeed config for `--deepspeed CHOICE` as a dict, batch sizes and precision filled in from the
    training flags (explicit values must agree); None for `none`."""
    if choice == "none":
        return None
    if choice in SHIPPED_DEEPSPEED:
        ds = shipped_deepspeed_config(choice)
    else:
        path = Path(choice)
        if not path.is_file():
            raise ConfigValueError(("deepspeed",), f"must be zero3, zero2, none or a DeepSpeed JSON file; no such "
                                   f"file: {choice}")
        try:
            ds = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AloeError(f"--deepspeed {choice}: not a readable JSON file ({exc})") from None
        if not isinstance(ds, dict):
            raise AloeError(f"--deepspeed {choice}: a DeepSpeed config is a JSON object")
    # DeepSpeed on CPU cannot take "auto" batch sizes, and explicit ones make the resolved file self-contained.
    wanted = {"train_micro_batch_size_per_gpu": micro_batch_size,
              "gradient_accumulation_steps": accumulation,
              "train_batch_size": micro_batch_size * accumulation * world}
    for key, value in wanted.items():
        _fill(ds, key, value, choice)
    for name, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        section = ds.get(name)
        if isinstance(section, dict):
            _fill(section, "enabled", precision == dtype, choice, f"{name}.")
    return ds


def _fill(section: dict, key: str, value: Any, origin: str, prefix: str = "") -> None:
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise AloeError(f"--deepspeed {origin}: {prefix}{key} is {current!r} but the training flags give {value!r} "
                        "(set it to \"auto\")")


__all__ = ["SHIPPED_DEEPSPEED", "deepspeed_config", "shipped_deepspeed_config"]
