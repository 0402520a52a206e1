"""What `aloe eval` shows on stderr while `aloe_cli.evaluation.run` does the work."""

from __future__ import annotations

from pathlib import Path

from aloe_cli import console


def evaluate(request) -> None:
    from aloe_cli.evaluation.run import run_evaluation

    run_evaluation(request, ConsoleReport())
    console.log(f"aloe eval: tables in {request.output / 'results.md'} and {request.output / 'results.csv'}")


def print_table(folder: Path, robustness_columns: str | tuple = "published") -> None:
    from aloe_cli.evaluation.run import results_table

    print(results_table(folder, robustness_columns), end="")


def rescore(paths: list[str], output: Path | None, on_error: str) -> None:
    from aloe_cli.commands._common import print_summary
    from aloe_cli.evaluation.run import rescore_predictions

    done = rescore_predictions(paths, output, on_error)
    print_summary(done.summary.to_dict())
    console.log(f"  {done.changed} line(s) changed extracted/correct; wrote {done.predictions}, "
                f"{done.folder / 'scores.json'}, {done.folder / 'results.md'}")
    print_scores(done.label, done.scores)


class ConsoleReport:
    """`evaluation.run.EvalReport` on stderr."""

    def log(self, message: str) -> None:
        console.log(message)

    def progress(self, label: str, name: str, total: int, stage) -> _BenchmarkBar:
        return _BenchmarkBar(label, name, total, stage)

    def benchmark_done(self, label: str, run) -> None:
        skipped = sum(run.skipped.values())
        console.log(f"  {run.name}: {run.read} read = {run.written} written + {skipped} skipped"
                    + (" (" + ", ".join(f"{k}={v}" for k, v in run.skipped.items()) + ")" if skipped else "")
                    + (f"; {run.lines} prediction lines" if run.lines != run.written else ""))
        print_scores(label, {run.name: run.scores})

    def scores(self, label: str, scores: dict[str, dict]) -> None:
        print_scores(label, scores)


class _BenchmarkBar:
    """The console's progress for one benchmark, with the running accuracy of the unperturbed items."""

    def __init__(self, label: str, name: str, total: int, stage) -> None:
        self._context = console.progress(f"aloe eval: {label} on {name}", total, unit="items")
        self._stage = stage

    def __enter__(self):
        self._bar = self._context.__enter__()
        return self

    def advance(self, n: int = 1) -> None:
        accuracy = self._stage.tally.accuracy
        self._bar.advance(n, accuracy=None if accuracy is None else f"{accuracy:.1f}%")

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


def print_scores(label: str, scores: dict[str, dict]) -> None:
    rows = []
    for name, entry in scores.items():
        rows.append([name, entry.get("items", 0), _fmt(entry.get("accuracy")), _fmt(entry.get("accuracy_aloe")),
                     _fmt(entry.get("pairs", {}).get("accuracy")) if "pairs" in entry else "-",
                     entry.get("unreadable", 0), entry.get("unanswered", 0), entry.get("unjudged", 0)])
        for kind, values in entry.get("perturbations", {}).items():
            if kind != "base":
                rows.append([f"  {kind}", values["items"], _fmt(values["accuracy"]),
                             _fmt(values.get("accuracy_aloe")), "-", "-", "-", "-"])
    console.print_table(f"aloe eval: {label}", ["benchmark", "items", "accuracy", "accuracy_aloe", "paired",
                                                 "unreadable", "unanswered", "unjudged"], rows)
    not_judged = sum(entry.get("scored_by", {}).get("exact_match", 0) for entry in scores.values())
    if not_judged:
        console.warn(f"{not_judged} open-ended item(s) not judged (no --judge): scored by exact match after "
                     "normalisation (VLMEvalKit's VQA score in accuracy, the exact match in accuracy_aloe)")
    unjudged = sum(entry.get("unjudged", 0) for entry in scores.values())
    if unjudged:
        console.warn(f"{unjudged} open-ended item(s) have no judge verdict (unparseable after retries, or the "
                     "request failed): they are left out of the accuracy, listed with correct=null")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"
