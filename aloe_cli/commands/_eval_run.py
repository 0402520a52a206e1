"""What `aloe eval` does with its options: build backends, run the core, report on stderr."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from aloe_cli import console
from aloe_cli.errors import AloeError, Terminated, UsageError
from aloe_cli.modeling.backends.factory import BackendConfig

PERTURBATION_CHOICES = ("base", "cap", "pmt", "syc", "leg")


@dataclass
class Request:
    models: list[str]
    benchmarks: list[str]
    output: Path
    perturb: str | None
    limit: int | None
    max_new_tokens: int
    batch_size: int
    on_error: str
    image_root: Path | None
    lm_eval_tasks: str | None
    lm_eval_include: Path | None
    cache: Path | None
    backend: BackendConfig  # model filled in per --model
    judge: str | None
    judge_backend: BackendConfig
    judge_parse_retries: int
    robustness_columns: str | tuple = "published"


def print_table(folder: Path, robustness_columns: str | tuple = "published") -> None:
    from aloe_cli.evaluation.results import collect_scores, render_markdown

    print(render_markdown(collect_scores(folder), robustness_columns), end="")


def rescore(paths: list[str], output: Path | None, on_error: str) -> None:
    import os

    from aloe_cli.commands._common import print_summary
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
    print_summary(summary.to_dict())
    console.log(f"  {stage.changed} line(s) changed extracted/correct; wrote {target}, "
                f"{folder / 'scores.json'}, {folder / 'results.md'}")
    _print_scores(label, stage.scores())


def parse_perturbations(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    kinds = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    unknown = [kind for kind in kinds if kind not in PERTURBATION_CHOICES]
    if unknown:
        raise UsageError(f"unknown perturbation(s) {', '.join(unknown)} "
                         f"(choose from {','.join(PERTURBATION_CHOICES)})", "--perturb")
    return kinds


def model_label(text: str) -> tuple[str, str]:
    """(label, model) from NAME=MODEL or MODEL (label: the Hub id, or a local folder's name)."""
    name, sep, reference = text.partition("=")
    if sep and name and "/" not in name and reference:
        return name, reference
    path = Path(text).expanduser()
    return (path.resolve().name if path.exists() else text), text


def evaluate(request: Request) -> None:
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
    for text in request.models + ([request.judge] if request.judge else []):
        _check_local_model(model_label(text)[1], request.judge_backend if text == request.judge else request.backend)
    finished: list[str] = []
    try:
        with folders_made() as make:
            make(request.output)
            streams = StreamCopies(request.output, prefix=".aloe-eval-stdin-")  # read once, asked per model
            plan = EvalPlan(benchmarks=specs, output=request.output, params=GenerationParams(
                max_new_tokens=request.max_new_tokens), batch_size=_runner_batch(request),
                perturbations=perturbations, limit=request.limit, on_error=request.on_error,
                image_root=request.image_root, streams=streams, make_folder=make,
                robustness_columns=request.robustness_columns)
            try:
                _evaluate_models(request, plan, perturbations, finished)
            finally:
                streams.close()
    except (Terminated, KeyboardInterrupt) as stop:
        stop.outcome = _what_is_kept(request, finished)
        raise
    console.log(f"aloe eval: tables in {request.output / 'results.md'} and {request.output / 'results.csv'}")


TABLES = ("results.md", "results.csv")


def _refuse_shared_names(option: str, names: list[str], form: str) -> None:
    """Two benchmarks (or models) with one name would write one folder: a usage error."""
    shared = sorted({name for name in names if names.count(name) > 1})
    if shared:
        raise UsageError(f"two of them share the name {', '.join(shared)}; name them with {form}", option)


def _check_outputs(request: Request, specs) -> None:
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


def _evaluate_models(request: Request, plan, perturbations: tuple[str, ...], finished: list[str]) -> None:
    from aloe_cli.evaluation.evaluate import evaluate_model

    cache = _open_cache(request.cache)
    judge = _judge(request, cache)
    try:
        for text in request.models:
            label, reference = model_label(text)
            config = replace(request.backend, model=reference)
            backend = _lazy(lambda config=config, label=label: _backend(config, f"aloe eval: {label}:", cache))
            info = {"model_reference": reference, "backend": config.kind}
            try:
                evaluate_model(label, backend, plan, judge=judge, perturbers=_perturbers(perturbations),
                               progress=_progress, info=info, cache_tag=f"{config.kind}:{reference}",
                               keyed=cache is not None,
                               on_run=lambda run, label=label: (finished.append(f"{label}/{run.name}"),
                                                                _print_run(label, run)))
                if request.lm_eval_tasks:
                    _lm_eval(label, reference, backend, request, plan.make_folder)
            finally:
                backend.close_if_open()
    finally:
        if judge is not None:
            judge.backend.close_if_open()
        if cache is not None:
            cache.close()


def _what_is_kept(request: Request, finished: list[str]) -> str | None:
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


def _check_local_model(reference: str, config: BackendConfig) -> None:
    """A missing local model folder, or one without a chat template, stops the run before any work."""
    if config.kind != "hf":
        return
    from aloe_cli.evaluation.inference import check_chat_template
    from aloe_cli.modeling.loading import check_model_reference

    check_model_reference(reference)
    check_chat_template(reference)


def _runner_batch(request: Request) -> int:
    """Items handed to the backend at once: enough to keep every batch / connection busy."""
    if request.backend.kind == "openai":
        return max(request.batch_size, request.backend.concurrency * 4)
    return request.batch_size * 4


def _open_cache(path: Path | None):
    if path is None:
        return None
    from aloe_cli.modeling.backends.cache import ResponseCache

    cache = ResponseCache(path)
    console.log(f"aloe eval: {len(cache)} cached reply(ies) in {path}"
                + (f" ({cache.bad_lines} unreadable line(s) skipped)" if cache.bad_lines else ""))
    return cache


def _backend(config: BackendConfig, announce: str, cache, accept=None):
    from aloe_cli.commands._backend import open_backend

    backend = open_backend(config, announce)
    if cache is None:
        return backend
    from aloe_cli.modeling.backends.cache import CachedBackend

    return _KeepCacheOpen(CachedBackend(backend, cache, accept=accept))


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


class _lazy:
    """A backend created on first call (a fully cached run never loads a model), closed at the end."""

    def __init__(self, factory: Callable):
        self._factory = factory
        self._backend = None

    def __call__(self):
        if self._backend is None:
            self._backend = self._factory()
        return self._backend

    def close_if_open(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


def _loaded_model(backend: _lazy, reference: str, request: Request):
    """The model the hf backend holds (loaded on first use)."""
    return backend().loaded


def _judge(request: Request, cache):
    if request.judge is None:
        return None
    from aloe_cli.evaluation.judge import OpenJudge, verdict_parses

    _, reference = model_label(request.judge)
    config = replace(request.judge_backend, model=reference)
    backend = _lazy(lambda: _backend(config, "aloe eval: judge:", cache, accept=verdict_parses))
    return OpenJudge(backend, f"{config.kind}:{reference}", parse_retries=request.judge_parse_retries,
                     keyed=cache is not None)


def _perturbers(perturbations: tuple[str, ...]):
    from aloe_cli.evaluation.runner import make_perturber

    return make_perturber if perturbations else None


def _lm_eval(label: str, reference: str, backend: _lazy, request: Request, make_folder) -> None:
    from aloe_cli.evaluation.lm_eval_tasks import parse_tasks, run_lm_eval
    from aloe_cli.evaluation.results import folder_name, save_scores, write_tables

    tasks = parse_tasks(request.lm_eval_tasks)
    loaded = _loaded_model(backend, reference, request)
    console.log(f"aloe eval: {label} on lm-eval task(s) {', '.join(tasks)}")
    scores = run_lm_eval(loaded.model, getattr(loaded.processor, "tokenizer", loaded.processor), tasks,
                         include_path=request.lm_eval_include, limit=request.limit, batch_size=request.batch_size)
    save_scores(make_folder(request.output / folder_name(label)), label, scores,
                {"model_reference": reference, "backend": "hf"})
    write_tables(request.output, request.robustness_columns)
    _print_scores(label, scores)


class _ProgressLine:
    """Items done, items/s and running accuracy, on stderr every few seconds and at the end."""

    def __init__(self, label: str, name: str, total: int, stage) -> None:
        self.label, self.name, self.total, self.stage = label, name, total, stage
        self.done = 0
        self.start = self.last = time.perf_counter()

    def __enter__(self):
        return self

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= 5.0 or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            accuracy = self.stage.tally.accuracy
            console.log(f"aloe eval: {self.label} on {self.name}: {self.done}/{self.total} items, {rate:.1f} items/s"
                        + (f", accuracy {accuracy:.1f}%" if accuracy is not None else ""))

    def __exit__(self, *exc) -> None:
        return None


def _progress(label: str, name: str, total: int, stage) -> _ProgressLine:
    return _ProgressLine(label, name, total, stage)


def _print_run(label: str, run) -> None:
    skipped = sum(run.skipped.values())
    console.log(f"  {run.name}: {run.read} read = {run.written} written + {skipped} skipped"
                + (" (" + ", ".join(f"{k}={v}" for k, v in run.skipped.items()) + ")" if skipped else "")
                + (f"; {run.lines} prediction lines" if run.lines != run.written else ""))
    _print_scores(label, {run.name: run.scores})


def _print_scores(label: str, scores: dict[str, dict]) -> None:
    rows = []
    for name, entry in scores.items():
        rows.append([name, entry.get("items", 0), _fmt(entry.get("accuracy")),
                     _fmt(entry.get("pairs", {}).get("accuracy")) if "pairs" in entry else "-",
                     entry.get("unanswered", 0), entry.get("unjudged", 0)])
        for kind, values in entry.get("perturbations", {}).items():
            if kind != "base":
                rows.append([f"  {kind}", values["items"], _fmt(values["accuracy"]), "-", "-", "-"])
    console.print_table(f"aloe eval: {label}", ["benchmark", "items", "accuracy", "paired", "unanswered",
                                                 "unjudged"], rows)
    unjudged = sum(entry.get("unjudged", 0) for entry in scores.values())
    if unjudged:
        console.warn(f"{unjudged} open-ended item(s) have no judge verdict (no --judge, or unparseable after "
                     "retries): they are left out of the accuracy, listed with correct=null")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"
