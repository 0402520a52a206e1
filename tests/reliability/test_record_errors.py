"""Record- and image-level input errors, through the real CLI of every data command.

Each class of bad record gives, in every command, one line `aloe: error:
FILE:LINE: field 'F': ...` and exit 1 (no output file left behind), or, under
`--on-error skip`, a counted reject with its reason while the run goes on.
Every command is run under skip; the one-line error is checked for the
commands that start in a second (perplexity, which loads a model, once).
"""

from __future__ import annotations

import base64
import io
import shutil

import pydicom
import pytest
from fake_openai_server import FakeOpenAIServer
from PIL import Image

from aloe_cli.filters.hashing import hash_image
from reliability.dicom_cases import COMMANDS, TEST_FILES, data_uri, png_bytes, read_records, record, run_command
from support import write_jsonl

JPEG_LS = "MR_small_jpeg_ls_lossless.dcm"  # needs pylibjpeg-libjpeg, gdcm or pyjpegls
JPEG_12_BIT = "JPGExtended.dcm"  # 12-bit JPEG Extended: Pillow's plugin is there but cannot decode it
QUICK = ("dedup", "score", "mix")  # the commands whose one-line errors every test checks


@pytest.fixture(scope="module")
def judge():
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def folder(tmp_path):
    """Images the records refer to by path, next to the input files."""
    (tmp_path / "ok.png").write_bytes(png_bytes(48, 90))
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "reportsi.dcm", JPEG_LS, JPEG_12_BIT):
        shutil.copy(TEST_FILES / name, tmp_path / name)
    return tmp_path


def decodable(name: str) -> bool:
    try:
        return pydicom.dcmread(TEST_FILES / name).pixel_array is not None
    except Exception:  # noqa: BLE001 - any failure means: this environment cannot decode it
        return False


def check_skip(command, folder, bad: dict, judge, model, good: int = 1, extra=()) -> dict:
    """Run `command` under --on-error skip over `good` good records and the `bad` ones ({id: record});
    check the accounting and that exactly the bad ones are rejected. Returns {id: reject}."""
    records = [record(f"good-{i}", [data_uri(png_bytes(40 + 8 * i, 30 * i), "image/png")]) for i in range(good)]
    inputs = [write_jsonl(folder / "records.jsonl", records + list(bad.values()))]
    run = run_command(command, inputs, folder / f"{command}-skip", *extra, judge_url=judge.url, model=model)
    result = run.result
    assert result.returncode == 0, f"{command}: {result.stderr}"
    assert "Traceback" not in result.stderr
    summary = run.summary
    assert summary["read"] == good + len(bad) == summary["kept"] + summary["rejected"], command
    assert summary["rejected"] == len(bad), f"{command}: {summary['reasons']}"
    kept = {row["id"] for row in read_records(run.output)}
    assert kept == {f"good-{i}" for i in range(good)}, command
    rejects = {row["id"]: row["aloe"]["reject"] for row in read_records(run.rejects)}
    assert set(rejects) == set(bad), command
    assert f"{summary['read']} read = {summary['kept']} kept + {summary['rejected']} rejected" in result.stderr
    return rejects


def check_fail(command, folder, bad: dict, judge, model, field: str, text: str, extra=()) -> str:
    """Under --on-error fail the first bad record (line 2, after a good one) ends the run with one line."""
    good = record("good", [data_uri(png_bytes(), "image/png")])
    inputs = [write_jsonl(folder / "first-bad.jsonl", [good, bad])]
    run = run_command(command, inputs, folder / f"{command}-fail", *extra, judge_url=judge.url, model=model,
                      on_error="fail")
    result = run.result
    assert result.returncode == 1, f"{command}: {result.stderr}"
    assert "Traceback" not in result.stderr, command
    errors = [line for line in result.stderr.splitlines() if line.startswith("aloe: error:")]
    assert len(errors) == 1, f"{command}: {result.stderr}"
    assert f"{inputs[0]}:2: field '{field}': " in errors[0] and text in errors[0], f"{command}: {errors[0]}"
    assert not run.output.exists() and result.stdout == "", command  # nothing half-written
    return errors[0]


def test_a_non_object_aloe_field_is_a_record_error(folder, judge, tiny_model_dir):
    bad = {f"aloe-{kind}": record(f"aloe-{kind}", [data_uri(png_bytes(), "image/png")], aloe=value)
           for kind, value in (("string", "scored"), ("list", [1, 2]), ("number", 4))}
    for command in COMMANDS:
        rejects = check_skip(command, folder, bad, judge, tiny_model_dir)
        assert {reject["reason"] for reject in rejects.values()} == {"invalid_field"}, command
        assert "field 'aloe': must be an object" in rejects["aloe-list"]["detail"], command
    for command in QUICK:
        check_fail(command, folder, bad["aloe-string"], judge, tiny_model_dir, "aloe", "got a string")


def test_an_empty_image_string_is_a_record_error(folder, judge, tiny_model_dir):
    bad = {"empty": record("empty", [""]), "blank": record("blank", ["  "])}
    for command in COMMANDS:
        rejects = check_skip(command, folder, bad, judge, tiny_model_dir)
        assert {reject["reason"] for reject in rejects.values()} == {"image_invalid"}, command
    for command in QUICK:
        check_fail(command, folder, bad["empty"], judge, tiny_model_dir, "images[0]", "empty image entry")


def test_dicom_is_recognised_by_its_magic_whatever_its_name_or_mime_type(folder, judge, tiny_model_dir):
    shutil.copy(folder / "CT_small.dcm", folder / "ct_scan")  # no suffix
    shutil.copy(folder / "MR_small.dcm", folder / "mr_scan.png")  # a suffix that lies
    liver = (TEST_FILES / "liver_1frame.dcm").read_bytes()
    records = [record("no-suffix", ["ct_scan"]), record("png-suffix", ["mr_scan.png"]),
               record("jpeg-mime", [data_uri(liver, "image/jpeg")])]  # the MIME type lies
    inputs = [write_jsonl(folder / "dicom.jsonl", records)]
    for command in COMMANDS:
        run = run_command(command, inputs, folder / command, judge_url=judge.url, model=tiny_model_dir)
        assert run.result.returncode == 0, f"{command}: {run.result.stderr}"
        summary = run.summary
        assert summary["read"] == 3 == summary["kept"] and summary["rejected"] == 0, f"{command}: {summary}"
        kept = {row["id"]: row for row in read_records(run.output)}
        assert set(kept) == {"no-suffix", "png-suffix", "jpeg-mime"}, command
        [path] = kept["no-suffix"]["images"]  # a path stays a path, written to resolve from the output's folder
        assert path == "../ct_scan" and (run.output.parent / path).resolve() == (folder / "ct_scan").resolve(), command
        png = base64.b64decode(kept["jpeg-mime"]["images"][0].partition(",")[2])
        assert Image.open(io.BytesIO(png)).format == "PNG", command  # embedded DICOM: re-encoded on read
        assert "3 read = 3 kept + 0 rejected" in run.result.stderr
    # dedup hashed the suffix-less file exactly as the same file named .dcm
    dedup = {row["id"]: row for row in read_records(folder / "dedup" / "out.jsonl")}
    assert dedup["no-suffix"]["aloe"]["dedup"]["phash"] == [f"{hash_image(str(folder / 'CT_small.dcm')):016x}"]


def test_dicom_without_pixel_data_is_a_record_error(folder, judge, tiny_model_dir):
    rtplan = (folder / "rtplan.dcm").read_bytes()
    bad = {"rtplan-path": record("rtplan-path", ["rtplan.dcm"]), "report-path": record("report-path", ["reportsi.dcm"]),
           "rtplan-uri": record("rtplan-uri", [data_uri(rtplan, "application/dicom")])}
    for command in COMMANDS:
        rejects = check_skip(command, folder, bad, judge, tiny_model_dir)
        assert {reject["reason"] for reject in rejects.values()} == {"dicom_no_pixel_data"}, command
        assert "holds no pixel data" in rejects["rtplan-uri"]["detail"], command
    for command in COMMANDS:
        check_fail(command, folder, bad["rtplan-path"], judge, tiny_model_dir, "images[0]",
                   "DICOM file rtplan.dcm holds no pixel data")


@pytest.mark.skipif(decodable(JPEG_LS), reason="a JPEG-LS decoder is installed here")
def test_compressed_dicom_without_a_decoder_names_the_package_to_install(folder, judge, tiny_model_dir):
    jpeg_ls = (folder / JPEG_LS).read_bytes()
    bad = {"jpeg-ls-path": record("jpeg-ls-path", [JPEG_LS]),
           "jpeg-ls-uri": record("jpeg-ls-uri", [data_uri(jpeg_ls, "application/dicom")])}
    for command in COMMANDS:
        rejects = check_skip(command, folder, bad, judge, tiny_model_dir)
        assert {reject["reason"] for reject in rejects.values()} == {"dicom_decoder_missing"}, command
        assert "pip install pylibjpeg pylibjpeg-libjpeg" in rejects["jpeg-ls-uri"]["detail"], command
    for command in QUICK:
        line = check_fail(command, folder, bad["jpeg-ls-path"], judge, tiny_model_dir, "images[0]",
                          "JPEG-LS Lossless Image Compression pixel data")
        assert "no decoder plugin is installed; install a decoder: pip install pylibjpeg pylibjpeg-libjpeg" in line


@pytest.mark.skipif(decodable(JPEG_12_BIT), reason="a 12-bit JPEG decoder is installed here")
def test_compressed_dicom_the_installed_plugin_cannot_decode_names_another(folder, judge, tiny_model_dir):
    # mix checks headers only: a plugin for the transfer syntax is installed, so it cannot know (docs/mix.md)
    bad = {"jpeg12": record("jpeg12", [JPEG_12_BIT])}
    for command in ("dedup", "score", "perplexity"):
        rejects = check_skip(command, folder, bad, judge, tiny_model_dir)
        assert rejects["jpeg12"]["reason"] == "dicom_decode_failed", command
        assert "pip install pylibjpeg pylibjpeg-libjpeg" in rejects["jpeg12"]["detail"], command
    for command in ("dedup", "score"):
        line = check_fail(command, folder, bad["jpeg12"], judge, tiny_model_dir, "images[0]",
                          "JPEG Extended (Process 2 and 4) pixel data of DICOM file JPGExtended.dcm")
        assert "plugin(s) (pillow) failed" in line and "pip install pylibjpeg pylibjpeg-libjpeg" in line, line


def test_a_decompression_bomb_in_mix_is_a_reject_and_the_run_goes_on(folder, judge, tiny_model_dir):
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")  # 400 M pixels in 48 KB: over twice Pillow's limit
    (folder / "bomb.png").write_bytes(buffer.getvalue())
    bad = {"bomb-path": record("bomb-path", ["bomb.png"]),
           "bomb-uri": record("bomb-uri", [data_uri(buffer.getvalue(), "image/png")]),
           "bomb-grounded": record("bomb-grounded", ["bomb.png"], objects=[{"bbox": [10, 10, 50, 50],
                                                                            "label": "nodule"}])}
    rejects = check_skip("mix", folder, bad, judge, tiny_model_dir, good=2)
    assert {reject["reason"] for reject in rejects.values()} == {"image_too_large"}
    assert "decompression-bomb limit" in rejects["bomb-grounded"]["detail"]
    check_fail("mix", folder, bad["bomb-grounded"], judge, tiny_model_dir, "images[0]", "decompression-bomb limit")


def test_mix_rejects_image_entries_it_cannot_use(folder, judge, tiny_model_dir):
    """mix decodes no pixels, but checks every entry's type, data URI and header, and that paths exist."""
    bad = {
        "null": (record("null", [None]), "image_invalid"),
        "not-base64": (record("not-base64", ["data:image/png;base64,!!!"]), "image_invalid"),
        "not-an-image": (record("not-an-image", [data_uri(b"hello, world", "image/png")]), "image_corrupt"),
        "empty-uri": (record("empty-uri", ["data:image/png;base64,"]), "image_invalid"),
        "missing": (record("missing", ["nowhere/scan.png"]), "image_missing"),
        "truncated-header": (record("truncated-header", [data_uri(png_bytes()[:20], "image/png")]),
                             "image_truncated"),
    }
    rejects = check_skip("mix", folder, {id: rec for id, (rec, _) in bad.items()}, judge, tiny_model_dir, good=2)
    assert {id: reject["reason"] for id, reject in rejects.items()} == {id: reason for id, (_, reason) in bad.items()}
    assert all("field 'images[0]'" in reject["detail"] for reject in rejects.values())
    check_fail("mix", folder, bad["null"][0], judge, tiny_model_dir, "images[0]", "got null")
