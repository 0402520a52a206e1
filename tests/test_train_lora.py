"""aloe train --lora (PEFT through TRL): the tiny model learns a scan task with adapters only, the run folder holds
the adapter, --merge-lora a merged model, and `aloe eval` / `aloe infer` load both like any other model."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import yaml
from eval_fixtures import write_tsv
from PIL import Image

from aloe_cli.evaluation.benchmarks import EvalItem
from aloe_cli.evaluation.prompts import eval_record
from support import aloe, read_jsonl, write_jsonl

pytestmark = pytest.mark.slow
ENV = {"OMP_NUM_THREADS": "1"}  # the test machine's cores are shared
MARKS = {"A": "Red", "B": "Blue"}
QUESTION = "Which colour is the scan tinted?"
FLAGS = ("--global-batch-size", "8", "--micro-batch-size", "8", "--learning-rate", "1e-2", "--lr-scheduler",
         "constant", "--warmup-ratio", "0", "--dtype", "float32", "--no-gradient-checkpointing", "--deepspeed", "none",
         "--dataloader-workers", "0", "--logging-steps", "20", "--save-steps", "1000")


def scan_uri(colour: str) -> str:
    """A 56x56 scan tinted in one colour, as a PNG data URI (the tiny model's random vision tower, frozen under
    LoRA, tells whole-image colours apart; a small marked region would need it trained)."""
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), colour.lower()).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def scan_item(index: int) -> EvalItem:
    letter = "AB"[index % 2]
    return EvalItem(id=str(index), benchmark="scan", kind="mcq", question=QUESTION, answer=letter,
                    options=dict(MARKS), images=[scan_uri(MARKS[letter])])


def scan_benchmark(path: Path, count: int = 8) -> Path:
    """Held-out items as a VLMEvalKit TSV: answers alternate A/B, so chance is 50%."""
    rows = []
    for item in (scan_item(index) for index in range(1000, 1000 + count)):
        rows.append({"index": item.id, "question": item.question, **item.options, "answer": item.answer,
                     "image": item.images[0].split(",", 1)[1]})
    return write_tsv(path, rows)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """60 steps of LoRA on 32 records (each asked as `aloe eval` asks), adapters merged at the end. The tiny model's
    output layer is random and small, so its logits cannot move far through adapters alone: it is trained in full
    beside them (--lora-modules-to-save lm_head), as for a model whose output layer is new."""
    folder = tmp_path_factory.mktemp("lora")
    data = write_jsonl(folder / "scan.jsonl", [eval_record(scan_item(index)) for index in range(32)])
    run = folder / "run"
    proc = aloe("train", "-i", str(data), "--model", str(tiny_model_dir), "--output-dir", str(run), "--lora",
                "--lora-modules-to-save", "lm_head", "--merge-lora", "--max-steps", "60", *FLAGS, env=ENV,
                timeout=600)
    return proc, run, folder


def test_lora_trains_adapters_only_and_the_run_folder_holds_them(lora_run, tiny_model_dir):
    from safetensors import safe_open

    proc, run, _ = lora_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "aloe train: LoRA r=16, alpha=32: float32 weights" in proc.stderr
    assert f"aloe train: the model with its adapters merged in: {run / 'merged'}" in proc.stderr
    losses = [line["loss"] for line in read_jsonl(run / "log.jsonl") if "loss" in line]
    assert losses[-1] < losses[0] / 10, losses
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())  # found from anywhere
    assert adapter["r"] == 16 and adapter["lora_alpha"] == 32
    with safe_open(str(run / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert any("q_proj.lora_A" in name for name in names) and any("down_proj.lora_B" in name for name in names)
    assert not any("visual" in name for name in names)  # the vision tower stays frozen by default
    assert not (run / "model.safetensors").exists()  # the run folder holds the adapter, not a copy of the model
    assert (run / "merged" / "config.json").is_file() and (run / "merged" / "model.safetensors").is_file()
    assert json.loads((run / "run.json").read_text())["state"] == "complete"


def test_eval_loads_the_adapter_and_the_merged_model_and_both_beat_chance(lora_run, tiny_model_dir):
    proc, run, folder = lora_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = scan_benchmark(folder / "scan.tsv")
    out = folder / "results"
    accuracy = {}
    for label, model in (("base", tiny_model_dir), ("adapter", run), ("merged", run / "merged")):
        result = aloe("eval", "--model", f"{label}={model}", "--benchmark", str(bench), "-o", str(out), "--protocol",
                      "aloe", "--batch-size", "4", "--max-new-tokens", "4", env=ENV, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        accuracy[label] = json.loads((out / label / "scores.json").read_text())["benchmarks"]["scan"]["accuracy"]
    assert accuracy["adapter"] >= 87.5 and accuracy["merged"] >= 87.5, accuracy  # chance: 50%
    assert accuracy["adapter"] >= accuracy["base"] + 25, accuracy
    adapter = [line["prediction"] for line in read_jsonl(out / "adapter" / "scan" / "predictions.jsonl")]
    merged = [line["prediction"] for line in read_jsonl(out / "merged" / "scan" / "predictions.jsonl")]
    assert adapter == merged  # the same weights, loaded two ways
    table = (out / "results.md").read_text()
    assert "| adapter |" in table and "| merged |" in table


def test_lora_under_zero3_saves_whole_adapters_and_merges(tiny_model_dir, tmp_path):
    """ZeRO-3 partitions the model while it loads (TRL then wraps it with PEFT): the adapter saved at the end is
    gathered whole, and the merge loads the base model outside the partitioning."""
    data = write_jsonl(tmp_path / "scan.jsonl", [eval_record(scan_item(index)) for index in range(32)])
    run = tmp_path / "run"
    flags = [flag if flag != "none" else "zero3" for flag in FLAGS]
    proc = aloe("train", "-i", str(data), "--model", str(tiny_model_dir), "--output-dir", str(run), "--lora",
                "--lora-modules-to-save", "lm_head", "--merge-lora", "--max-steps", "40", *flags, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = yaml.safe_load((run / "aloe-train.yaml").read_text())
    assert resolved["deepspeed"]["zero_optimization"]["stage"] == 3 and resolved["peft"]["r"] == 16
    out = tmp_path / "results"
    bench = scan_benchmark(tmp_path / "scan.tsv")
    result = aloe("eval", "--model", f"merged={run / 'merged'}", "--benchmark", str(bench), "-o", str(out),
                  "--protocol", "aloe", "--batch-size", "4", "--max-new-tokens", "4", env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "merged" / "scores.json").read_text())["benchmarks"]["scan"]["accuracy"] >= 87.5


def test_infer_answers_through_the_adapter_folder(lora_run, tmp_path):
    from aloe_cli.evaluation.prompts import prompt_text

    proc, run, _ = lora_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    item = scan_item(7)  # a blue mark: B
    image = tmp_path / "scan.png"
    image.write_bytes(base64.b64decode(item.images[0].split(",", 1)[1]))
    result = aloe("infer", "--model", str(run), "--device", "cpu", "--dtype", "fp32", "--image", str(image),
                  "--max-new-tokens", "4", prompt_text(item), env=ENV)  # fp32: train's short name, read as float32
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "B"


def test_qlora_without_cuda_and_unknown_target_modules_are_one_line_errors(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "scan.jsonl", [eval_record(scan_item(index)) for index in range(8)])
    common = ("-i", str(data), "--model", str(tiny_model_dir), "--max-steps", "1", *FLAGS)
    proc = aloe("train", *common, "--output-dir", str(tmp_path / "q"), "--load-in-4bit", env=ENV)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "aloe: error: --load-in-4bit (QLoRA) needs bitsandbytes on a CUDA GPU and no CUDA device is visible: train "
        "without it (--lora alone), or on a GPU")
    assert not (tmp_path / "q").exists()
    proc = aloe("train", *common, "--output-dir", str(tmp_path / "t"), "--lora", "--lora-target-modules",
                "attention_xyz", env=ENV, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("aloe: error: --lora: ") and "attention_xyz" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
