"""Training progress for people: a transformers `TrainerCallback` that feeds the console's progress facility.

    callback = TrainProgress(progress, "aloe train")   # progress: console.progress (or null_progress)
    trainer.add_callback(callback); ...; callback.close()   # close() also after a failed run

On the main process it opens one progress over the optimizer steps (step/total, rate, ETA) when training begins,
advances it at every step with samples/s, sets loss and lr at every logging step, and closes it at the end.
Ranks other than the first show nothing.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

from transformers import TrainerCallback


class TrainProgress(TrainerCallback):
    def __init__(self, progress, description: str):
        self.progress = progress
        self.description = description
        self.bar: Any = None
        self._stack = ExitStack()
        self._start = 0.0
        self._first_step = 0
        self._samples_per_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.bar is not None:
            return
        self._samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self._first_step = state.global_step  # a resumed run starts where its checkpoint was
        self._start = time.perf_counter()
        self.bar = self._stack.enter_context(
            self.progress(self.description, state.max_steps or None, unit="steps", completed=state.global_step))
        self.bar.update(loss=None, lr=None)  # their place in the line, before samples/s

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        elapsed = time.perf_counter() - self._start
        steps = state.global_step - self._first_step
        rate = steps * self._samples_per_step / elapsed if elapsed > 0 else None
        self.bar.update(state.global_step, **{"samples/s": rate})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        figures = {name: logs[key] for key, name in (("loss", "loss"), ("learning_rate", "lr"),
                                                     ("eval_loss", "eval_loss")) if key in logs}
        if figures:
            self.bar.update(**figures)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        self.bar = None
        self._stack.close()
