"""The flags of `aloe train` and `aloe adv-train`, generated from the training config dataclass.

Every field of `TrainConfig` (and `AdvTrainConfig`) is a flag: `--field-name`,
typed like the field, listed in a help panel by its group, showing the
recipe default. A flag that is not given is None, so a `--config` YAML value
is only overridden by flags the user actually typed.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

PANELS = {"data": "Data and model", "training": "Optimisation (defaults: the published recipe)",
          "model": "Model options", "lora": "LoRA / QLoRA (PEFT)", "run": "Run", "adversarial": "Adversarial stage"}
_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str, "bool": bool, "list[str]": list[str]}


def _field_parameter(f: dataclasses.Field) -> inspect.Parameter:
    meta = f.metadata
    base = _TYPES[str(f.type).split(" |")[0]]
    flags = meta.get("flags") or (f"--{f.name.replace('_', '-')}",)
    default = f.default if f.default is not dataclasses.MISSING else None
    help_text = meta.get("help", "")
    if default not in (None, "", False) and base is not list[str]:
        help_text += f" (default: {'yes' if default is True else default})"
    option = typer.Option(*flags, help=help_text, rich_help_panel=PANELS.get(meta.get("group", "training")),
                          show_default=False)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[base | None, option])


def config_parameters(config_cls: type, exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    return [_field_parameter(f) for f in dataclasses.fields(config_cls) if f.name not in exclude]


def with_config_flags(config_cls: type, extra: list[inspect.Parameter], exclude: tuple[str, ...] = ()
                      ) -> Callable[[Callable], Callable]:
    """Give a `def command(**options)` function the signature typer reads: `extra` options, then the config's."""
    def decorate(function: Callable) -> Callable:
        function.__signature__ = inspect.Signature(extra + config_parameters(config_cls, exclude))
        return function

    return decorate


def parameter(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def launch_parameters(command: str) -> list[inspect.Parameter]:
    """--config, --dry-run and the SLURM generator's options."""
    from pathlib import Path

    slurm = "SLURM"
    return [
        parameter("config", Annotated[Path | None, typer.Option(
            "--config", help="YAML file whose keys are these flags' names (snake_case), or a `trl sft` config "
                             "(its keys are mapped, and the mapping printed); flags given override it.",
            rich_help_panel=PANELS["run"])]),
        parameter("dry_run", Annotated[bool, typer.Option(
            "--dry-run", help="Print the resolved configuration (SFTConfig fields, world size, DeepSpeed config) as "
                              "YAML and exit; nothing is loaded.", rich_help_panel=PANELS["run"])], False),
        parameter("slurm", Annotated[bool, typer.Option(
            "--slurm", help=f"Print an sbatch script that runs this same `aloe {command}` on --nodes x "
                            "--gpus-per-node GPUs, and exit.", rich_help_panel=slurm)], False),
        parameter("nodes", Annotated[int, typer.Option("--nodes", min=1, help="--slurm: nodes.",
                                                       rich_help_panel=slurm)], 1),
        parameter("gpus_per_node", Annotated[int, typer.Option(
            "--gpus-per-node", min=1, help="--slurm: GPUs (ranks) per node.", rich_help_panel=slurm)], 8),
        parameter("cpus_per_task", Annotated[int | None, typer.Option(
            "--cpus-per-task", min=1, help="--slurm: CPUs of the one task per node, shared by its ranks. Default: "
            "a node's CPUs as sinfo reports them for the partition.", rich_help_panel=slurm)]),
        parameter("launcher", Annotated[str, typer.Option(
            "--launcher", help="--slurm: torchrun or accelerate.", rich_help_panel=slurm)], "torchrun"),
        parameter("sbatch", Annotated[list[str] | None, typer.Option(
            "--sbatch", help="--slurm: extra #SBATCH option, e.g. --sbatch partition=gpu --sbatch time=48:00:00 "
                             "(repeatable).", rich_help_panel=slurm)]),
    ]


__all__ = ["config_parameters", "launch_parameters", "parameter", "with_config_flags"]
