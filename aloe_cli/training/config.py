"""The training configuration: one dataclass whose fields are both the flags and the YAML keys.

    cfg = TrainConfig.from_sources(yaml_path, flags)   # defaults < YAML < flags
    plan = resolve(cfg, world_size())                 # gradient accumulation, SFTConfig kwargs, DeepSpeed config
    print(plan.to_yaml())

Defaults are the published recipe: bf16, global batch 1024, micro batch 16,
1 epoch, max length 4096, learning rate 3.75e-5, cosine schedule, 3% warmup,
AdamW, gradient checkpointing, DeepSpeed ZeRO-3. Gradient accumulation is
global / (micro x world size); a global batch that does not divide is an error
before anything heavy is imported.

Nothing here imports torch, transformers or DeepSpeed: `--dry-run` and
`--slurm` resolve the whole configuration from this module alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from aloe_cli.errors import AloeError

PRECISIONS = ("bf16", "fp16", "fp32")
# transformers' SchedulerType values that need no extra arguments.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
TRUNCATE_MODES = ("none", "text")
ON_ERROR_MODES = ("skip", "fail")
SHIPPED_DEEPSPEED = ("zero3", "zero2")
PERTURB_KINDS_DEFAULT = "cap,pmt,syc,leg,region"
CONFIG_FILE = "aloe-train.yaml"


def option(help: str, *flags: str, minimum: float | None = None, group: str = "training") -> dict:
    """Field metadata: the flag spelling(s), help text, lower bound, and the help panel it is listed in."""
    return {"help": help, "flags": flags, "min": minimum, "group": group}


@dataclass
class TrainConfig:
    """Everything `aloe train` needs. Field names are the YAML keys; flags are the same names in kebab case."""

    # -- data and model
    input: list[str] = field(default_factory=list, metadata=option(
        "Training records (JSONL[.gz], parquet, dataset folder; globs; repeatable).", "-i", "--input", group="data"))
    model: str | None = field(default=None, metadata=option(
        "Model folder or Hub id to start from (Qwen2-VL family).", group="data"))
    output_dir: str | None = field(default=None, metadata=option(
        "Run folder: checkpoints, final model + processor, aloe-train.yaml, log.jsonl.", group="data"))
    image_root: str | None = field(default=None, metadata=option(
        "Folder that relative image paths resolve against (default: each input file's folder).", group="data"))
    max_pixels: int | None = field(default=None, metadata=option(
        "Processor limit: images larger than this many pixels are downscaled.", minimum=1, group="data"))
    min_pixels: int | None = field(default=None, metadata=option(
        "Processor limit: images smaller than this many pixels are upscaled.", minimum=1, group="data"))
    truncate: str = field(default="none", metadata=option(
        "Over-long samples: none = drop them (counted); text = cut their text, never image tokens.", group="data"))
    on_error: str = field(default="skip", metadata=option(
        "A record with a missing or broken image: skip (counted) or fail (stop the run).", group="data"))
    dataloader_workers: int = field(default=4, metadata=option(
        "Worker processes decoding images and running the processor, per rank.", minimum=0, group="data"))

    # -- optimisation (the published recipe)
    global_batch_size: int = field(default=1024, metadata=option(
        "Samples per optimizer step over all ranks (= micro x accumulation x world size).", minimum=1))
    micro_batch_size: int = field(default=16, metadata=option("Samples per forward pass per rank.", minimum=1))
    epochs: float = field(default=1.0, metadata=option("Passes over the data.", minimum=0))
    max_steps: int | None = field(default=None, metadata=option(
        "Stop after this many optimizer steps (overrides --epochs).", minimum=1))
    learning_rate: float = field(default=3.75e-5, metadata=option("Peak learning rate (AdamW).", minimum=0))
    lr_scheduler: str = field(default="cosine", metadata=option(
        "Learning-rate schedule (transformers' names: cosine, linear, constant, constant_with_warmup, ...)."))
    warmup_ratio: float = field(default=0.03, metadata=option(
        "Fraction of the steps spent warming up (SFTConfig's fractional warmup_steps).", minimum=0))
    weight_decay: float = field(default=0.0, metadata=option("AdamW weight decay.", minimum=0))
    max_length: int = field(default=4096, metadata=option(
        "Longest sample in tokens, image tokens included.", minimum=1))
    precision: str = field(default="bf16", metadata=option("bf16, fp16 or fp32."))
    gradient_checkpointing: bool = field(default=True, metadata=option(
        "Recompute activations in the backward pass (less memory, ~30% more compute).",
        "--gradient-checkpointing/--no-gradient-checkpointing"))
    seed: int = field(default=42, metadata=option("Seed for weights, data order and dropout.", minimum=0))
    shuffle: bool = field(default=True, metadata=option(
        "Shuffle the records each epoch (--no-shuffle keeps the input order, e.g. a mixture aloe mix shuffled).",
        "--shuffle/--no-shuffle"))
    deepspeed: str = field(default="zero3", metadata=option(
        "zero3, zero2 (configs shipped with aloe), none (plain DDP), or a DeepSpeed JSON file."))

    # -- model options
    freeze_vision: bool = field(default=False, metadata=option(
        "Do not train the vision encoder (the projector still trains unless --freeze-projector).", group="model"))
    freeze_projector: bool = field(default=False, metadata=option(
        "Do not train the vision-language projector (the patch merger).", group="model"))
    attn_implementation: str | None = field(default=None, metadata=option(
        "eager, sdpa, flash_attention_2, ... Default: flash_attention_2 when installed on a GPU, else sdpa.",
        group="model"))
    use_liger: bool = field(default=False, metadata=option(
        "Use Liger kernels (needs the liger-kernel package).", group="model"))
    trust_remote_code: bool = field(default=False, metadata=option(
        "Allow the checkpoint to run its own Python code.", group="model"))

    # -- run
    save_steps: int = field(default=500, metadata=option("Save a checkpoint every N optimizer steps.", minimum=1,
                                                         group="run"))
    save_total_limit: int | None = field(default=None, metadata=option(
        "Keep only the newest N checkpoints.", minimum=1, group="run"))
    logging_steps: int = field(default=10, metadata=option(
        "Log loss, learning rate and tokens/s every N optimizer steps.", minimum=1, group="run"))
    resume: bool = field(default=False, metadata=option(
        "Continue from the last checkpoint in --output-dir.", group="run"))
    report_to: str = field(default="none", metadata=option(
        "Experiment trackers (wandb, tensorboard, ...; comma-separated) or none.", group="run"))

    # ------------------------------------------------------------------ building

    @classmethod
    def from_sources(cls, yaml_path: str | os.PathLike | None, flags: dict[str, Any]) -> TrainConfig:
        """Defaults, overridden by the YAML file, overridden by the flags that were given (not None)."""
        values: dict[str, Any] = {}
        if yaml_path is not None:
            values.update(load_yaml(yaml_path, cls))
        names = {f.name for f in dataclasses.fields(cls)}
        values.update({key: value for key, value in flags.items() if key in names and value not in (None, [])})
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            bound = f.metadata.get("min")
            value = getattr(self, f.name)
            if bound is not None and value is not None and value < bound:
                raise AloeError(f"{describe(f.name)} must be at least {bound:g}, got {value}")
        _choice("precision", self.precision, PRECISIONS)
        _choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _choice("truncate", self.truncate, TRUNCATE_MODES)
        _choice("on_error", self.on_error, ON_ERROR_MODES)
        if self.warmup_ratio >= 1:
            raise AloeError(f"{describe('warmup_ratio')} is a fraction of the steps, below 1; got {self.warmup_ratio}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise AloeError(f"--min-pixels {self.min_pixels} is larger than --max-pixels {self.max_pixels}")
        if self.epochs == 0 and self.max_steps is None:
            raise AloeError("--epochs 0 trains nothing; give --max-steps or a positive --epochs")

    def require(self, *names: str) -> None:
        """Fields a real run (not --dry-run or --slurm) cannot do without."""
        for name in names:
            if not getattr(self, name):
                raise AloeError(f"{describe(name)} is required (as a flag or a key of --config)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class AdvTrainConfig(TrainConfig):
    """`aloe adv-train`: stage 2 from a stage-1 folder on perturbed records, with the same optimisation flags."""

    base: str | None = field(default=None, metadata=option(
        "Stage-1 run folder (aloe train --output-dir) or any model folder to continue from.", group="adversarial"))
    perturb: str = field(default=PERTURB_KINDS_DEFAULT, metadata=option(
        "Perturbations to emit, comma-separated, balanced across them; none = the inputs are already perturbed "
        "(e.g. written by --emit-only).", group="adversarial"))
    samples: int | None = field(default=17200, metadata=option(
        "How many perturbed samples to emit (the published stage 2 used 17.2 K).", minimum=1, group="adversarial"))
    emit: str | None = field(default=None, metadata=option(
        "Also write the perturbed records here (.jsonl, .jsonl.gz, .parquet). Default: <output-dir>/adversarial.jsonl.",
        group="adversarial"))
    emit_only: bool = field(default=False, metadata=option(
        "Write the perturbed records to --emit and stop (no model is loaded).", group="adversarial"))

    def validate(self) -> None:
        if self.base:
            self.model = self.base
        super().validate()
        if self.perturb != "none":
            self.perturb_kinds()
        if self.emit_only and not self.emit:
            raise AloeError("--emit-only needs --emit FILE")
        if self.emit_only and self.perturb == "none":
            raise AloeError("--emit-only with --perturb none has nothing to emit")

    def perturb_kinds(self) -> tuple[str, ...]:
        from aloe_cli.perturb import KINDS

        kinds = tuple(part.strip() for part in self.perturb.split(",") if part.strip())
        unknown = [kind for kind in kinds if kind not in KINDS]
        if unknown or not kinds or len(set(kinds)) != len(kinds):
            raise AloeError(f"--perturb must be distinct names among {', '.join(KINDS)} (or none), "
                            f"got {self.perturb!r}")
        return kinds


def describe(name: str) -> str:
    """`--flag-name` (YAML key `flag_name`), for error messages."""
    return f"--{name.replace('_', '-')}"


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise AloeError(f"{describe(name)} must be one of {', '.join(choices)}, got {value!r}")


def load_yaml(path: str | os.PathLike, cls: type = TrainConfig) -> dict[str, Any]:
    """The keys of a YAML (or JSON) config file, checked against the dataclass and converted to its types."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise AloeError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise AloeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AloeError(f"{path}: a config file must be a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise AloeError(f"{path}: unknown key {key!r} (known keys: {', '.join(fields)})")
        values[name] = _convert(path, name, value, fields[name])
    return values


def _convert(path, name: str, value: Any, f: dataclasses.Field) -> Any:
    kind = str(f.type)
    if value is None:
        if "None" in kind:
            return None
        raise AloeError(f"{path}: key {name!r} cannot be empty")
    try:
        if kind.startswith("list"):
            return [str(v) for v in value] if isinstance(value, list) else [str(value)]
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            raise ValueError
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)  # YAML reads 1e-5 (no dot) as a string
        return str(value)
    except (TypeError, ValueError):
        expected = kind.split(" |")[0]
        raise AloeError(f"{path}: key {name!r} must be {expected}, got {value!r}") from None


# ----------------------------------------------------------------------------- resolution

def world_size() -> int:
    """The number of ranks, from the launcher (torchrun, accelerate, deepspeed, srun set WORLD_SIZE); 1 alone."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(value)
    except ValueError:
        raise AloeError(f"WORLD_SIZE must be a positive integer, got {value!r}") from None
    if size < 1:
        raise AloeError(f"WORLD_SIZE must be a positive integer, got {value!r}")
    return size


@dataclass
class TrainPlan:
    """A configuration resolved for a world size: what SFTConfig and DeepSpeed receive."""

    config: TrainConfig
    world_size: int
    gradient_accumulation_steps: int
    deepspeed: dict | None
    command: str = "train"

    @property
    def effective_global_batch_size(self) -> int:
        return self.config.micro_batch_size * self.gradient_accumulation_steps * self.world_size

    def sft_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for TRL's SFTConfig (its own field names)."""
        c = self.config
        return {
            "output_dir": c.output_dir,
            "per_device_train_batch_size": c.micro_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "num_train_epochs": c.epochs,
            "max_steps": c.max_steps if c.max_steps is not None else -1,
            "learning_rate": c.learning_rate,
            "lr_scheduler_type": c.lr_scheduler,
            "warmup_steps": c.warmup_ratio,  # transformers 5: a value below 1 is a fraction of the steps
            "weight_decay": c.weight_decay,
            "optim": "adamw_torch",
            "max_length": c.max_length,
            "bf16": c.precision == "bf16",
            "fp16": c.precision == "fp16",
            "gradient_checkpointing": c.gradient_checkpointing,
            "gradient_checkpointing_kwargs": {"use_reentrant": False} if c.gradient_checkpointing else None,
            "seed": c.seed,
            "data_seed": c.seed,
            "train_sampling_strategy": "random" if c.shuffle else "sequential",
            "save_strategy": "steps",
            "save_steps": c.save_steps,
            "save_total_limit": c.save_total_limit,
            "logging_steps": c.logging_steps,
            "logging_first_step": True,
            "report_to": [] if c.report_to == "none" else [part.strip() for part in c.report_to.split(",")],
            "dataloader_num_workers": c.dataloader_workers,
            "assistant_only_loss": True,
            "remove_unused_columns": False,  # the collator needs every column the dataset keeps
            "dataset_kwargs": {"skip_prepare_dataset": True},  # images are decoded lazily, in the collator
            "use_liger_kernel": c.use_liger,
            "deepspeed": self.deepspeed,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "world_size": self.world_size,
            "effective_global_batch_size": self.effective_global_batch_size,
            # SFTConfig's `deepspeed` field receives the `deepspeed` section below.
            "sft_config": {key: value for key, value in self.sft_config_kwargs().items() if key != "deepspeed"},
            "deepspeed": self.deepspeed,
            "aloe": self.config.to_dict(),
        }

    def to_yaml(self) -> str:
        import yaml

        header = f"# aloe {self.command}: resolved configuration (world size {self.world_size})\n"
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=120)


def resolve(config: TrainConfig, world: int, *, command: str = "train") -> TrainPlan:
    """Gradient accumulation for `world` ranks, and the DeepSpeed config with its batch sizes filled in."""
    per_step = config.micro_batch_size * world
    if config.global_batch_size % per_step:
        raise AloeError(f"--global-batch-size {config.global_batch_size} is not a multiple of --micro-batch-size "
                        f"{config.micro_batch_size} x world size {world} = {per_step}")
    accumulation = config.global_batch_size // per_step
    deepspeed = deepspeed_config(config, accumulation, world)
    return TrainPlan(config=config, world_size=world, gradient_accumulation_steps=accumulation,
                     deepspeed=deepspeed, command=command)


def shipped_deepspeed_config(name: str) -> dict:
    """One of the DeepSpeed configs that ship in the package (`"auto"` values for transformers to fill)."""
    text = resources.files("aloe_cli.training").joinpath("deepspeed", f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def deepspeed_config(config: TrainConfig, accumulation: int, world: int) -> dict | None:
    """The DeepSpeed config as a dict, batch sizes and precision filled in (explicit values must agree)."""
    choice = config.deepspeed
    if choice == "none":
        return None
    if choice in SHIPPED_DEEPSPEED:
        ds = shipped_deepspeed_config(choice)
    else:
        path = Path(choice)
        if not path.is_file():
            raise AloeError(f"--deepspeed must be zero3, zero2, none or a DeepSpeed JSON file; no such file: {choice}")
        try:
            ds = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AloeError(f"--deepspeed {choice}: not a readable JSON file ({exc})") from None
        if not isinstance(ds, dict):
            raise AloeError(f"--deepspeed {choice}: a DeepSpeed config is a JSON object")
    # DeepSpeed on CPU cannot take "auto" batch sizes, and explicit ones make the resolved file self-contained.
    wanted = {"train_micro_batch_size_per_gpu": config.micro_batch_size,
              "gradient_accumulation_steps": accumulation,
              "train_batch_size": config.micro_batch_size * accumulation * world}
    for key, value in wanted.items():
        _fill(ds, key, value, choice)
    for name in ("bf16", "fp16"):
        section = ds.get(name)
        if isinstance(section, dict):
            _fill(section, "enabled", config.precision == name, choice, f"{name}.")
    return ds


def _fill(section: dict, key: str, value: Any, origin: str, prefix: str = "") -> None:
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise AloeError(f"--deepspeed {origin}: {prefix}{key} is {current!r} but the training flags give {value!r} "
                        "(set it to \"auto\")")


__all__ = ["AdvTrainConfig", "CONFIG_FILE", "TrainConfig", "TrainPlan", "describe", "deepspeed_config", "load_yaml",
           "resolve", "shipped_deepspeed_config", "world_size"]
