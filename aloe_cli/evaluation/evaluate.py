"""Evaluate one model on every benchmark: predictions, scores and tables in the results folder.

Each benchmark runs as a stage over its items (and their perturbed copies) on the shared stage runner,
writing `<output>/<model>/<benchmark>/predictions.jsonl`; the scores of every benchmark are merged into
`<output>/<model>/scores.json` and the tables of all models in the folder are rewritten.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from aloe_cli.data.io import RecordWriter, StreamCopies
from aloe_cli.data.preflight import check_items
from aloe_cli.data.stage import RunConfig, run_stage
from aloe_cli.errors import AloeError
from aloe_cli.evaluation.benchmarks import BenchmarkSpec, read_benchmark
from aloe_cli.evaluation.judge import OpenJudge
from aloe_cli.evaluation.results import PREDICTIONS_FILE, folder_name, save_scores, write_tables
from aloe_cli.evaluation.runner import EvalStage, Perturber
from aloe_cli.modeling.backends import GenerationBackend, GenerationParams


def _make(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class EvalPlan:
    benchmarks: list[BenchmarkSpec]
    output: Path
    params: GenerationParams = field(default_factory=lambda: GenerationParams(max_new_tokens=128))
    batch_size: int = 64  # items handed to the backend at once (it batches and sorts inside)
    perturbations: tuple[str, ...] = ()
    protocol: str = "vlmevalkit"  # whose prompt is sent (both verdicts are always scored)
    limit: int | None = None
    on_error: str = "fail"
    image_root: Path | None = None
    streams: StreamCopies | None = None  # benchmarks that can be read once only (FIFOs, stdin), copied once
    make_folder: Callable[[Path], Path] = _make  # creates a folder (and its parents) for the results
    robustness_columns: str | tuple = "published"  # the adversarial table's columns (results.robustness_columns)


@dataclass
class BenchmarkRun:
    name: str
    read: int
    written: int  # items whose lines were written
    lines: int  # prediction lines (one per item and perturbation)
    skipped: dict[str, int]
    scores: dict


# (model label, benchmark name, units, stage) -> a context manager whose value has advance(n): the console's
# progress for one benchmark (the runner's `ProgressFactory` is built from it below)
BenchmarkProgress = Callable[[str, str, int, EvalStage], AbstractContextManager]
# (benchmark items) -> the perturber for that benchmark (wrong answers come from its own items)
PerturberFactory = Callable[[list], Perturber]


def evaluate_model(label: str, backend: Callable[[], GenerationBackend], plan: EvalPlan, *,
                   judge: OpenJudge | None = None, perturbers: PerturberFactory | None = None,
                   progress: BenchmarkProgress | None = None, info: dict | None = None,
                   cache_tag: str = "", keyed: bool = False,
                   on_run: Callable[[BenchmarkRun], None] | None = None) -> list[BenchmarkRun]:
    """Every benchmark of `plan` on one model; `on_run` hears of each benchmark once its files are written.

    A benchmark's predictions and its entry in scores.json are complete or absent: an interrupted run keeps
    the benchmarks it finished, nothing of the one under way."""
    model_dir = Path(plan.output) / folder_name(label)
    runs = []
    for spec in plan.benchmarks:
        items = read_benchmark(spec, plan.image_root, plan.limit, streams=plan.streams)
        if plan.on_error == "fail":  # a bad item stops the run before any model is loaded
            bad = next((item for item in items if item.error is not None), None)
            if bad is not None:
                raise bad.error.located(bad.where)
            unresolved = check_items(items)  # image paths too, while no model is loaded yet
            if not unresolved.ok:
                raise AloeError(f"benchmark {spec.name}: {unresolved.message()}")
        perturber = perturbers([item for item in items if item.error is None]) if plan.perturbations else None
        stage = EvalStage(backend, label, plan.params, judge=judge, perturber=perturber,
                          perturbations=plan.perturbations, cache_tag=cache_tag, keyed=keyed,
                          protocol=plan.protocol, dataset=spec.vlmevalkit_dataset)
        target = plan.make_folder(model_dir / spec.name) / PREDICTIONS_FILE
        config = RunConfig(batch_size=plan.batch_size, on_error=plan.on_error)
        bar = _progress_factory(progress, label, spec.name, len(items), stage)
        with RecordWriter(target) as writer:
            summary = run_stage(stage, items, writer, None, config, progress=bar)
        scores = {**stage.scores(), "file": spec.path, "skipped": dict(sorted(summary.reasons.items())),
                  "published": spec.published, "vlmevalkit_name": spec.vlmevalkit_name,
                  "protocol": plan.protocol}
        run = BenchmarkRun(spec.name, summary.read, summary.kept, summary.emitted, scores["skipped"], scores)
        save_scores(model_dir, label, {spec.name: scores}, info)
        # after every benchmark: the tables always match the scores files
        write_tables(Path(plan.output), plan.robustness_columns)
        runs.append(run)
        if on_run is not None:
            on_run(run)
    return runs


def _progress_factory(factory: BenchmarkProgress | None, label: str, name: str, total: int, stage: EvalStage):
    """The runner's progress factory, showing this benchmark's figures."""
    if factory is None:
        return None
    return lambda description, count=None: factory(label, name, total, stage)


__all__ = ["BenchmarkRun", "EvalPlan", "evaluate_model"]
