"""The one progress facility (console.progress) as people see it through the CLI: a rich bar with rate and ETA
on a terminal, timestamped heartbeat lines otherwise (pipes, SLURM logs)."""

from __future__ import annotations

import re

import pytest

from support import aloe, aloe_on_terminal, chat, write_jsonl

pytestmark = pytest.mark.slow

EVERY_ADVANCE = {"ALOE_PROGRESS_INTERVAL": "0", "OMP_NUM_THREADS": "1"}
STAMP = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] "
TRAIN_FLAGS = ("--global-batch-size", "4", "--micro-batch-size", "4", "--precision", "fp32",
               "--no-gradient-checkpointing", "--deepspeed", "none", "--dataloader-workers", "0",
               "--logging-steps", "1", "--max-steps", "2")


def records(tmp_path, count: int = 6):
    return write_jsonl(tmp_path / "in.jsonl", [chat(f"Question {i}?", f"Answer {i}.", id=f"r{i}")
                                               for i in range(count)])


def test_heartbeat_lines_count_a_files_records_against_its_total(tmp_path, tiny_model_dir):
    data = records(tmp_path)
    result = aloe("perplexity", "-i", str(data), "--model", str(tiny_model_dir), "-o", str(tmp_path / "out.jsonl"),
                  "--batch-size", "2", env=EVERY_ADVANCE)
    assert result.returncode == 0, result.stderr
    beats = re.findall(STAMP + r"aloe perplexity: (\d+)/6 records \(\d+%\), [\d.e+]+ records/s, (.*)$",
                       result.stderr, re.M)
    assert beats, result.stderr
    assert beats[-1][0] == "6" and "done in" in beats[-1][1]
    assert "\x1b[" not in result.stderr  # plain lines, no terminal codes in a log


def test_a_shard_counts_its_share_and_stdin_counts_without_a_total(tmp_path, tiny_model_dir):
    data = records(tmp_path)
    sharded = aloe("perplexity", "-i", str(data), "--model", str(tiny_model_dir), "--shard", "0/2",
                   "-o", str(tmp_path / "shard.jsonl"), env=EVERY_ADVANCE)
    assert sharded.returncode == 0, sharded.stderr
    assert re.search(STAMP + r"aloe perplexity: 3/3 records \(100%\)", sharded.stderr, re.M), sharded.stderr
    piped = aloe("perplexity", "--model", str(tiny_model_dir), stdin=data.read_text(), env=EVERY_ADVANCE)
    assert piped.returncode == 0, piped.stderr
    assert len(piped.stdout.splitlines()) == 6
    assert re.search(STAMP + r"aloe perplexity: 6 records, [\d.e+]+ records/s, done in", piped.stderr, re.M), \
        piped.stderr


def test_no_heartbeat_before_the_interval(tmp_path, tiny_model_dir):
    data = records(tmp_path, 2)
    result = aloe("perplexity", "-i", str(data), "--model", str(tiny_model_dir), "-o", str(tmp_path / "out.jsonl"),
                  env={"ALOE_PROGRESS_INTERVAL": "600"})
    assert result.returncode == 0 and "2 kept" in result.stderr.replace("kept: ", "kept "), result.stderr
    assert not re.search(STAMP + "aloe perplexity:", result.stderr, re.M), result.stderr


def test_a_terminal_gets_a_bar_with_the_total_and_rate(tmp_path, tiny_model_dir):
    data = records(tmp_path)
    result = aloe_on_terminal("perplexity", "-i", str(data), "--model", str(tiny_model_dir),
                              "-o", str(tmp_path / "out.jsonl"), "--batch-size", "2", env=EVERY_ADVANCE)
    assert result.returncode == 0, result.stderr
    assert "\x1b[" in result.stderr and "━" in result.stderr  # a rich bar
    assert "6/6" in result.stderr and "records/s" in result.stderr, result.stderr
    assert not re.search(STAMP + "aloe perplexity:", result.stderr, re.M)  # no heartbeat lines on a terminal


def test_training_heartbeat_shows_steps_loss_lr_samples_per_second_and_eta(tmp_path, tiny_model_dir):
    data = records(tmp_path, 8)
    result = aloe("train", "-i", str(data), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run"),
                  *TRAIN_FLAGS, env=EVERY_ADVANCE, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first = re.search(STAMP + r"aloe train: 1/2 steps \(50%\), [\d.e+]+ steps/s, elapsed \d+:\d\d, "
                      r"ETA \d+:\d\d, .*samples/s [\d.e+]+", result.stderr, re.M)
    assert first, result.stderr[-3000:]
    last = re.findall(STAMP + r"aloe train: 2/2 steps \(100%\), .*$", result.stderr, re.M)
    assert last and "done in" in last[-1] and re.search(r"loss [\d.]+, lr [\d.e+-]+", last[-1]), last


def test_training_on_a_terminal_shows_a_bar(tmp_path, tiny_model_dir):
    data = records(tmp_path, 8)
    result = aloe_on_terminal("train", "-i", str(data), "--model", str(tiny_model_dir), "--output-dir",
                              str(tmp_path / "run"), *TRAIN_FLAGS, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2/2" in result.stderr and "steps/s" in result.stderr and "samples/s" in result.stderr
    assert re.search(r"loss [\d.]+, lr [\d.e+-]+", result.stderr), result.stderr[-3000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()
