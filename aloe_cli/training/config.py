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
from aloe_cli.modeling.loading import canonical_dtype
from aloe_cli.perturb.names import KINDS

# One vocabulary for precision in every command: torch's dtype names (what transformers' `dtype=` and TRL's
# `dtype` key take); the short names are read as aliases (`aloe_cli.modeling.dtypes`).
PRECISIONS = ("bfloat16", "float16", "float32")
# transformers' SchedulerType values that need no extra arguments.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
TRUNCATE_MODES = ("none", "text")
ON_ERROR_MODES = ("fail", "skip")
# The language model's attention and MLP projections, never the vision tower's (Qwen2.5-VL's vision MLP is also
# named gate/up/down_proj): a regular expression PEFT matches against whole module names.
LORA_DEFAULT_TARGETS = r"^(?!.*visual).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
LORA_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save", "merge_lora")
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
    on_error: str = field(default="fail", metadata=option(
        "A bad record or a missing or broken image: fail (stop, naming it) or skip (counted, within "
        "--max-skipped).", group="data"))
    max_skipped: float = field(default=0.001, metadata=option(
        "With --on-error skip: fail the run when more than this fraction of the records is lost (unreadable "
        "records, missing or broken images); every loss is counted either way.", minimum=0, maximum=1, group="data"))
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
    gradient_accumulation_steps: int | None = field(default=None, metadata=option(
        "Micro batches per optimizer step; given, it sets the global batch (micro x this x world size) instead "
        "of --global-batch-size.", minimum=1, maximum=2 ** 24))
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
    dtype: str = field(default="bfloat16", metadata=option(
        "Training precision: bfloat16, float16 or float32 (bf16, fp16, fp32 also read).", "--dtype", "--precision"))
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

    # -- LoRA / QLoRA (PEFT)
    lora: bool = field(default=False, metadata=option(
        "Train LoRA adapters (PEFT) instead of every weight; the run folder holds the adapter.",
        "--lora/--no-lora", group="lora"))
    lora_r: int = field(default=16, metadata=option("--lora: rank of the adapters.", minimum=1, maximum=65536,
                                                    group="lora"))
    lora_alpha: int = field(default=32, metadata=option("--lora: scaling numerator (scale = alpha / r).", minimum=1,
                                                        maximum=2 ** 20, group="lora"))
    lora_dropout: float = field(default=0.05, metadata=option("--lora: dropout on the adapters' input.", minimum=0,
                                                              maximum=0.999, group="lora"))
    lora_target_modules: str | None = field(default=None, metadata=option(
        "--lora: module names to adapt, comma-separated, or all-linear. Default: the language model's attention "
        "and MLP projections (the vision tower stays frozen unless named).", group="lora"))
    lora_modules_to_save: str | None = field(default=None, metadata=option(
        "--lora: modules trained in full beside the adapters, comma-separated (e.g. a new output layer).",
        group="lora"))
    load_in_4bit: bool = field(default=False, metadata=option(
        "QLoRA: load the base weights in 4 bits (bitsandbytes NF4, CUDA only) and train LoRA adapters on them "
        "(implies --lora).", group="lora"))
    merge_lora: bool = field(default=False, metadata=option(
        "--lora: also write the base model with the adapters merged in, to <output-dir>/merged.", group="lora"))

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
        mapped: list[tuple[str, str]] = []
        if yaml_path is not None:
            loaded = read_config(yaml_path, cls)
            values.update(loaded.values)
            mapped = loaded.mapped
            origins.update(dict.fromkeys(values, str(yaml_path)))
        names = {f.name for f in dataclasses.fields(cls)}
        given = {key: value for key, value in flags.items() if key in names and value not in (None, [])}
        values.update(given)
        origins.update(dict.fromkeys(given, FLAG))
        config = cls(**values)
        config.origins = origins
        config.mapped = mapped  # the --config keys read as aloe's, for the command to show
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
        self.dtype = canonical_dtype(self.dtype) or self.dtype
        _choice("dtype", self.dtype, PRECISIONS)
        _choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _choice("truncate", self.truncate, TRUNCATE_MODES)
        _choice("on_error", self.on_error, ON_ERROR_MODES)
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ConfigValueError(("min_pixels", "max_pixels"),
                                   f"{self.min_pixels} is larger than --max-pixels {self.max_pixels}")
        if self.resume and self.overwrite:
            raise ConfigValueError(("overwrite", "resume"), "and --resume exclude each other: --resume continues "
                                   "the run, --overwrite replaces it")
        if self.load_in_4bit:
            self.lora = True  # QLoRA trains adapters on the quantized weights
        origins = getattr(self, "origins", {})
        stray = [name for name in LORA_OPTIONS if name in origins and not self.lora]
        if stray:
            raise ConfigValueError((stray[0],), "needs --lora (LoRA is off)")
        if self.gradient_accumulation_steps is not None and "global_batch_size" in origins:
            raise ConfigValueError(("gradient_accumulation_steps", "global_batch_size"),
                                   "and --global-batch-size exclude each other: give one")
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


# `trl sft` config keys (SFTConfig, ModelConfig, ScriptArguments) that mean one of aloe's: read as aloe's, and
# the mapping printed. Keys TRL and aloe spell alike (learning_rate, warmup_ratio, max_length, seed, ...) need none;
# bf16/fp16 and the batch keys are handled in `_map_foreign`.
FOREIGN_KEYS = {
    "model_name_or_path": "model",
    "dataset_name": "input",
    "per_device_train_batch_size": "micro_batch_size",
    "lr_scheduler_type": "lr_scheduler",
    "num_train_epochs": "epochs",
    "max_seq_length": "max_length",  # TRL before 0.20
    "torch_dtype": "dtype",
    "precision": "dtype",  # aloe's own former name
    "dataloader_num_workers": "dataloader_workers",
    "use_liger_kernel": "use_liger",
    "use_peft": "lora",
}
PRECISION_SWITCHES = ("bf16", "fp16")  # TRL's booleans; aloe has one dtype key


@dataclass
class LoadedConfig:
    """The values of a --config file, by aloe's field names, and the foreign keys read as aloe's (key, flag)."""

    values: dict[str, Any]
    mapped: list[tuple[str, str]]


def load_yaml(path: str | os.PathLike, cls: type = TrainConfig) -> dict[str, Any]:
    """The keys of a YAML (or JSON) config file, checked against the dataclass and converted to its types."""
    return read_config(path, cls).values


def read_config(path: str | os.PathLike, cls: type = TrainConfig) -> LoadedConfig:
    """A config file's keys as aloe's fields: aloe's own keys, or `trl sft`'s (FOREIGN_KEYS, bf16/fp16). A key
    given twice, an unknown key (with the nearest known ones), a file that is not text: one-line errors."""
    import yaml

    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise AloeError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
        if "\0" in text:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "NUL byte")
    except UnicodeDecodeError as exc:
        raise AloeError(f"{path}: not a text file (byte {exc.start}: {exc.reason}); --config takes a YAML file") \
            from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise AloeError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise AloeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return LoadedConfig({}, [])
    if not isinstance(data, dict):
        raise AloeError(f"{path}: a config file must be a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    mapped: list[tuple[str, str]] = []
    given: dict[str, str] = {}  # aloe field -> the key that gave it
    data = _map_foreign(path, data, mapped)
    for key, value in data.items():
        name = str(key).replace("-", "_")
        target = FOREIGN_KEYS.get(name, name)
        if target not in fields:
            raise AloeError(f"{path}: unknown key {key!r}{_did_you_mean(name, fields)}")
        if target in given:
            raise AloeError(f"{path}: keys {given[target]!r} and {key!r} both set {target!r}: keep one")
        given[target] = str(key)
        if target != name:
            mapped.append((str(key), describe(target)))
        values[target] = _convert(path, target, value, fields[target])
    return LoadedConfig(values, mapped)


def _map_foreign(path, data: dict, mapped: list[tuple[str, str]]) -> dict:
    """TRL's bf16/fp16 switches -> dtype; per_device_train_batch_size x gradient_accumulation_steps stays as
    TRL means it (the global batch follows from the world size, see `resolve`)."""
    switches = {key: data[key] for key in PRECISION_SWITCHES if key in data}
    if not switches:
        return data
    for key, value in switches.items():
        if not isinstance(value, bool):
            raise AloeError(f"{path}: key {key!r} must be true or false, got {value!r}")
    if switches.get("bf16") and switches.get("fp16"):
        raise AloeError(f"{path}: keys 'bf16' and 'fp16' are both true: choose one")
    if "dtype" in data or "torch_dtype" in data or "precision" in data:
        raise AloeError(f"{path}: keys {', '.join(repr(k) for k in switches)} and 'dtype' both set the precision: "
                        "keep one")
    dtype = "bfloat16" if switches.get("bf16") else "float16" if switches.get("fp16") else "float32"
    rest = {key: value for key, value in data.items() if key not in switches}
    rest["dtype"] = dtype
    mapped.append((", ".join(f"{key}: {str(value).lower()}" for key, value in switches.items()), f"--dtype {dtype}"))
    return rest


def _did_you_mean(name: str, fields: dict) -> str:
    import difflib

    known = list(fields) + list(FOREIGN_KEYS) + list(PRECISION_SWITCHES)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    if close:
        return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    return f" (known keys: {', '.join(fields)})"


class _DuplicateKey(Exception):
    pass


def _unique_key_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """SafeLoader that refuses a mapping key given twice (plain YAML keeps the last one silently)."""

        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(f"line {line}: key {key!r} given twice (first on line {seen[key]})")
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _convert(path, name: str, value: Any, f: dataclasses.Field) -> Any:
    kind = str(f.type)
    if value is None:
        if "None" in kind:
            return None
        raise AloeError(f"{path}: key {name!r} cannot be empty")
    try:
        if kind.startswith("list"):
            return [str(v) for v in value] if isinstance(value, list) else [str(value)]
        if kind.startswith("str") and isinstance(value, list):  # TRL's lists (lora_target_modules, report_to)
            return ",".join(str(v) for v in value)
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
            "bf16": c.dtype == "bfloat16",
            "fp16": c.dtype == "float16",
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

    def lora_config_kwargs(self) -> dict[str, Any] | None:
        """Keyword arguments for PEFT's LoraConfig (None without --lora)."""
        c = self.config
        if not c.lora:
            return None
        targets: str | list[str] = LORA_DEFAULT_TARGETS
        if c.lora_target_modules:
            names = [name.strip() for name in c.lora_target_modules.split(",") if name.strip()]
            targets = "all-linear" if names == ["all-linear"] else names
        saved = [name.strip() for name in (c.lora_modules_to_save or "").split(",") if name.strip()] or None
        return {"r": c.lora_r, "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout,
                "target_modules": targets, "modules_to_save": saved, "bias": "none", "task_type": "CAUSAL_LM"}

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "world_size": self.world_size,
            "effective_global_batch_size": self.effective_global_batch_size,
            # SFTConfig's `deepspeed` field receives the `deepspeed` section below.
            "sft_config": {key: value for key, value in self.sft_config_kwargs().items() if key != "deepspeed"},
            "deepspeed": self.deepspeed,
            "peft": self.lora_config_kwargs(),  # LoraConfig, or null without --lora
            "aloe": self.config.to_dict(),
        }

    def to_yaml(self) -> str:
        import yaml

        header = f"# aloe {self.command}: resolved configuration (world size {self.world_size})\n"
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=120)


def resolve(config: TrainConfig, world: int, *, command: str = "train") -> TrainPlan:
    """Gradient accumulation for `world` ranks, and the DeepSpeed config with its batch sizes filled in."""
    per_step = config.micro_batch_size * world
    if config.gradient_accumulation_steps is not None:  # TRL's way: the global batch follows from it
        config.global_batch_size = per_step * config.gradient_accumulation_steps
    if config.global_batch_size % per_step:
        raise config.blame(ConfigValueError(
            ("global_batch_size", "micro_batch_size"), f"{config.global_batch_size} is not a multiple of "
            f"--micro-batch-size {config.micro_batch_size} x world size {world} = {per_step}"))
    accumulation = config.global_batch_size // per_step
    from aloe_cli.training.deepspeed_config import deepspeed_config

    try:
        deepspeed = deepspeed_config(config.deepspeed, micro_batch_size=config.micro_batch_size,
                                     precision=config.dtype, accumulation=accumulation, world=world)
    except ConfigValueError as error:
        raise config.blame(error) from None
    return TrainPlan(config=config, world_size=world, gradient_accumulation_steps=accumulation,
                     deepspeed=deepspeed, command=command)


__all__ = ["AdvTrainConfig", "CONFIG_FILE", "ConfigValueError", "FOREIGN_KEYS", "TrainConfig", "TrainPlan", "describe",
           "load_yaml", "read_config", "resolve", "world_size"]
