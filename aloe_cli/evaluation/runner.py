"""The evaluation stage: ask the model every item (and every perturbed copy), extract, judge, score.

It runs on the shared stage runner (`aloe_cli.data.stage.run_stage`), one benchmark at a time, so
batching, `--on-error`, counting and progress work as in every other command. Each item is asked as it
is, then once per perturbation that applies to it (`cap` and `leg` need an image, `region` a box), and
expands (1 -> N) into one prediction line per question asked:

    {"id", "benchmark", "model", "kind", "question", "options", "answer", "prediction", "extracted",
     "correct", "extracted_aloe", "correct_aloe", "rule", "perturb", "category", "l2_category", "split",
     "task", "pair_id", "prompt", "protocol", "vlmevalkit"?, "scored_by"?, "judge"?}

Both verdicts are computed whatever the protocol (`aloe_cli.evaluation.scoring`); the protocol only
chooses the prompt. Open items are graded by the judge when there is one, else by exact match (not
judged), or by IoU when the answer is a box (`evaluation.open_answers`). A perturbation that does not apply
to an item is left out and counted in the scores (`not_perturbed`: kind -> reason -> items).

The model sees `eval_record(item, protocol)` (perturbed by `aloe_cli.perturb` when asked), through any
generation backend. A request that fails (a broken image, a server that gave up) or a perturbation that
breaks becomes the item's error: an item is complete in the output, or counted as skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from aloe_cli.data.io import Item
from aloe_cli.data.records import text_of
from aloe_cli.data.stage import Stage
from aloe_cli.errors import RecordError
from aloe_cli.evaluation.benchmarks import EvalItem
from aloe_cli.evaluation.judge import JudgeCase, OpenJudge
from aloe_cli.evaluation.open_answers import EXACT_MATCH, JUDGE, judge_reference, open_verdict
from aloe_cli.evaluation.prompts import eval_record, prompt_messages
from aloe_cli.evaluation.scoring import benchmark_scores, score_open, score_prediction
from aloe_cli.modeling.backends import Failure, GenerationBackend, GenerationParams, GenerationRequest
from aloe_cli.modeling.backends.cache import request_key
from aloe_cli.perturb.names import BASE

# (record, kind, item) -> the perturbed record; `Skipped` when the kind does not apply to the item,
# RecordError when the item is broken
Perturber = Callable[[dict, str, EvalItem], dict]


class Skipped(Exception):
    """A perturbation that does not apply to an item (its reason is counted, the item is asked without it)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def make_perturber(items: list[Item], seed: int = 0) -> Perturber:
    """Perturbations from `aloe_cli.perturb`; wrong answers come from the item's options, the opposite of
    yes/no, or another answer of the same benchmark.

    A kind that cannot apply to an item (`cap`/`leg` without an image, `region` without a box, no wrong answer
    to push) raises `Skipped`. `region` injects no answer: its `wrong_answer` is the region it moved."""
    from aloe_cli.perturb import WrongAnswerPicker, perturb_record
    from aloe_cli.perturb.stage import NOT_APPLICABLE, NOT_PERTURBABLE

    picker = WrongAnswerPicker(eval_record(item.annotations["eval_item"]) for item in items)

    def perturber(record: dict, kind: str, eval_item: EvalItem) -> dict:
        try:
            wrong = None if kind == "region" else picker.pick(record, seed=seed)
            return perturb_record(record, kind, wrong, image_root=eval_item.image_root, seed=seed)
        except RecordError as error:
            if error.reason in NOT_APPLICABLE | NOT_PERTURBABLE:
                raise Skipped(error.reason) from None
            raise
        except ValueError as exc:
            raise RecordError("perturb_failed", str(exc)) from None

    return perturber


@dataclass
class Tally:
    """Running figures of the unperturbed items, for progress lines."""

    done: int = 0
    scored: int = 0
    points: float = 0.0

    @property
    def accuracy(self) -> float | None:
        return 100.0 * self.points / self.scored if self.scored else None


@dataclass
class EvalStage(Stage):
    """One benchmark on one model; `lines` keeps every prediction line for the scores."""

    backend: Callable[[], GenerationBackend]  # returns the model's one backend (created on first call)
    model: str  # the label written on every line
    params: GenerationParams
    judge: OpenJudge | None = None
    perturber: Perturber | None = None
    perturbations: tuple[str, ...] = ()
    cache_tag: str = ""  # what identifies the model in cache keys (name + backend)
    keyed: bool = False  # give requests cache keys (when a response cache is in front of the backend)
    protocol: str = "vlmevalkit"  # whose prompt is sent: vlmevalkit or aloe (both verdicts are always scored)
    dataset: str | None = None  # the VLMEvalKit dataset name (None: the benchmark's name)
    lines: list[dict] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
    not_perturbed: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> why it did not apply -> items

    name = "eval"

    def annotate(self, batch: list[Item]) -> None:
        units: list[tuple[Item, str | None, dict]] = []  # (item, perturbation or None, the record asked)
        requests: list[GenerationRequest] = []
        for item in batch:
            try:
                item_units = [(item, kind, record) for kind, record in self._records(item)]
                item_requests = [self._request(item, record) for _, _, record in item_units]
            except RecordError as error:
                item.error = error.located(item.where)
                continue
            units.extend(item_units)
            requests.extend(item_requests)
        replies: dict[int, str] = {}

        def on_done(index: int, completion) -> None:
            item, kind, _ = units[index]
            if not isinstance(completion, Failure):
                replies[index] = completion.text
            elif item.error is None:
                suffix = f" (perturbation {kind})" if kind else ""
                item.error = RecordError(completion.reason, completion.message + suffix, where=item.where)

        if requests:
            self.backend().generate(requests, self.params, on_done)
        lines: dict[int, list[dict]] = {}
        to_judge: list[tuple[Item, dict]] = []
        for index, (item, kind, record) in enumerate(units):
            if item.error is None:
                line = self._line(item, kind, record, replies[index])
                lines.setdefault(id(item), []).append(line)
                if line.get("scored_by") == EXACT_MATCH:  # open, and not a box answer
                    to_judge.append((item, line))
        self._grade_open(to_judge)
        for item in batch:
            if item.error is None and id(item) in lines:
                item.annotations["lines"] = lines[id(item)]
                self.lines.extend(lines[id(item)])
                self._count(lines[id(item)][0])

    def expand(self, item: Item) -> list[dict]:
        """The item's prediction lines: unperturbed first, then one per perturbation."""
        return item.annotations["lines"]

    def _records(self, item: Item) -> list[tuple[str | None, dict]]:
        eval_item: EvalItem = item.annotations["eval_item"]
        record = eval_record(eval_item, self.protocol, self.dataset)
        kinds = [kind for kind in self.perturbations if kind != BASE]  # base is the plain run; others may not apply
        if kinds and self.perturber is None:
            raise RuntimeError("perturbations were asked for without a perturber")
        records: list[tuple[str | None, dict]] = [(None, record)]
        for kind in kinds:
            try:
                records.append((kind, self.perturber(record, kind, eval_item)))
            except Skipped as skipped:
                self.not_perturbed.setdefault(kind, {}).setdefault(skipped.reason, 0)
                self.not_perturbed[kind][skipped.reason] += 1
        return records

    def _line(self, item: Item, kind: str | None, record: dict, prediction: str) -> dict:
        eval_item: EvalItem = item.annotations["eval_item"]
        values = eval_item.fields()
        line = {"id": values.pop("id"), "benchmark": values.pop("benchmark"), "model": self.model,
                "kind": values.pop("kind"), "question": values.pop("question"), "options": values.pop("options"),
                "answer": values.pop("answer"), "prediction": prediction, "extracted": None, "correct": None,
                "extracted_aloe": None, "correct_aloe": None, "perturb": kind, **values,
                "prompt": text_of(prompt_messages(record)[-1]), "protocol": self.protocol}
        if kind is not None:
            line["wrong_answer"] = record.get("aloe", {}).get("perturb", {}).get("wrong_answer")
        fields = eval_item.vlmevalkit_fields()  # the options and answer VLMEvalKit's rules compare
        view = {"dataset": self.dataset or line["benchmark"], "answer": fields.answer}
        if line["kind"] == "open":  # exact match or box IoU until a judge grades it
            line.update(open_verdict(line["answer"], prediction))
            line["extracted_aloe"] = line["extracted"]
            theirs = score_open(prediction, view)
            if theirs is not None:  # MMMU: exact matching scores it; the judge grades it for aloe
                line.update(theirs, vlmevalkit=view)
        else:
            if line["kind"] == "mcq":
                view["options"] = dict(fields.options)
            line["vlmevalkit"] = view
            line.update(score_prediction(line["kind"], prediction, line["answer"], line["options"], view))
        return line

    def _grade_open(self, lines: list[tuple[Item, dict]]) -> None:
        """The judge grades open answers; it sees the item's own images, never a perturbed copy's. A judge that
        was asked and did not answer fails the item like the model's own failed request does (stop, or a counted
        skip with --on-error skip), never an "unjudged"."""
        if not lines or self.judge is None:
            return
        items = [item.annotations["eval_item"] for item, _ in lines]
        results = self.judge.grade([JudgeCase(line["question"], judge_reference(line["answer"]), line["prediction"],
                                              tuple(eval_item.images), eval_item.image_root)
                                    for (_, line), eval_item in zip(lines, items)])
        for (item, line), result in zip(lines, results):
            line["correct_aloe"], line["scored_by"] = result.score, JUDGE
            if "vlmevalkit" not in line:  # else VLMEvalKit's exact matching already gave its verdict
                line["correct"] = result.score
            line["judge"] = {"model": self.judge.name, **result.to_dict()}
            if result.request_failed and item.error is None:
                item.error = RecordError("judge_request_failed", result.error, where=item.where)

    def _count(self, line: dict) -> None:
        self.tally.done += 1
        correct = line["correct"]
        if correct is not None:
            self.tally.scored += 1
            self.tally.points += float(correct)

    def _request(self, item: Item, record: dict) -> GenerationRequest:
        messages, images = prompt_messages(record), list(record.get("images") or [])
        key = None
        if self.keyed:  # the model, the conversation, the image bytes, and how long the answer may be
            key = request_key(self.cache_tag or self.model, messages, images, item.image_root,
                              salt=f"max_new_tokens={self.params.max_new_tokens}")
        return GenerationRequest(messages=messages, images=images, image_root=item.image_root, key=key,
                                 id=str(record.get("id")))

    def scores(self) -> dict:
        scores = benchmark_scores(self.lines)
        if self.not_perturbed:
            scores["not_perturbed"] = self.not_perturbed
        return scores

    def summary(self) -> dict:
        return {"model": self.model, "accuracy": self.tally.accuracy}


__all__ = ["EvalStage", "Perturber", "Skipped", "Tally", "make_perturber"]
