"""The run folder of a training run: what is in it, and what an interrupted run leaves there.

    runs/stage1/
      aloe-train.yaml            the resolved configuration (written atomically)
      log.jsonl                  one line per logging step
      dataset/train.arrow        the records, read once (written under a temporary name, renamed when complete)
      run.json                   the ledger: what made the run and its state (training.ledger)
      checkpoint-N/              Trainer checkpoints; trainer_state.json is written last
      damaged-checkpoint-N/      a checkpoint found damaged when resuming, kept aside for inspection
      model + processor files    the final model, moved into place from a staging folder once complete

A run stopped while it saves (SLURM preemption, Ctrl-C, a full disk) could leave a checkpoint or a final model
half written, which `--resume` or a loader would take for a whole one. `remove_incomplete` removes them, and
`last_checkpoint` only ever picks a complete checkpoint, so what is left resumes with `--resume`. A checkpoint
can also be damaged after its save finished (a truncated copy, a bad disk): `checkpoint_damage` reads the
headers of its files (trainer_state.json, safetensors, torch's zip files) without loading them, and
`resume_point` picks the newest checkpoint that is complete and whole.
"""

from __future__ import annotations

import os
from pathlib import Path

from aloe_cli.training.config import CONFIG_FILE, TrainPlan


def write_plan(plan: TrainPlan, output_dir: Path) -> Path:
    """`aloe-train.yaml`: the resolved configuration, written atomically."""
    from aloe_cli.data.writing import write_atomic

    path = output_dir / CONFIG_FILE
    write_atomic(path, plan.to_yaml().encode("utf-8"))
    return path


LOG_FILE = "log.jsonl"  # one line per logging step: step, loss, lr, tokens/s (loss.png is drawn from it)
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: a checkpoint without it is incomplete
FINAL_STAGING = ".aloe-final.tmp"  # the final model is saved here, then moved into the run folder


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` folder, oldest first."""
    found = []
    for path in output_dir.glob("checkpoint-*") if output_dir.is_dir() else ():
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and path.is_dir():
            found.append((int(step), path))
    return sorted(found)


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest complete checkpoint (one whose save finished: it holds trainer_state.json, written last)."""
    complete = [path for _, path in checkpoints(output_dir) if (path / TRAINER_STATE).is_file()]
    return str(complete[-1]) if complete else None


def remove_incomplete(output_dir: Path) -> list[Path]:
    """Remove the checkpoint folders whose save never finished and the final model's staging folder (a run
    stopped while saving): what is left resumes with --resume. Returns the checkpoints removed."""
    import shutil

    removed = []
    for _, path in checkpoints(output_dir):
        if not (path / TRAINER_STATE).is_file():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    shutil.rmtree(output_dir / FINAL_STAGING, ignore_errors=True)
    return removed


def stopped(output_dir: Path, command: str, resume_command: str | None = None) -> str:
    """What an interrupted run leaves, for the closing line: the checkpoint to resume from and the command."""
    kept = last_checkpoint(output_dir)
    if kept is None:
        return (f"no checkpoint was complete: a rerun of aloe {command} starts from the beginning (the records "
                "are read again)")
    how = f"resume with: {resume_command}" if resume_command else "rerun the same command with --resume"
    return f"the last complete checkpoint is {kept}: {how}"


# ----------------------------------------------------------------------------- damaged checkpoints

DAMAGED_PREFIX = "damaged-"  # a damaged checkpoint is renamed damaged-checkpoint-N: out of the Trainer's sight


def checkpoint_damage(folder: Path) -> str | None:
    """Why a checkpoint whose save finished cannot be resumed from (its first damaged file), or None when every
    file it holds is whole as far as its headers tell: trainer_state.json parses and names its step, each
    safetensors file is as long as its header says, each torch file (.pt, .pth, .bin: zip archives) has its
    central directory. Nothing is loaded, so this costs a few reads per file, not the checkpoint's size."""
    import json

    state_path = folder / TRAINER_STATE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{TRAINER_STATE} cannot be read ({_reason(exc)})"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"{TRAINER_STATE} names no global_step"
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        name = path.relative_to(folder).as_posix()
        if path.suffix == ".safetensors":
            problem = _safetensors_damage(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            problem = _torch_file_damage(path)
        elif path.name.endswith(".index.json"):
            problem = _index_damage(path)
        else:
            continue
        if problem:
            return f"{name} {problem}"
    return None


def _reason(exc: BaseException) -> str:
    from aloe_cli.errors import first_line

    return getattr(exc, "strerror", None) or first_line(exc)


def _safetensors_damage(path: Path) -> str | None:
    """A safetensors file: 8 bytes of header length, a JSON header, then the tensors up to the largest offset."""
    import json
    import struct

    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"is truncated ({size} bytes, no header)"
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8:
                return f"is truncated ({size} bytes, its header alone is {length + 8})"
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as exc:
        return f"cannot be read ({_reason(exc)})"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"is truncated ({size} of {expected} bytes)"
    return None


def _torch_file_damage(path: Path) -> str | None:
    """torch.save writes a zip archive; a cut one has lost its central directory, which sits at the end."""
    import zipfile

    try:
        with path.open("rb") as handle:
            magic = handle.read(2)
    except OSError as exc:
        return f"cannot be read ({_reason(exc)})"
    if magic != b"PK":  # empty, or a legacy (pre-zip) torch file, which has no structure to check
        return "is empty" if not magic else None
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        return f"is truncated or corrupt ({_reason(exc)})"
    return None


def _index_damage(path: Path) -> str | None:
    """A sharded checkpoint's index: JSON naming shards that are all there."""
    import json

    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        shards = set((index.get("weight_map") or {}).values())
    except (OSError, ValueError, AttributeError) as exc:
        return f"cannot be read ({_reason(exc)})"
    missing = sorted(shard for shard in shards if not (path.parent / shard).is_file())
    return f"names a missing shard {missing[0]}" if missing else None


def checkpoint_step(folder: Path) -> int:
    """The step of a checkpoint folder, from its name."""
    return int(folder.name.removeprefix("checkpoint-"))


def resume_point(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint that is whole, and the newer complete ones found damaged (folder, why)."""
    damaged = []
    for _, path in reversed(checkpoints(output_dir)):
        if not (path / TRAINER_STATE).is_file():
            continue  # never finished: remove_incomplete's business
        problem = checkpoint_damage(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint to damaged-checkpoint-N (numbered further if that exists): the Trainer no
    longer sees it, a new save of the same step starts from an empty folder, and nothing is deleted."""
    target = folder.with_name(DAMAGED_PREFIX + folder.name)
    counter = 1
    while target.exists():
        counter += 1
        target = folder.with_name(f"{DAMAGED_PREFIX}{folder.name}.{counter}")
    os.replace(folder, target)
    return target


def folder_bytes(folder: Path) -> int:
    """What the files under `folder` take on disk (apparent sizes)."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_final(trainer, processor, output_dir: Path) -> None:
    """The final model and processor appear in the run folder complete or not at all: saved into a hidden
    staging folder (every rank takes part under ZeRO-3), then moved into place by the main process, with the
    usual file mode for the umask."""
    import shutil

    staging = output_dir / FINAL_STAGING
    accelerator = trainer.accelerator
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    if accelerator.is_main_process:
        processor.save_pretrained(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        mode = 0o666 & ~_umask()
        for entry in sorted(staging.iterdir()):
            target = output_dir / entry.name
            if entry.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                os.chmod(entry, mode)
            os.replace(entry, target)
        staging.rmdir()
    accelerator.wait_for_everyone()


def disk_full(exc: BaseException) -> str | None:
    """The reason, when an exception from a library's writer (torch.save, safetensors, pyarrow) is a disk that
    filled up or a quota; None for anything else."""
    import errno

    link: BaseException | None = exc
    while link is not None:
        if isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT):
            return link.strerror or str(link)
        if "No space left on device" in str(link) or "Disk quota exceeded" in str(link):
            return "No space left on device" if "No space" in str(link) else "Disk quota exceeded"
        link = link.__cause__ or link.__context__
    return None


__all__ = ["DAMAGED_PREFIX", "FINAL_STAGING", "TRAINER_STATE", "checkpoint_damage", "checkpoint_step", "checkpoints",
           "disk_full", "folder_bytes", "human_bytes", "last_checkpoint", "remove_incomplete", "resume_point",
           "save_final", "set_aside", "stopped", "write_plan"]
