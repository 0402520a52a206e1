"""Hostile inputs, through the real CLI: pipes read once, TSVs read as VLMEvalKit writes them, damaged
files counted rather than lost, and one-line errors where a traceback used to be."""

from __future__ import annotations

import base64
import gzip
import json

import pytest

from reliability.hostile import (
    STAGES,
    FifoWriter,
    assert_accounted,
    assert_one_line_error,
    lines_of,
    run,
    stage_args,
)
from support import chat, jpeg_bytes, scan, write_jsonl

# ----------------------------------------------------------------------------- streams


@pytest.mark.parametrize("stage", STAGES)
def test_a_fifo_input_is_read_whole(stage, ctx, train_lines, tmp_path):
    records = b"".join(train_lines[:24])  # ~10 KB: more than a read-ahead buffer
    fifo = FifoWriter(tmp_path / "train.jsonl", records, chunk=997)
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    rejects = [] if stage == "mix" else ["--rejects", str(tmp_path / "rejects.jsonl")]
    result = run([*stage_args(stage, ctx), "-i", str(fifo.path), "-o", str(out), *rejects, "--report", str(report)])
    fifo.close()
    assert result.returncode == 0, result.stderr[-3000:]
    summary = assert_accounted(report, 24, out, tmp_path / "rejects.jsonl" if rejects else None)
    assert list(summary["inputs"]) == [str(fifo.path)]
    if stage != "mix":
        got = sorted(r["id"] for r in lines_of(out) + lines_of(tmp_path / "rejects.jsonl"))
        assert got == sorted(json.loads(line)["id"] for line in train_lines[:24])


def test_shards_of_fifos_cover_the_input_exactly_once(ctx, train_lines, tmp_path):
    data = gzip.compress(b"".join(train_lines))
    seen = []
    for index in range(3):
        fifo = FifoWriter(tmp_path / f"part{index}.jsonl.gz", data, chunk=701)
        out = tmp_path / f"out{index}.jsonl"
        rejects = tmp_path / f"rejects{index}.jsonl"
        result = run([*stage_args("dedup", ctx), "-i", str(fifo.path), "--shard", f"{index}/3", "-o", str(out),
                      "--rejects", str(rejects)])
        fifo.close()
        assert result.returncode == 0, result.stderr[-3000:]
        seen += [r["id"] for r in lines_of(out) + lines_of(rejects)]
    assert sorted(seen) == sorted(json.loads(line)["id"] for line in train_lines)


@pytest.mark.parametrize("how", ["process-substitution", "process-substitution-gzip", "dev-stdin"])
def test_process_substitution_and_dev_stdin_are_read_as_jsonl(how, ctx, demo, tmp_path):
    train = demo / "train.jsonl"
    out, rejects = tmp_path / "out.jsonl", tmp_path / "rejects.jsonl"
    source = {"process-substitution": f"<(cat {train})", "process-substitution-gzip": f"<(gzip -c {train})",
              "dev-stdin": "/dev/stdin"}[how]
    redirect = f" < {train}" if how == "dev-stdin" else ""
    result = run([], shell_prefix=f"ALOE {' '.join(stage_args('dedup', ctx))} -i {source} -o {out} "
                                  f"--rejects {rejects}{redirect}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(lines_of(out)) + len(lines_of(rejects)) == 57 and len(lines_of(rejects)) >= 4


@pytest.mark.parametrize("stage", ["dedup", "score", "mix"])
def test_closed_stdin_is_a_one_line_error(stage, ctx):
    result = run(stage_args(stage, ctx), shell_prefix="ALOE <&-")
    assert_one_line_error(result, 1, "standard input is closed")
    assert result.stdout == ""


# ----------------------------------------------------------------------------- VLMEvalKit TSV

def _b64(seed: int) -> str:
    return base64.b64encode(jpeg_bytes(scan(seed))).decode()


def _tsv(rows: list[list[str]], header=("index", "image", "question", "answer")) -> str:
    return "\t".join(header) + "\n" + "".join("\t".join(row) + "\n" for row in rows)


@pytest.fixture
def leaking_train(tmp_path):
    """Ten training records, each with its own image; the benchmark below holds the images of 3..9."""
    (tmp_path / "img").mkdir()
    records = []
    for i in range(10):
        scan(100 + i).save(tmp_path / "img" / f"{i}.png")
        records.append(chat(f"q{i}", f"a{i}", [f"img/{i}.png"], id=f"t{i}"))
    return write_jsonl(tmp_path / "train.jsonl", records)


def test_an_unmatched_quote_swallows_no_rows(leaking_train, tmp_path):
    rows = [["0", _b64(1), "Is it normal?", "yes"],
            ["1", _b64(2), '"Unclosed quote at the start', "no"],  # a csv reader would run on to the next quote
            *[[str(i), _b64(100 + i), f"Leak {i}?", "yes"] for i in range(3, 10)],
            ["10", _b64(3), '"""Normal"" or not?"', "A"]]  # VLMEvalKit's own quoting: "Normal" or not?
    bench = tmp_path / "bench.tsv"
    bench.write_text(_tsv(rows))
    out, rejects = tmp_path / "out.jsonl", tmp_path / "leaks.jsonl"
    result = run(["dedup", "-i", str(leaking_train), "--against", str(bench), "-o", str(out),
                  "--rejects", str(rejects)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(r["id"] for r in lines_of(rejects)) == [f"t{i}" for i in range(3, 10)]
    assert [r["id"] for r in lines_of(out)] == ["t0", "t1", "t2"]

    # Read as records: every row is there, and both quotes at the start of a field survive.
    as_records = tmp_path / "bench.jsonl"
    read = run(["dedup", "--within", "-i", str(bench), "-o", str(as_records), "--report", str(tmp_path / "r.json")])
    assert read.returncode == 0, read.stderr[-3000:]
    assert_accounted(tmp_path / "r.json", 10, as_records)
    questions = {r["id"]: r["messages"][0]["content"][-1]["text"] for r in lines_of(as_records)}
    assert questions["1"] == '"Unclosed quote at the start' and questions["10"] == '"Normal" or not?'


def test_a_tsv_line_that_fits_no_reading_names_its_line(tmp_path):
    bench = tmp_path / "bench.tsv"
    bench.write_text(_tsv([["0", "", "fine", "yes"], ["1", "", '"stray\ttab', "yes", "extra"]]))
    result = run(["dedup", "--within", "-i", str(bench)])
    assert_one_line_error(result, 1, "bench.tsv:3", "6 tab-separated field(s)")


@pytest.mark.parametrize("variant", ["bom", "gzip", "crlf"])
def test_bom_gzip_and_crlf_tsvs_are_read(variant, leaking_train, tmp_path):
    text = _tsv([[str(i), _b64(100 + i), f"Leak {i}?", "yes"] for i in range(3, 10)])
    data = {"bom": "\ufeff" + text, "gzip": text, "crlf": text.replace("\n", "\r\n")}[variant].encode()
    bench = tmp_path / ("bench.tsv.gz" if variant == "gzip" else "bench.tsv")
    bench.write_bytes(gzip.compress(data) if variant == "gzip" else data)
    rejects = tmp_path / "leaks.jsonl"
    result = run(["dedup", "-i", str(leaking_train), "--against", str(bench), "-o", str(tmp_path / "out.jsonl"),
                  "--rejects", str(rejects)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(r["id"] for r in lines_of(rejects)) == [f"t{i}" for i in range(3, 10)]


def test_a_row_that_is_not_utf8_is_an_error_or_a_counted_reject(tmp_path):
    bench = tmp_path / "bench.tsv"
    bench.write_bytes(_tsv([["0", "", "fine", "yes"], ["1", "", "caf\xe9", "yes"], ["2", "", "ok", "no"]])
                      .encode("latin-1"))
    failed = run(["dedup", "--within", "-i", str(bench)])
    assert_one_line_error(failed, 1, "bench.tsv:3", "not UTF-8")
    report = tmp_path / "r.json"
    skipped = run(["dedup", "--within", "-i", str(bench), "--on-error", "skip", "-o", str(tmp_path / "out.jsonl"),
                   "--rejects", str(tmp_path / "rej.jsonl"), "--report", str(report)])
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    summary = assert_accounted(report, 3, tmp_path / "out.jsonl", tmp_path / "rej.jsonl")
    assert summary["reasons"] == {"invalid_encoding": 1}


# ----------------------------------------------------------------------------- damaged and missing inputs

def _corrupt_parquet(path, groups=3, rows_per_group=10):
    """A parquet file whose second row group has a damaged data page (the page header is overwritten)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [chat(f"question {i} " * 10, f"answer {i} " * 10, id=f"r{i}") for i in range(groups * rows_per_group)]
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=rows_per_group, compression="zstd")
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    for i in range(start, start + 24):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def test_a_damaged_parquet_row_group_is_counted_not_lost(tmp_path):
    data = _corrupt_parquet(tmp_path / "train.parquet")
    failed = run(["dedup", "--within", "-i", str(data)])
    assert_one_line_error(failed, 1, "train.parquet row 10", "row group 1 (rows 10-19) cannot be read")
    out, rejects, report = tmp_path / "out.jsonl", tmp_path / "rejects.jsonl", tmp_path / "r.json"
    skipped = run(["dedup", "--within", "-i", str(data), "--on-error", "skip", "-o", str(out),
                   "--rejects", str(rejects), "--report", str(report)])
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    summary = assert_accounted(report, 30, out, rejects)
    assert summary["reasons"] == {"unreadable_row_group": 10}
    assert [r["id"] for r in lines_of(out)] == [f"r{i}" for i in (*range(10), *range(20, 30))]


def test_a_missing_against_file_is_one_line_before_any_work(leaking_train, demo, tmp_path):
    result = run(["dedup", "-i", str(leaking_train), "--against", str(demo / "eval.tsv"),
                  "--against", str(tmp_path / "nope.tsv")])
    assert_one_line_error(result, 1, "nope.tsv")
    assert "hashed" not in result.stderr  # refused before the first benchmark was hashed
