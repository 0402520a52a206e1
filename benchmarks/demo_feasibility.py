"""Can the demo's two-stage recipe be seen learning on a CPU? Train, attack and repair the tiny model.

For each seed: write the synthetic demo data (`aloe_cli.demo.task`), drop what curation drops
(the planted wrong/empty answers and evaluation leaks), build the tiny offline Qwen2-VL, then

  stage 1  TRL SFTTrainer on the training records (a share of the lesion prompts carry a correct hint)
  stage 2  from the stage-1 weights, on fresh lesion records perturbed as `aloe adv-train` does
           (`aloe_cli.perturb`: a wrong answer as a caption in the prompt, `pmt`, or as the user's
           guess, `syc`, in turn), targets correct
  eval     `aloe eval --perturb pmt,syc` (greedy) for the untrained, stage-1 and stage-2 models on the
           medical and the general benchmark; open-ended lines are graded with the demo's rule
           (`aloe_cli.demo.rules.grade_open`, what the demo's stand-in judge applies)

and print accuracy per model x perturbation with the three claims checked against the untrained baseline
measured in the same run:

  1. stage 1 beats the untrained model by >= 30 points on the medical benchmark (clean);
  2. stage 1 drops by >= 25 points from clean under pmt and under syc (all medical items, cls + det);
  3. stage 2 recovers >= 20 of those points under pmt and syc, and loses at most 5 clean points.

    python benchmarks/demo_feasibility.py --seeds 0 1 2            # the full configuration
    python benchmarks/demo_feasibility.py --quick --seeds 0 1 2    # the CI configuration

Wall and CPU seconds are printed per phase (CPU = user + system of this process and its children).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from aloe_cli.demo.rules import grade_open
from aloe_cli.demo.task import QUICK, DemoConfig, write_demo_data

BENCHMARKS = ("demo-med", "demo-general")
PERTURBATIONS = ("pmt", "syc")


@dataclass(frozen=True)
class Setup:
    config: DemoConfig
    stage1_steps: int
    stage2_steps: int
    batch_size: int = 16
    lr: float = 5e-4
    stage2_lr: float = 5e-4
    scheduler: str = "cosine"
    warmup: float = 0.03
    eval_batch: int = 64
    max_new_tokens: int = 32


FULL = Setup(DemoConfig(), stage1_steps=1200, stage2_steps=300, stage2_lr=2e-4)
QUICK_SETUP = Setup(QUICK, stage1_steps=500, stage2_steps=150, stage2_lr=2e-4)


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Clock:
    def __init__(self):
        self.phases: dict[str, tuple[float, float]] = {}

    def run(self, name, fn, *args, **kwargs):
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = fn(*args, **kwargs)
        self.phases[name] = (time.perf_counter() - wall, cpu_seconds() - cpu)
        print(f"  {name}: {self.phases[name][0]:.0f} s wall, {self.phases[name][1]:.0f} s CPU", file=sys.stderr)
        return result


# ----------------------------------------------------------------------------- data

def _load_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def curated(records: list[dict]) -> list[dict]:
    """What the curation pipe keeps: everything but the planted faults (its own tests check it catches them)."""
    return [r for r in records if "planted" not in r.get("meta", {})]


def adversarial(records: list[dict], seed: int) -> list[dict]:
    """Stage-2 records as `aloe adv-train` makes them: each gets pmt or syc in turn, a wrong answer, its target."""
    from aloe_cli.perturb import WrongAnswerPicker, perturb_record

    picker = WrongAnswerPicker(records)
    return [perturb_record(record, PERTURBATIONS[i % len(PERTURBATIONS)], picker.pick(record, seed=seed), seed=seed)
            for i, record in enumerate(records)]


def to_dataset(records: list[dict], root: Path):
    import datasets
    from PIL import Image

    rows = {"messages": [], "images": []}
    for record in records:
        rows["messages"].append(record["messages"])
        rows["images"].append([Image.open(root / p).convert("RGB") for p in record["images"]])
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "images": datasets.Sequence(datasets.Image()),
    })
    return datasets.Dataset.from_dict(rows, features=features)


# ----------------------------------------------------------------------------- training

def sft(model_dir: Path, dataset, out_dir: Path, steps: int, setup: Setup, lr: float, seed: int) -> Path:
    import torch
    import trl
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(seed)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    args = trl.SFTConfig(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=setup.batch_size,
        learning_rate=lr, lr_scheduler_type=setup.scheduler, warmup_steps=round(setup.warmup * steps), weight_decay=0.0,
        assistant_only_loss=True, report_to="none", logging_steps=50, save_strategy="no", use_cpu=True,
        bf16=False, dataloader_num_workers=0, seed=seed, disable_tqdm=True, max_length=None,
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    trainer.train()
    losses = [(log["step"], round(log["loss"], 3)) for log in trainer.state.log_history if "loss" in log]
    print(f"    loss: {losses}", file=sys.stderr)
    trainer.save_model(str(out_dir))
    processor.save_pretrained(str(out_dir))
    return out_dir


# ----------------------------------------------------------------------------- evaluation

def evaluate(name: str, model_dir: Path, data, out: Path, setup: Setup) -> dict:
    """`aloe eval` on both benchmarks with pmt and syc; open lines graded by the demo's rule."""
    command = [sys.executable, "-m", "aloe_cli", "eval", "--model", f"{name}={model_dir}", "-o", str(out),
               "--perturb", ",".join(PERTURBATIONS), "--batch-size", str(setup.eval_batch),
               "--max-new-tokens", str(setup.max_new_tokens), "--device", "cpu"]
    for benchmark in BENCHMARKS:
        command += ["--benchmark", f"{benchmark}={data.root / (benchmark + '.tsv')}"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("DEMO_THREADS", "2")}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    scores: dict = {}
    for benchmark in BENCHMARKS:
        lines = [json.loads(x) for x in (out / name / benchmark / "predictions.jsonl").read_text().splitlines()]
        for line in lines:
            if line["kind"] == "open":
                line["correct"] = grade_open(line["answer"], line["prediction"] or "")
        by_perturb: dict[str, list[float]] = {}
        for line in lines:
            by_perturb.setdefault(line.get("perturb") or "base", []).append(float(line["correct"]))
        for perturb, values in by_perturb.items():
            scores[f"{benchmark}/{perturb}"] = 100 * float(np.mean(values))
        for category in sorted({line.get("category") for line in lines}):
            for perturb in ("base", *PERTURBATIONS):
                values = [float(x["correct"]) for x in lines
                          if x.get("category") == category and (x.get("perturb") or "base") == perturb]
                if values:
                    scores[f"{benchmark}/{category}/{perturb}"] = 100 * float(np.mean(values))
    scores["clean"], scores["general"] = scores["demo-med/base"], scores["demo-general/base"]
    for perturb in PERTURBATIONS:
        scores[perturb] = scores[f"demo-med/{perturb}"]
    return scores


# ----------------------------------------------------------------------------- one seed

def run_seed(seed: int, setup: Setup, work: Path) -> dict:
    import torch

    from aloe_cli.testing.tiny import build_tiny_qwen2vl

    torch.set_num_threads(int(os.environ.get("DEMO_THREADS", "2")))
    clock = Clock()
    print(f"seed {seed}", file=sys.stderr)
    data = clock.run("generate", write_demo_data, work / "data", seed, setup.config)
    train = curated(_load_records(data.train))
    stage2_records = adversarial(_load_records(data.adversarial), seed)
    untrained = clock.run("build", build_tiny_qwen2vl, work / "untrained", seed=seed)
    stage1 = clock.run("stage1", sft, untrained, to_dataset(train, data.root), work / "stage1",
                       setup.stage1_steps, setup, setup.lr, seed)
    stage2 = clock.run("stage2", sft, stage1, to_dataset(stage2_records, data.root), work / "stage2",
                       setup.stage2_steps, setup, setup.stage2_lr, seed)
    scores = {}
    for name, model_dir in (("untrained", untrained), ("stage1", stage1), ("stage2", stage2)):
        scores[name] = clock.run(f"eval {name}", evaluate, name, model_dir, data, work / "eval", setup)
        print(f"    {name}: " + ", ".join(f"{k} {v:.0f}" for k, v in scores[name].items() if "/" in k),
              file=sys.stderr)
    wall = sum(w for w, _ in clock.phases.values())
    cpu = sum(c for _, c in clock.phases.values())
    return {"seed": seed, "scores": scores, "phases": clock.phases, "wall": wall, "cpu": cpu,
            "train_records": len(train), "stage2_records": len(stage2_records)}


def claims(scores: dict) -> dict[str, bool]:
    s1, s2, base = scores["stage1"], scores["stage2"], scores["untrained"]
    result = {"stage1 - untrained >= 30": s1["clean"] - base["clean"] >= 30}
    for form in ("pmt", "syc"):
        drop = s1["clean"] - s1[form]
        result[f"stage1 {form} drop >= 25"] = drop >= 25
        result[f"stage2 {form} recovers >= 20"] = s2[form] - s1[form] >= 20
    # "Stays within 5 points": stage 2 may not lose more than 5 clean points (it may gain).
    result["stage2 clean >= stage1 - 5"] = s2["clean"] >= s1["clean"] - 5
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="the CI configuration")
    parser.add_argument("--stage1-steps", type=int)
    parser.add_argument("--stage2-steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--stage2-lr", type=float)
    parser.add_argument("--hint-share", type=float)
    parser.add_argument("--scheduler", choices=["cosine", "constant"])
    parser.add_argument("--lesion-records", type=int)
    parser.add_argument("--adversarial-records", type=int)
    parser.add_argument("--categories", help="comma-separated lesion categories to train on (default: all)")
    parser.add_argument("--eval-lesion", help="items per lesion category, e.g. 24,24,0,0")
    parser.add_argument("--no-general", action="store_true", help="no shapes, facts or arithmetic records")
    parser.add_argument("--json", type=Path, help="write every figure as JSON here")
    parser.add_argument("--workdir", type=Path, help="where the temporary folder goes")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (data, models, predictions)")
    args = parser.parse_args(argv)

    setup = QUICK_SETUP if args.quick else FULL
    config = setup.config
    for name in ("hint_share", "lesion_records", "adversarial_records"):
        if getattr(args, name) is not None:
            config = replace(config, **{name: getattr(args, name)})
    if args.categories:
        config = replace(config, lesion_categories=tuple(args.categories.split(",")))
    if args.eval_lesion:
        config = replace(config, eval_lesion=tuple(int(n) for n in args.eval_lesion.split(",")))
    if args.no_general:
        config = replace(config, shapes_records=0, fact_records=0, arithmetic_records=0)
    overrides = {k: getattr(args, k) for k in ("stage1_steps", "stage2_steps", "lr", "stage2_lr", "scheduler")
                 if getattr(args, k) is not None}
    setup = replace(setup, config=config, **overrides)
    print(f"setup: {setup}", file=sys.stderr)

    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = args.keep or Path(tmp)
        for seed in args.seeds:
            results.append(run_seed(seed, setup, work / f"seed{seed}"))

    print("seed | model     | clean | pmt   | syc   | general | steps | train wall/CPU s | eval wall/CPU s")
    for r in results:
        for model in ("untrained", "stage1", "stage2"):
            s = r["scores"][model]
            steps = {"untrained": 0, "stage1": setup.stage1_steps, "stage2": setup.stage2_steps}[model]
            train = r["phases"].get(model, (0.0, 0.0))
            evaluation = r["phases"][f"eval {model}"]
            print(f"{r['seed']:4d} | {model:9s} | {s['clean']:5.1f} | {s['pmt']:5.1f} | {s['syc']:5.1f} | "
                  f"{s['general']:7.1f} | {steps:5d} | {train[0]:6.0f} / {train[1]:6.0f} | "
                  f"{evaluation[0]:5.0f} / {evaluation[1]:5.0f}")
        print(f"     total {r['wall']:.0f} s wall, {r['cpu']:.0f} s CPU; claims: {claims(r['scores'])}")
    passed = all(all(claims(r["scores"]).values()) for r in results)
    print(f"all claims met for every seed: {passed}")
    if args.json:
        args.json.write_text(json.dumps({"setup": repr(setup), "results": results}, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
