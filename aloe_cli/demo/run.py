"""The demo run: the whole recipe on the synthetic task, each step the real `aloe` command.

    data       write_demo_data: train.jsonl (planted faults and leaks included), adversarial.jsonl,
               demo-med.tsv, demo-general.tsv, images/
    curation   aloe dedup | aloe perplexity | aloe score > curated.jsonl   (one shell pipe, printed)
               aloe mix                                                    (token-balanced mixture)
    stage 1    aloe train      on the mixture, from a tiny Qwen2-VL built offline (random weights)
    stage 2    aloe adv-train  from stage 1, on lesion records perturbed with cap, pmt, syc, leg and region,
                               with a share of stage 1's mixture replayed (--replay mixture.jsonl)
    eval       aloe eval       untrained, stage 1 and stage 2, --perturb base,cap,pmt,syc,leg
    infer      aloe infer      one scan, the predicted box drawn to a PNG

Every command runs as a subprocess in the work folder (relative paths, so the printed commands can
be pasted there), its stderr kept in logs/<step>.log and shown when it fails. The judge of `score`
and of eval's open-ended items is `RuleJudgeServer`, a stand-in on 127.0.0.1 that grades by rule.
`build_report` collects the figures, in the published layout (classification and detection parts);
`claims` checks those the published model card makes.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aloe_cli.console import heartbeat_text, live_line, stdout_to_stderr
from aloe_cli.demo.task import DETECT_QUESTION, DemoConfig, item_prompt, write_demo_data
from aloe_cli.errors import AloeError
from aloe_cli.perturb.names import KINDS, PUBLISHED_COLUMNS

MODELS = ("untrained", "stage1", "stage2")
PERTURBATIONS = PUBLISHED_COLUMNS["det"]  # the published table's perturbations
STAGE2_PERTURBATIONS = KINDS  # every kind the recipe names
# The published robustness table: classification Base/Cap/Pmt/Syc, detection Base/Cap/Pmt/Syc/Leg.
TABLE_COLUMNS = tuple(PUBLISHED_COLUMNS.items())
MEDICAL = "demo-med"
GENERAL = "demo-general"
CURATION_STAGES = ("dedup", "perplexity", "score", "mix")
STEP_HEARTBEAT = "2"  # seconds between the commands' heartbeat lines in logs/<step>.log (ALOE_PROGRESS_INTERVAL)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and optimisation of one demo run; the defaults pass every claim for the seeds tried (docs/demo.md)."""

    seed: int = 0
    data: DemoConfig = field(default_factory=DemoConfig)
    stage1_steps: int = 1200
    stage2_steps: int = 600  # 300 left the detection items misled by hints in two seeds of three (docs/demo.md)
    batch_size: int = 16
    learning_rate: float = 5e-4  # >= 1e-3 often leaves the tiny model on the majority answer
    stage2_learning_rate: float = 2e-4  # gentler: stage 2 must keep stage 1's clean accuracy
    stage2_samples: int = 1600
    # Share of stage 2's records replayed from stage 1's mixture (clean, medical and general): without it the
    # tiny model forgets the general task and part of the clean one while it learns to ignore hints (docs/demo.md).
    stage2_replay_share: float = 0.25
    eval_batch_size: int = 64
    threads: int = 2
    # Loss-token shares of the four cells for `aloe mix`: the lesion task carries the demo.
    # Near the cells' natural shares (the lesion task carries the demo); the small text sets are repeated
    # up to `max_repeats` times to fill theirs.
    shares: tuple[tuple[str, float], ...] = (("medical/multimodal", 0.90), ("general/multimodal", 0.07),
                                             ("medical/text", 0.02), ("general/text", 0.01))
    max_repeats: float = 2.0


def quick_settings(seed: int = 0) -> DemoSettings:
    """Every step on a sliver of the data with a few optimizer steps: the pipeline runs, the claims do not hold."""
    from aloe_cli.demo.task import SMOKE

    return DemoSettings(seed=seed, data=SMOKE, stage1_steps=40, stage2_steps=8, stage2_samples=100)


class Runner:
    """Runs `aloe` commands in the work folder, timing each step and keeping its log."""

    def __init__(self, workdir: Path, threads: int, say: Callable[[str], None]):
        self.bash = shutil.which("bash")
        if self.bash is None:  # before any work: every step runs through it (the curation step is a pipe)
            raise AloeError("aloe demo needs bash to run its steps")
        self.workdir, self.say = workdir, say
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # A fixed thread count: the figures depend on it. Waiting threads sleep rather than spin (OpenMP's passive
        # policy): the same figures, and on a busy machine several times faster (docs/demo.md).
        # The commands' heartbeat lines go to the step's log every STEP_HEARTBEAT seconds; the demo's console
        # follows the newest (a line redrawn on a terminal, printed now and then otherwise).
        self.env = {"OMP_WAIT_POLICY": "PASSIVE", "ALOE_PROGRESS_INTERVAL": STEP_HEARTBEAT, **os.environ,
                    "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        self.seconds: dict[str, float] = {}
        self.number = 0

    @staticmethod
    def shown(args: list[str]) -> str:
        return shlex.join(["aloe", *args])

    def run(self, step: str, title: str, commands: list[list[str]], stdout: str | None = None) -> None:
        """Run one command, or several as a shell pipe (`stdout` names the file the last one writes)."""
        self.number += 1
        shown = " \\\n  | ".join(self.shown(c) for c in commands) + (f" > {stdout}" if stdout else "")
        self.say(f"\n[{self.number}] {title}\n  $ {shown}")
        started = time.perf_counter()
        log = self.logs / f"{step}.log"
        python = shlex.quote(sys.executable)
        script = " | ".join(f"{python} -m aloe_cli {shlex.join(c)}" for c in commands)
        script = f"set -o pipefail; {script}" + (f" > {shlex.quote(stdout)}" if stdout else "")
        with log.open("wb") as handle, live_line() as show:
            # Its own session, so that on Ctrl-C or SIGTERM the whole pipe is stopped, not just bash.
            process = subprocess.Popen([self.bash, "-c", script], cwd=self.workdir, env=self.env, stderr=handle,
                                       stdout=None if stdout else handle, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
            tail = LogTail(log)
            try:
                while True:
                    try:
                        returncode = process.wait(timeout=0.5)
                        break
                    except subprocess.TimeoutExpired:
                        newest = tail.newest_heartbeat()
                        if newest:
                            show(f"  {newest}")
            except BaseException:
                _stop(process)
                raise
        self.seconds[step] = time.perf_counter() - started
        if returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            raise AloeError(f"demo step {step!r} failed (exit {returncode}); the end of {log}:\n" + "\n".join(tail))
        self.say(f"  done in {self.seconds[step]:.0f} s")


class LogTail:
    """Reads what a step's commands add to its log and keeps the newest heartbeat line (console.progress's)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""
        self.newest: str | None = None

    def newest_heartbeat(self) -> str | None:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except OSError:
            return self.newest
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        for line in lines:
            text = heartbeat_text(line.decode("utf-8", errors="replace"))
            if text:
                self.newest = text
        return self.newest


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the step's whole process group (bash and every command of its pipe), then SIGKILL for
    whatever is still there after 10 s; returns once the group is gone."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            process.poll()  # reap bash; its children are reaped by init once orphaned
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
    process.poll()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _pct(value: float | None) -> float | None:
    return None if value is None else round(value, 1)  # scores.json holds percentages already


def stage_counts(report: dict) -> dict:
    return {key: report.get(key, 0) for key in ("read", "kept", "rejected")} | {"reasons": report.get("reasons", {})}


def planted_caught(workdir: Path, planted: dict[str, list[str]]) -> dict:
    """How many planted faults each stage rejected, from the rejects files (ids of the records)."""
    rejected = {}
    for stage in ("dedup", "score"):
        path = workdir / "rejects" / f"{stage}.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        rejected[stage] = {json.loads(line).get("id") for line in lines if line.strip()}
    caught = {"eval_leak": rejected["dedup"], "wrong_answer": rejected["score"],
              "empty_answer": rejected["score"]}
    every_planted = {i for ids in planted.values() for i in ids}
    return {kind: {"planted": len(ids), "caught": len(set(ids) & caught[kind])} for kind, ids in planted.items()} | {
        "clean_rejected": len((rejected["dedup"] | rejected["score"]) - every_planted)}


def claims(accuracy: dict, robustness: dict) -> dict[str, bool]:
    """The published card's claims, in miniature.

    Stage 1 learns the task (>= 30 points over the untrained model on demo-med) and is misled by hints (>= 25
    points lost under pmt and under syc); stage 2 improves every adversarial column of the classification and
    detection parts over stage 1 (>= 20 points where stage 1 lost >= 25 from its clean figure, >= 5 elsewhere)
    and keeps clean classification, clean detection and general accuracy within 5 points of stage 1.
    """
    s1, s2 = robustness["stage1"], robustness["stage2"]
    result = {"stage 1 beats the untrained model by >= 30 points":
              accuracy["stage1"][MEDICAL] - accuracy["untrained"][MEDICAL] >= 30}
    for form in ("pmt", "syc"):
        result[f"stage 1 drops >= 25 points under {form}"] = s1["base"] - s1[form] >= 25
    for part, kinds in TABLE_COLUMNS:
        for kind in kinds[1:]:
            column = f"{part}_{kind}"
            need = 20 if s1[f"{part}_base"] - s1[column] >= 25 else 5
            result[f"stage 2 improves {part.capitalize()} {kind.capitalize()} by >= {need}"] = \
                s2[column] - s1[column] >= need
    for part in ("cls", "det"):
        base = f"{part}_base"
        result[f"stage 2 keeps clean {part.capitalize()} (>= stage 1 - 5)"] = s2[base] >= s1[base] - 5
    result["stage 2 keeps general accuracy (>= stage 1 - 5)"] = \
        accuracy["stage2"][GENERAL] >= accuracy["stage1"][GENERAL] - 5
    return result


def _write_example_scan(path: Path, seed: int) -> None:
    import numpy as np

    from aloe_cli.demo.images import lesion_scan, png_bytes

    image, _ = lesion_scan(np.random.default_rng([seed, 7777]), quadrant=1)
    path.write_bytes(png_bytes(image))


def run_demo(workdir: Path, settings: DemoSettings, say: Callable[[str], None]) -> dict:
    """Run every step in `workdir` and return the report (see docs/demo.md for its shape)."""
    from aloe_cli.demo.judge_server import MODEL_NAME, RuleJudgeServer
    from aloe_cli.modeling.tiny import build_tiny_qwen2vl

    started = time.perf_counter()
    runner = Runner(workdir, settings.threads, say)
    for folder in ("reports", "rejects", "infer"):
        (workdir / folder).mkdir(parents=True, exist_ok=True)
    say(f"[0] data and the untrained model (seed {settings.seed}) in {workdir}")
    data = write_demo_data(workdir, settings.seed, settings.data)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the model is saved in a blink; no bar on the demo's output
    # transformers may import DeepSpeed here, whose logger prints to stdout: stdout carries data only.
    with stdout_to_stderr():
        build_tiny_qwen2vl(workdir / "models" / "untrained", seed=settings.seed)
    _write_example_scan(workdir / "scan.png", settings.seed)
    runner.seconds["data"] = time.perf_counter() - started
    say(f"  {data.counts['train']} training records ({sum(map(len, data.planted.values()))} planted faults), "
        f"{data.counts['adversarial']} for stage 2, {data.counts['eval_med']} + {data.counts['eval_general']} "
        f"evaluation items")

    common = ["--seed", str(settings.seed)]
    with RuleJudgeServer() as judge:
        say(f"  stand-in judge: {MODEL_NAME} on {judge.url} (grades by rule; a real run serves an LVLM)")
        runner.run("curate", "curation: leaks, perplexity, judge", [
            ["dedup", "-i", "train.jsonl", "--against", f"{MEDICAL}.tsv", "--against", f"{GENERAL}.tsv",
             "--rejects", "rejects/dedup.jsonl", "--report", "reports/dedup.json"],
            ["perplexity", "--model", "models/untrained", "--device", "cpu", "--report", "reports/perplexity.json"],
            ["score", "--judge", MODEL_NAME, "--base-url", judge.url, "--concurrency", "8",
             "--rejects", "rejects/score.jsonl", "--report", "reports/score.json"],
        ], stdout="curated.jsonl")
        shares = [arg for cell, share in settings.shares for arg in ("--share", f"{cell}={share}")]
        runner.run("mix", "mixture: balanced by loss tokens", [
            ["mix", "-i", "curated.jsonl", "--tokenizer", "models/untrained", *shares, "--max-repeats",
             str(settings.max_repeats), *common, "-o", "mixture.jsonl", "--report", "reports/mix.json"]])
        optimisation = ["--global-batch-size", str(settings.batch_size), "--micro-batch-size",
                        str(settings.batch_size), "--lr-scheduler", "cosine", "--warmup-ratio", "0.03",
                        "--weight-decay", "0", "--precision", "fp32", "--deepspeed", "none",
                        "--no-gradient-checkpointing", "--dataloader-workers", "0", "--save-steps", "100000",
                        "--logging-steps", "100", *common]
        runner.run("stage1", f"stage 1: SFT on the mixture ({settings.stage1_steps} steps)", [
            ["train", "-i", "mixture.jsonl", "--model", "models/untrained", "--output-dir", "runs/stage1",
             "--max-steps", str(settings.stage1_steps), "--learning-rate", str(settings.learning_rate),
             *optimisation]])
        runner.run("stage2", f"stage 2: adversarial SFT from stage 1 ({settings.stage2_steps} steps)", [
            ["adv-train", "-i", "adversarial.jsonl", "--base", "runs/stage1", "--output-dir", "runs/stage2",
             "--perturb", ",".join(STAGE2_PERTURBATIONS), "--samples", str(settings.stage2_samples),
             "--replay", "mixture.jsonl", "--replay-share", str(settings.stage2_replay_share),
             "--max-steps", str(settings.stage2_steps), "--learning-rate", str(settings.stage2_learning_rate),
             *optimisation]])
        models = [arg for name, path in zip(MODELS, ("models/untrained", "runs/stage1", "runs/stage2"))
                  for arg in ("--model", f"{name}={path}")]
        runner.run("eval", "evaluation: three models, five conditions", [
            # --protocol aloe: the tiny models learned aloe's wording of each question (task.item_prompt), so
            # they are asked the same way; the claims read the aloe-protocol figures (accuracy_aloe)
            ["eval", *models, "--benchmark", f"{MEDICAL}.tsv", "--benchmark", f"{GENERAL}.tsv", "--protocol", "aloe",
             "--perturb", ",".join(PERTURBATIONS), "--batch-size", str(settings.eval_batch_size),
             "--max-new-tokens", "32", "--device", "cpu",
             "--judge", MODEL_NAME, "--judge-backend", "openai", "--judge-base-url", judge.url,
             "-o", "results"]])
    prompt = item_prompt("open", DETECT_QUESTION, None)
    runner.run("infer", "inference with grounding: the stage-2 model on one scan", [
        ["infer", "--model", "runs/stage2", "--device", "cpu", "--max-new-tokens", "32", "--image", "scan.png",
         "--draw", "infer", prompt]], stdout="infer/answer.txt")
    return build_report(workdir, data.planted, runner.seconds, time.perf_counter() - started, settings)


def build_report(workdir: Path, planted: dict[str, list[str]], seconds: dict, total: float,
                 settings: DemoSettings) -> dict:
    curation = {stage: stage_counts(_read_json(workdir / "reports" / f"{stage}.json")) for stage in CURATION_STAGES}
    accuracy, robustness = {}, {}
    for model in MODELS:
        scores = _read_json(workdir / "results" / model / "scores.json")["benchmarks"]
        accuracy[model] = {name: _pct(scores[name]["accuracy_aloe"]) for name in (MEDICAL, GENERAL)}
        perturbations = scores[MEDICAL]["perturbations"]
        robustness[model] = {kind: _pct(perturbations[kind]["accuracy_aloe"]) for kind in PERTURBATIONS}
        by_task = scores[MEDICAL]["robustness"]
        robustness[model].update({f"{part}_{kind}": _pct(by_task[part][kind]["accuracy_aloe"])
                                  for part, kinds in TABLE_COLUMNS for kind in kinds})
    from aloe_cli.data.grounding import parse_grounding

    answer = (workdir / "infer" / "answer.txt").read_text(encoding="utf-8").strip()
    return {
        "seconds": round(total, 1),
        "seed": settings.seed,
        "curation": curation,
        "planted": planted_caught(workdir, planted),
        "accuracy": accuracy,
        "robustness": robustness,
        "claims": claims(accuracy, robustness),
        "infer": {"text": answer, "boxes": [list(found.box) for found in parse_grounding(answer)],
                  "drawn": sorted(str(p.relative_to(workdir)) for p in (workdir / "infer").glob("*.png"))},
        "steps": {step: round(value, 1) for step, value in seconds.items()},
        "workdir": str(workdir),
    }


__all__ = ["DemoSettings", "MODELS", "PERTURBATIONS", "TABLE_COLUMNS", "build_report", "claims", "run_demo"]
