"""`aloe dedup` end to end, through the real CLI in subprocesses and real pipes."""

import base64
import json
import subprocess
import sys

import pytest

from aloe_cli.demo.sample_data import write_sample_data
from support import ROOT, aloe, chat, jpeg_bytes, read_jsonl, scan, write_jsonl


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_sample_data(tmp_path_factory.mktemp("demo"))


def ids(records):
    return [r["id"] for r in records]


def clean_ids(demo):
    """The training ids, in order, without the exact leaks: what a plain `--against eval.tsv` run keeps."""
    return [r["id"] for r in read_jsonl(demo.train) if r["id"] not in demo.leaked_ids]


def kept_ids(result):
    assert result.returncode == 0, result.stderr
    return ids(read_jsonl(result.stdout))


def test_exact_leaks_are_removed_through_a_pipe(demo, tmp_path):
    rejects, report = tmp_path / "rejects.jsonl", tmp_path / "report.json"
    result = aloe("dedup", "--against", str(demo.eval_tsv), "--image-root", str(demo.train.parent),
                  "--rejects", str(rejects), "--report", str(report), stdin=demo.train.read_text())
    assert result.returncode == 0, result.stderr
    kept, rejected = read_jsonl(result.stdout), read_jsonl(rejects)
    train = read_jsonl(demo.train)
    assert sorted(ids(rejected)) == sorted(demo.leaked_ids)
    assert ids(kept) == [r["id"] for r in train if r["id"] not in demo.leaked_ids]  # order kept
    for record in rejected:
        assert record["aloe"]["reject"]["reason"] == "eval_leak"
        detail = record["aloe"]["reject"]["detail"]
        assert str(demo.eval_tsv) in detail and " row 10" in detail
    summary = json.loads(report.read_text())
    assert summary["read"] == len(train) == summary["kept"] + summary["rejected"]
    assert summary["eval_sets"][str(demo.eval_tsv)]["leaked_records"] == len(demo.leaked_ids)
    assert result.stdout.count("\n") == len(kept)  # stdout carries records only
    assert "leaked from" in result.stderr


def test_phash_annotation_is_imagehash_phash(demo):
    import imagehash
    from PIL import Image

    result = aloe("dedup", "-i", str(demo.train), "--against", str(demo.eval_tsv))
    assert kept_ids(result) == clean_ids(demo)
    checked = 0
    for record in read_jsonl(result.stdout):
        for image, value in zip(record["images"], record["aloe"]["dedup"]["phash"], strict=True):
            assert value == str(imagehash.phash(Image.open(demo.train.parent / image)))
            checked += 1
    assert checked == sum(len(r["images"]) for r in read_jsonl(result.stdout)) > 0


def test_near_duplicates_and_within(demo, tmp_path):
    exact = kept_ids(aloe("dedup", "-i", str(demo.train), "--against", str(demo.eval_tsv)))
    assert demo.near_duplicate_id in exact  # re-encoded copy: not bit-equal
    near = aloe("dedup", "-i", str(demo.train), "--against", str(demo.eval_tsv), "--max-distance", "6", "--within",
                "--rejects", str(tmp_path / "r.jsonl"))
    assert near.returncode == 0, near.stderr
    reasons = {r["id"]: r["aloe"]["reject"]["reason"] for r in read_jsonl(tmp_path / "r.jsonl")}
    assert reasons[demo.near_duplicate_id] == "eval_leak"
    assert reasons["rad-vqa-9999"] == "duplicate_within"  # repeats an earlier record's image
    assert demo.repeated_id in ids(read_jsonl(near.stdout))  # the first occurrence stays


def test_saved_index_gives_the_same_result(demo, tmp_path):
    index = tmp_path / "eval.idx"
    built = aloe("dedup", "--against", str(demo.eval_tsv), "--save-index", str(index))
    assert built.returncode == 0 and built.stdout == "" and index.exists()
    direct = aloe("dedup", "-i", str(demo.train), "--against", str(demo.eval_tsv))
    loaded = aloe("dedup", "-i", str(demo.train), "--against", str(index))
    assert kept_ids(direct) == kept_ids(loaded) == clean_ids(demo)
    assert loaded.stdout == direct.stdout
    mismatch = aloe("dedup", "-i", str(demo.train), "--against", str(index), "--hash", "dhash")
    assert mismatch.returncode == 1 and "rebuild it or match the options" in mismatch.stderr


def dedup_ok(*args, **kwargs):
    result = aloe("dedup", *args, **kwargs)
    assert result.returncode == 0, result.stderr
    assert "read = " in result.stderr  # the closing summary
    return result


def test_shards_from_flag_and_slurm_cover_the_input_once(demo):
    seen = []
    for k in range(3):
        env = {"SLURM_ARRAY_TASK_ID": str(k), "SLURM_ARRAY_TASK_COUNT": "3"}
        result = dedup_ok("-i", str(demo.train), "--against", str(demo.eval_tsv), env=env)
        assert f"(shard {k}/3)" in result.stderr
        seen += ids(read_jsonl(result.stdout))
    whole = ids(read_jsonl(dedup_ok("-i", str(demo.train), "--against", str(demo.eval_tsv)).stdout))
    assert whole == clean_ids(demo) and sorted(seen) == sorted(whole)
    flag = dedup_ok("-i", str(demo.train), "--against", str(demo.eval_tsv), "--shard", "1/3")
    from_env = dedup_ok("-i", str(demo.train), "--against", str(demo.eval_tsv),
                        env={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"})
    assert ids(read_jsonl(flag.stdout)) and ids(read_jsonl(flag.stdout)) == ids(read_jsonl(from_env.stdout))


def test_stdin_shards_cover_the_input_once():
    text = "".join(json.dumps(chat(f"question {i}", "a" * 100, id=str(i))) + "\n" for i in range(2000))
    seen = []
    for k in range(3):
        result = dedup_ok("--within", "--shard", f"{k}/3", stdin=text)
        assert f"(shard {k}/3)" in result.stderr and result.stdout  # ~6 chunks of 64 KiB: each shard has some
        seen += ids(read_jsonl(result.stdout))
    assert sorted(seen, key=int) == [str(i) for i in range(2000)]


def test_a_slurm_task_id_without_a_count_is_an_error(demo):
    result = aloe("dedup", "-i", str(demo.train), "--against", str(demo.eval_tsv),
                  env={"SLURM_ARRAY_TASK_ID": "3"})
    assert result.returncode == 1 and result.stdout == ""
    one_line_error(result, "SLURM_ARRAY_TASK_ID=3", "SLURM_ARRAY_TASK_COUNT")


def test_shard_reports_resume_and_merge(demo, tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    common = ("-i", str(demo.train), "--against", str(demo.eval_tsv))  # (--within is per shard)
    dedup_ok(*common, "--report", str(tmp_path / "whole.json"), "-o", str(tmp_path / "w.jsonl"))
    whole = json.loads((tmp_path / "whole.json").read_text())
    for k in range(3):
        dedup_ok(*common, "--shard", f"{k}/3", "-o", str(tmp_path / f"part-{k}.jsonl"),
                 "--report", str(reports / f"{k}.json"), "--resume")
    first = json.loads((reports / "0.json").read_text())
    assert first["shard"] == "0/3" and first["input_files"] == [str(demo.train)]
    assert first["read"] == first["kept"] + first["rejected"] > 0
    assert json.loads((reports / "0.json.done").read_text()) == {"stage": "dedup", "shard": "0/3",
                                                                  "report": "0.json"}

    # a rerun of the array skips finished shards; a shard without its marker runs again
    (reports / "2.json.done").unlink()
    before = (tmp_path / "part-0.jsonl").stat().st_mtime_ns
    skipped = aloe("dedup", *common, "--shard", "0/3", "-o", str(tmp_path / "part-0.jsonl"),
                   "--report", str(reports / "0.json"), "--resume")
    assert skipped.returncode == 0 and "shard 0/3 already done" in skipped.stderr and "skipped" in skipped.stderr
    assert (tmp_path / "part-0.jsonl").stat().st_mtime_ns == before
    rerun = dedup_ok(*common, "--shard", "2/3", "-o", str(tmp_path / "part-2.jsonl"),
                     "--report", str(reports / "2.json"), "--resume")
    assert "already done" not in rerun.stderr and (reports / "2.json.done").exists()
    wrong = aloe("dedup", *common, "--shard", "1/3", "--report", str(reports / "0.json"), "--resume")
    one_line_error(wrong, "0.json.done was written by dedup shard 0/3", "this is dedup shard 1/3")
    assert aloe("dedup", *common, "--resume").returncode == 2  # --resume needs --report

    merged = aloe("report", "merge", *(str(reports / f"{k}.json") for k in range(3)))
    assert merged.returncode == 0, merged.stderr
    total = json.loads(merged.stdout)
    for key in ("read", "kept", "rejected", "reasons", "images_hashed"):
        assert total[key] == whole[key], key
    assert total["eval_sets"][str(demo.eval_tsv)]["leaked_records"] == len(demo.leaked_ids)
    assert total["inputs"][str(demo.train)] == whole["inputs"][str(demo.train)]
    assert total["shard"] == "all/3" and "3 shard report(s) merged" in merged.stderr
    assert f"{whole['read']} read = {whole['kept']} kept + {whole['rejected']} rejected" in merged.stderr
    kept = [r for k in range(3) for r in read_jsonl(tmp_path / f"part-{k}.jsonl")]
    assert sorted(ids(kept)) == sorted(ids(read_jsonl(tmp_path / "w.jsonl")))

    to_file = aloe("report", "merge", str(reports / "0.json"), str(reports / "1.json"), str(reports / "2.json"),
                   "-o", str(tmp_path / "merged.json"))
    assert to_file.returncode == 0 and to_file.stdout == "" and "merged" in to_file.stderr
    assert json.loads((tmp_path / "merged.json").read_text())["read"] == whole["read"]

    other = json.loads((reports / "1.json").read_text())
    other["stage"] = "score"
    (reports / "other.json").write_text(json.dumps(other))
    one_line_error(aloe("report", "merge", str(reports / "0.json"), str(reports / "other.json"),
                        str(reports / "2.json")), "other.json is a score report", "0.json is a dedup report")
    one_line_error(aloe("report", "merge", str(reports / "0.json"), str(reports / "0.json"),
                        str(reports / "2.json")), "shard 0/3 appears twice")
    one_line_error(aloe("report", "merge", str(reports / "0.json"), str(reports / "2.json")),
                   "missing shard(s) 1 of 3")
    damaged = {**first, "kept": first["kept"] + 1}
    (reports / "damaged.json").write_text(json.dumps(damaged))
    one_line_error(aloe("report", "merge", str(reports / "damaged.json")), "damaged.json", "read !=")


def test_workers_and_fast_catch_the_leaks(demo):
    result = aloe("dedup", "-i", str(demo.train), "--against", str(demo.eval_tsv), "--workers", "2", "--fast")
    assert kept_ids(result) == clean_ids(demo)  # every exact leak removed, every other record kept, in order


def test_text_only_and_formats(tmp_path, demo):
    text = write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i}", "a", id=str(i)) for i in range(20)])
    out = tmp_path / "o.parquet"
    result = aloe("dedup", "-i", str(text), "--against", str(demo.eval_tsv), "-o", str(out))
    assert result.returncode == 0 and out.exists() and result.stdout == ""
    back = aloe("dedup", "-i", str(out), "--against", str(demo.eval_tsv))
    assert kept_ids(back) == [str(i) for i in range(20)]


def test_parquet_rows_without_annotations_are_annotated(tmp_path):
    from aloe_cli.data.io import RecordWriter

    data = tmp_path / "mixed.parquet"  # the row without `aloe` reads back with aloe = null
    with RecordWriter(data) as writer:
        writer.write(chat("q", "a", id="1", aloe={"score": {"value": 4}}))
        writer.write(chat("q", "b", id="2"))
    result = aloe("dedup", "-i", str(data), "--within")
    assert kept_ids(result) == ["1", "2"]
    first, second = read_jsonl(result.stdout)
    assert first["aloe"] == {"score": {"value": 4}, "dedup": {"phash": []}}
    assert second["aloe"] == {"dedup": {"phash": []}} and second["source"] == "mixed"


def test_eval_jsonl_with_data_uris_and_keep_all(tmp_path):
    leaked = jpeg_bytes(scan(11))
    (tmp_path / "a.jpg").write_bytes(leaked)
    (tmp_path / "b.jpg").write_bytes(jpeg_bytes(scan(12)))
    train = write_jsonl(tmp_path / "train.jsonl",
                        [chat("q", "a", ["a.jpg"], id="a"), chat("q", "b", ["b.jpg"], id="b")])
    uri = "data:image/jpeg;base64," + base64.b64encode(leaked).decode()
    bench = write_jsonl(tmp_path / "bench.jsonl", [chat("q", "x", [uri], id="bench-7")])
    result = aloe("dedup", "-i", str(train), "--against", str(bench), "--keep-all")
    assert kept_ids(result) == ["a", "b"]
    kept = read_jsonl(result.stdout)
    assert kept[0]["aloe"]["dedup"]["flag"]["reason"] == "eval_leak"
    assert kept[0]["aloe"]["dedup"]["leaks"][0]["id"] == "bench-7"


# ---------------------------------------------------------------------------- bad input


def one_line_error(result, *needles):
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("aloe: error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def bad_inputs(tmp_path):
    good = jpeg_bytes(scan(21))
    (tmp_path / "good.jpg").write_bytes(good)
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notimage.png").write_text("hello")
    return tmp_path


@pytest.mark.parametrize("line, reason, field", [
    ('{"messages": [', "invalid_json", None),
    ('{"images": []}', "missing_field", "messages"),
    (json.dumps(chat("q", "a", ["good.jpg", "good.jpg"]) | {"images": ["good.jpg"]}), "image_count_mismatch", "images"),
    (json.dumps(chat("q", "a", ["missing.jpg"])), "image_missing", "images[0]"),
    (json.dumps(chat("q", "a", ["truncated.jpg"])), "image_truncated", "images[0]"),
    (json.dumps(chat("q", "a", ["empty.jpg"])), "image_corrupt", "images[0]"),
    (json.dumps(chat("q", "a", ["notimage.png"])), "image_corrupt", "images[0]"),
    (json.dumps(chat("q", "a", ["good.jpg"], objects=[{"bbox": [0, 0, 999, 10]}])), "bbox_outside_image",
     "objects[0].bbox"),  # grounding happens on read, for every command
])
def test_bad_records_fail_with_one_line_or_go_to_rejects(bad_inputs, demo, line, reason, field):
    good = json.dumps(chat("fine", "ok", ["good.jpg"], id="good"))
    data = bad_inputs / "train.jsonl"
    data.write_text(good + "\n" + line + "\n" + good + "\n")
    failed = aloe("dedup", "-i", str(data), "--against", str(demo.eval_tsv))
    message = one_line_error(failed, "train.jsonl:2")
    if field:
        assert f"field '{field}'" in message
    rejects = bad_inputs / "rejects.jsonl"
    skipped = aloe("dedup", "-i", str(data), "--against", str(demo.eval_tsv), "--on-error", "skip",
                   "--rejects", str(rejects), "--workers", "2")
    assert skipped.returncode == 0, skipped.stderr
    assert len(read_jsonl(skipped.stdout)) == 2
    rejected = read_jsonl(rejects)
    assert [r["aloe"]["reject"]["reason"] for r in rejected] == [reason]
    assert "3 read = 2 kept + 1 rejected" in skipped.stderr


def test_eval_tsv_missing_column(tmp_path, demo):
    bad = tmp_path / "bench.tsv"
    bad.write_text("index\tquestion\n0\tq\n")
    one_line_error(aloe("dedup", "-i", str(demo.train), "--against", str(bad)), "bench.tsv", "image")


def test_empty_input_and_usage_errors(tmp_path, demo):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = aloe("dedup", "-i", str(empty), "--against", str(demo.eval_tsv))
    assert result.returncode == 0 and result.stdout == "" and "0 read = 0 kept + 0 rejected" in result.stderr
    nothing = aloe("dedup", "-i", str(empty))
    assert nothing.returncode == 2 and "nothing to compare against" in nothing.stderr
    md5 = aloe("dedup", "--against", str(demo.eval_tsv), "--hash", "md5", "-i", str(empty))
    assert md5.returncode == 2 and "Invalid value for --hash: must be one of phash" in md5.stderr
    one_line_error(aloe("dedup", "-i", str(tmp_path / "nope.jsonl"), "--against", str(demo.eval_tsv)), "nope.jsonl")


def test_closed_pipe_ends_quietly(demo):
    big = "".join(json.dumps(chat(f"q{i}", "a" * 200, id=str(i))) + "\n" for i in range(20000))
    pipeline = subprocess.run(
        f"{sys.executable} -m aloe_cli dedup --within | head -1", shell=True, input=big.encode(),
        capture_output=True, cwd=ROOT, timeout=120)
    assert pipeline.returncode == 0
    assert pipeline.stdout.decode().count("\n") == 1
    assert b"Traceback" not in pipeline.stderr and b"Error" not in pipeline.stderr


def test_help_does_not_import_torch():
    code = ("import sys; from aloe_cli.app import main\n"
            "try:\n    main(['dedup', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "--against" in result.stdout


def test_dicom_patient_data_never_reaches_outputs_or_logs(tmp_path):
    import pydicom
    from test_images import DICOM_DIR

    dataset = pydicom.dcmread(DICOM_DIR / "CT_small.dcm")
    dataset.PatientName, dataset.PatientID, dataset.PatientBirthDate = "SECRET^PATIENT", "ID-424242", "19700101"
    dataset.save_as(tmp_path / "scan.dcm")
    dataset.PixelData = dataset.PixelData[:100]  # truncated pixel data: an error path
    dataset.save_as(tmp_path / "broken.dcm")
    train = write_jsonl(tmp_path / "train.jsonl", [chat("q", "a", ["scan.dcm"], id="ok"),
                                                   chat("q", "a", ["broken.dcm"], id="bad")])
    bench = write_jsonl(tmp_path / "bench.jsonl", [chat("q", "a", ["scan.dcm"], id="b1")])
    report, rejects = tmp_path / "report.json", tmp_path / "rejects.jsonl"
    result = aloe("dedup", "-i", str(train), "--against", str(bench), "--on-error", "skip", "--report", str(report),
                  "--rejects", str(rejects))
    assert result.returncode == 0, result.stderr
    rejected = read_jsonl(rejects)
    assert {r["id"]: r["aloe"]["reject"]["reason"] for r in rejected} == {"ok": "eval_leak", "bad": "image_corrupt"}
    for text in (result.stdout, result.stderr, report.read_text(), rejects.read_text()):
        for secret in ("SECRET", "424242", "19700101"):
            assert secret not in text
