"""`aloe eval --rescore`: re-extract and re-score saved predictions without any model.

Reads prediction lines (ours, edited by hand, or written by another tool in the same schema), recomputes
both verdicts from `prediction` with the current rules (`extracted`/`correct` by VLMEvalKit's, on the line's
`vlmevalkit` fields when it has them; `extracted_aloe`/`correct_aloe`/`rule` by aloe's; open items keep
their judge grade),
and writes a new predictions file, the scores and the tables under the output folder. Lines that cannot
be read are errors naming the file, line and field, or counted skips with `--on-error skip`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Iterator

from aloe_cli.data.io import Item, read_file
from aloe_cli.data.stage import Stage
from aloe_cli.errors import AloeError, RecordError
from aloe_cli.evaluation.scoring import benchmark_scores, rescore_line

VERDICT_FIELDS = ("extracted", "correct", "extracted_aloe", "correct_aloe")


def prediction_items(paths: Iterable[str]) -> Iterator[Item]:
    """Prediction lines as items whose record is the line itself (not a converted chat record)."""
    for path in paths:
        if not os.path.exists(path):
            raise AloeError(f"predictions file not found: {path}")
        for item in read_file(path):
            if isinstance(item.raw, dict):
                item.record, item.error = item.raw, None
            yield item


class RescoreStage(Stage):
    name = "rescore"

    def __init__(self) -> None:
        self.lines_by_benchmark: dict[str, list[dict]] = defaultdict(list)
        self.changed = 0
        self.models: set[str] = set()

    def annotate(self, batch: list[Item]) -> None:
        for item in batch:
            try:
                line = rescore_line(item.record)
            except RecordError as error:
                item.error = error.located(item.where)
                continue
            old = item.record
            if any(old.get(key) != line.get(key) for key in VERDICT_FIELDS):
                self.changed += 1
            item.record = line
            self.lines_by_benchmark[str(line["benchmark"])].append(line)
            if line.get("model"):
                self.models.add(str(line["model"]))

    def scores(self) -> dict[str, dict]:
        return {name: benchmark_scores(lines) for name, lines in self.lines_by_benchmark.items()}

    def summary(self) -> dict:
        return {"changed": self.changed, "benchmarks": sorted(self.lines_by_benchmark)}


__all__ = ["RescoreStage", "prediction_items"]
