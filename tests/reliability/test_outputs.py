"""Hostile destinations, through the real CLI: colliding paths refused before reading, unwritable folders
refused before the work, full disks and full stdout as one line with nothing left behind, and outputs
that give back every value they were given."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from reliability.hostile import (
    STAGES,
    assert_accounted,
    assert_one_line_error,
    environment,
    leftovers,
    lines_of,
    mounted_tmpfs,
    run,
    stage_args,
)
from support import chat, write_jsonl

BIG = 2 ** 70 + 3  # beyond 64 bits: JSON allows it, floats do not hold it


def _text_records(count: int, answer_words: int = 300, **extra) -> list[dict]:
    return [chat(f"Question {i}?", " ".join(["word"] * answer_words), id=f"r{i}", source="text",
                 domain="medical" if i % 2 else "general", **extra) for i in range(count)]


def _report_pair(tmp_path):
    """Two shard reports of one dedup run, for `aloe report merge`."""
    data = write_jsonl(tmp_path / "t.jsonl", _text_records(4, 3))
    for index in range(2):
        done = run(["dedup", "--within", "-i", str(data), "--shard", f"{index}/2",
                    "-o", str(tmp_path / f"o{index}.jsonl"), "--report", str(tmp_path / f"r{index}.json")])
        assert done.returncode == 0, done.stderr
    return [tmp_path / "r0.json", tmp_path / "r1.json"]


# ----------------------------------------------------------------------------- paths that collide

COLLISIONS = ["output-is-the-input", "rejects-is-a-symlink-to-the-output", "report-is-a-hard-link-to-the-input"]


@pytest.mark.parametrize("case", COLLISIONS)
@pytest.mark.parametrize("stage", STAGES)
def test_colliding_paths_are_refused_before_reading(stage, case, ctx, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", _text_records(3, 3))
    before = data.read_bytes()
    out = tmp_path / "out.jsonl"
    out.write_text("an earlier output\n")
    if case == "output-is-the-input":
        paths = ["-i", "train.jsonl", "-o", "./train.jsonl"]
    elif case == "rejects-is-a-symlink-to-the-output":
        (tmp_path / "link.jsonl").symlink_to(out)
        paths = ["-i", "train.jsonl", "-o", "out.jsonl", "--rejects", "link.jsonl"]
    else:
        os.link(data, tmp_path / "report.json")
        paths = ["-i", "train.jsonl", "-o", "out.jsonl", "--report", "report.json"]
    result = run([*stage_args(stage, ctx), *paths], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "is the same file as" in result.stderr and "Traceback" not in result.stderr
    assert data.read_bytes() == before and out.read_text() == "an earlier output\n"


def test_report_merge_refuses_to_overwrite_one_of_its_reports(tmp_path):
    reports = _report_pair(tmp_path)
    before = reports[0].read_bytes()
    result = run(["report", "merge", *map(str, reports), "-o", "./r0.json"], cwd=tmp_path)
    assert result.returncode == 2 and "is the same file as" in result.stderr, result.stderr[-3000:]
    assert reports[0].read_bytes() == before


@pytest.mark.parametrize("option", ["--rejects", "--report"])
@pytest.mark.parametrize("stage", STAGES)
def test_stdout_cannot_take_records_and_something_else(stage, option, ctx, demo):
    result = run([*stage_args(stage, ctx), "-i", str(demo / "train.jsonl"), option, "-"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "both write to standard output" in result.stderr and result.stdout == ""


def test_the_report_goes_to_stdout_when_the_records_do_not(ctx, demo, tmp_path):
    out = tmp_path / "out.jsonl"
    result = run([*stage_args("dedup", ctx), "-i", str(demo / "train.jsonl"), "-o", str(out), "--report", "-"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["read"] == 57 and report["kept"] == len(lines_of(out))
    assert not (tmp_path / "-").exists() and not (demo.parent / "-").exists()


def test_sample_data_refuses_a_folder_that_holds_its_files(tmp_path):
    target = tmp_path / "demo"
    first = run(["sample-data", str(target)])
    assert first.returncode == 0, first.stderr
    (target / "train.jsonl").write_text("edited by hand\n")
    again = run(["sample-data", str(target), "--seed", "3"])
    assert_one_line_error(again, 1, "already holds train.jsonl", "--force")
    assert (target / "train.jsonl").read_text() == "edited by hand\n"
    forced = run(["sample-data", str(target), "--force"])
    assert forced.returncode == 0 and len(lines_of(target / "train.jsonl")) == 57
    assert leftovers(target) == ["eval.tsv", "images", "train.jsonl"]


# ----------------------------------------------------------------------------- destinations that cannot be written

@pytest.mark.parametrize("stage", STAGES)
def test_an_output_that_is_a_folder_is_refused_before_the_work(stage, ctx, demo, tmp_path):
    folder = tmp_path / "out.jsonl"
    folder.mkdir()
    result = run([*stage_args(stage, ctx), "-i", str(demo / "train.jsonl"), "-o", str(folder)])
    assert_one_line_error(result, 1, str(folder), "is a folder")
    assert "hashed" not in result.stderr and "judging" not in result.stderr and "scoring" not in result.stderr
    assert leftovers(tmp_path) == ["out.jsonl"] and leftovers(folder) == []


@pytest.mark.parametrize("stage", [*STAGES, "sample-data", "report-merge"])
def test_a_path_through_a_file_is_refused_before_the_work(stage, ctx, demo, tmp_path):
    blocker = tmp_path / "file.jsonl"
    blocker.write_text("not a folder\n")
    target = str(blocker / "out.jsonl")
    if stage == "sample-data":
        args = ["sample-data", target]
    elif stage == "report-merge":
        args = ["report", "merge", *map(str, _report_pair(tmp_path)), "-o", target]
    else:
        args = [*stage_args(stage, ctx), "-i", str(demo / "train.jsonl"), "-o", target]
    result = run(args)
    assert_one_line_error(result, 1, "file.jsonl")
    assert "hashed" not in result.stderr
    assert blocker.read_text() == "not a folder\n"


@pytest.mark.parametrize("stage", ["dedup", "mix", "sample-data"])
def test_a_read_only_folder_is_refused_before_the_work(stage, ctx, demo, tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as folder:
        if stage == "sample-data":
            args = ["sample-data", str(folder)]
        else:
            args = [*stage_args(stage, ctx), "-i", str(demo / "train.jsonl"), "-o", str(folder / "out.jsonl"),
                    "--report", str(tmp_path / "report.json")]
        result = run(args)
        assert_one_line_error(result, 1, str(folder), "Read-only file system")
        assert "hashed" not in result.stderr and not (tmp_path / "report.json").exists()


def test_an_immutable_folder_is_refused_before_the_work(ctx, demo, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    locked = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if locked.returncode != 0:
        pytest.skip(f"chattr +i is not available here ({locked.stderr.strip()})")
    try:
        result = run([*stage_args("dedup", ctx), "-i", str(demo / "train.jsonl"), "-o", str(folder / "out.jsonl")])
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    assert_one_line_error(result, 1, str(folder), "Operation not permitted")
    assert "hashed" not in result.stderr


@pytest.mark.parametrize("stage", ["dedup", "perplexity", "mix", "sample-data"])
def test_a_full_disk_is_one_line_and_leaves_nothing(stage, ctx, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", _text_records(300))  # ~600 KB of records
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = environment(TMPDIR=str(scratch))
    with mounted_tmpfs(tmp_path / "small", "size=64k") as small:
        if stage == "sample-data":
            result = run(["sample-data", str(small / "demo")], env=env)
        else:
            args = stage_args(stage, ctx)
            if stage == "dedup":  # worker processes, and rejects on the same full disk
                args += ["--workers", "2", "--within", "--rejects", str(small / "rejects.jsonl")]
            if stage == "perplexity":  # percentile thresholds: the run also spools to $TMPDIR
                (tmp_path / "t.yaml").write_text("default: {min: p1, max: p99}\n")
                args = [a for a in args if a != "--keep-all"] + ["--thresholds", str(tmp_path / "t.yaml")]
            result = run([*args, "-i", str(data), "-o", str(small / "out.jsonl"),
                          "--report", str(small / "report.json")], env=env)
        assert_one_line_error(result, 1, "No space left on device")
        assert leftovers(small) == [], "a failed write left files behind"
    assert leftovers(scratch) == []
    assert "BrokenPipeError" not in result.stderr and "KeyboardInterrupt" not in result.stderr


@pytest.mark.parametrize("stage", [*STAGES, "sample-data", "report-merge"])
def test_stdout_on_a_full_device_is_one_line(stage, ctx, demo, tmp_path):
    if stage == "sample-data":
        args = ["sample-data", str(tmp_path / "demo")]
    elif stage == "report-merge":
        args = ["report", "merge", *map(str, _report_pair(tmp_path))]
    else:
        args = [*stage_args(stage, ctx), "-i", str(demo / "train.jsonl")]
    result = run(args, stdin=subprocess.DEVNULL, shell_prefix="ALOE > /dev/full")
    assert_one_line_error(result, 1, "standard output", "No space left on device")


# ----------------------------------------------------------------------------- every value comes back

def _read_back(path, tmp_path, name="back.jsonl") -> list[dict]:
    """Records of an aloe output, read by aloe's own reader (through the CLI) and written as JSONL."""
    back = tmp_path / name
    result = run(["dedup", "--within", "--on-error", "skip", "-i", str(path), "-o", str(back),
                  "--rejects", str(tmp_path / f"{name}.rejects.jsonl")])
    assert result.returncode == 0, result.stderr[-3000:]
    return lines_of(back) + lines_of(tmp_path / f"{name}.rejects.jsonl")


def test_parquet_output_keeps_fields_whose_type_changes(tmp_path):
    records = []
    for i in range(2600):  # more than one row group: the type changes after the first
        records.append(chat(f"q{i}", "a", id=BIG + i if i % 7 == 0 else f"r{i}",
                            extra=i if i < 2300 else f"text {i}",  # int, then str after the first row group
                            ratio=1 if i % 2 else 0.5,  # ints and floats mixed: neither may become the other
                            meta={}, note={"by": "x"} if i % 3 else {"by": ["x", "y"]}))
    records.append({**chat("bad", "record"), "id": "bad", "images": [5]})  # a reject whose image is not a dict
    data = write_jsonl(tmp_path / "in.jsonl", records)
    out, rejects, report = tmp_path / "out.parquet", tmp_path / "rejects.parquet", tmp_path / "r.json"
    result = run(["dedup", "--within", "--on-error", "skip", "-i", str(data), "-o", str(out),
                  "--rejects", str(rejects), "--report", str(report)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_accounted(report, 2601)
    back = {r["id"]: r for r in _read_back(out, tmp_path)}
    assert len(back) == 2600
    for original in records[:-1]:
        got = back[original["id"]]
        for key in ("extra", "ratio", "meta", "note"):
            assert json.dumps(got[key]) == json.dumps(original[key]), (key, got[key], original[key])
    rejected = _read_back(rejects, tmp_path, "rejects-back.jsonl")
    assert [r["images"] for r in rejected] == [[5]]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".parquet"])
def test_integers_beyond_64_bits_round_trip(suffix, tmp_path):
    records = [chat("q", "a", id=BIG, meta={"n": -(2 ** 65), "m": [2 ** 64, 18446744073709551615]}),
               chat("q2", "a2", id=7, meta={"n": 1, "m": [2, 3]})]
    data = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / f"out{suffix}"
    result = run(["dedup", "--within", "-i", str(data), "-o", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    back = _read_back(out, tmp_path)
    assert [(r["id"], r["meta"]) for r in back] == [(r["id"], r["meta"]) for r in records]
    assert str(BIG) in (tmp_path / "back.jsonl").read_text()


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_outputs_honour_the_umask(umask, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", _text_records(3, 3))
    outputs = [tmp_path / name for name in ("out.jsonl", "out.jsonl.gz", "out.parquet")]
    for out in outputs:
        result = run([], shell_prefix=f"umask {umask:03o}; ALOE dedup --within -i {data} -o {out}")
        assert result.returncode == 0, result.stderr[-3000:]
        assert out.stat().st_mode & 0o777 == 0o666 & ~umask, (out, oct(out.stat().st_mode))
