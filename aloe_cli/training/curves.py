"""Loss curves from a run folder's log.jsonl: the run's own `loss.png`, and several runs overlaid.

    curves = read_curves(path)                    # path: a run folder or its log.jsonl
    draw_curves([curves, ...], "loss.png")        # training loss (raw and smoothed), eval loss, learning rate
    loss_curve_callback(output_dir, note)         # a TrainerCallback: loss.png at logging steps and at the end

The picture has two panels over the optimizer step: the loss (each run's logged training loss, faint, with its
exponential moving average drawn over it as LLaMA-Factory's plot_loss does, and the eval loss as points when
the run evaluated) and the learning rate. Without matplotlib (the `[plot]` extra) training draws nothing and
says so once. This module never prints; `note` is how the callback speaks.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aloe_cli.errors import AloeError
from aloe_cli.training.run_folder import LOG_FILE as LOG_NAME

CURVE_FILE = "loss.png"
# A logging step redraws loss.png only when the run has trained this long since the last drawing (or since it
# began), and at least DRAW_COST_SHARE times as long as that drawing took: a picture costs a tenth of a second or
# more (the first one also imports matplotlib), so drawing takes under 1% of the run whatever its step time.
REDRAW_SECONDS = 30.0
DRAW_COST_SHARE = 100


@dataclass
class Curves:
    label: str
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr_steps: list[int] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)


def log_path(run: str | Path) -> Path:
    path = Path(run)
    return path / LOG_NAME if path.is_dir() else path


def read_runs(runs: list[str | Path]) -> list[Curves]:
    """Several runs, labelled by their folder names (by the paths as given where two names are alike)."""
    names = [(log_path(run).parent if log_path(run).name == LOG_NAME else log_path(run)).resolve().name
             for run in runs]
    return [read_curves(run, name if names.count(name) == 1 else str(run)) for run, name in zip(runs, names)]


def read_curves(run: str | Path, label: str | None = None) -> Curves:
    """The logged points of one run (a run folder or a log.jsonl). A resumed run's log repeats the steps after
    its checkpoint: the later value of a step wins."""
    path = log_path(run)
    if label is None:
        label = (path.parent if path.name == LOG_NAME else path).resolve().name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AloeError(f"{run}: no {LOG_NAME} (give a training run folder or its {LOG_NAME})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AloeError(f"cannot read {path}: {exc}") from None
    loss: dict[int, float] = {}
    lr: dict[int, float] = {}
    evals: dict[int, float] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            step = int(entry["step"])
        except (ValueError, KeyError, TypeError):
            raise AloeError(f"{path}:{number}: not a log line (JSON with a step)") from None
        for name, into in (("loss", loss), ("lr", lr), ("eval_loss", evals)):
            value = entry.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                into[step] = float(value)
    if not loss and not evals:
        raise AloeError(f"{path}: no loss logged yet")
    curves = Curves(label)
    curves.steps, curves.loss = sorted(loss), [loss[s] for s in sorted(loss)]
    curves.lr_steps, curves.lr = sorted(lr), [lr[s] for s in sorted(lr)]
    curves.eval_steps, curves.eval_loss = sorted(evals), [evals[s] for s in sorted(evals)]
    return curves


def smoothed(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average, debiased; the weight grows with the number of points (LLaMA-Factory's rule)."""
    if not values:
        return []
    if weight is None:
        weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], 0.0
    for i, value in enumerate(values, 1):
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight ** i) if weight else value)
    return out


def draw_curves(runs: list[Curves], output: str | Path) -> Path:
    """Write the picture of `runs` to `output` (PNG, or any format matplotlib knows by suffix), atomically."""
    from aloe_cli.plotting import pyplot

    plt = pyplot()
    output = Path(output)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1.4],
                                         layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, run in enumerate(runs):
        colour = colours[index % len(colours)]
        name = f"{run.label}: " if len(runs) > 1 else ""
        if run.steps:
            if len(run.steps) > 1:
                top.plot(run.steps, run.loss, color=colour, alpha=0.3, linewidth=1,
                         label=None if name else "training loss")
                top.plot(run.steps, smoothed(run.loss), color=colour, linewidth=2,
                         label=f"{name}training loss (smoothed)")
            else:
                top.plot(run.steps, run.loss, "o", color=colour, label=f"{name}training loss")
        if run.eval_steps:
            top.plot(run.eval_steps, run.eval_loss, "s--", color=colour, markersize=5, linewidth=1,
                     label=f"{name}eval loss")
        if run.lr_steps:
            bottom.plot(run.lr_steps, run.lr, color=colour, linewidth=1.5, label=run.label)
    top.set_ylabel("loss")
    top.set_title(runs[0].label if len(runs) == 1 else f"{len(runs)} runs")
    top.grid(alpha=0.3)
    top.legend(loc="upper right", fontsize="small")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    bottom.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    temporary = output.with_name(f".{output.name}.tmp{output.suffix}")
    try:
        figure.savefig(temporary, dpi=100)
        temporary.replace(output)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise AloeError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        plt.close(figure)
    return output


def loss_curve_callback(output_dir: Path, note: Callable[[str], None]):
    """A TrainerCallback that keeps `output_dir/loss.png` in step with log.jsonl (the main process only)."""
    from transformers import TrainerCallback

    class LossCurve(TrainerCallback):
        def __init__(self):
            self.drawn_at = time.monotonic()  # the run's start stands for the last drawing until there is one
            self.wait = REDRAW_SECONDS
            self.enabled: bool | None = None  # known at the first drawing

        def _draw(self) -> None:
            started = time.monotonic()
            if self.enabled is None:
                self.enabled = _matplotlib_works()
                if not self.enabled:
                    note(f"aloe: note: no {CURVE_FILE} (it needs matplotlib: pip install 'aloe-cli[plot]')")
            if not self.enabled:
                return
            try:
                draw_curves([read_curves(output_dir, output_dir.resolve().name)], output_dir / CURVE_FILE)
            except AloeError:
                return  # nothing logged yet, or the folder cannot take it: training goes on
            self.drawn_at = time.monotonic()
            self.wait = max(REDRAW_SECONDS, DRAW_COST_SHARE * (self.drawn_at - started))

        def on_train_begin(self, args, state, control, **kwargs):
            self.drawn_at = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and time.monotonic() - self.drawn_at >= self.wait:
                self._draw()

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self._draw()

    return LossCurve()


def _matplotlib_works() -> bool:
    from aloe_cli.plotting import pyplot

    try:
        pyplot()
    except AloeError:
        return False
    return True
