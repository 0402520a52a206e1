"""The whole `aloe eval` run: a request -> backends -> every model on every benchmark -> tables.

    run_evaluation(request, report)       # report: what the run tells people (log lines, progress, scores)
    rescore_predictions(paths, output, on_error)
    results_table(folder)

Everything is checked before any model is loaded or item asked: names that would share a folder, outputs
that are inputs, folders that cannot be written, local model folders. Backends are built on first use (a
run answered entirely from `--cache` loads no model); one response cache serves every model and the judge.
lm-evaluation-harness scores join the same `scores.json` and tables. An interrupted run (Ctrl-C, SIGTERM)
keeps the benchmarks it finished, and the exception it re-raises says what is kept.
This module never prints: what people read goes through `report`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from aloe_cli.errors import AloeError, Terminated, UsageError
from aloe_cli.modeling.backends.factory import BackendConfig, LazyBackend
from aloe_cli.perturb.names import EVAL_NAMES

TABLES = ("results.md", "results.csv")


@dataclass
class EvalRequest:
    models: list[str]
    benchmarks: list[str]
    output: Path
    perturb: str | None
    limit: int | None
    max_new_tokens: int
    on_error: str
    image_root: Path | None
    lm_eval_tasks: str | None
    lm_eval_include: Path | None
    cache: Path | None
    backend: BackendConfig  # model filled in per --model
    judge: str | None
    judge_backend: BackendConfig
    judge_parse_retries: int
    protocol: str = "vlmevalkit"  # whose prompt is sent (both protocols are always scored)
    judge_vision: bool | None = None  # None: decided from the judge (evaluation.judge.judge_vision)
    robustness_columns: str | tuple = "published"  # the adversarial table's columns (results.robustness_columns)


class EvalReport(Protocol):
    """What a run tells people; the command prints it."""

    def log(self, message: str) -> None: ...

    def progress(self, label: str, name: str, total: int, stage) -> AbstractContextManager:
        """A context manager whose value has advance(n), for one benchmark of one model."""

    def benchmark_done(self, label: str, run) -> None:
        """One benchmark's files are written (`evaluate.BenchmarkRun`)."""

    def scores(self, label: str, scores: dict[str, dict]) -> None:
        """Scores of one model by benchmark (lm-eval tasks, a rescore)."""


def parse_perturbations(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    kinds = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    unknown = [kind for kind in kinds if kind not in EVAL_NAMES]
    if unknown:
        raise UsageError(f"unknown perturbation(s) {', '.join(unknown)} "
                         f"(choose from {','.join(EVAL_NAMES)})", "--perturb")
    return kinds


def model_label(text: str) -> tuple[str, str]:
    """(label, model) from NAME=MODEL or MODEL (label: the Hub id, or a local folder's name)."""
    name, sep, reference = text.partition("=")
    if sep and name and "/" not in name and reference:
        return name, reference
    path = Path(text).expanduser()
    return (path.resolve().name if path.exists() else text), text


def results_table(folder: Path, robustness_columns: str | tuple = "published") -> str:
    """The tables of a results folder, from its saved scores (markdown)."""
    from aloe_cli.evaluation.results import collect_scores, render_markdown

    return render_markdown(collect_scores(folder), robustness_columns)


# ----------------------------------------------------------------------------- a run


def run_evaluation(request: EvalRequest, report: EvalReport) -> None:
    from aloe_cli.data.io import StreamCopies
    from aloe_cli.data.writing import folders_made
    from aloe_cli.evaluation.benchmarks import parse_benchmark_spec
    from aloe_cli.evaluation.evaluate import EvalPlan
    from aloe_cli.modeling.backends import GenerationParams

    perturbations = parse_perturbations(request.perturb)
    if request.lm_eval_tasks:
        from aloe_cli.evaluation.lm_eval_tasks import parse_tasks, require_lm_eval

        parse_tasks(request.lm_eval_tasks)
        require_lm_eval()
        if request.backend.kind != "hf":
            raise AloeError("--lm-eval-tasks scores a local model's likelihoods: use it with --backend hf")
    specs = [parse_benchmark_spec(text) for text in request.benchmarks]
    _refuse_shared_names("--benchmark", [spec.name for spec in specs], "NAME=FILE")
    _refuse_shared_names("--model", [model_label(text)[0] for text in request.models], "NAME=MODEL")
    _check_outputs(request, specs)
    for text in request.models:
        _check_model(model_label(text)[1], request.backend)
    if request.judge:
        _check_model(model_label(request.judge)[1], request.judge_backend, "judge-")
    finished: list[str] = []
    try:
        with folders_made() as make:
            make(request.output)
            streams = StreamCopies(request.output, prefix=".aloe-eval-stdin-")  # read once, asked per model
            plan = EvalPlan(benchmarks=specs, output=request.output, params=GenerationParams(
                max_new_tokens=request.max_new_tokens), batch_size=request.backend.items_at_once,
                perturbations=perturbations, limit=request.limit, on_error=request.on_error,
                protocol=request.protocol, image_root=request.image_root, streams=streams, make_folder=make,
                robustness_columns=request.robustness_columns)
            try:
                _evaluate_models(request, plan, report, finished)
            finally:
                streams.close()
    except (Terminated, KeyboardInterrupt) as stop:
        stop.outcome = _what_is_kept(request, finished)
        raise


def _refuse_shared_names(option: str, names: list[str], form: str) -> None:
    """Two benchmarks (or models) with one name would write one folder: a usage error."""
    shared = sorted({name for name in names if names.count(name) > 1})
    if shared:
        raise UsageError(f"two of them share the name {', '.join(shared)}; name them with {form}", option)


def _check_outputs(request: EvalRequest, specs) -> None:
    """Every file the run will write, checked before any model is checked or loaded: one that is also a
    benchmark or another output (exit 2), a results folder that cannot be (exit 1), a cache that cannot be
    written (exit 1)."""
    from aloe_cli.data.destinations import Named, check_conflicts, check_folder, check_writable
    from aloe_cli.evaluation.results import PREDICTIONS_FILE, SCORES_FILE, folder_name

    out = request.output
    outputs = [Named("-o", str(out / name)) for name in TABLES]
    for text in request.models:
        model_dir = out / folder_name(model_label(text)[0])
        outputs.append(Named("-o", str(model_dir / SCORES_FILE)))
        outputs += [Named("-o", str(model_dir / spec.name / PREDICTIONS_FILE)) for spec in specs]
    if request.cache is not None:
        outputs.append(Named("--cache", str(request.cache)))
    check_conflicts([Named("--benchmark", spec.path) for spec in specs], outputs)
    check_folder(Named("-o", str(out)))
    if request.cache is not None:
        check_writable(Named("--cache", str(request.cache)))


def _check_model(reference: str, config: BackendConfig, prefix: str = "") -> None:
    """Before any work: a local model folder is there with a chat template, a Hub id can be loaded, a server
    can be reached (`factory.check_backend`)."""
    from aloe_cli.modeling.backends.factory import check_backend

    check_backend(replace(config, model=reference), prefix)
    if config.kind == "hf":
        from aloe_cli.evaluation.inference import check_chat_template

        check_chat_template(reference)


def _evaluate_models(request: EvalRequest, plan, report: EvalReport, finished: list[str]) -> None:
    from aloe_cli.evaluation.evaluate import evaluate_model

    cache = _open_cache(request.cache, report)
    judge = _judge(request, cache, report)
    perturbers = _perturbers(plan.perturbations)
    try:
        for text in request.models:
            label, reference = model_label(text)
            config = replace(request.backend, model=reference)
            backend = _lazy_backend(config, f"aloe eval: {label}:", cache, report)

            def on_run(run, label=label) -> None:
                finished.append(f"{label}/{run.name}")
                report.benchmark_done(label, run)

            try:
                evaluate_model(label, backend, plan, judge=judge, perturbers=perturbers, progress=report.progress,
                               info={"model_reference": reference, "backend": config.kind},
                               cache_tag=f"{config.kind}:{reference}", keyed=cache is not None, on_run=on_run)
                if request.lm_eval_tasks:
                    _lm_eval(label, reference, backend, request, plan.make_folder, report)
            finally:
                backend.close_if_open()
    finally:
        if judge is not None:
            judge.backend.close_if_open()
        if cache is not None:
            cache.close()


def _what_is_kept(request: EvalRequest, finished: list[str]) -> str | None:
    """What an interrupted run leaves, for the closing line (None: nothing, the usual words)."""
    parts = []
    if finished:
        parts.append(f"the predictions and scores of {len(finished)} finished benchmark run(s) are kept in "
                     f"{request.output} ({', '.join(finished)}); the benchmark under way left nothing")
    if request.cache is not None:
        parts.append(f"the replies received so far are kept in --cache {request.cache}: a rerun asks only for "
                     "the rest")
    elif finished:
        parts.append("a rerun evaluates everything again (give --cache to reuse replies)")
    return "; ".join(parts) or None


def _open_cache(path: Path | None, report: EvalReport):
    if path is None:
        return None
    from aloe_cli.modeling.backends.cache import ResponseCache

    cache = ResponseCache(path)
    report.log(f"aloe eval: {len(cache)} cached reply(ies) in {path}"
               + (f" ({cache.bad_lines} unreadable line(s) skipped)" if cache.bad_lines else ""))
    return cache


def _lazy_backend(config: BackendConfig, announce: str, cache, report: EvalReport,
                  accept: Callable | None = None) -> LazyBackend:
    """The backend, built on first use, behind the shared response cache when there is one."""
    from aloe_cli.modeling.backends.factory import build_backend

    def build():
        backend = build_backend(config, on_ready=lambda description: report.log(f"{announce} {description}"))
        if cache is None:
            return backend
        from aloe_cli.modeling.backends.cache import CachedBackend

        return _KeepCacheOpen(CachedBackend(backend, cache, accept=accept))

    return LazyBackend(build)


class _KeepCacheOpen:
    """A cached backend whose close leaves the shared cache file open for the next model and the judge."""

    def __init__(self, cached) -> None:
        self.cached = cached
        self.name = cached.name

    def generate(self, requests, params, on_done) -> None:
        self.cached.generate(requests, params, on_done)

    @property
    def loaded(self):
        return self.cached.backend.loaded

    def close(self) -> None:
        self.cached.backend.close()


def _judge(request: EvalRequest, cache, report: EvalReport):
    if request.judge is None:
        return None
    from aloe_cli.evaluation.judge import OpenJudge, judge_vision, verdict_parses

    _, reference = model_label(request.judge)
    config = replace(request.judge_backend, model=reference)
    backend = _lazy_backend(config, "aloe eval: judge:", cache, report, accept=verdict_parses)
    return OpenJudge(backend, f"{config.kind}:{reference}", parse_retries=request.judge_parse_retries,
                     keyed=cache is not None, vision=judge_vision(config.kind, reference, request.judge_vision,
                                                                  trust_remote_code=config.trust_remote_code))


def _perturbers(perturbations: tuple[str, ...]):
    from aloe_cli.evaluation.runner import make_perturber

    return make_perturber if perturbations else None


def _lm_eval(label: str, reference: str, backend: LazyBackend, request: EvalRequest, make_folder,
             report: EvalReport) -> None:
    """lm-evaluation-harness tasks on the model the hf backend holds (loaded on first use); their scores
    join the model's scores.json and the tables."""
    from aloe_cli.evaluation.lm_eval_tasks import parse_tasks, run_lm_eval
    from aloe_cli.evaluation.results import folder_name, save_scores, write_tables

    tasks = parse_tasks(request.lm_eval_tasks)
    loaded = backend().loaded
    report.log(f"aloe eval: {label} on lm-eval task(s) {', '.join(tasks)}")
    scores = run_lm_eval(loaded.model, getattr(loaded.processor, "tokenizer", loaded.processor), tasks,
                         include_path=request.lm_eval_include, limit=request.limit,
                         batch_size=request.backend.batch_size)
    save_scores(make_folder(request.output / folder_name(label)), label, scores,
                {"model_reference": reference, "backend": "hf"})
    write_tables(request.output, request.robustness_columns)
    report.scores(label, scores)


# ----------------------------------------------------------------------------- --rescore


@dataclass
class Rescored:
    summary: object  # the stage runner's summary (read = written + rejected)
    label: str
    scores: dict[str, dict]
    changed: int  # lines whose extracted answer or verdict changed
    folder: Path
    predictions: Path


def rescore_predictions(paths: list[str], output: Path | None, on_error: str) -> Rescored:
    """Re-extract and re-score saved predictions (no model) into `output` (default: beside the first, in
    `rescored/`): predictions, scores and tables."""
    import os

    from aloe_cli.data.destinations import Named, check_conflicts, check_folder
    from aloe_cli.data.io import RecordWriter
    from aloe_cli.data.stage import RunConfig, run_stage
    from aloe_cli.data.writing import folders_made
    from aloe_cli.evaluation.rescore import RescoreStage, prediction_items
    from aloe_cli.evaluation.results import PREDICTIONS_FILE, SCORES_FILE, save_scores, write_tables

    folder = Path(output) if output is not None else Path(paths[0]).parent / "rescored"
    target = folder / PREDICTIONS_FILE
    # Before anything is read or made: an output that is one of the inputs (exit 2), a missing input, a folder
    # that cannot be written (exit 1).
    check_conflicts([Named("--rescore", path) for path in paths],
                    [Named("-o", str(folder / name)) for name in (PREDICTIONS_FILE, SCORES_FILE, *TABLES)])
    for path in paths:
        if not os.path.exists(path):
            raise AloeError(f"predictions file not found: {path}")
    check_folder(Named("-o", str(folder)))
    stage = RescoreStage()
    with folders_made() as make:
        make(folder)
        with RecordWriter(target) as writer:
            summary = run_stage(stage, prediction_items(paths), writer, None, RunConfig(on_error=on_error))
        label = next(iter(stage.models)) if len(stage.models) == 1 else "rescored"
        save_scores(folder, label, stage.scores(), {"rescored_from": [str(p) for p in paths]})
        write_tables(folder)
    return Rescored(summary, label, stage.scores(), stage.changed, folder, target)


__all__ = ["TABLES", "EvalReport", "EvalRequest", "Rescored", "model_label",
           "parse_perturbations", "rescore_predictions", "results_table", "run_evaluation"]
