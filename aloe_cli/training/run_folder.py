"""The run folder of a training run: what is in it, and what an interrupted run leaves there.

    runs/stage1/
      aloe-train.yaml            the resolved configuration (written atomically)
      log.jsonl                  one line per logging step
      dataset/train.arrow        the records, read once (written under a temporary name, renamed when complete)
      checkpoint-N/              Trainer checkpoints; trainer_state.json is written last
      model + processor files    the final model, moved into place from a staging folder once complete

A run stopped while it saves (SLURM preemption, Ctrl-C, a full disk) could leave a checkpoint or a final model
half written, which `--resume` or a loader would take for a whole one. `remove_incomplete` removes them, and
`last_checkpoint` only ever picks a complete checkpoint, so what is left resumes with `--resume`.
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


def stopped(output_dir: Path, command: str) -> str:
    """What an interrupted run leaves, for the closing line."""
    kept = last_checkpoint(output_dir)
    if kept is None:
        return (f"no checkpoint was complete: a rerun of aloe {command} starts from the beginning (the records "
                "are read again)")
    return f"the last complete checkpoint is {kept}: rerun the same command with --resume to continue from it"


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


__all__ = ["FINAL_STAGING", "TRAINER_STATE", "checkpoints", "disk_full", "last_checkpoint", "remove_incomplete",
           "save_final", "stopped", "write_plan"]
