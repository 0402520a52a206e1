"""The per-source thresholds file, and deciding after the whole distribution is known."""

from __future__ import annotations

import json
import os

import pytest

from aloe_cli.data.io import Item, RecordWriter
from aloe_cli.data.stage import Reject, RunConfig, Stage, run_stage
from aloe_cli.errors import AloeError, RecordError
from aloe_cli.filters.thresholds import (
    Bounds,
    Distribution,
    Limits,
    Percentile,
    check_value,
    load_thresholds,
    parse_thresholds,
    source_of,
)
from support import read_jsonl


def write(tmp_path, text, name="t.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_absolute_and_percentile_bounds_with_default_fallback_key_by_key(tmp_path):
    path = write(tmp_path, "default: {min: p2, max: p98}\nslake: {min: 1.5, max: 40}\n"
                           "vqa_rad: {max: p99.5}\npmc: {max: null}\n")
    t = load_thresholds(path, "perplexity")
    assert t.bounds_for("slake") == Bounds(1.5, 40.0)
    assert t.bounds_for("vqa_rad") == Bounds(Percentile(2), Percentile(99.5))  # min from default
    assert t.bounds_for("pmc") == Bounds(Percentile(2), None)  # an explicit null switches the bound off
    assert t.bounds_for("unlisted") == Bounds(Percentile(2), Percentile(98))
    assert t.needs_distribution()
    assert not load_thresholds(write(tmp_path, "a: {min: 1}\n", "abs.yaml"), "perplexity").needs_distribution()


def test_json_file_and_stage_sections(tmp_path):
    path = write(tmp_path, json.dumps({"perplexity": {"default": {"max": 50}}, "score": {"slake": {"min": 4}}}),
                 "t.json")
    assert load_thresholds(path, "perplexity").bounds_for("x") == Bounds(None, 50.0)
    score = load_thresholds(path, "score", allowed=("min",), default=Bounds(min=3.0))
    assert score.bounds_for("slake").min == 4.0 and score.bounds_for("other").min == 3.0


@pytest.mark.parametrize(("text", "message"), [
    ("slake: {min: abc}\n", "slake.min: expected a number or a percentile like p2, got 'abc'"),
    ("slake: {low: 1}\n", "slake: unknown key(s) low"),
    ("slake: {min: 5, max: 2}\n", "slake: min 5 is greater than max 2"),
    ("slake: {min: p101}\n", "percentile must be within p0..p100"),
    ("slake: [1, 2]\n", "slake: expected a mapping"),
    ("- just\n- a list\n", "expected a mapping of source"),
    ("slake: {min: 1\n", "not valid YAML/JSON"),
    ("slake: {min: .nan}\n", "must be a finite number"),
    ("default: {max: 10}\nslake: {min: 20}\n", "slake: min 20 is greater than max 10"),
])
def test_bad_files_are_one_line_errors_naming_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(AloeError) as error:
        load_thresholds(path, "perplexity")
    assert message in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_file_and_out_of_range_scores(tmp_path):
    with pytest.raises(AloeError, match="thresholds file not found"):
        load_thresholds(tmp_path / "nope.yaml", "perplexity")
    with pytest.raises(AloeError, match=r"7 is outside 1\.\.5"):
        parse_thresholds({"a": {"min": 7}}, "score", allowed=("min",), value_range=(1, 5))
    with pytest.raises(AloeError, match="unknown key"):
        parse_thresholds({"a": {"max": 4}}, "score", allowed=("min",))


def test_percentiles_resolve_per_source_from_the_completed_distribution():
    t = parse_thresholds({"default": {"min": "p10", "max": "p90"}, "b": {"min": 2.0}}, "perplexity")
    distribution = Distribution()
    for value in range(1, 101):
        distribution.add("a", float(value))
        distribution.add("b", float(value) * 10)
    with pytest.raises(RuntimeError, match="whole distribution"):
        t.resolve(distribution)
    distribution.complete = True
    resolved = t.resolve(distribution)
    assert resolved.limits_for("a") == Limits(pytest.approx(10.9), pytest.approx(90.1))
    assert resolved.limits_for("b") == Limits(2.0, pytest.approx(901.0))  # p90 of b's own values
    assert resolved.limits_for("empty") == Limits(None, None)  # no values, no percentile


def test_bounds_themselves_are_kept():
    limits = Limits(2.0, 5.0)
    assert [check_value(v, limits) for v in (1.9, 2.0, 5.0, 5.1)] == ["below", None, None, "above"]


def test_source_falls_back_to_the_input_name():
    assert source_of(Item({"source": "slake"}, "x:1", "data/a.jsonl")) == "slake"
    assert source_of(Item({}, "x:1", "data/vqa_rad.jsonl.gz")) == "vqa_rad"
    assert source_of(Item({}, "<stdin>:1", "<stdin>")) == "stdin"


class ValueStage(Stage):
    """A model-free stage: the value is in the record; rejects below the p50 of its source."""

    name = "toy"
    measure_first = True

    def __init__(self):
        self.distribution = Distribution()
        self.thresholds = parse_thresholds({"default": {"min": "p50"}}, "toy")
        self.annotated = 0
        self.events = []
        self.resolved = None

    def annotate(self, batch):
        self.events.append("annotate")
        for item in batch:
            if item.record.get("bad"):
                item.error = RecordError("bad_value", "this record is bad")
                continue
            self.annotated += 1
            item.record.setdefault("aloe", {})["toy"] = {"value": item.record["v"]}
            self.distribution.add(source_of(item), item.record["v"])

    def decide(self, item):
        self.events.append("decide")
        if self.resolved is None:
            self.resolved = self.thresholds.resolve(self.distribution)
        limits = self.resolved.limits_for(source_of(item))
        if check_value(item.record["aloe"]["toy"]["value"], limits):
            return Reject("low", "below p50")
        return None


def items(values, bad=()):
    return [Item({"id": str(i), "source": "s", "v": float(v), "bad": i in bad}, f"in:{i + 1}", "in")
            for i, v in enumerate(values)]


def run(stage, ready, config, tmp_path):
    with RecordWriter(tmp_path / "out.jsonl") as out, RecordWriter(tmp_path / "rej.jsonl") as rej:
        summary = run_stage(stage, ready, out, rej, config)
    return summary, read_jsonl(tmp_path / "out.jsonl"), read_jsonl(tmp_path / "rej.jsonl")


def test_a_measure_first_stage_is_annotated_whole_then_decided_in_input_order(tmp_path):
    stage = ValueStage()
    spool = tmp_path / "spool"
    spool.mkdir()
    config = RunConfig(batch_size=3, on_error="skip", spool_dir=str(spool))
    summary, kept, rejected = run(stage, items([5, 1, 9, 3, 7, 2, 8, 4], bad={2}), config, tmp_path)
    assert stage.events == ["annotate"] * 3 + ["decide"] * 7  # three batches measured before any decision
    assert stage.annotated == 7 and stage.distribution.complete
    assert [r["id"] for r in kept] == ["0", "4", "6", "7"]  # input order; values >= 4, the median of the seven
    assert {r["aloe"]["reject"]["reason"] for r in rejected} == {"low", "bad_value"}
    assert (summary.read, summary.kept, summary.rejected) == (8, 4, 4)
    assert summary.inputs["in"].read == 8
    assert list(spool.iterdir()) == []  # the spool is removed


def test_a_streaming_stage_cannot_use_percentiles():
    stage = ValueStage()
    stage.measure_first = False  # decides batch by batch: the distribution is not complete yet
    with pytest.raises(RuntimeError, match="whole distribution"):
        run_stage(stage, items([1, 2, 3]), None, None, RunConfig(batch_size=2))


def test_a_measure_first_stage_fails_fast_like_the_runner(tmp_path):
    stage = ValueStage()
    with pytest.raises(RecordError, match="in:2: this record is bad"):
        run_stage(stage, items([1, 2, 3], bad={1}), None, None, RunConfig(batch_size=8, spool_dir=str(tmp_path)))
    assert not os.listdir(tmp_path)
    unreadable = items([1, 2, 3])
    unreadable[1] = Item(None, "in:2", "in", error=RecordError("invalid_json", "invalid JSON"), raw="{")
    stage = ValueStage()
    with pytest.raises(RecordError, match="in:2: invalid JSON"):
        run_stage(stage, unreadable, None, None, RunConfig(batch_size=8, spool_dir=str(tmp_path)))
    assert stage.annotated == 0  # a record the reader could not parse stops the run before any work
    assert not os.listdir(tmp_path)
