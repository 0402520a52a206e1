"""aloe train under real launchers: 2 processes, DeepSpeed ZeRO-3 on gloo (CPU), the tiny model.

The first run of DeepSpeed on a machine compiles a small communication op
(g++, ninja), which can take a minute; later runs reuse it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from support import ROOT, chat, read_jsonl, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

FLAGS = ("--precision", "fp32", "--dataloader-workers", "0", "--logging-steps", "1", "--learning-rate", "1e-3",
         "--deepspeed", "zero3")


def mixed_ranks_task(folder: Path, count: int = 16) -> Path:
    """Even records text-only, odd records with an image: with micro batch 1, no shuffling and 2 ranks,
    rank 0 only ever sees text and rank 1 only images."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        if i % 2 == 0:
            records.append(chat("Say hello.", "Hello."))
        else:
            Image.new("RGB", (56, 56), "red").save(folder / f"{i}.png")
            records.append(chat("What colour?", "Red.", [f"{i}.png"]))
    return write_jsonl(folder / "task.jsonl", records)


def launch(launcher: list[str], args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    return subprocess.run([*launcher, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=400)


def bin_of(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else shutil.which(name)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "aloe_cli"]


def test_zero3_on_two_ranks_with_a_text_only_rank_trains_and_saves_a_model_that_loads_back(tmp_path, tiny_model_dir):
    """Also: --resume under ZeRO-3 restores DeepSpeed's own states and ends where the uninterrupted run ended."""
    import torch
    from transformers import AutoModelForImageTextToText

    task = mixed_ranks_task(tmp_path / "data")
    run = tmp_path / "run"
    args = ["train", "-i", str(task), "--model", str(tiny_model_dir), *FLAGS, "--global-batch-size", "2",
            "--micro-batch-size", "1", "--max-steps", "4", "--no-shuffle", "--save-steps", "2"]
    proc = launch(TORCHRUN, [*args, "--output-dir", str(run)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # rank 0 got text only (4 micro batches through the guard), rank 1 images only
    assert "vision guard: text-only micro batches per rank [4, 0]" in proc.stderr
    log = [line for line in read_jsonl(run / "log.jsonl") if "loss" in line]
    assert [line["step"] for line in log] == [1, 2, 3, 4]
    assert json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    trained = AutoModelForImageTextToText.from_pretrained(run)
    initial = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    changed = [name for (name, a), (_, b) in zip(trained.named_parameters(), initial.named_parameters())
               if not torch.equal(a, b)]
    assert any("visual" in name for name in changed) and any("language_model" in name for name in changed)
    assert len(dict(trained.named_parameters())) == len(dict(initial.named_parameters()))

    interrupted = tmp_path / "interrupted"
    shutil.copytree(run / "checkpoint-2", interrupted / "checkpoint-2")
    proc = launch(TORCHRUN, [*args, "--output-dir", str(interrupted), "--resume"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("resuming from") == 1  # said once, by the main process
    resumed = {line["step"]: line["loss"] for line in read_jsonl(interrupted / "log.jsonl") if "loss" in line}
    assert sorted(resumed) == [3, 4]
    assert resumed[4] == pytest.approx({line["step"]: line["loss"] for line in log}[4], rel=1e-4)


@pytest.mark.parametrize("launcher", ["accelerate", "deepspeed"])
def test_the_same_command_runs_under_accelerate_launch_and_the_deepspeed_launcher(tmp_path, tiny_model_dir,
                                                                                  launcher):
    task = mixed_ranks_task(tmp_path / "data", count=8)
    run = tmp_path / "run"
    command = {"accelerate": [bin_of("accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                              "aloe_cli"],
               "deepspeed": [bin_of("deepspeed"), "--num_gpus", "2", "--module", "aloe_cli"]}[launcher]
    proc = launch(command, ["train", "-i", str(task), "--model", str(tiny_model_dir), "--output-dir", str(run),
                            *FLAGS, "--global-batch-size", "4", "--micro-batch-size", "2", "--max-steps", "2"],
                  tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert re.search(r"optimizer steps\s+2\n", proc.stderr)
    assert "world size 2" in (run / "aloe-train.yaml").read_text()
    assert (run / "model.safetensors").is_file()


def test_plain_data_parallel_on_two_ranks_prepares_the_data_once_and_trains(tmp_path, tiny_model_dir):
    """--deepspeed none under torchrun on CPUs: one gloo process group; the main rank reads the records into the
    run folder while the other waits for it, then both train in step."""
    from transformers import AutoModelForImageTextToText

    task = mixed_ranks_task(tmp_path / "data", count=8)
    run = tmp_path / "run"
    flags = [flag if flag != "zero3" else "none" for flag in FLAGS]
    proc = launch(TORCHRUN, ["train", "-i", str(task), "--model", str(tiny_model_dir), "--output-dir", str(run),
                             *flags, "--no-gradient-checkpointing", "--global-batch-size", "4", "--micro-batch-size",
                             "2", "--max-steps", "2", "--save-steps", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("8 training record(s) of 8 read") == 1  # read once, by the main rank
    assert "vision guard: text-only micro batches per rank" in proc.stderr
    assert re.search(r"optimizer steps\s+2\n", proc.stderr)
    assert [line["step"] for line in read_jsonl(run / "log.jsonl") if "loss" in line] == [1, 2]
    record = json.loads((run / "run.json").read_text())
    assert record["state"] == "complete" and record["world_size"] == 2
    assert "world size 2" in (run / "aloe-train.yaml").read_text()
    assert not list((run / "dataset").glob(".*.tmp"))
    AutoModelForImageTextToText.from_pretrained(run)


def test_samples_lost_on_one_rank_stop_every_rank_at_the_same_step(tmp_path, tiny_model_dir):
    """A broken image in one rank's micro batch: the skip counts are summed over ranks, so both ranks find
    --max-skipped exceeded at the same logging step and stop with the same line (no rank left waiting)."""
    task = mixed_ranks_task(tmp_path / "data", count=8)
    (tmp_path / "data" / "5.png").write_bytes(b"not a png")  # record 6: rank 1's third micro batch
    flags = [flag if flag != "zero3" else "none" for flag in FLAGS]
    proc = launch(TORCHRUN, ["train", "-i", str(task), "--model", str(tiny_model_dir), "--output-dir",
                             str(tmp_path / "run"), *flags, "--no-gradient-checkpointing", "--global-batch-size", "2",
                             "--micro-batch-size", "1", "--max-steps", "4", "--no-shuffle", "--on-error",
                             "skip"], tmp_path)
    assert proc.returncode != 0, proc.stderr[-4000:]
    line = ("aloe: error: 1 of 8 records lost (image_corrupt=1): more than --max-skipped 0.1% of 8 = 0 allows; fix "
            "the inputs (image paths, files) or raise --max-skipped")
    assert proc.stderr.count(line) == 2, proc.stderr[-4000:]  # said by both ranks
    assert json.loads((tmp_path / "run" / "run.json").read_text())["state"] == "failed"
