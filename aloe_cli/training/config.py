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
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aloe_cli.errors import AloeError, ConfigValueError, UsageError
from aloe_cli.perturb.names import KINDS

PRECISIONS = ("bf16", "fp16", "fp32")
# transformers' SchedulerType values that need no extra arguments.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
TRUNCATE_MODES = ("none", "text")
ON_ERROR_MODES = ("skip", "fail")
PERTURB_KINDS_DEFAULT = ",".join(KINDS)
CONFIG_FILE = "aloe-train.yaml"


FLAG = "flag"  # where a value came from: a flag, else the path of the --config file
INT_MAX = 2 ** 31 - 1


def option(help: str, *flags: str, minimum: float | None = None, maximum: float | None = None,
           group: str = "training") -> dict:
    """Field metadata: the flag spelling(s), help text, bounds, and the help panel it is listed in."""
    return {"help": help, "flags": flags, "min": minimum, "max": maximum, "group": group}


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
        "Processor limit: images larger than this many pixels are downscaled.", minimum=1, maximum=INT_MAX,
        group="data"))
    min_pixels: int | None = field(default=None, metadata=option(
        "Processor limit: images smaller than this many pixels are upscaled.", minimum=1, maximum=INT_MAX,
        group="data"))
    truncate: str = field(default="none", metadata=option(
        "Over-long samples: none = drop them (counted); text = cut their text, never image tokens.", group="data"))
    on_error: str = field(default="skip", metadata=option(
        "A record with a missing or broken image: skip (counted) or fail (stop the run).", group="data"))
    max_skipped: float = field(default=0.001, metadata=option(
        "Fail the run when more than this fraction of the records is lost (unreadable records, missing or broken "
        "images); every loss is counted either way.", minimum=0, maximum=1, group="data"))
    dataloader_workers: int = field(default=4, metadata=option(
        "Worker processes decoding images and running the processor, per rank; capped at the CPUs a rank may use. "
        "Under SLURM, when not given: SLURM_CPUS_PER_TASK / ranks per node - 1.",
        minimum=0, maximum=1024, group="data"))

    # -- optimisation (the published recipe)
    global_batch_size: int = field(default=1024, metadata=option(
        "Samples per optimizer step over all ranks (= micro x accumulation x world size).", minimum=1,
        maximum=2 ** 24))
    micro_batch_size: int = field(default=16, metadata=option("Samples per forward pass per rank.", minimum=1,
                                                              maximum=2 ** 16))
    epochs: float = field(default=1.0, metadata=option("Passes over the data.", minimum=0, maximum=10_000))
    max_steps: int | None = field(default=None, metadata=option(
        "Stop after this many optimizer steps (overrides --epochs).", minimum=1, maximum=INT_MAX))
    learning_rate: float = field(default=3.75e-5, metadata=option("Peak learning rate (AdamW).", minimum=0,
                                                                  maximum=1))
    lr_scheduler: str = field(default="cosine", metadata=option(
        "Learning-rate schedule (transformers' names: cosine, linear, constant, constant_with_warmup, ...)."))
    warmup_ratio: float = field(default=0.03, metadata=option(
        "Fraction of the steps spent warming up (SFTConfig's fractional warmup_steps).", minimum=0, maximum=0.999))
    weight_decay: float = field(default=0.0, metadata=option("AdamW weight decay.", minimum=0))
    max_length: int = field(default=4096, metadata=option(
        "Longest sample in tokens, image tokens included.", minimum=1, maximum=2 ** 20))
    precision: str = field(default="bf16", metadata=option("bf16, fp16 or fp32."))
    gradient_checkpointing: bool = field(default=True, metadata=option(
        "Recompute activations in the backward pass (less memory, ~30% more compute).",
        "--gradient-checkpointing/--no-gradient-checkpointing"))
    seed: int = field(default=42, metadata=option("Seed for weights, data order and dropout.", minimum=0,
                                                  maximum=2 ** 32 - 1))
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
                                                         maximum=INT_MAX, group="run"))
    save_total_limit: int | None = field(default=None, metadata=option(
        "Keep only the newest N checkpoints.", minimum=1, maximum=INT_MAX, group="run"))
    logging_steps: int = field(default=10, metadata=option(
        "Log loss, learning rate and tokens/s every N optimizer steps.", minimum=1, maximum=INT_MAX, group="run"))
    resume: bool = field(default=False, metadata=option(
        "Continue the run in --output-dir (the same inputs and configuration only) from its newest complete "
        "checkpoint.", group="run"))
    overwrite: bool = field(default=False, metadata=option(
        "Start a new run in an --output-dir that holds one: the old run is moved aside, never mixed with the new.",
        group="run"))
    report_to: str = field(default="none", metadata=option(
        "Experiment trackers (wandb, tensorboard, ...; comma-separated) or none.", group="run"))

    # ------------------------------------------------------------------ building

    @classmethod
    def from_sources(cls, yaml_path: str | os.PathLike | None, flags: dict[str, Any]) -> TrainConfig:
        """Defaults, overridden by the YAML file, overridden by the flags that were given (not None).

        A value no run can use is a usage error naming the flag (exit 2) when a flag gave it, else a one-line
        error naming the file and the key (exit 1)."""
        values: dict[str, Any] = {}
        origins: dict[str, str] = {}
        if yaml_path is not None:
            values.update(load_yaml(yaml_path, cls))
            origins.update(dict.fromkeys(values, str(yaml_path)))
        names = {f.name for f in dataclasses.fields(cls)}
        given = {key: value for key, value in flags.items() if key in names and value not in (None, [])}
        values.update(given)
        origins.update(dict.fromkeys(given, FLAG))
        config = cls(**values)
        config.origins = origins
        try:
            config.validate()
        except ConfigValueError as error:
            raise config.blame(error) from None
        return config

    def blame(self, error: ConfigValueError) -> AloeError:
        """The error for a bad value, told where it came from: the flag (exit 2), else the --config file and key
        (exit 1); a value that came from neither (a default, the launcher's world size) blames the flag."""
        origins = getattr(self, "origins", {})
        flagged = [name for name in error.fields if origins.get(name) == FLAG]
        in_file = [name for name in error.fields if origins.get(name) not in (None, FLAG)]
        if flagged or not in_file:
            return UsageError(str(error), describe((flagged or error.fields)[0]))
        return AloeError(f"{origins[in_file[0]]}: key {in_file[0]!r}: {error}")

    def validate(self) -> None:
        """ConfigValueError for the first value no run can use."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check_value(f, value)
        _choice("precision", self.precision, PRECISIONS)
        _choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _choice("truncate", self.truncate, TRUNCATE_MODES)
        _choice("on_error", self.on_error, ON_ERROR_MODES)
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ConfigValueError(("min_pixels", "max_pixels"),
                                   f"{self.min_pixels} is larger than --max-pixels {self.max_pixels}")
        if self.resume and self.overwrite:
            raise ConfigValueError(("overwrite", "resume"), "and --resume exclude each other: --resume continues "
                                   "the run, --overwrite replaces it")
        if self.epochs == 0 and self.max_steps is None:
            raise ConfigValueError(("epochs", "max_steps"), "0 trains nothing; give --max-steps or a positive --epochs")

    def require(self, *names: str) -> None:
        """Fields a real run (not --dry-run or --slurm) cannot do without: a usage error (exit 2)."""
        for name in names:
            if not getattr(self, name):
                raise UsageError("is required (as a flag or a key of --config)", describe(name))

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
        "How many perturbed samples to emit (the published stage 2 used 17.2 K).", minimum=1, maximum=INT_MAX,
        group="adversarial"))
    emit: str | None = field(default=None, metadata=option(
        "Also write the perturbed records here (.jsonl, .jsonl.gz, .parquet). Default: <output-dir>/adversarial.jsonl.",
        group="adversarial"))
    emit_only: bool = field(default=False, metadata=option(
        "Write the perturbed records to --emit and stop (no model is loaded).", group="adversarial"))
    keep_dicom_bytes: bool = field(default=False, metadata=option(
        "Pass embedded DICOM (data URIs, parquet image bytes) through to --emit with its header and patient data. "
        "Default: re-encoded on read as PNG pixels without the header.", group="adversarial"))

    def validate(self) -> None:
        if self.base:
            self.model = self.base
        super().validate()
        if self.perturb != "none":
            self.perturb_kinds()
        if self.emit_only and not self.emit:
            raise ConfigValueError(("emit_only", "emit"), "needs --emit FILE")
        if self.emit_only and self.perturb == "none":
            raise ConfigValueError(("emit_only", "perturb"), "with --perturb none there is nothing to emit")

    def perturb_kinds(self) -> tuple[str, ...]:
        kinds = tuple(part.strip() for part in self.perturb.split(",") if part.strip())
        unknown = [kind for kind in kinds if kind not in KINDS]
        if unknown or not kinds or len(set(kinds)) != len(kinds):
            raise ConfigValueError(("perturb",), f"must be distinct names among {', '.join(KINDS)} (or none), "
                                   f"got {self.perturb!r}")
        return kinds


def describe(name: str) -> str:
    """`--flag-name` (YAML key `flag_name`), for error messages."""
    return f"--{name.replace('_', '-')}"


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigValueError((name,), f"must be one of {', '.join(choices)}, got {value!r}")


def _check_value(f: dataclasses.Field, value: Any) -> None:
    """Bounds, finiteness and non-empty text for one field."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str) and not value.strip():
        raise ConfigValueError((f.name,), "is empty")
    if isinstance(value, list) and any(not str(entry).strip() for entry in value):
        raise ConfigValueError((f.name,), "has an empty entry")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigValueError((f.name,), f"must be a finite number, got {value}")
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if low is not None and value < low:
        raise ConfigValueError((f.name,), f"must be at least {_bound(low)}, got {value}")
    if high is not None and value > high:
        raise ConfigValueError((f.name,), f"must be at most {_bound(high)}, got {value}")


def _bound(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


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

    def schedule(self, records: int) -> tuple[int, int]:
        """(optimizer steps, warmup steps) of a run on `records` samples, computed as the Trainer computes them:
        each rank gets ceil(records / (micro x world)) micro batches per epoch, an optimizer step takes
        `accumulation` of them (a partial last one counts)."""
        c = self.config
        if c.max_steps is not None:
            steps = c.max_steps
        else:
            batches = math.ceil(records / (c.micro_batch_size * self.world_size))
            per_epoch = max(math.ceil(batches / self.gradient_accumulation_steps), 1)
            steps = math.ceil(c.epochs * per_epoch)
        warmup = math.ceil(steps * c.warmup_ratio)
        return steps, warmup

    def schedule_warning(self, records: int) -> str | None:
        """Words for a schedule too short to learn from: under 10 optimizer steps, or warmup over all of them."""
        steps, warmup = self.schedule(records)
        c = self.config
        how = (f"{records} record(s), global batch {self.effective_global_batch_size}"
               + (f", --max-steps {c.max_steps}" if c.max_steps is not None else f", {c.epochs:g} epoch(s)"))
        if warmup >= steps and c.learning_rate > 0 and c.lr_scheduler not in ("constant",):
            return (f"the schedule has {steps} optimizer step(s) ({how}) and its warmup ({warmup} step(s), "
                    f"--warmup-ratio {c.warmup_ratio:g}) covers all of them: the learning rate never reaches "
                    f"{c.learning_rate:g}; lower --global-batch-size or --warmup-ratio, or train longer")
        if steps < 10:
            return (f"the schedule has only {steps} optimizer step(s) ({how}): lower --global-batch-size or train "
                    "longer to learn anything")
        return None

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
        raise config.blame(ConfigValueError(
            ("global_batch_size", "micro_batch_size"), f"{config.global_batch_size} is not a multiple of "
            f"--micro-batch-size {config.micro_batch_size} x world size {world} = {per_step}"))
    accumulation = config.global_batch_size // per_step
    from aloe_cli.training.deepspeed_config import deepspeed_config

    try:
        deepspeed = deepspeed_config(config.deepspeed, micro_batch_size=config.micro_batch_size,
                                     precision=config.precision, accumulation=accumulation, world=world)
    except ConfigValueError as error:
        raise config.blame(error) from None
    return TrainPlan(config=config, world_size=world, gradient_accumulation_steps=accumulation,
                     deepspeed=deepspeed, command=command)


__all__ = ["AdvTrainConfig", "CONFIG_FILE", "ConfigValueError", "TrainConfig", "TrainPlan", "describe", "load_yaml",
           "resolve", "world_size"]
