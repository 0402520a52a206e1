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


def test_shards_partition_the_input():
    questions = [c * 2 for c in "abcdefghij"]
    seen = []
    for k in range(3):
        out = ListWriter()
        run_stage(EvenLengthFilter(), items(questions), out, None, RunConfig(shard=Shard(k, 3)))
        seen += [r["id"] for r in out.records]
    assert sorted(seen, key=int) == [str(i) for i in range(10)]


def test_shard_parsing_and_slurm_environment(monkeypatch):
    assert Shard.parse("3/8") == Shard(3, 8)
    for bad in ("8/8", "x/2", "1", "-1/2"):
        with pytest.raises(AloeError):
            Shard.parse(bad)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    assert Shard.from_env() == Shard(2, 4)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert Shard.from_env() == Shard(0, 1)
