import pytest

from aloe_cli.data.io import Item
from aloe_cli.data.stage import Reject, RunConfig, Shard, Stage, run_stage
from aloe_cli.errors import AloeError, RecordError
from support import chat


class ListWriter:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


class EvenLengthFilter(Stage):
    """Rejects answers of odd length; fails records whose question is 'boom'."""

    name = "toy"

    def __init__(self):
        self.batches = []

    def annotate(self, batch):
        self.batches.append(len(batch))
        for item in batch:
            question = item.record["messages"][0]["content"][-1]["text"]
            if question == "boom":
                item.error = RecordError("toy_failure", "cannot annotate", where=item.where)
            else:
                item.record.setdefault("aloe", {})["toy"] = {"len": len(question)}

    def decide(self, item):
        return Reject("odd_length", "odd") if item.record["aloe"]["toy"]["len"] % 2 else None


def items(questions, input_name="in.jsonl"):
    return [Item(chat(q, "a", id=str(i)), f"{input_name}:{i + 1}", input_name) for i, q in enumerate(questions)]


def test_counts_order_and_rejects():
    out, rejects = ListWriter(), ListWriter()
    batch = items(["aa", "b", "cccc", "ddd", "ee"])
    summary = run_stage(EvenLengthFilter(), batch, out, rejects, RunConfig(batch_size=2))
    assert [r["id"] for r in out.records] == ["0", "2", "4"]
    assert [r["aloe"]["reject"]["reason"] for r in rejects.records] == ["odd_length", "odd_length"]
    assert rejects.records[0]["aloe"]["reject"]["stage"] == "toy"
    assert (summary.read, summary.kept, summary.rejected) == (5, 3, 2)
    assert summary.reasons == {"odd_length": 2}
    assert vars(summary.inputs["in.jsonl"]) == {"read": 5, "kept": 3, "rejected": 2}


def test_keep_all_flags_instead_of_dropping():
    out = ListWriter()
    summary = run_stage(EvenLengthFilter(), items(["aa", "b"]), out, None, RunConfig(keep_all=True))
    assert len(out.records) == 2 and summary.flagged == 1 and summary.rejected == 0
    assert out.records[1]["aloe"]["toy"]["flag"]["reason"] == "odd_length"


def test_record_errors_fail_or_skip():
    bad = items(["aa", "boom", "cc"])
    with pytest.raises(RecordError, match="in.jsonl:2"):
        run_stage(EvenLengthFilter(), bad, ListWriter(), None, RunConfig())
    out, rejects = ListWriter(), ListWriter()
    parse_error = Item(None, "in.jsonl:9", "in.jsonl", error=RecordError("invalid_json", "bad"), raw="{oops")
    summary = run_stage(EvenLengthFilter(), items(["aa", "boom", "cc"]) + [parse_error], out, rejects,
                        RunConfig(on_error="skip"))
    assert [r["aloe"]["reject"]["reason"] for r in rejects.records] == ["toy_failure", "invalid_json"]
    assert rejects.records[1]["raw"] == "{oops"
    assert summary.read == summary.kept + summary.rejected == 4


class Copies(Stage):
    """1 -> N: each kept record is written `n` times (what a perturbation stage does); rejects 'drop'."""

    name = "copies"

    def __init__(self, n):
        self.n = n
        self.settled_log = []

    def decide(self, item):
        return Reject("dropped", "asked to") if item.record["messages"][0]["content"][-1]["text"] == "drop" else None

    def expand(self, item):
        if item.record["messages"][0]["content"][-1]["text"] == "unexpandable":
            raise RecordError("cannot_expand", "nothing to perturb", field="messages")
        return [{**item.record, "copy": k} for k in range(self.n)]

    def settled(self, item, kept):
        self.settled_log.append((item.record["id"] if item.record else item.where, kept))


def test_a_stage_may_emit_several_records_per_input():
    out, rejects = ListWriter(), ListWriter()
    stage = Copies(3)
    summary = run_stage(stage, items(["a", "drop", "b", "unexpandable"]), out, rejects,
                        RunConfig(batch_size=2, on_error="skip"))
    assert [(r["id"], r["copy"]) for r in out.records] == [("0", 0), ("0", 1), ("0", 2), ("2", 0), ("2", 1), ("2", 2)]
    assert (summary.read, summary.kept, summary.rejected, summary.emitted) == (4, 2, 2, 6)
    assert summary.reasons == {"dropped": 1, "cannot_expand": 1}
    assert [r["aloe"]["reject"]["where"] for r in rejects.records] == ["in.jsonl:2", "in.jsonl:4"]
    assert stage.settled_log == [("0", True), ("1", False), ("2", True), ("3", False)]  # every input, in order
    assert summary.to_dict()["emitted"] == 6 and summary.to_dict()["read"] == 4
    with pytest.raises(RecordError, match="in.jsonl:2: field 'messages': nothing to perturb"):
        run_stage(Copies(2), items(["a", "unexpandable"]), ListWriter(), None, RunConfig())


def test_a_counting_pass_writes_nothing_and_uses_the_stage_batch():
    class Counting(EvenLengthFilter):
        def runner_batch_size(self):
            return 3

    stage = Counting()
    summary = run_stage(stage, items(["aa", "b", "cc", "dd", "e"]), None, None, RunConfig(on_error="skip"))
    assert stage.batches == [3, 2]
    assert (summary.read, summary.kept, summary.rejected, summary.emitted) == (5, 3, 2, 0)


def test_an_overlapping_stage_sees_every_batch_once_in_order():
    class Overlapping(EvenLengthFilter):
        def annotate_stream(self, batches):
            pending = None  # hands back batch k only once batch k + 1 has been annotated
            for batch in batches:
                self.annotate(batch)
                if pending is not None:
                    yield pending
                pending = batch
            if pending is not None:
                yield pending

    out = ListWriter()
    summary = run_stage(Overlapping(), items(["aa", "b", "cc", "dddd", "ee"]), out, None, RunConfig(batch_size=2))
    assert [r["id"] for r in out.records] == ["0", "2", "3", "4"] and summary.read == 5


def test_shard_parsing_and_slurm_environment(monkeypatch):
    assert Shard.parse("3/8") == Shard(3, 8)
    for bad in ("8/8", "x/2", "1", "-1/2"):
        with pytest.raises(AloeError):
            Shard.parse(bad)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    assert Shard.from_env() == Shard(2, 4)
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    with pytest.raises(AloeError, match="SLURM_ARRAY_TASK_COUNT is not"):
        Shard.from_env()  # not a silent 0/1: every task would process everything
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert Shard.from_env() == Shard(0, 1)
