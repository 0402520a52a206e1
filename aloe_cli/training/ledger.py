"""The run folder's ledger, `run.json`: what made a run and where it stands.

    {"aloe_version": "0.1.0", "command": "train", "state": "running",      # running | complete | failed
     "started": "2026-12-07T05:00:00Z", "updated": "...", "host": "node7", "pid": 4242, "world_size": 32,
     "inputs": [{"path": "/data/mixture.jsonl", "size": 1234567, "sha256": "9f2c..."}],
     "model": {"path": "/models/Qwen2-VL-7B-Instruct", "files": {"config.json": 1617, "model-00001-of-00005...": ...}},
     "config": {...every field of the resolved TrainConfig...},
     "global_step": 500, "checkpoint": "checkpoint-500", "resumed_from": ["checkpoint-500"],
     "records": {"read": ..., "kept": ..., "rejected": ..., "reasons": {...}}, "error": null}

`claim` applies the folder's rules before anything is read or written:
- without --resume or --overwrite, a folder that holds a run (a ledger that is running or complete, a checkpoint,
  a final model, or an older run's aloe-train.yaml) is refused: it is never shared by two runs. A run that failed
  before its first checkpoint holds nothing worth keeping and is started again;
- --overwrite moves the old run aside (`<folder>.replaced-<UTC time>`), so old and new checkpoints never mix;
- --resume continues the same run only: its inputs (size and SHA-256), its model and every configuration value
  that changes what is learnt must be those recorded, else a one-line error says what differs. A complete run is
  left as it is. The checkpoint is the newest complete one that is whole (`run_folder.resume_point`); damaged ones
  are set aside and named;
- a job SLURM requeued (SLURM_RESTART_COUNT > 0) runs its script again, flags and all: it resumes its own run
  (`requeued`: --overwrite would move it aside and start over), and where that run stopped before its first
  checkpoint it starts again.

Inputs are hashed in full (SHA-256 at disk speed: seconds per GB); a model is identified by its path and the sizes
of its files, since hashing its weights on every start would cost minutes. Input that cannot be read twice (a pipe,
standard input) is recorded by path only.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aloe_cli.errors import AloeError, UsageError
from aloe_cli.training.config import CONFIG_FILE, TrainPlan, describe
from aloe_cli.training.run_folder import (
    checkpoint_step,
    checkpoints,
    remove_incomplete,
    resume_point,
    set_aside,
)
from aloe_cli.training.slurm import restart_count

RUN_FILE = "run.json"
RUNNING, COMPLETE, FAILED = "running", "complete", "failed"
# Fields that steer a run without changing what it learns (where it reads from, how often it logs and saves, how
# fast it runs): they may differ when a run is resumed. The inputs and the model are compared by content instead.
RUN_CONTROL = frozenset({"input", "model", "base", "output_dir", "resume", "overwrite", "dataloader_workers",
                         "logging_steps", "save_steps", "save_total_limit", "report_to", "max_skipped", "emit",
                         "emit_only", "attn_implementation", "use_liger"})
_MODEL_FILES = (".safetensors", ".bin", ".json")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ----------------------------------------------------------------------------- what made a run

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def describe_input(path: str) -> dict[str, Any]:
    """{path, size, sha256} of one input: a file, or a dataset folder (its files' hashes, hashed in order)."""
    target = Path(path)
    entry: dict[str, Any] = {"path": path if path == "-" else str(target.absolute()), "size": None, "sha256": None}
    try:
        if target.is_file():
            entry.update(size=target.stat().st_size, sha256=sha256_of(target))
        elif target.is_dir():
            digest, size = hashlib.sha256(), 0
            for file in sorted(p for p in target.rglob("*") if p.is_file()):
                size += file.stat().st_size
                digest.update(f"{file.relative_to(target).as_posix()}\0{sha256_of(file)}\n".encode())
            entry.update(size=size, sha256=digest.hexdigest())
    except OSError as exc:
        raise AloeError(f"cannot read input {path}: {exc.strerror or exc}") from None
    return entry  # a pipe or standard input: read once, by the run itself


def describe_model(ref: str) -> dict[str, Any]:
    """The model a run starts from: a local folder's absolute path and the sizes of its weight and config files,
    or a Hub id."""
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        return {"path": ref, "files": None}
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())
             if p.is_file() and p.name.endswith(_MODEL_FILES) and p.name != RUN_FILE}
    return {"path": str(folder.resolve()), "files": files}


def fingerprint(plan: TrainPlan, paths: list[str]) -> dict[str, Any]:
    """What must be equal for a run to be the same run: command, inputs, model and the learning configuration."""
    config = plan.config.to_dict()
    return {"command": plan.command, "inputs": [describe_input(path) for path in paths],
            "model": describe_model(plan.config.model),
            "config": {key: value for key, value in config.items() if key not in RUN_CONTROL}}


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "unknown"


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the recorded run and this one, in words (empty when they are the same run)."""
    found = []
    if recorded.get("command") != current["command"]:
        found.append(f"it was made by aloe {recorded.get('command')}, not aloe {current['command']}")
    old_inputs, new_inputs = recorded.get("inputs") or [], current["inputs"]
    if len(old_inputs) != len(new_inputs):
        found.append(f"-i: {len(old_inputs)} input(s) then ({', '.join(i['path'] for i in old_inputs)}), "
                     f"{len(new_inputs)} now ({', '.join(i['path'] for i in new_inputs)})")
    else:
        for old, new in zip(old_inputs, new_inputs):
            if old.get("sha256") is None or new["sha256"] is None:  # a pipe: only its name can be compared
                if old.get("path") != new["path"]:
                    found.append(f"-i: {old.get('path')} then, {new['path']} now")
            elif (old.get("sha256"), old.get("size")) != (new["sha256"], new["size"]):
                found.append(f"-i {new['path']} is not the input the run was made from (sha256 "
                             f"{_short(old.get('sha256'))}, {old.get('size')} bytes then; {_short(new['sha256'])}, "
                             f"{new['size']} bytes now)")
    old_model, new_model = recorded.get("model") or {}, current["model"]
    flag = "--base" if current["command"] == "adv-train" else "--model"
    if old_model.get("path") != new_model["path"]:
        found.append(f"{flag}: {old_model.get('path')} then, {new_model['path']} now")
    elif old_model.get("files") != new_model["files"]:
        changed = sorted(set(old_model.get("files") or {}) ^ set(new_model["files"] or {}) | {
            name for name in set(old_model.get("files") or {}) & set(new_model["files"] or {})
            if old_model["files"][name] != new_model["files"][name]})
        found.append(f"{flag} {new_model['path']} changed since ({', '.join(changed)})")
    # The ledger keeps the full configuration; fields that a newer or older aloe lacks are not compared.
    old_config, new_config = recorded.get("config") or {}, current["config"]
    for key in new_config:
        if key in old_config and old_config[key] != new_config[key]:
            found.append(f"{describe(key)} {_value(old_config.get(key))} then, {_value(new_config.get(key))} now")
    return found


def _value(value: Any) -> str:
    return "unset" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


# ----------------------------------------------------------------------------- what a folder holds

def read_run(output_dir: Path) -> dict[str, Any] | None:
    """The ledger of the run in `output_dir`, or None when it has none."""
    path = output_dir / RUN_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AloeError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AloeError(f"{path} is not valid JSON ({exc}): the run folder's ledger is damaged; --overwrite "
                        "moves the run aside and starts a new one") from None
    if not isinstance(record, dict):
        raise AloeError(f"{path} does not hold a JSON object: the run folder's ledger is damaged")
    return record


def has_final_model(output_dir: Path) -> bool:
    """A model, or a LoRA adapter (--lora), saved in the folder."""
    return ((output_dir / "config.json").is_file() and any(output_dir.glob("model*.safetensors*"))) or (
        (output_dir / "adapter_config.json").is_file() and any(output_dir.glob("adapter_model*.safetensors")))


def _alive(record: dict[str, Any]) -> bool | None:
    """Whether a run marked running is still running: True or False when it ran on this machine (a process that
    is gone was killed without a chance to say so), None when it ran on another one (there is no telling)."""
    if record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def what_it_holds(output_dir: Path, record: dict[str, Any] | None) -> str | None:
    """Words for the run `output_dir` holds, or None when it holds none worth keeping."""
    found = checkpoints(output_dir)
    if record is not None:
        state = record.get("state")
        step = record.get("global_step")
        if state == RUNNING and _alive(record) is False:
            state = "stopped without a word (killed?)"
        if state == COMPLETE or state == RUNNING or found or has_final_model(output_dir):
            at = f", step {step}" if step else ""
            return f"a run of aloe {record.get('command', 'train')} ({state}{at}, started {record.get('started')})"
        return None
    if found or has_final_model(output_dir) or (output_dir / CONFIG_FILE).is_file():
        what = [f"{len(found)} checkpoint(s)"] if found else []
        what += ["a model"] if has_final_model(output_dir) else []
        what += [CONFIG_FILE] if (output_dir / CONFIG_FILE).is_file() else []
        return f"another run ({', '.join(what)})"
    return None


def completed_step(output_dir: Path) -> int | None:
    """The final step of the complete run in `output_dir` (0 when unknown), or None when it holds none: its ledger
    says complete, or (an older run without a ledger) it holds a final model."""
    record = read_run(output_dir) if output_dir.is_dir() else None
    if record is not None:
        return int(record.get("global_step") or 0) if record.get("state") == COMPLETE else None
    if not output_dir.is_dir() or not has_final_model(output_dir):
        return None
    found = checkpoints(output_dir)
    return found[-1][0] if found else 0


# ----------------------------------------------------------------------------- the rules

@dataclass
class Claim:
    """What `claim` decided: a complete run (nothing to do), or the checkpoint to resume from (None: a new run),
    and what it did on the way, for the log."""

    complete: bool = False
    step: int | None = None
    resume_from: Path | None = None
    notes: list[str] = field(default_factory=list)
    record: dict[str, Any] | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)


def requeued(config, log) -> None:
    """On a job SLURM requeued, --overwrite and a plain start are read as --resume (`claim` then starts the run again
    when it stopped before its first checkpoint). Every rank calls it, with the same environment."""
    restarts = restart_count()
    if not restarts or config.resume:
        return
    config.resume, config.overwrite = True, False
    log(f"SLURM requeued this job (SLURM_RESTART_COUNT={restarts}): it continues its run in {config.output_dir} "
        "from the newest checkpoint (--resume) instead of starting again")


def _move_aside(output_dir: Path, result: Claim, what: str) -> None:
    aside = output_dir.with_name(f"{output_dir.name}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    os.replace(output_dir, aside)
    output_dir.mkdir()
    result.notes.append(f"{what} in {output_dir} was moved aside to {aside} (delete it when it is no longer needed)")
    result.record = None


def claim(plan: TrainPlan, paths: list[str]) -> Claim:
    """Apply the run folder's rules (see the module); returns what the run does. Raises before changing anything
    when the folder is refused."""
    config = plan.config
    output_dir = Path(config.output_dir)
    record = read_run(output_dir) if output_dir.is_dir() else None
    current = fingerprint(plan, paths)
    result = Claim(record=record, fingerprint=current)
    if not config.resume:
        held = what_it_holds(output_dir, record) if output_dir.is_dir() else None
        if held and not config.overwrite:
            raise UsageError(f"{output_dir} holds {held}: --resume continues it, --overwrite moves it aside and "
                             "starts a new run, or name another folder", "--output-dir")
        if held:
            _move_aside(output_dir, result, "--overwrite: the old run")
        return result

    # Only a live process on this machine is known to be training: a run marked running elsewhere is taken for one
    # whose node died (SLURM requeues it elsewhere), so --resume may continue it.
    if record is not None and record.get("state") == RUNNING and _alive(record):
        raise AloeError(f"--resume: {output_dir} is being trained right now (process {record.get('pid')} on "
                        f"{record.get('host')}, state running); stop it first")
    final_step = completed_step(output_dir)
    complete = final_step is not None
    point, damaged = resume_point(output_dir)
    if not complete and point is None and not damaged:
        if restart_count() and (record is None or not differences(record, current)):
            # Requeued before its first checkpoint: nothing to continue, so the job's run starts again.
            if output_dir.is_dir() and what_it_holds(output_dir, record):
                _move_aside(output_dir, result, "the stopped run")
            result.notes.append("the job was requeued before its run's first checkpoint: the run starts again")
            return result
        if record is not None:
            raise AloeError(f"--resume: no checkpoint-* folder in {output_dir}: the run stopped before its first "
                            "checkpoint; run it again without --resume")
        raise AloeError(f"--resume: no checkpoint-* folder in {output_dir}")
    step = final_step or (checkpoint_step(point) if point is not None else None)
    if config.max_steps is not None and step is not None and config.max_steps < step:
        where = f"the run's final step {step} (it is complete)" if complete else f"{point} (step {step})"
        raise UsageError(f"{config.max_steps} is below {where}: a resumed run cannot go back", "--max-steps")
    if record is not None:
        differs = differences(record, current)
        if differs:
            raise AloeError(f"--resume: {output_dir} holds another run: {'; '.join(differs)} (--overwrite moves it "
                            "aside and starts a new one)")
    if complete:
        result.complete, result.step = True, step
        return result
    if point is None:
        names = ", ".join(f"{folder.name} ({why})" for folder, why in damaged)
        raise AloeError(f"--resume: no checkpoint in {output_dir} is whole: {names}; --overwrite starts the run "
                        "again")
    for folder in remove_incomplete(output_dir):
        result.notes.append(f"removed the incomplete checkpoint {folder} (its save never finished)")
    for folder, why in damaged:
        aside = set_aside(folder)
        result.notes.append(f"{folder} is damaged: {why}; kept aside as {aside.name}")
    if damaged:
        result.notes.append(f"resuming from {point}, the newest complete checkpoint, instead")
    result.resume_from, result.step = point, checkpoint_step(point)
    return result


# ----------------------------------------------------------------------------- keeping the record

class Ledger:
    """Writes `run.json` (atomically) on the main process as the run goes: running, then complete or failed."""

    def __init__(self, plan: TrainPlan, output_dir: Path, claimed: Claim):
        from aloe_cli import __version__

        base = (claimed.record or {}) if claimed.resume_from is not None else {}  # a new run starts a new record
        self.path = output_dir / RUN_FILE
        self.record: dict[str, Any] = {
            "aloe_version": __version__, "command": plan.command, "state": RUNNING,
            "started": base.get("started") or _now(), "updated": _now(), "host": socket.gethostname(),
            "pid": os.getpid(), "world_size": plan.world_size, **claimed.fingerprint,
            "config": plan.config.to_dict(), "config_file": CONFIG_FILE,
            "global_step": claimed.step or 0, "checkpoint": claimed.resume_from.name if claimed.resume_from else None,
            "resumed_from": list(base.get("resumed_from") or []), "records": None, "error": None,
        }
        if claimed.resume_from is not None:
            self.record["resumed_from"].append(claimed.resume_from.name)

    def _write(self) -> None:
        from aloe_cli.data.writing import write_atomic

        self.record["updated"] = _now()
        write_atomic(self.path, (json.dumps(self.record, indent=1) + "\n").encode("utf-8"))

    def start(self, records: dict[str, Any]) -> None:
        self.record["records"] = records
        self._write()

    def saved(self, step: int, checkpoint: str) -> None:
        self.record.update(global_step=step, checkpoint=checkpoint)
        self._write()

    def complete(self, step: int, skipped: dict[str, int]) -> None:
        self.record.update(state=COMPLETE, global_step=step, finished=_now(), skipped=skipped)
        self._write()

    def fail(self, error: str) -> None:
        self.record.update(state=FAILED, error=error)
        try:
            self._write()
        except (AloeError, OSError):  # a full disk: the error that stopped the run is the one to report
            pass

    def callback(self):
        from transformers import TrainerCallback

        ledger = self

        class LedgerCallback(TrainerCallback):
            """The step and checkpoint of every finished save, into run.json."""

            def on_save(self, args, state, control, **kwargs):
                if state.is_world_process_zero:
                    ledger.saved(state.global_step, f"checkpoint-{state.global_step}")

        return LedgerCallback()


__all__ = ["COMPLETE", "Claim", "FAILED", "Ledger", "RUN_FILE", "RUNNING", "claim", "completed_step",
           "describe_input", "differences", "fingerprint", "read_run", "what_it_holds"]
