"""The run folder is a ledger, through the real CLI on the tiny model (a few CPU steps each).

run.json records what made a run and its state; a folder that is, holds or lies inside the starting model, or
holds another run, is refused; --resume continues the same run only, from its newest whole checkpoint; --overwrite
moves the old run aside; lost samples count against --max-skipped; a schedule too short to learn warns.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from support import aloe, chat, read_jsonl, write_jsonl

ENV = {"OMP_NUM_THREADS": "1"}  # the test machine's cores are shared
FLAGS = ("--global-batch-size", "4", "--micro-batch-size", "4", "--precision", "fp32", "--no-gradient-checkpointing",
         "--deepspeed", "none", "--dataloader-workers", "0", "--logging-steps", "1", "--warmup-ratio", "0",
         "--no-shuffle")


def train(*args: str, timeout: float = 300):
    return aloe("train", *FLAGS, *args, env=ENV, timeout=timeout)


def one_line_error(proc, code: int) -> str:
    """The command failed with `code` and said why in one last line, without a traceback."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(("aloe: error: ", "Error: ")), line
    return line


def digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, by relative path: a folder left exactly as it was."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def png(path: Path, colour: str = "red") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 56), colour).save(path)
    return str(path)


def colour_records(folder: Path, count: int) -> list[dict]:
    return [chat("What colour is it?", ("Red.", "Blue.")[i % 2], [png(folder / f"{i}.png", ("red", "blue")[i % 2])],
                 id=f"c{i}") for i in range(count)]


@pytest.fixture(scope="module")
def complete_run(tiny_model_dir, tmp_path_factory):
    """A finished run: 8 text records, 4 steps, checkpoints at 2 and 4. Tests copy it before changing it."""
    folder = tmp_path_factory.mktemp("complete")
    data = write_jsonl(folder / "items.jsonl", [chat(f"Is there an effusion in case {i}?", ("Yes.", "No.")[i % 2])
                                                for i in range(8)])
    run = folder / "run"
    proc = train("-i", str(data), "--model", str(tiny_model_dir), "--output-dir", str(run), "--max-steps", "4",
                 "--save-steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, data, proc


def args_of(run: Path, data: Path, model: Path, *extra: str) -> list[str]:
    return ["-i", str(data), "--model", str(model), "--output-dir", str(run), "--max-steps", "4", "--save-steps", "2",
            *extra]


# ----------------------------------------------------------------------------- the ledger

def test_a_finished_run_records_what_made_it_and_that_it_is_complete(complete_run, tiny_model_dir):
    run, data, _ = complete_run
    record = json.loads((run / "run.json").read_text())
    assert record["state"] == "complete" and record["command"] == "train" and record["global_step"] == 4
    assert record["aloe_version"] and record["config"]["max_steps"] == 4 and record["checkpoint"] == "checkpoint-4"
    assert record["inputs"] == [{"path": str(data), "size": data.stat().st_size,
                                 "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}]
    assert record["model"]["path"] == str(Path(tiny_model_dir).resolve())
    assert record["model"]["files"]["model.safetensors"] == (tiny_model_dir / "model.safetensors").stat().st_size
    assert record["records"] == {"read": 8, "kept": 8, "rejected": 0, "reasons": {}}


@pytest.mark.parametrize("where", ["is", "inside", "holds"])
@pytest.mark.parametrize("command", ["train", "adv-train"])
def test_an_output_folder_that_is_inside_or_holds_the_starting_model_is_refused(tiny_model_dir, tmp_path, where,
                                                                                command):
    model = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model)
    before = digest(model)
    data = write_jsonl(tmp_path / "items.jsonl", [chat("Q?", "A.")])
    out = {"is": model, "inside": model / "stage2", "holds": tmp_path}[where]
    flag = "--model" if command == "train" else "--base"
    extra = ["--perturb", "none"] if command == "adv-train" else []
    proc = aloe(command, *FLAGS, "-i", str(data), flag, str(model), "--output-dir", str(out), *extra, env=ENV)
    line = one_line_error(proc, 2)
    assert "--output-dir" in line and f"{flag} folder" in line
    assert digest(model) == before  # the starting weights are untouched
    assert not (out / "run.json").exists() and not (model / "stage2").exists()


def test_a_second_run_into_a_folder_that_holds_a_run_is_refused_and_changes_nothing(complete_run, tiny_model_dir):
    run, data, _ = complete_run
    before = digest(run)
    proc = train(*args_of(run, data, tiny_model_dir))
    line = one_line_error(proc, 2)
    assert "--output-dir" in line and "holds a run of aloe train (complete, step 4" in line
    assert "--resume continues it, --overwrite" in line and "training record" not in proc.stderr
    assert digest(run) == before


def test_a_folder_with_an_older_runs_checkpoints_and_no_ledger_is_refused_too(complete_run, tiny_model_dir,
                                                                               tmp_path):
    run, data, _ = complete_run
    legacy = tmp_path / "legacy"
    shutil.copytree(run / "checkpoint-2", legacy / "checkpoint-2")
    proc = train(*args_of(legacy, data, tiny_model_dir))
    assert "holds another run (1 checkpoint(s))" in one_line_error(proc, 2)


def test_resuming_a_complete_run_says_so_and_changes_nothing(complete_run, tiny_model_dir):
    run, data, _ = complete_run
    before = digest(run)
    proc = train(*args_of(run, data, tiny_model_dir, "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"the run in {run} is complete (step 4): nothing to resume, nothing changed" in proc.stderr
    assert "mean training loss" not in proc.stderr and "step 5" not in proc.stderr
    assert digest(run) == before


@pytest.mark.parametrize(("change", "expected"), [
    (("--learning-rate", "1e-3"), "--learning-rate 3.75e-05 then, 0.001 now"),
    (("--max-steps", "8"), "--max-steps 4 then, 8 now"),
    (("--global-batch-size", "8", "--micro-batch-size", "8"), "--global-batch-size 4 then, 8 now"),
    ("inputs", "is not the input the run was made from (sha256"),
    ("model", "--model: "),
])
def test_resume_refuses_another_run_and_says_what_differs(complete_run, tiny_model_dir, tmp_path, change, expected):
    run, data, _ = complete_run
    before = digest(run)
    model = tiny_model_dir
    if change == "inputs":  # seven of the eight records
        data = write_jsonl(tmp_path / "items.jsonl", read_jsonl(data)[:7])
        args = args_of(run, data, model, "--resume")
    elif change == "model":
        model = tmp_path / "other-model"
        shutil.copytree(tiny_model_dir, model)
        args = args_of(run, data, model, "--resume")
    else:
        args = [*args_of(run, data, model, "--resume"), *change]
    proc = train(*args)
    line = one_line_error(proc, 1)
    assert line.startswith(f"aloe: error: --resume: {run} holds another run: ") and expected in line, line
    assert digest(run) == before


def test_max_steps_below_the_checkpoint_to_resume_from_is_refused(complete_run, tiny_model_dir, tmp_path):
    run, data, _ = complete_run
    interrupted = tmp_path / "run"
    shutil.copytree(run / "checkpoint-2", interrupted / "checkpoint-2")  # an older run's checkpoint, no ledger
    proc = train(*args_of(interrupted, data, tiny_model_dir, "--resume", "--max-steps", "1"))
    line = one_line_error(proc, 2)
    assert "--max-steps" in line and f"1 is below {interrupted / 'checkpoint-2'} (step 2)" in line
    proc = train(*args_of(run, data, tiny_model_dir, "--resume", "--max-steps", "3"))
    assert "3 is below the run's final step 4" in one_line_error(proc, 2)


def test_resume_and_overwrite_together_are_a_usage_error(complete_run, tiny_model_dir):
    run, data, _ = complete_run
    proc = train(*args_of(run, data, tiny_model_dir, "--resume", "--overwrite"))
    assert "--overwrite" in one_line_error(proc, 2) and "exclude each other" in proc.stderr


def test_overwrite_moves_the_old_run_aside_and_never_mixes_checkpoints(complete_run, tiny_model_dir, tmp_path):
    run, data, _ = complete_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "checkpoint-8").mkdir()  # a later checkpoint of the old run
    shutil.copytree(run / "checkpoint-4", copy / "checkpoint-8", dirs_exist_ok=True)
    old = digest(copy)
    proc = train(*args_of(copy, data, tiny_model_dir, "--overwrite", "--max-steps", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and f"was moved aside to {aside[0]}" in proc.stderr
    assert digest(aside[0]) == old  # the old run, whole
    assert sorted(p.name for p in copy.glob("checkpoint-*")) == ["checkpoint-2"]
    assert [line["step"] for line in read_jsonl(copy / "log.jsonl") if "loss" in line] == [1, 2]
    assert json.loads((copy / "run.json").read_text())["state"] == "complete"
    # a resume of the new run now finds it complete at step 2, not the old run's checkpoint-8
    proc = train(*args_of(copy, data, tiny_model_dir, "--resume", "--max-steps", "2"))
    assert proc.returncode == 0 and "is complete (step 2)" in proc.stderr, proc.stderr[-3000:]


def test_overwrite_refuses_to_move_an_input_aside_with_the_old_run(complete_run, tiny_model_dir, tmp_path):
    run, data, _ = complete_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    inside = shutil.copy(data, copy / "items.jsonl")
    before = digest(copy)
    proc = train(*args_of(copy, Path(inside), tiny_model_dir, "--overwrite"))
    line = one_line_error(proc, 2)
    assert "--overwrite" in line and "lies inside" in line
    assert digest(copy) == before


# ----------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def failed_run(tiny_model_dir, tmp_path_factory):
    """A run that failed at step 4 (a broken image, over --max-skipped), with checkpoints 1 to 3; the image is then
    repaired, so the run can be resumed. Tests copy it before changing it."""
    folder = tmp_path_factory.mktemp("failed")
    data = write_jsonl(folder / "task.jsonl", colour_records(folder / "img", 16))
    (folder / "img" / "12.png").write_bytes(b"not a png")  # read at step 4 (no shuffling, 4 per step)
    run = folder / "run"
    proc = train("-i", str(data), "--model", str(tiny_model_dir), "--output-dir", str(run), "--max-steps", "6",
                 "--save-steps", "1", "--on-error", "skip")
    png(folder / "img" / "12.png")
    return run, data, proc


def test_a_run_fails_when_images_it_cannot_read_exceed_max_skipped(failed_run):
    run, _, proc = failed_run
    line = one_line_error(proc, 1)
    assert line == ("aloe: error: 1 of 16 records lost (image_corrupt=1): more than --max-skipped 0.1% of 16 = 0 "
                    "allows; fix the inputs (image paths, files) or raise --max-skipped")
    record = json.loads((run / "run.json").read_text())
    assert record["state"] == "failed" and record["error"] == line.removeprefix("aloe: error: ")
    assert record["global_step"] == 3 and record["checkpoint"] == "checkpoint-3"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def resume(run: Path, data: Path, model: Path, *extra: str):
    return train("-i", str(data), "--model", str(model), "--output-dir", str(run), "--max-steps", "6",
                 "--save-steps", "1", "--on-error", "skip", "--resume", *extra)


def test_a_failed_run_resumes_from_its_newest_checkpoint_to_the_end(failed_run, tiny_model_dir, tmp_path):
    run, data, _ = failed_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    proc = resume(copy, data, tiny_model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {copy / 'checkpoint-3'}" in proc.stderr and "damaged" not in proc.stderr
    steps = [line["step"] for line in read_jsonl(copy / "log.jsonl") if "loss" in line]
    assert steps == [1, 2, 3, 4, 4, 5, 6]  # the failed run logged step 4 before it stopped
    record = json.loads((copy / "run.json").read_text())
    assert record["state"] == "complete" and record["global_step"] == 6 and record["resumed_from"] == ["checkpoint-3"]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


DAMAGES = {
    "trainer_state.json": (lambda folder: (folder / "trainer_state.json").write_text('{"global_step": 3, "log_hi'),
                           "trainer_state.json cannot be read"),
    "optimizer.pt": (lambda folder: truncate(folder / "optimizer.pt"), "optimizer.pt is truncated or corrupt"),
    "model.safetensors": (lambda folder: truncate(folder / "model.safetensors"),
                          "model.safetensors is truncated"),
    "scheduler.pt": (lambda folder: (folder / "scheduler.pt").write_bytes(b""), "scheduler.pt is empty"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_named_and_resume_falls_back_to_the_newest_whole_one(failed_run, tiny_model_dir,
                                                                                     tmp_path, damage):
    run, data, _ = failed_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    spoil, words = DAMAGES[damage]
    spoil(copy / "checkpoint-3")
    proc = resume(copy, data, tiny_model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(rf"{re.escape(str(copy / 'checkpoint-3'))} is damaged: {re.escape(words)}.*; kept aside as "
                     r"damaged-checkpoint-3\n", proc.stderr), proc.stderr[-3000:]
    assert f"resuming from {copy / 'checkpoint-2'}, the newest complete checkpoint, instead" in proc.stderr
    assert "--model" not in proc.stderr and "Traceback" not in proc.stderr
    assert (copy / "damaged-checkpoint-3").is_dir()
    assert [line["step"] for line in read_jsonl(copy / "log.jsonl") if "loss" in line][-4:] == [3, 4, 5, 6]
    assert json.loads((copy / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3  # saved anew


def test_resume_with_every_checkpoint_damaged_is_one_line_naming_them(failed_run, tiny_model_dir, tmp_path):
    run, data, _ = failed_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for step in (1, 2, 3):
        truncate(copy / f"checkpoint-{step}" / "optimizer.pt")
    before = digest(copy)
    proc = resume(copy, data, tiny_model_dir)
    line = one_line_error(proc, 1)
    assert line.startswith(f"aloe: error: --resume: no checkpoint in {copy} is whole: checkpoint-3 (optimizer.pt is "
                           "truncated or corrupt"), line
    assert "checkpoint-1 (optimizer.pt" in line
    assert digest(copy) == before  # refused: nothing renamed or removed


# ----------------------------------------------------------------------------- lost samples and short schedules

def test_missing_images_are_counted_and_fail_the_run_above_max_skipped(tiny_model_dir, tmp_path):
    """The seam `aloe mix` -> `aloe train` with image paths that do not resolve: counted as records lost, the run
    fails before training above --max-skipped, and within it the summary's kept is what was trained on."""
    records = colour_records(tmp_path / "img", 8)
    for i in (2, 5):
        records[i]["images"] = [f"elsewhere/{i}.png"]
    data = write_jsonl(tmp_path / "mixture.jsonl", records)
    run = tmp_path / "run"
    proc = train("-i", str(data), "--model", str(tiny_model_dir), "--output-dir", str(run), "--max-steps", "1",
                 "--on-error", "skip")
    line = one_line_error(proc, 1)
    assert line == ("aloe: error: 2 of 8 records lost (image_missing=2): more than --max-skipped 0.1% of 8 = 0 "
                    "allows; fix the inputs (image paths, files) or raise --max-skipped")
    assert not run.exists()  # nothing was trained: no run folder is left behind
    proc = train("-i", str(data), "--model", str(tiny_model_dir), "--output-dir", str(run), "--max-steps", "1",
                 "--on-error", "skip", "--max-skipped", "0.25")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("aloe: warning: 2 of 8 records lost (image_missing=2): not trained on (within --max-skipped 25% of 8 = 2)"
            in proc.stderr)
    assert re.search(r"records rejected\s+2\n", proc.stderr) and re.search(r"records kept\s+6\n", proc.stderr)
    assert "aloe: warning: 2 of 8 records were not trained on: only 6 were kept" in proc.stderr


def test_six_records_with_the_published_global_batch_warn_before_training(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "six.jsonl", [chat(f"Question {i}?", "Answer.") for i in range(6)])
    proc = aloe("train", "--precision", "fp32", "--no-gradient-checkpointing", "--deepspeed", "none",
                "--dataloader-workers", "0", "-i", str(data), "--model", str(tiny_model_dir), "--output-dir",
                str(tmp_path / "run"), env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = ("aloe: warning: the schedule has 1 optimizer step(s) (6 record(s), global batch 1024, 1 epoch(s)) and "
               "its warmup (1 step(s), --warmup-ratio 0.03) covers all of them: the learning rate never reaches "
               "3.75e-05")
    assert warning in proc.stderr
    assert proc.stderr.index(warning) < proc.stderr.index("step 1/1")  # before it starts


def test_a_short_schedule_warns_that_it_has_few_steps(complete_run):
    *_, proc = complete_run
    assert ("aloe: warning: the schedule has only 4 optimizer step(s) (8 record(s), global batch 4, --max-steps 4)"
            in proc.stderr)


def test_a_folder_a_live_run_is_training_is_refused_with_and_without_resume(tiny_model_dir, tmp_path):
    """Two runs started into one folder at once: the second is refused (it would share the folder), and --resume
    names the live process instead of continuing under its feet."""
    import signal

    from reliability.hostile import environment, start, terminate_when

    data = write_jsonl(tmp_path / "items.jsonl", [chat(f"Question {i}?", "Answer.") for i in range(8)])
    run = tmp_path / "run"
    args = ["-i", str(data), "--model", str(tiny_model_dir), "--output-dir", str(run), "--max-steps", "100000",
            "--save-steps", "1000"]
    first = start(["train", *FLAGS, *args], env=environment(**ENV))
    seen = {}

    def second_runs_refused() -> bool:
        if not (run / "log.jsonl").is_file():
            return False
        seen["plain"] = train(*args)
        seen["resume"] = train(*args, "--resume")
        return True

    stderr = terminate_when(second_runs_refused, first, timeout=240, grace=120, signum=signal.SIGTERM)
    assert first.returncode == 143, stderr[-3000:]
    assert "holds a run of aloe train (running" in one_line_error(seen["plain"], 2)
    line = one_line_error(seen["resume"], 1)
    assert f"--resume: {run} is being trained right now (process {first.pid} on" in line, line


def test_a_run_that_failed_before_its_first_checkpoint_is_started_again_in_its_folder(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[:1000])  # found when the weights load, after the records
    data = write_jsonl(tmp_path / "items.jsonl", [chat(f"Question {i}?", "Answer.") for i in range(4)])
    run = tmp_path / "run"
    args = ["-i", str(data), "--model", str(model), "--output-dir", str(run), "--max-steps", "1"]
    line = one_line_error(train(*args), 1)
    assert line.startswith(f"aloe: error: cannot load model {model}: ")
    failed = json.loads((run / "run.json").read_text())
    assert failed["state"] == "failed" and failed["error"] == line.removeprefix("aloe: error: ")
    (model / "model.safetensors").write_bytes(weights)
    proc = train(*args)  # nothing worth keeping: no --overwrite needed
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run / "run.json").read_text())
    assert record["state"] == "complete" and record["started"] >= failed["started"] and record["resumed_from"] == []


def test_damage_is_found_in_sharded_and_deepspeed_checkpoints_without_loading_them(tmp_path):
    """Other shapes of checkpoint: a sharded model (an index naming its shards) and DeepSpeed's per-rank states
    under global_stepN/. Real files written by torch and safetensors, then damaged."""
    import torch
    from safetensors.torch import save_file

    from aloe_cli.training.run_folder import checkpoint_damage, resume_point

    def checkpoint(step: int) -> Path:
        folder = tmp_path / f"checkpoint-{step}"
        (folder / f"global_step{step}").mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
            save_file({"w": torch.zeros(64, 64)}, str(folder / shard))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
        torch.save({"exp_avg": torch.zeros(256, 256)}, folder / f"global_step{step}" / "zero_pp_rank_0_optim_states.pt")
        return folder

    whole, missing_shard, cut_states = checkpoint(1), checkpoint(2), checkpoint(3)
    assert checkpoint_damage(whole) is None
    (missing_shard / "model-00002-of-00002.safetensors").unlink()
    assert checkpoint_damage(missing_shard) == ("model.safetensors.index.json names a missing shard "
                                                "model-00002-of-00002.safetensors")
    truncate(cut_states / "global_step3" / "zero_pp_rank_0_optim_states.pt", keep=0.9)
    assert checkpoint_damage(cut_states).startswith(
        "global_step3/zero_pp_rank_0_optim_states.pt is truncated or corrupt")
    point, damaged = resume_point(tmp_path)
    assert point == whole and [folder for folder, _ in damaged] == [cut_states, missing_shard]


# ----------------------------------------------------------------------------- SLURM requeue

def test_a_requeued_job_resumes_its_run_though_its_script_says_overwrite(failed_run, tiny_model_dir, tmp_path):
    """SLURM runs a requeued job's script again, flags and all: --overwrite would move its own run aside."""
    run, data, _ = failed_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    proc = aloe("train", *FLAGS, "-i", str(data), "--model", str(tiny_model_dir), "--output-dir", str(copy),
                "--max-steps", "6", "--save-steps", "1", "--on-error", "skip", "--overwrite",
                env={**ENV, "SLURM_RESTART_COUNT": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SLURM requeued this job (SLURM_RESTART_COUNT=1): it continues its run" in proc.stderr
    assert f"resuming from {copy / 'checkpoint-3'}" in proc.stderr
    assert not list(tmp_path.glob("run.replaced-*"))
    record = json.loads((copy / "run.json").read_text())
    assert record["state"] == "complete" and record["resumed_from"] == ["checkpoint-3"]


def test_a_requeued_job_that_stopped_before_its_first_checkpoint_starts_again(tiny_model_dir, tmp_path):
    import signal

    from reliability.hostile import environment, start, terminate_when

    data = write_jsonl(tmp_path / "items.jsonl", [chat(f"Question {i}?", "Answer.") for i in range(8)])
    run = tmp_path / "run"
    args = ["-i", str(data), "--model", str(tiny_model_dir), "--output-dir", str(run), "--max-steps", "200",
            "--save-steps", "1000"]
    first = start(["train", *FLAGS, *args], env=environment(**ENV))  # preempted at its first logged step
    stderr = terminate_when(lambda: (run / "log.jsonl").is_file(), first, timeout=240, grace=120,
                            signum=signal.SIGTERM)
    assert first.returncode == 143 and not list(run.glob("checkpoint-*")), stderr[-3000:]
    proc = aloe("train", *FLAGS, *args, env={**ENV, "SLURM_RESTART_COUNT": "2"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SLURM_RESTART_COUNT=2" in proc.stderr
    assert "requeued before its run's first checkpoint: the run starts again" in proc.stderr
    record = json.loads((run / "run.json").read_text())
    assert record["state"] == "complete" and record["global_step"] == 200 and record["resumed_from"] == []
    # A job requeued before it made its folder starts it.
    fresh = tmp_path / "fresh"
    proc = aloe("train", *FLAGS, *args[:5], str(fresh), "--max-steps", "2", env={**ENV, "SLURM_RESTART_COUNT": "1"})
    assert proc.returncode == 0 and json.loads((fresh / "run.json").read_text())["state"] == "complete", proc.stderr
