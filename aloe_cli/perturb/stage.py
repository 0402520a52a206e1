"""The perturbation stage: every input record becomes perturbed copies (1 -> N through `expand`).

Two ways to spread the kinds:

- `per_record=1` (the default, what adv-train wants): each input gets one kind,
  the one emitted least so far among those that apply to it, ties broken by a
  rotation seeded by `seed`, so the output is balanced across kinds (exactly,
  to within one, when every kind applies to every record);
- `per_record=None` (what eval wants): every kind that applies, in the order given.

`samples` caps how many records are emitted (per shard when sharded); inputs
after the cap are rejected as `sample_limit`. A kind that cannot apply to a
record (`cap` on a text-only record, `region` without a box) is skipped and
counted; a record no kind applies to, or with no wrong answer, is rejected
with the reason. Broken records (a missing image) are errors, as in every stage.

The wrong answers come from `picker`. Without one, the stage pools the
answers of the records it has seen so far (a batch's answers are pooled
before any of them is perturbed), which depends on the input order and the
shard: pass `WrongAnswerPicker(all records)` when shards must agree.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from aloe_cli.data.io import Item
from aloe_cli.data.stage import Reject, Stage
from aloe_cli.errors import RecordError
from aloe_cli.perturb.answers import WrongAnswerPicker
from aloe_cli.perturb.keys import record_rng
from aloe_cli.perturb.names import KINDS
from aloe_cli.perturb.record import perturb_record

# perturb_record's reasons for "this kind does not fit this record" (another kind may).
NOT_APPLICABLE = frozenset({"perturb_needs_image", "perturb_needs_box", "perturb_no_free_area"})
# Reasons no kind can fix: the record is rejected with them.
NOT_PERTURBABLE = frozenset({"perturb_no_wrong_answer", "perturb_no_answer", "perturb_needs_question"})


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """The kinds as a tuple; ValueError naming the bad one, a repeat, or an empty list."""
    kinds = tuple(kinds)
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"unknown perturbation {unknown[0]!r}; choose from {', '.join(KINDS)}")
    if not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"need one or more different perturbations, got {list(kinds)}")
    return kinds


class PerturbStage(Stage):
    """Emits perturbed copies of each input; see the module docstring."""

    name = "perturb"
    additive = ("kinds.*", "skipped.*.*")

    def __init__(self, kinds: Sequence[str] = KINDS, *, seed: int = 0, samples: int | None = None,
                 per_record: int | None = 1, picker: WrongAnswerPicker | None = None,
                 image_root: str | os.PathLike | None = None, bbox_format: str = "xyxy"):
        self.kinds = check_kinds(kinds)
        if per_record is not None and not 1 <= per_record <= len(self.kinds):
            raise ValueError(f"per_record must be between 1 and {len(self.kinds)} (or None for every kind)")
        if samples is not None and samples < 1:
            raise ValueError("samples must be positive")
        self.seed, self.samples, self.image_root, self.bbox_format = seed, samples, image_root, bbox_format
        self.per_record = len(self.kinds) if per_record is None else per_record
        self.picker = picker if picker is not None else WrongAnswerPicker()
        self._pool_as_we_go = picker is None
        rotation = list(self.kinds)
        record_rng(seed, "", "rotation").shuffle(rotation)
        self._rotation = {kind: i for i, kind in enumerate(rotation)}
        self.emitted: Counter = Counter()
        self.skipped: dict[str, Counter] = {kind: Counter() for kind in self.kinds}

    # -------------------------------------------------------------------- runner hooks

    def annotate(self, batch: list[Item]) -> None:
        if self._pool_as_we_go:
            for item in batch:
                self.picker.add(item.record)
        for item in batch:
            try:
                item.annotations[self.name] = self.perturb_item(item)
            except RecordError as error:
                item.error = error.located(item.where)

    def decide(self, item: Item) -> Reject | None:
        outcome = item.annotations.get(self.name)
        return outcome if isinstance(outcome, Reject) else None

    def expand(self, item: Item) -> list[dict]:
        outcome = item.annotations.get(self.name)
        # A rejected record kept by --keep-all passes through as it was.
        return [item.record] if isinstance(outcome, Reject) or outcome is None else outcome

    def summary(self) -> dict[str, Any]:
        """Records emitted per kind and kinds skipped per reason (the runner reports the total as `emitted`)."""
        return {"seed": self.seed, "samples": self.samples,
                "kinds": {kind: self.emitted[kind] for kind in self.kinds},
                "skipped": {kind: dict(sorted(reasons.items())) for kind, reasons in self.skipped.items() if reasons}}

    # -------------------------------------------------------------------- per item

    def perturb_item(self, item: Item) -> list[dict] | Reject:
        """The perturbed copies of one input, or why it has none; RecordError for a broken record.

        Call in input order: which kind a record gets depends on what was emitted before it.
        """
        if self._full():
            return Reject("sample_limit", f"{self.samples} samples already emitted")
        record = item.record
        try:
            wrong = self.picker.pick(record, seed=self.seed)
        except RecordError as error:
            if error.reason in NOT_PERTURBABLE:
                return Reject(error.reason, error.message)
            raise
        root = item.image_root if item.image_root is not None else self.image_root
        copies, reasons = [], []
        for kind in self._candidates():
            if len(copies) == self.per_record or self._full():
                break
            try:
                copies.append(perturb_record(record, kind, wrong, image_root=root, seed=self.seed,
                                             bbox_format=self.bbox_format))
            except RecordError as error:
                if error.reason in NOT_PERTURBABLE:
                    return Reject(error.reason, error.message)
                if error.reason not in NOT_APPLICABLE:
                    raise
                self.skipped[kind][error.reason] += 1
                reasons.append(f"{kind}: {error.reason}")
                continue
            self.emitted[kind] += 1
        if not copies:
            return Reject("perturb_not_applicable", "; ".join(reasons))
        return copies

    def _candidates(self) -> list[str]:
        if self.per_record == len(self.kinds):
            return list(self.kinds)
        return sorted(self.kinds, key=lambda kind: (self.emitted[kind], self._rotation[kind]))

    def _full(self) -> bool:
        return self.samples is not None and sum(self.emitted.values()) >= self.samples
