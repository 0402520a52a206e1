"""Shard reports: completion markers and merging (the CLI side is in test_dedup_cli.py)."""

from __future__ import annotations

import json

import pytest

from aloe_cli.data.reports import finished, marker_path, merge_reports, write_report
from aloe_cli.data.shard import Shard
from aloe_cli.errors import AloeError


def shard_report(k, n, read, kept, *, scores, requests, judge="j", p50=1.0):
    return {"stage": "score", "shard": f"{k}/{n}", "read": read, "kept": kept, "rejected": read - kept,
            "flagged": 0, "emitted": kept, "reasons": {"low_score": read - kept} if read > kept else {},
            "inputs": {"a.jsonl": {"read": read, "kept": kept, "rejected": read - kept}},
            "rejects_written": True, "input_files": ["a.jsonl"], "judge": judge, "requests": requests,
            "scores": scores, "median": p50, "additive": ["requests", "scores.*.*"]}


def test_counts_and_declared_figures_add_up_the_rest_must_agree():
    reports = [("r0.json", shard_report(0, 2, 5, 3, scores={"s": {"1": 2, "5": 3}}, requests=5, p50=2.0)),
               ("r1.json", shard_report(1, 2, 4, 4, scores={"s": {"5": 4}, "t": {"3": 1}}, requests=7))]
    merged = merge_reports(reports)
    assert (merged["read"], merged["kept"], merged["rejected"], merged["emitted"]) == (9, 7, 2, 7)
    assert merged["reasons"] == {"low_score": 2}
    assert merged["inputs"] == {"a.jsonl": {"read": 9, "kept": 7, "rejected": 2}}
    assert merged["requests"] == 12
    assert merged["scores"] == {"s": {"1": 2, "5": 7}, "t": {"3": 1}}
    assert merged["judge"] == "j"  # the same in every shard: kept
    assert "median" not in merged and merged["not_merged"] == ["median"]  # a percentile does not add up
    assert merged["shard"] == "all/2" and merged["merged_from"] == ["r0.json", "r1.json"]


def test_mixed_stages_duplicate_missing_and_foreign_reports_are_refused():
    a = shard_report(0, 3, 2, 2, scores={}, requests=0)
    b = shard_report(1, 3, 2, 2, scores={}, requests=0)
    c = shard_report(2, 3, 2, 2, scores={}, requests=0)
    with pytest.raises(AloeError, match="b.json is a dedup report but a.json is a score report"):
        merge_reports([("a.json", a), ("b.json", {**b, "stage": "dedup"}), ("c.json", c)])
    with pytest.raises(AloeError, match="shard 1/3 appears twice: b.json and b2.json"):
        merge_reports([("a.json", a), ("b.json", b), ("b2.json", b), ("c.json", c)])
    with pytest.raises(AloeError, match=r"missing shard\(s\) 1 of 3"):
        merge_reports([("a.json", a), ("c.json", c)])
    with pytest.raises(AloeError, match="different shard counts"):
        merge_reports([("a.json", a), ("b.json", {**b, "shard": "1/4"})])
    with pytest.raises(AloeError, match="b.json was run over other inputs"):
        merge_reports([("a.json", a), ("b.json", {**b, "input_files": ["other.jsonl"]}), ("c.json", c)])
    with pytest.raises(AloeError, match="x.json: not an aloe stage report"):
        merge_reports([("x.json", {"hello": 1})])


def test_the_marker_follows_the_report_and_names_its_shard(tmp_path):
    path = tmp_path / "3.json"
    assert not finished(path, "score", Shard(3, 8))
    write_report(path, {"stage": "score", "shard": "3/8", "read": 0}, mark_done=True)
    assert json.loads(path.read_text())["shard"] == "3/8"
    assert json.loads(marker_path(path).read_text()) == {"stage": "score", "shard": "3/8", "report": "3.json"}
    assert finished(path, "score", Shard(3, 8))
    with pytest.raises(AloeError, match="written by score shard 3/8, but this is score shard 4/8"):
        finished(path, "score", Shard(4, 8))
    write_report(tmp_path / "plain.json", {"stage": "mix"})  # not a shard: no marker
    assert not marker_path(tmp_path / "plain.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3.json", "3.json.done", "plain.json"]  # no temp files
