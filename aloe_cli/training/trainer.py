"""Run one SFT stage on TRL's SFTTrainer: data once into a memory-mapped dataset, then TRL's own loop.

    result = run_training(plan, items, paths=paths)   # items(): the records of `paths`, as data.io.Items

What this adds around `SFTTrainer` (nothing of its loop is re-implemented):
- the distributed state: on a machine without CUDA, DeepSpeed runs on gloo
  (the state is created before SFTConfig, which then uses it as configured);
- the data path: the global main process reads the records once into
  `<output_dir>/dataset/train.arrow`, every rank memory-maps it, and the
  collator (`training.collator`) decodes images lazily;
- the chat template that defines the loss, set on the processor before the
  trainer sees it (TRL never swaps it), and the processor's pixel limits;
- the vision guard (`training.guard`) for text-only micro batches under ZeRO-3;
- the run folder's rules and its ledger `run.json` (`training.ledger`): the folder is claimed (refused, moved
  aside, or resumed from its newest whole checkpoint) before anything is read;
- samples lost to unreadable records and images, held against `--max-skipped` at every logging step;
- `log.jsonl` (step, loss, lr, tokens/s, skipped samples) and its picture `loss.png` (`training.curves`),
  the progress people see (`training.progress`), `aloe-train.yaml`,
  the final model + processor in `output_dir`.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aloe_cli.console import ProgressFactory, null_progress, stdout_to_stderr
from aloe_cli.data.io import Item
from aloe_cli.errors import AloeError, Terminated, first_line
from aloe_cli.training.config import TrainPlan
from aloe_cli.training.run_folder import (
    LOG_FILE,
    disk_full,
    last_checkpoint,
    remove_incomplete,
    save_final,
    stopped,
    write_plan,
)


@dataclass
class TrainResult:
    output_dir: Path
    records: dict[str, Any]  # the ingestion counts: read, kept, rejected, reasons
    global_step: int = 0
    train_loss: float | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    guard_calls: list[int] = field(default_factory=list)  # text-only micro batches the vision guard covered, per rank
    resumed_from: str | None = None
    complete: bool = False  # --resume found the run complete: nothing was done
    is_main: bool = True


# ----------------------------------------------------------------------------- distributed state

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_distributed(plan: TrainPlan) -> tuple[Any, bool]:
    """The accelerate state, and whether SFTConfig must use it as configured (DeepSpeed on CPU, gloo)."""
    import torch
    from accelerate import PartialState

    if plan.deepspeed is None and not torch.cuda.is_available() and plan.world_size > 1:
        # Plain data parallelism on CPUs: accelerate makes a gloo process group only when asked for a CPU run;
        # otherwise every rank would take itself for the only one (and the main process).
        return PartialState(cpu=True), False
    if plan.deepspeed is None or torch.cuda.is_available():
        return None, False
    # DeepSpeed without CUDA: a gloo process group, also for a single process started without a launcher.
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    # `accelerate launch --cpu` asks for a CPU run, which DeepSpeed on gloo is; its flag would turn DeepSpeed off.
    os.environ.pop("ACCELERATE_USE_CPU", None)
    return PartialState(backend="gloo"), True


# ----------------------------------------------------------------------------- model and processor

def prepare_processor(plan: TrainPlan):
    """The processor with the training chat template (generation markers) and the pixel limits set."""
    from aloe_cli.modeling.chat_template import apply_training_chat_template
    from aloe_cli.modeling.loading import ModelSpec, load_processor

    config = plan.config
    processor = load_processor(ModelSpec(config.model, trust_remote_code=config.trust_remote_code))
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise AloeError(f"{config.model}: not a vision-language processor (no image processor or tokenizer)")
    try:  # set before the trainer sees the processor, so TRL finds the markers and never swaps templates
        apply_training_chat_template(processor)
    except AloeError as error:
        raise AloeError(f"--model {config.model}: {error}") from None
    if config.min_pixels or config.max_pixels:
        size = dict(processor.image_processor.size or {})
        if config.min_pixels:
            size["shortest_edge"] = config.min_pixels
        if config.max_pixels:
            size["longest_edge"] = config.max_pixels
        processor.image_processor.size = {key: value for key, value in size.items() if value is not None}
    return processor


def load_training_model(plan: TrainPlan, weights: str | None = None):
    """AutoModelForImageTextToText for training (after SFTConfig, so ZeRO-3 partitions it while loading).

    `weights`: a checkpoint folder to take the weights from instead of the model (resuming without DeepSpeed).
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from aloe_cli.modeling.loading import resolve_attn_implementation

    config = plan.config
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(config.dtype)
    # DeepSpeed keeps fp32 master weights itself; without it, autocast needs fp32 weights.
    dtype = half if (half is not None and plan.deepspeed is not None) else torch.float32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    attn = resolve_attn_implementation(config.attn_implementation, device, half or torch.float32)
    extra = {}
    if config.load_in_4bit:
        from transformers import BitsAndBytesConfig

        # QLoRA as PEFT documents it for ZeRO-3: NF4 weights stored in the training dtype, so DeepSpeed can
        # partition them like any other; the vision tower stays in full precision.
        dtype = half or torch.float32
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype, llm_int8_skip_modules=["visual", "lm_head"])
        if plan.deepspeed is None:
            extra["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            weights or config.model, dtype=dtype, attn_implementation=attn, trust_remote_code=config.trust_remote_code,
            **extra)
    except Exception as exc:  # transformers raises many types for a bad checkpoint
        what = f"checkpoint {weights}" if weights else f"model {config.model}"
        raise AloeError(f"cannot load {what}: {first_line(exc)}") from None
    model.config.use_cache = False
    return model


def describe_model(model) -> str:
    """Weights dtype, attention implementation and trainable parameters (ZeRO-3 partitions count in full)."""
    def size(parameter) -> int:
        return getattr(parameter, "ds_numel", None) or parameter.numel()

    parameters = list(model.parameters())
    total = sum(size(p) for p in parameters)
    trainable = sum(size(p) for p in parameters if p.requires_grad)
    dtype = str(parameters[0].dtype).replace("torch.", "")
    attention = getattr(model.config, "_attn_implementation", None) or "default"
    return (f"{dtype} weights, {attention} attention, {trainable:,} of {total:,} parameters trained")


def freeze(model, *, vision: bool, projector: bool) -> None:
    """--freeze-vision: the vision encoder; --freeze-projector: the patch merger that feeds the language model."""
    from aloe_cli.training.guard import vision_core

    visual = vision_core(model).visual
    merger = getattr(visual, "merger", None)
    merger_params = {id(p) for p in merger.parameters()} if merger is not None else set()
    for parameter in visual.parameters():
        is_projector = id(parameter) in merger_params
        if (vision and not is_projector) or (projector and is_projector):
            parameter.requires_grad_(False)


# ----------------------------------------------------------------------------- trainer pieces

def _trainer_class():
    from trl import SFTTrainer

    from aloe_cli.training.collator import SKIPPED_KEY

    class AloeSFTTrainer(SFTTrainer):
        """SFTTrainer, plus the collator's skip counts summed over ranks into every log."""

        skipped: Counter
        lost_budget: _LostBudget
        weights_from: str | None = None  # the checkpoint the model was loaded from, if any

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            # transformers#43701: this loads a checkpoint's state dict without the key conversion that
            # from_pretrained applies to Qwen2-VL (saved as model.layers.*, built as model.language_model.*), so
            # nothing would load. The model was loaded from the checkpoint with from_pretrained instead.
            if resume_from_checkpoint != self.weights_from:
                super()._load_from_checkpoint(resume_from_checkpoint, model)

        def _save_checkpoint(self, model, trial):
            try:
                super()._save_checkpoint(model, trial)
            except Exception as exc:
                # torch's zip writer reports a full disk as "unexpected pos ..." with no errno: a save that fails
                # with less room left than a checkpoint takes is a full disk.
                if disk_full(exc) is None and _short_of_space(Path(self.args.output_dir), self):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from exc
                raise

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            counts = inputs.pop(SKIPPED_KEY, None)
            if counts:
                self.skipped.update(counts)
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            # Every rank logs at the same step, so the sum over ranks is one collective.
            skipped = _sum_over_ranks(self.accelerator, self.skipped)
            for reason, total in skipped.items():
                logs[f"skipped_{reason}"] = total
            super().log(logs, start_time)
            self.lost_budget.check(skipped)  # every rank sees the same sums: all stop at this step, or none

    return AloeSFTTrainer


# The collator's skip reasons; the counts are summed over ranks as one fixed-shape tensor.
SKIP_REASONS = ("too_long", "no_loss_tokens", "template_error", "image_missing", "image_corrupt", "image_truncated",
                "image_too_large", "image_invalid", "other")


def _sum_over_ranks(accelerator, counts: Counter) -> dict[str, int]:
    import torch

    local = [counts.get(name, 0) for name in SKIP_REASONS[:-1]]
    local.append(sum(n for name, n in counts.items() if name not in SKIP_REASONS))
    values = torch.tensor(local, device=accelerator.device)
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="sum")
    return {name: int(value) for name, value in zip(SKIP_REASONS, values.tolist()) if value}


def _log_callback(path: Path, log: Callable[[str], None]):
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """log.jsonl on the main process: one line per logging step (and the closing summary)."""

        def __init__(self):
            self.last_time: float | None = None
            self.last_tokens: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.last_time = time.perf_counter()
            self.last_tokens = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            now = time.perf_counter()
            line: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
            tokens = logs.get("num_tokens")
            if "loss" in logs:
                line["loss"] = logs["loss"]
                line["lr"] = logs.get("learning_rate")
                if tokens is not None and self.last_tokens is not None and now > self.last_time:
                    line["tokens_per_s"] = round((tokens - self.last_tokens) / (now - self.last_time), 1)
            line.update({key: value for key, value in logs.items()
                         if key not in ("loss", "learning_rate", "epoch")})
            if tokens is not None:
                self.last_tokens, self.last_time = tokens, now
            with path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")
            if "loss" in line:
                rate = f", {line['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in line else ""
                log(f"step {state.global_step}/{state.max_steps}: loss {line['loss']:.4f}, "
                    f"lr {line['lr']:.3g}{rate}")

    return JsonlLog()


def _current_names(config_cls, kwargs: dict) -> dict:
    """transformers >= 5.2x renamed gradient_checkpointing to activation_checkpointing (the old names warn)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    if "activation_checkpointing" not in names:
        return kwargs
    renamed = dict(kwargs)
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in renamed and new in names:
            renamed[new] = renamed.pop(old)
    return renamed


def _worker_error(error: AloeError) -> AloeError:
    """An AloeError re-raised by a data-loader worker carries the worker's traceback: keep the message only."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[-1].startswith("aloe_cli.errors.AloeError: "):
        return AloeError(lines[-1].removeprefix("aloe_cli.errors.AloeError: "))
    return error


# ----------------------------------------------------------------------------- the run

def run_training(plan: TrainPlan, items: Callable[[], Iterable[Item]], *, paths: list[str],
                 log: Callable[[str], None] = lambda message: None, resume_command: str | None = None,
                 progress: ProgressFactory = null_progress) -> TrainResult:
    """Train `plan.config.model` on the records `items()` yields (read from `paths`, which the run folder's ledger
    records); everything lands in `plan.config.output_dir`. `resume_command`: the command line that resumes this
    run, for the closing line of an interrupted one; `progress`: shows the steps (`training.progress`)."""
    config = plan.config
    output_dir = Path(config.output_dir)
    run: dict[str, Any] = {}  # the ledger and the trainer, once there are any
    with stdout_to_stderr():
        try:
            result = _run(plan, items, paths, output_dir, log, resume_command, run, progress)
            _leave_process_group()
            return result
        except AloeError as error:
            error = _worker_error(error)
            _failed(run, first_line(error))
            raise error from None
        except (Terminated, KeyboardInterrupt) as stop:
            if getattr(stop, "outcome", None) is None:
                stop.outcome = stopped(output_dir, plan.command, resume_command)
            _failed(run, "interrupted (SIGINT)" if isinstance(stop, KeyboardInterrupt)
                    else f"terminated by {signal.Signals(stop.signum).name}")
            raise
        except Exception as exc:
            full = disk_full(exc)
            _failed(run, first_line(exc) if full is None else full)
            if full is None:
                raise
            raise AloeError(_disk_full_message(output_dir, full, run.get("trainer"))) from exc


def _failed(run: dict, why: str) -> None:
    ledger = run.get("ledger")
    if ledger is not None:
        ledger.fail(why)


def _checkpoint_need(output_dir: Path, trainer) -> tuple[int, str] | None:
    """About how many bytes a checkpoint takes, and how that was found: the newest complete checkpoint's size,
    else the weights plus AdamW's two fp32 moments of the trained parameters."""
    from aloe_cli.training.run_folder import folder_bytes

    kept = last_checkpoint(output_dir)
    if kept is not None:
        return folder_bytes(Path(kept)), f"the size of {Path(kept).name}"
    if trainer is None:
        return None
    parameters = list(trainer.model.parameters())
    total = sum(getattr(p, "ds_numel", None) or p.numel() for p in parameters)
    trained = sum(getattr(p, "ds_numel", None) or p.numel() for p in parameters if p.requires_grad)
    return total * parameters[0].element_size() + trained * 8, "weights and AdamW's moments"


def _short_of_space(output_dir: Path, trainer) -> bool:
    import shutil

    need = _checkpoint_need(output_dir, trainer)
    try:
        return need is not None and shutil.disk_usage(output_dir).free < need[0]
    except OSError:
        return False


def _disk_full_message(output_dir: Path, reason: str, trainer) -> str:
    """A full disk while saving: what a save needs and what is free, and that the last complete checkpoint is
    intact."""
    import shutil

    from aloe_cli.training.run_folder import human_bytes

    kept = last_checkpoint(output_dir)
    need = _checkpoint_need(output_dir, trainer)
    try:
        free = shutil.disk_usage(output_dir).free
    except OSError:
        free = None
    message = f"cannot write {output_dir}: {reason}"
    if need is not None:
        message += f"; a checkpoint needs about {human_bytes(need[0])} ({need[1]})"
    if free is not None:
        message += f", {human_bytes(free)} free"
    if kept is not None:
        message += f"; {kept} is intact: free space, then resume with --resume"
    return message


def _leave_process_group() -> None:
    """Every rank leaves the process group together once the run is saved. Left to interpreter exit, the
    communication threads of gloo / DeepSpeed can be torn down while still running, and a finished run's
    processes then abort ("terminate called without an active exception", exit -6) at random."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --report-to names whose package is not called as the tracker is.
_TRACKER_PACKAGES = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "codecarbon": "codecarbon"}


def preflight(plan: TrainPlan) -> None:
    """Options that need a package or a known name fail here, in one line, before anything is read or loaded."""
    import importlib.util

    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    if plan.config.use_liger and importlib.util.find_spec("liger_kernel") is None:
        raise AloeError("--use-liger needs the liger-kernel package (pip install liger-kernel)")
    _check_lora(plan)
    for name in plan.sft_config_kwargs()["report_to"]:
        if name not in INTEGRATION_TO_CALLBACK:
            raise AloeError(f"--report-to {name}: unknown (known: {', '.join(sorted(INTEGRATION_TO_CALLBACK))}, none)")
        if name not in get_available_reporting_integrations():
            package = _TRACKER_PACKAGES.get(name, name)
            raise AloeError(f"--report-to {name} needs the {package} package, which is not installed "
                            f"(pip install {package})")
    _check_precision(plan)


def _check_lora(plan: TrainPlan) -> None:
    """--lora needs PEFT; --load-in-4bit needs bitsandbytes and a CUDA GPU: one line each, before any work."""
    import importlib.util

    import torch

    config = plan.config
    if config.lora and importlib.util.find_spec("peft") is None:
        raise AloeError("--lora needs the peft package (pip install 'aloe-cli[train]')")
    if config.load_in_4bit:
        if not torch.cuda.is_available():
            raise AloeError("--load-in-4bit (QLoRA) needs bitsandbytes on a CUDA GPU and no CUDA device is visible: "
                            "train without it (--lora alone), or on a GPU")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise AloeError("--load-in-4bit (QLoRA) needs the bitsandbytes package (pip install bitsandbytes)")
        if config.dtype == "float32":
            raise AloeError("--load-in-4bit computes in half precision: use --dtype bfloat16 or float16")


def _check_precision(plan: TrainPlan) -> None:
    """Half precision under DeepSpeed needs a GPU (without DeepSpeed, bf16 also runs on the CPU): say so in one
    line before anything is read, not in the Trainer's traceback after the records were."""
    import torch

    dtype = plan.config.dtype
    if dtype != "float32" and plan.deepspeed is not None and not torch.cuda.is_available():
        raise AloeError(f"--dtype {dtype} with --deepspeed {plan.config.deepspeed} needs a GPU and none is "
                        "visible: use --dtype float32 (or --deepspeed none)")


def rank_cpus() -> tuple[int, str]:
    """The CPUs one rank may use, and why: the task's (SLURM_CPUS_PER_TASK where SLURM set it, at most the
    process's CPU affinity) shared by the ranks on this node (LOCAL_WORLD_SIZE, set by the launcher)."""
    from aloe_cli.data.shard import available_cpus

    cpus, why = available_cpus(), "the CPUs this process may use"
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and 0 < int(slurm) <= cpus:
        cpus, why = int(slurm), f"SLURM_CPUS_PER_TASK={slurm}"
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    ranks = int(ranks) if ranks.isdigit() and int(ranks) > 0 else 1
    if ranks > 1:
        why += f" over {ranks} ranks"
    return max(1, cpus // ranks), why


def _cap_dataloader_workers(config, log: Callable[[str], None]) -> None:
    """Data-loader workers per rank. Under SLURM, when --dataloader-workers was not given, they follow the task's
    CPUs: the rank's share minus one for the rank itself. More workers than the rank's share only adds processes:
    capped, with a note."""
    cpus, why = rank_cpus()
    given = "dataloader_workers" in getattr(config, "origins", {})
    if not given and os.environ.get("SLURM_CPUS_PER_TASK", "").strip().isdigit():
        config.dataloader_workers = cpus - 1
        log(f"aloe: data-loader workers per rank: {config.dataloader_workers} ({cpus} CPU(s) per rank from {why}, "
            "one kept for the rank)")
    elif config.dataloader_workers > cpus:
        log(f"aloe: note: --dataloader-workers {config.dataloader_workers} is more than the {cpus} CPU(s) this "
            f"rank may use ({why}); using {cpus}")
        config.dataloader_workers = cpus


def _quiet_libraries() -> None:
    """No per-shard progress bars (our log lines say what happens) and no warnings DeepSpeed triggers every step."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    # PEFT asks transformers >= 5.2x by its old name (the answer is the same)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _run(plan: TrainPlan, items, paths: list[str], output_dir: Path, log, resume_command: str | None,
         run: dict, progress: ProgressFactory) -> TrainResult:
    import torch
    from trl import SFTConfig

    from aloe_cli.data.writing import folders_made
    from aloe_cli.training.collator import TrainingCollator
    from aloe_cli.training.curves import loss_curve_callback
    from aloe_cli.training.data import build_dataset, dataset_path, load_dataset, lost_message
    from aloe_cli.training.guard import VisionGuard
    from aloe_cli.training.ledger import Ledger, claim, completed_step, read_run, requeued
    from aloe_cli.training.progress import TrainProgress

    _quiet_libraries()
    preflight(plan)
    config = plan.config
    command = f"aloe {plan.command}"
    _cap_dataloader_workers(config, log)
    state, configured = init_distributed(plan)
    from accelerate import PartialState

    state = state or PartialState()
    requeued(config, lambda message: log(f"{command}: {message}") if state.is_main_process else None)

    # The folder's rules, on the main process only (the others wait): refuse, move an old run aside, set damaged
    # checkpoints aside, or find the run complete.
    claimed = None
    with state.main_process_first():
        if state.is_main_process:
            claimed = claim(plan, paths)
            for note in claimed.notes:
                log(f"{command}: {note}")
    complete_at = claimed.step if claimed is not None and claimed.complete else (
        completed_step(output_dir) if claimed is None and config.resume else None)
    if complete_at is not None:
        return TrainResult(output_dir=output_dir, records={}, global_step=complete_at, complete=True,
                           is_main=state.is_main_process)

    processor = prepare_processor(plan)  # before the data: a bad model folder fails in seconds
    records: dict[str, Any] = {}
    ledger = None
    with state.main_process_first():
        if state.is_main_process:
            # Records that stop the run (--on-error fail, none trainable, too many lost) leave no run folder it made.
            with folders_made() as make:
                make(dataset_path(output_dir).parent)
                summary = build_dataset(items(), output_dir, on_error=config.on_error)
                lost = lost_message(dict(summary.reasons), summary.read, config.max_skipped)
                if lost and lost[0]:
                    dataset_path(output_dir).unlink(missing_ok=True)
                    raise AloeError(lost[1])
            write_plan(plan, output_dir)
            if claimed.resume_from is None:  # a new run starts a new log; a resumed one continues it
                (output_dir / LOG_FILE).unlink(missing_ok=True)
            records = {"read": summary.read, "kept": summary.kept, "rejected": summary.rejected,
                       "reasons": dict(summary.reasons)}
            log(f"{command}: {summary.kept} training record(s) of {summary.read} read"
                + (f" ({', '.join(f'{k}={v}' for k, v in sorted(summary.reasons.items()))} rejected)"
                   if summary.rejected else ""))
            if lost:
                log(f"aloe: warning: {lost[1]}")
            warning = plan.schedule_warning(summary.kept)
            if warning:
                log(f"aloe: warning: {warning}")
            ledger = Ledger(plan, output_dir, claimed)
            ledger.start(records)
    run["ledger"] = ledger
    if not state.is_main_process:  # the counts --max-skipped weighs, as the main process wrote them
        records = (read_run(output_dir) or {}).get("records") or {}
    resume_from = str(claimed.resume_from) if claimed is not None and claimed.resume_from else None
    if not state.is_main_process and config.resume:
        from aloe_cli.training.run_folder import resume_point

        point, _ = resume_point(output_dir)  # what the main process chose, damaged checkpoints already set aside
        resume_from = str(point) if point is not None else None
    dataset = load_dataset(output_dir)

    kwargs = plan.sft_config_kwargs()
    if configured:
        kwargs["accelerator_config"] = {"use_configured_state": True}
    if not torch.cuda.is_available():
        kwargs["use_cpu"] = plan.deepspeed is None
        kwargs["dataloader_pin_memory"] = False
    args = SFTConfig(**_current_names(SFTConfig, kwargs))

    # Without DeepSpeed the Trainer cannot restore Qwen2-VL weights itself (see AloeSFTTrainer); DeepSpeed restores
    # its own per-rank states.
    weights_from = resume_from if resume_from and plan.deepspeed is None and not config.lora else None
    model = load_training_model(plan, weights_from)
    if config.freeze_vision or config.freeze_projector:
        freeze(model, vision=config.freeze_vision, projector=config.freeze_projector)
    if state.is_main_process:
        log(f"{command}: {describe_model(model)}")
    guard = VisionGuard(model).install()
    collator = TrainingCollator(processor, max_length=config.max_length, truncate_text=config.truncate == "text",
                                on_error=config.on_error, dataset=dataset)

    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    shown = TrainProgress(progress, command)
    callbacks = [_log_callback(output_dir / LOG_FILE, log), loss_curve_callback(output_dir, log), shown] + (
        [ledger.callback()] if ledger else [])
    try:
        trainer = _trainer_class()(model=model, args=args, data_collator=collator, train_dataset=dataset,
                                   processing_class=processor, callbacks=callbacks, peft_config=lora_config(plan))
    except ValueError as exc:  # PEFT and TRL refuse adapter settings they cannot train (a module not found, ...)
        if not config.lora:
            raise
        raise AloeError(f"--lora: {first_line(exc)}") from None
    if config.lora and state.is_main_process:
        log(f"{command}: LoRA r={config.lora_r}, alpha={config.lora_alpha}: {describe_model(trainer.model)}")
    trainer.skipped = Counter()
    trainer.lost_budget = _LostBudget(dict(records.get("reasons") or {}), int(records.get("read") or 0),
                                      config.max_skipped)
    trainer.weights_from = weights_from
    run["trainer"] = trainer
    for callback in (PrinterCallback, ProgressCallback):  # they print to stdout; our callback logs to stderr
        trainer.remove_callback(callback)
    if resume_from and state.is_main_process:
        log(f"{command}: resuming from {resume_from}")
    try:
        output = trainer.train(resume_from_checkpoint=resume_from)
        skipped = _sum_over_ranks(trainer.accelerator, trainer.skipped)
        trainer.lost_budget.check(skipped)  # the steps after the last logged one
        save_final(trainer, processor, output_dir)
        if config.lora and state.is_main_process:
            _record_base_path(output_dir, config.model)
        if config.lora and config.merge_lora and state.is_main_process:
            merged = merge_adapter(plan, output_dir, processor)
            log(f"{command}: the model with its adapters merged in: {merged}")
        trainer.accelerator.wait_for_everyone()
    except BaseException as stop:
        shown.close()
        # Preempted (SIGTERM), interrupted or failed (a full disk) while training or saving: a checkpoint or a final
        # model half written would be taken for a whole one; remove them, so what is left resumes.
        if state.is_main_process:
            remove_incomplete(output_dir)
            if isinstance(stop, (Terminated, KeyboardInterrupt)):
                stop.outcome = stopped(output_dir, plan.command, resume_command)
        raise
    guard_calls = trainer.accelerator.gather(torch.tensor([guard.calls], device=trainer.accelerator.device))
    guard.remove()
    if ledger is not None:
        ledger.complete(trainer.state.global_step, skipped)
    return TrainResult(output_dir=output_dir, records=records, global_step=trainer.state.global_step,
                       train_loss=output.training_loss, skipped=skipped, guard_calls=guard_calls.tolist(),
                       resumed_from=resume_from, is_main=trainer.accelerator.is_main_process)


def lora_config(plan: TrainPlan):
    """PEFT's LoraConfig for --lora (None without): TRL wraps the model with it (and prepares a 4-bit one)."""
    kwargs = plan.lora_config_kwargs()
    if kwargs is None:
        return None
    from peft import LoraConfig

    return LoraConfig(**kwargs)


MERGED = "merged"


def _record_base_path(output_dir: Path, model: str) -> None:
    """The adapter names its base model as --model was given; a relative folder would not be found from elsewhere,
    so a local one is recorded as an absolute path."""
    from aloe_cli.modeling.loading import is_local_reference

    path = output_dir / "adapter_config.json"
    if not path.is_file() or not is_local_reference(model):
        return
    adapter = json.loads(path.read_text(encoding="utf-8"))
    adapter["base_model_name_or_path"] = str(Path(model).expanduser().resolve())
    path.write_text(json.dumps(adapter, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def merge_adapter(plan: TrainPlan, output_dir: Path, processor) -> Path:
    """--merge-lora: the base model (full precision, whatever --load-in-4bit trained on) with the run's adapters
    merged in, saved with the processor to <output_dir>/merged, complete or not at all. Done from the saved
    adapter, so it is the same under ZeRO-3 (whose live weights are partitioned)."""
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    config = plan.config
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(config.dtype, torch.float32)
    unset_hf_deepspeed_config()  # training is over: the base loads whole, not partitioned by ZeRO-3
    base = AutoModelForImageTextToText.from_pretrained(config.model, dtype=dtype,
                                                       trust_remote_code=config.trust_remote_code)
    model = PeftModel.from_pretrained(base, str(output_dir)).merge_and_unload()
    target, staging = output_dir / MERGED, output_dir / f".{MERGED}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    processor.save_pretrained(str(staging))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


@dataclass
class _LostBudget:
    """--max-skipped over a whole run: the records rejected while reading plus the samples lost while training
    (summed over ranks, so every rank decides alike and stops at the same step)."""

    at_read: dict[str, int]
    read: int
    max_skipped: float

    def check(self, skipped: dict[str, int]) -> None:
        from aloe_cli.training.data import LOST_WHILE_TRAINING, lost_message

        lost = Counter(self.at_read)
        lost.update({reason: n for reason, n in skipped.items() if reason in LOST_WHILE_TRAINING})
        verdict = lost_message(dict(lost), self.read, self.max_skipped)
        if verdict and verdict[0]:
            raise AloeError(verdict[1])


__all__ = ["TrainResult", "freeze", "last_checkpoint", "run_training", "write_plan"]
