"""Benchmark: aloe train's data path, its vision guard, and its start-up on a million records (CPU).

Four measurements, each against a baseline run beside it:

1. Collator throughput, one worker: 512x512 JPEGs decoded + the processor
   (Qwen2-VL's own pixel limits, so an image is 324 visual tokens) + labels,
   ~1 k tokens per sample, in samples/s. Printed beside what one H100
   consumes when training a 7B model on such samples (~3.3 samples/s; goal: at
   least 10x that per worker), and beside TRL's own vision collator doing the
   same work on the same samples (images decoded with PIL, then
   `DataCollatorForVisionLanguageModeling`).
2. The dummy-image guard: forward + backward on a text-only micro batch of
   the tiny model with and without the guard, alternating step by step, and
   the guard's own work timed alone; goal: under 5% more step time.
3. Start-up on a generated text-only mixture of `--records` records (1 M by
   default): wall time from launching `aloe train` to its first optimizer step,
   and peak RSS, beside the same run on 1,000 records (the model, libraries and
   a trivial mixture); goal: under 2 GiB above it.
4. Step time: `aloe train` beside TRL's `SFTTrainer` with TRL's own vision
   collator, on the same records (64 colour scans), the tiny model and the same
   SFTConfig values (aloe's resolved plan), 200 steps, each run in its own
   process with one thread; with and without LoRA. Seconds per step is the
   Trainer's `train_runtime` / steps for both; goal: aloe <= 1.05x TRL.

    python benchmarks/train.py                       # all three (several minutes; writes ~400 MB of JSONL)
    python benchmarks/train.py --only collator guard
    python benchmarks/train.py --records 200000      # a smaller start-up test
    python benchmarks/train.py --only steps --repeats 2
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H100_SAMPLES_PER_S = 3.3  # a 7B model on one H100 at ~1 k tokens per sample (bf16, ZeRO-3, ~40% MFU)
WORDS = ("the chest film shows a small nodule in the right upper lobe with mild pleural thickening and no "
         "effusion while the heart size is normal and the bones are intact").split()


def tiny_model(scratch: Path) -> Path:
    from aloe_cli.modeling.tiny import build_tiny_qwen2vl

    return build_tiny_qwen2vl(scratch / "tiny")


def training_processor(model_dir: Path, real_pixel_limits: bool):
    from transformers import AutoProcessor

    from aloe_cli.modeling.chat_template import apply_training_chat_template

    processor = AutoProcessor.from_pretrained(model_dir)
    apply_training_chat_template(processor)
    if real_pixel_limits:  # Qwen2-VL-7B-Instruct's preprocessor_config.json
        processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}
    return processor


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


# ----------------------------------------------------------------------------- 1. collator

def jpeg_records(folder: Path, count: int, seed: int = 0) -> Path:
    import numpy as np

    from aloe_cli.data.io import RecordWriter
    from aloe_cli.demo.images import synthetic_scan

    rng, words = np.random.default_rng(seed), random.Random(seed)
    path = folder / "jpegs.jsonl"
    with RecordWriter(path) as writer:
        for index in range(count):
            synthetic_scan(rng, size=512, color=True).save(folder / f"{index}.jpg", quality=90)
            writer.write({"messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sentence(words, 60)}]},
                {"role": "assistant", "content": [{"type": "text", "text": sentence(words, 450)}]}],
                "images": [f"{index}.jpg"]})
    return path


def bench_collator(scratch: Path, model_dir: Path, samples: int, batch: int) -> None:
    from PIL import Image
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from aloe_cli.data.io import read_items
    from aloe_cli.training.collator import TrainingCollator
    from aloe_cli.training.data import build_dataset, load_dataset

    folder = scratch / "jpegs"
    folder.mkdir()
    path = jpeg_records(folder, samples)
    build_dataset(read_items([str(path)]), scratch / "collator-run")
    dataset = load_dataset(scratch / "collator-run")
    rows = [dataset[i] for i in range(len(dataset))]
    processor = training_processor(model_dir, real_pixel_limits=True)
    ours = TrainingCollator(processor, max_length=8192, dataset=dataset)
    trl = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)

    def run_ours() -> int:
        tokens = 0
        for begin in range(0, len(rows), batch):
            tokens += int(ours(rows[begin:begin + batch])["attention_mask"].sum())
        return tokens

    def run_trl() -> int:
        tokens = 0
        for begin in range(0, len(rows), batch):
            examples = [{"messages": row["messages"],
                         "images": [Image.open(image["path"]).convert("RGB") for image in row["images"]]}
                        for row in rows[begin:begin + batch]]
            tokens += int(trl(examples)["attention_mask"].sum())
        return tokens

    timings = {"aloe": [], "trl": []}
    tokens = {}
    for _ in range(3):  # interleaved rounds: both see the same machine load
        for name, run in (("aloe", run_ours), ("trl", run_trl)):
            start = time.perf_counter()
            tokens[name] = run()
            timings[name].append(time.perf_counter() - start)
    ours_rate = len(rows) / min(timings["aloe"])
    trl_rate = len(rows) / min(timings["trl"])
    print(f"[collator] {len(rows)} samples of 512x512 JPEG + text, {tokens['aloe'] / len(rows):.0f} tokens each, "
          f"batches of {batch}, one process (best of 3)")
    print(f"[collator] aloe TrainingCollator (decode + processor + labels): {ours_rate:7.1f} samples/s")
    print(f"[collator] TRL DataCollatorForVisionLanguageModeling (+ PIL decode): {trl_rate:7.1f} samples/s "
          f"-> aloe/TRL {ours_rate / trl_rate:.2f}x")
    print(f"[collator] one H100 training a 7B model consumes ~{H100_SAMPLES_PER_S} samples/s "
          f"-> one worker feeds {ours_rate / H100_SAMPLES_PER_S:.1f}x that (goal >= 10x)")


# ----------------------------------------------------------------------------- 2. guard

def bench_guard(scratch: Path, model_dir: Path, steps: int, micro: int) -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    from aloe_cli.training.collator import TrainingCollator
    from aloe_cli.training.guard import VisionGuard

    processor = training_processor(model_dir, real_pixel_limits=False)
    rng = random.Random(1)
    rows = [{"index": i, "where": str(i), "images": [], "messages": [
        {"role": "user", "content": sentence(rng, 30)}, {"role": "assistant", "content": sentence(rng, 60)}]}
        for i in range(micro)]
    batch = {k: v for k, v in TrainingCollator(processor, max_length=4096)(rows).items() if k != "aloe_skipped"}
    model = AutoModelForImageTextToText.from_pretrained(model_dir).train()
    guard = VisionGuard(model)

    # Forward and backward: what the guard adds to. The optimizer step is left out: in a distributed run it
    # updates the vision parameters with or without the guard (ZeRO steps whole partitions; DDP reduces
    # every gradient), so the guard does not change it.
    def step_time() -> float:
        start = time.perf_counter()
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(5):  # warm-up, both ways
        step_time()
        guard.install()
        step_time()
        guard.remove()
    plain, guarded = [], []
    for _ in range(steps):  # alternate step by step: both see the same machine load
        plain.append(step_time())
        guard.install()
        guarded.append(step_time())
        guard.remove()
    base, with_guard = statistics.median(plain), statistics.median(guarded)
    tokens = int(batch["attention_mask"].sum())
    print(f"[guard] tiny model, text-only micro batch of {micro} ({tokens} tokens), {steps} steps each, "
          f"alternating; median time of forward + backward")
    print(f"[guard] without the guard: {base * 1000:7.2f} ms; with it: {with_guard * 1000:7.2f} ms "
          f"-> {(with_guard / base - 1) * 100:+.1f}% (goal < 5%); the guard ran {guard.calls} times")
    # The guard's own work, timed alone: a less noisy estimate than the difference of two step times.
    from aloe_cli.training.guard import dummy_image_inputs, torch_cat

    core = guard.core
    pixels, grid = dummy_image_inputs(core.config.vision_config, "cpu", torch.float32)
    alone = []
    for _ in range(steps):
        start = time.perf_counter()
        torch_cat(core.get_image_features(pixels, grid, return_dict=True).pooler_output).sum().mul(0.0).backward()
        alone.append(time.perf_counter() - start)
    work = statistics.median(alone)
    print(f"[guard] its work alone (dummy image through the vision tower, forward + backward): {work * 1000:.2f} ms "
          f"= {work / base * 100:.1f}% of a step without it")


# ----------------------------------------------------------------------------- 3. start-up

def text_mixture(path: Path, count: int) -> None:
    import orjson

    rng = random.Random(2)
    questions = [sentence(rng, rng.randint(6, 30)) for _ in range(500)]
    answers = [sentence(rng, rng.randint(4, 80)) for _ in range(500)]
    with path.open("wb", buffering=1 << 22) as handle:
        for index in range(count):
            handle.write(orjson.dumps({
                "id": f"t{index}", "source": f"s{index % 7}", "domain": "medical" if index % 3 else "general",
                "messages": [{"role": "user", "content": [{"type": "text", "text": questions[index % 500]}]},
                             {"role": "assistant", "content": [{"type": "text", "text": answers[index % 499]}]}],
                "images": [], "aloe": {"mix": {"loss_tokens": 10 + index % 50, "cell": "medical/text"}}},
                option=orjson.OPT_APPEND_NEWLINE))


def time_to_first_step(mixture: Path, model_dir: Path, output: Path) -> tuple[float, float, float]:
    """(seconds to the first optimizer step, total seconds, peak RSS in GiB) of one `aloe train` run."""
    command = [sys.executable, "-m", "aloe_cli", "train", "-i", str(mixture), "--model", str(model_dir),
               "--output-dir", str(output), "--max-steps", "1", "--global-batch-size", "16", "--micro-batch-size",
               "16", "--deepspeed", "none", "--dtype", "float32", "--no-gradient-checkpointing",
               "--dataloader-workers", "0", "--logging-steps", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    first_step = None
    for line in process.stderr:
        if first_step is None and line.startswith("step 1/"):
            first_step = time.perf_counter() - start
    _, status, usage = os.wait4(process.pid, 0)
    total = time.perf_counter() - start
    if status != 0 or first_step is None:
        raise SystemExit(f"aloe train failed on {mixture} (status {status})")
    return first_step, total, usage.ru_maxrss / 2**20  # KiB -> GiB


def bench_startup(scratch: Path, model_dir: Path, records: int) -> None:
    small, large = scratch / "small.jsonl", scratch / "large.jsonl"
    text_mixture(small, 1000)
    start = time.perf_counter()
    text_mixture(large, records)
    size = large.stat().st_size / 2**20
    print(f"[start-up] generated {records:,} text-only records ({size:.0f} MiB) in {time.perf_counter() - start:.0f} s")
    base = time_to_first_step(small, model_dir, scratch / "run-small")
    big = time_to_first_step(large, model_dir, scratch / "run-large")
    print(f"[start-up] 1,000 records:    first step after {base[0]:6.1f} s, peak RSS {base[2]:.2f} GiB")
    print(f"[start-up] {records:,} records: first step after {big[0]:6.1f} s, peak RSS {big[2]:.2f} GiB "
          f"-> +{big[2] - base[2]:.2f} GiB above the 1,000-record run (goal < 2 GiB), "
          f"+{big[0] - base[0]:.1f} s to read and index the mixture ({records / max(big[0] - base[0], 1e-9):,.0f} "
          f"records/s)")
    arrow = scratch / "run-large" / "dataset" / "train.arrow"
    print(f"[start-up] the dataset file: {arrow.stat().st_size / 2**20:.0f} MiB, memory-mapped")


# ----------------------------------------------------------------------------- step time: aloe train vs TRL

STEP_SETTINGS = dict(global_batch_size=8, micro_batch_size=8, learning_rate=1e-3, lr_scheduler="constant",
                     warmup_ratio=0.0, dtype="float32", gradient_checkpointing=False, deepspeed="none",
                     dataloader_workers=0, logging_steps=50, save_steps=100_000, attn_implementation="sdpa")


def scan_records(folder: Path, count: int) -> Path:
    """`count` records of a colour-scan question on 56x56 PNG files (16 image tokens, ~50 tokens a sample)."""
    import orjson
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scans.jsonl"
    with path.open("wb") as handle:
        for index in range(count):
            colour, answer = (("red", "Red."), ("blue", "Blue."))[index % 2]
            image = folder / f"{index}.png"
            Image.new("RGB", (56, 56), colour).save(image)
            handle.write(orjson.dumps({
                "messages": [{"role": "user", "content": [{"type": "image"},
                                                          {"type": "text", "text": "What colour is the scan?"}]},
                             {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                "images": [str(image)]}, option=orjson.OPT_APPEND_NEWLINE))
    return path


def step_config(model_dir: Path, data: Path, output: Path, steps: int, lora: bool):
    from aloe_cli.training.config import TrainConfig, resolve

    config = TrainConfig(input=[str(data)], model=str(model_dir), output_dir=str(output), max_steps=steps, lora=lora,
                         **STEP_SETTINGS)
    config.validate()
    return resolve(config, 1)


def run_trl_baseline(spec: str) -> None:
    """The baseline, in its own process: TRL's SFTTrainer with TRL's own vision collator on the same records, model
    and SFTConfig values (aloe's plan, minus aloe's data path); prints the Trainer's train_runtime as JSON."""
    import json

    import datasets
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from aloe_cli.training.trainer import _current_names, lora_config

    torch.set_num_threads(1)
    options = json.loads(spec)
    plan = step_config(Path(options["model"]), Path(options["data"]), Path(options["output"]), options["steps"],
                       options["lora"])
    kwargs = plan.sft_config_kwargs()
    kwargs.pop("dataset_kwargs")  # aloe's own data path skips TRL's preparation; TRL's vision path needs none
    kwargs.update(use_cpu=True, dataloader_pin_memory=False, disable_tqdm=True)
    args = SFTConfig(**_current_names(SFTConfig, kwargs))
    rows = [json.loads(line) for line in Path(options["data"]).read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows).cast_column("images", datasets.Sequence(datasets.Image()))
    processor = AutoProcessor.from_pretrained(options["model"])
    model = AutoModelForImageTextToText.from_pretrained(options["model"], dtype=torch.float32,
                                                        attn_implementation="sdpa")
    model.config.use_cache = False
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                         peft_config=lora_config(plan))
    metrics = trainer.train().metrics
    print(json.dumps({"train_runtime": metrics["train_runtime"], "steps": trainer.state.global_step}))


def aloe_step_run(model_dir: Path, data: Path, output: Path, steps: int, lora: bool) -> float:
    """Seconds per optimizer step of one `aloe train` run (the Trainer's train_runtime, as for the baseline)."""
    import json

    plan = step_config(model_dir, data, output, steps, lora)
    from aloe_cli.training.slurm import flags_from_values

    values = {key: value for key, value in plan.config.to_dict().items() if key in STEP_SETTINGS or key in (
        "input", "model", "output_dir", "max_steps", "lora")}
    command = [sys.executable, "-m", "aloe_cli", "train", *flags_from_values(type(plan.config), values)]
    proc = subprocess.run(command, capture_output=True, text=True, env=_step_env())
    if proc.returncode != 0:
        raise SystemExit(f"aloe train failed:\n{proc.stderr[-3000:]}")
    summary = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    runtime = next(line["train_runtime"] for line in reversed(summary) if "train_runtime" in line)
    return runtime / steps


def trl_step_run(model_dir: Path, data: Path, output: Path, steps: int, lora: bool) -> float:
    import json

    spec = json.dumps({"model": str(model_dir), "data": str(data), "output": str(output), "steps": steps,
                       "lora": lora})
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--trl-baseline", spec],
                          capture_output=True, text=True, env=_step_env())
    if proc.returncode != 0:
        raise SystemExit(f"the TRL baseline failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["train_runtime"] / result["steps"]


def _step_env() -> dict[str, str]:
    """The same process settings for both: one thread, no tokenizer threads, the checkout's aloe."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def bench_steps(scratch: Path, model_dir: Path, steps: int, repeats: int) -> None:
    data = scan_records(scratch / "scans", 64)
    for lora in (False, True):
        label = "LoRA" if lora else "full"
        ours, theirs = [], []
        for repeat in range(repeats):  # alternated, so a change in the machine's load reaches both alike
            theirs.append(trl_step_run(model_dir, data, scratch / f"trl-{label}-{repeat}", steps, lora))
            ours.append(aloe_step_run(model_dir, data, scratch / f"aloe-{label}-{repeat}", steps, lora))
        best_ours, best_theirs = min(ours), min(theirs)
        pairs = ", ".join(f"{o * 1000:.1f}/{t * 1000:.1f}" for o, t in zip(ours, theirs))
        print(f"[steps] {label:4}: aloe train {best_ours * 1000:6.1f} ms/step, TRL SFTTrainer "
              f"{best_theirs * 1000:6.1f} ms/step over {steps} steps (best of {repeats}) -> "
              f"{best_ours / best_theirs:.3f}x (goal <= 1.05x); median of the run pairs "
              f"{statistics.median(o / t for o, t in zip(ours, theirs)):.3f}x (aloe/TRL ms per run: {pairs})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--trl-baseline":
        sys.path.insert(0, str(ROOT))
        run_trl_baseline(sys.argv[2])
        return 0
    parser.add_argument("--only", nargs="+", choices=("collator", "guard", "startup", "steps"),
                        default=["collator", "guard", "startup", "steps"])
    parser.add_argument("--steps", type=int, default=200, help="steps: optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="steps: runs of each, alternated (the best counts)")
    parser.add_argument("--samples", type=int, default=96, help="collator: samples (512x512 JPEGs)")
    parser.add_argument("--batch", type=int, default=16, help="collator: micro batch")
    parser.add_argument("--guard-steps", type=int, default=100, help="guard: steps with and without")
    parser.add_argument("--records", type=int, default=1_000_000, help="start-up: records in the big mixture")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)  # one worker's worth of CPU, and a fair comparison on a shared machine
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPU(s), "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        model_dir = tiny_model(scratch)
        if "collator" in args.only:
            bench_collator(scratch, model_dir, args.samples, args.batch)
        if "guard" in args.only:
            bench_guard(scratch, model_dir, args.guard_steps, 16)
        if "startup" in args.only:
            bench_startup(scratch, model_dir, args.records)
        if "steps" in args.only:
            bench_steps(scratch, model_dir, args.steps, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
