"""Benchmark: what the progress facility (console.progress fed by training.progress.TrainProgress) costs a
training step, on the tiny model (CPU).

One process trains the tiny Qwen2-VL with transformers' Trainer on text-only micro batches, in rounds that
alternate between four set-ups, so every set-up sees the same machine load:

- none:      no progress callback (the baseline);
- bar:       the rich bar, stderr on a pseudo-terminal (what a person at a terminal sees);
- heartbeat: heartbeat lines at the default interval (what a SLURM log gets);
- every:     a heartbeat line at every step (ALOE_PROGRESS_INTERVAL=0, the worst case).

It prints the median step time of each and its ratio to the baseline, and, as figures less sensitive to the
load of a shared machine, the CPU time spent inside the callback's own hooks per step and the CPU time of the
bar's redraws per second (a thread of rich's), each as a share of the step time (goal: under 1% together).

    python benchmarks/progress.py                  # 4 rounds of 50 steps per set-up
    python benchmarks/progress.py --rounds 6 --steps 100
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORDS = "the chest film shows a small nodule in the right upper lobe with no effusion".split()


def terminal_stderr():
    """Point stderr (fd 2 and sys.stderr) at a pseudo-terminal whose output is read and dropped."""
    import pty

    master, slave = pty.openpty()

    def drain() -> None:
        while True:
            try:
                if not os.read(master, 65536):
                    return
            except OSError:
                return

    threading.Thread(target=drain, daemon=True).start()
    saved = os.dup(2)
    os.dup2(slave, 2)
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
    return saved


def restore_stderr(saved: int) -> None:
    sys.stderr.flush()
    os.dup2(saved, 2)
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per set-up and round")
    parser.add_argument("--micro", type=int, default=4)
    options = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch
    from transformers import AutoModelForImageTextToText, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    from aloe_cli import console
    from aloe_cli.modeling.chat_template import apply_training_chat_template
    from aloe_cli.modeling.tiny import build_tiny_qwen2vl
    from aloe_cli.training.collator import TrainingCollator
    from aloe_cli.training.progress import TrainProgress

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    scratch = Path(tempfile.mkdtemp(prefix="aloe-bench-progress-"))
    model_dir = build_tiny_qwen2vl(scratch / "tiny")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    apply_training_chat_template(processor)
    rng = random.Random(0)

    def sentence(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words)) + "."

    rows = [{"index": i, "where": str(i), "images": [], "messages": [
        {"role": "user", "content": sentence(30)}, {"role": "assistant", "content": sentence(60)}]}
        for i in range(options.micro)]
    batch = {k: v for k, v in TrainingCollator(processor, max_length=4096)(rows).items() if k != "aloe_skipped"}
    dataset = [{key: value[i] for key, value in batch.items()} for i in range(options.micro)] * (options.steps + 1)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).train()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.begin = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.begin)

    class Timed(TrainProgress):
        """TrainProgress with the time spent in its hooks added up."""

        spent = 0.0

        def _timed(name):
            def hook(self, *args, **kwargs):
                start = time.thread_time()  # CPU time: a hook preempted on a busy machine is not charged for it
                try:
                    return getattr(TrainProgress, name)(self, *args, **kwargs)
                finally:
                    self.spent += time.thread_time() - start
            return hook

        on_step_end = _timed("on_step_end")
        on_log = _timed("on_log")

    def train(mode: str) -> tuple[list[float], float]:
        timer = StepTimer()
        callbacks = [timer]
        shown = None
        saved = None
        if mode != "none":
            os.environ["ALOE_PROGRESS_INTERVAL"] = "0" if mode == "every" else "30"
            if mode == "bar":
                saved = terminal_stderr()
            console._console = None  # the console follows stderr as it is now
            shown = Timed(console.progress, "aloe train")
            callbacks.append(shown)
        args = TrainingArguments(output_dir=str(scratch / "out"), max_steps=options.steps, report_to=[],
                                 per_device_train_batch_size=options.micro, logging_steps=1, save_strategy="no",
                                 use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False, learning_rate=1e-4)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks,
                          data_collator=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]})
        trainer.remove_callback(PrinterCallback)
        log_null = open(os.devnull, "w")
        real_stdout = sys.stdout
        sys.stdout = log_null
        try:
            trainer.train()
        finally:
            sys.stdout = real_stdout
            if shown is not None:
                shown.close()
            if saved is not None:
                restore_stderr(saved)
                console._console = None
            if mode == "every" or mode == "heartbeat":
                sys.stderr.flush()
        return timer.times[2:], (shown.spent if shown else 0.0)  # the first steps warm up

    modes = ("none", "bar", "heartbeat", "every")
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    spent: dict[str, float] = {mode: 0.0 for mode in modes}
    for round_ in range(options.rounds):
        for mode in modes if round_ % 2 == 0 else reversed(modes):
            if mode == "every":  # its lines would bury the figures: they go to a file
                saved = os.dup(2)
                with open(scratch / "heartbeat.log", "a") as log:
                    os.dup2(log.fileno(), 2)
                try:
                    got, hooks = train(mode)
                finally:
                    os.dup2(saved, 2)
                    os.close(saved)
            else:
                got, hooks = train(mode)
            times[mode] += got
            spent[mode] += hooks
    base = statistics.median(times["none"])
    print(f"[progress] tiny model, text-only micro batch of {options.micro}, {options.rounds} rounds x "
          f"{options.steps} steps per set-up, alternating; median step time")
    labels = {"none": "no progress (baseline)", "bar": "rich bar on a terminal",
              "heartbeat": "heartbeat lines every 30 s", "every": "a heartbeat line every step"}
    for mode in modes:
        median = statistics.median(times[mode])
        hooks = spent[mode] / max(len(times[mode]) + 2 * options.rounds, 1)
        line = f"[progress] {labels[mode]:30s} {median * 1000:7.2f} ms/step -> {median / base:.3f}x"
        if mode != "none":
            line += f"; its hooks {hooks * 1e6:6.1f} us/step = {hooks / base * 100:.3f}% of a step (goal < 1%)"
        print(line)
    saved = terminal_stderr()  # the bar's redraw, timed alone (rich calls it REDRAWS_PER_SECOND times a second)
    console._console = None
    with console.progress("aloe train", 1000, unit="steps") as bar:
        bar.update(3, loss=1.2345, lr=3.75e-5, **{"samples/s": 123.4})
        start = time.thread_time()
        for _ in range(200):
            bar._progress.refresh()
        redraw = (time.thread_time() - start) / 200
    restore_stderr(saved)
    share = redraw * console.REDRAWS_PER_SECOND
    hooks = spent["bar"] / max(len(times["bar"]) + 2 * options.rounds, 1)
    print(f"[progress] the bar's redraw: {redraw * 1000:.2f} ms of CPU, {console.REDRAWS_PER_SECOND} a second "
          f"= {share * 100:.2f}% of the time; with its hooks, the bar costs {(share + hooks / base) * 100:.2f}% "
          f"of a step (goal < 1%)")
    print(f"[progress] load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
