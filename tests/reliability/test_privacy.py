"""Embedded DICOM never leaves a run with its header: outputs, rejects, reports, caches, judge requests, stderr.

The records embed pydicom's bundled test files, with a patient name, ID and
birth date written into their headers, as data URIs (one with a MIME type that
lies) in JSONL and as image structs in parquet. Each data command runs through
the real CLI; by default the markers appear nowhere, and the images reach the
output as PNG rendered exactly as every stage sees them. `--keep-dicom-bytes`
passes the bytes through.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fake_openai_server import FakeOpenAIServer

from aloe_cli.data.images import load_image
from reliability.dicom_cases import (
    COMMANDS,
    MARKERS,
    data_uri,
    dicom_bytes,
    image_of,
    markers_in,
    markers_in_file,
    png_bytes,
    read_records,
    record,
    run_command,
    write_parquet,
)
from support import write_jsonl

GOOD = {"ct-uri", "mr-uri", "png", "rgb-struct"}  # the records every command keeps
BAD = {"rtplan-uri": "dicom_no_pixel_data", "rtplan-struct": "dicom_no_pixel_data",
       "one-placeholder": "image_count_mismatch"}  # the last fails before its images are looked at
BROKEN_JSON = 1  # one line of the JSONL input is cut off in the middle of a DICOM data URI


@pytest.fixture(scope="module")
def dicom():
    return {"ct": dicom_bytes("CT_small.dcm"), "mr": dicom_bytes("MR_small.dcm"),
            "rgb": dicom_bytes("examples_rgb_color.dcm"),
            "rtplan": dicom_bytes("rtplan.dcm")}  # an RT plan: a DICOM object without pixel data


@pytest.fixture
def inputs(tmp_path, dicom):
    """A JSONL and a parquet file that together hold 8 records: 4 good, 4 bad (one of them not even JSON)."""
    records = [
        record("ct-uri", [data_uri(dicom["ct"], "image/png")]),  # the MIME type lies: sniffed by its magic
        record("mr-uri", [data_uri(dicom["mr"], "application/dicom")]),
        record("png", [data_uri(png_bytes(), "image/png")]),
        record("rtplan-uri", [data_uri(dicom["rtplan"], "application/dicom")]),
        {**record("one-placeholder", [data_uri(dicom["mr"], "application/dicom")]),
         "images": [data_uri(dicom["mr"], "application/dicom"), data_uri(dicom["ct"], "application/dicom")]},
    ]
    jsonl = write_jsonl(tmp_path / "scans.jsonl", records)
    broken = json.dumps(record("cut", [data_uri(dicom["ct"], "application/dicom")]))
    with open(jsonl, "a") as handle:
        handle.write(broken[: len(broken) // 2] + "\n")
    parquet = write_parquet(tmp_path / "structs.parquet", [
        record("rgb-struct", [{"bytes": dicom["rgb"], "path": "scan.dcm"}]),
        record("rtplan-struct", [{"bytes": dicom["rtplan"], "path": "plan.dcm"}]),
    ])
    return [jsonl, parquet]


@pytest.fixture
def judge():
    with FakeOpenAIServer() as server:
        yield server


def run(command, inputs, workdir, judge, model, *extra, **names):
    return run_command(command, inputs, workdir, *extra, judge_url=judge.url, model=model, **names)


def check_accounting(result, read: int) -> None:
    """records in = out + rejects, in the report and in the files."""
    summary = result.summary
    assert summary["read"] == read == summary["kept"] + summary["rejected"]
    assert len(read_records(result.rejects)) == summary["rejected"]
    if result.command != "mix":
        assert len(read_records(result.output)) == summary["kept"]


@pytest.mark.parametrize("command", COMMANDS)
def test_embedded_dicom_leaves_no_patient_data_anywhere(command, inputs, judge, tiny_model_dir, tmp_path, dicom):
    result = run(command, inputs, tmp_path / command, judge, tiny_model_dir, output_name="out.parquet")
    assert result.result.returncode == 0, result.result.stderr
    check_accounting(result, read=len(GOOD) + len(BAD) + BROKEN_JSON)
    assert "Traceback" not in result.result.stderr

    # Nothing the run wrote or printed holds a marker, in plain bytes or inside base64.
    for path in result.files():
        assert markers_in_file(path) == [], f"{command}: patient data in {path.name}"
    assert markers_in(result.result.stderr.encode()) == []
    assert markers_in(result.result.stdout.encode()) == []
    if command == "score":
        assert len(judge.requests) == len(GOOD)
        for request in judge.requests:
            assert markers_in(json.dumps(request.body).encode()) == [], "patient data sent to the judge"

    kept = {row["id"]: row for row in read_records(result.output)}
    assert set(kept) == GOOD
    rejected = read_records(result.rejects)
    reasons = {row.get("id"): row["aloe"]["reject"]["reason"] for row in rejected}
    assert {k: v for k, v in reasons.items() if k in BAD} == BAD
    assert reasons[None] == "invalid_json"

    # The images went on as PNG, rendered as every stage renders the DICOM.
    for id, original in (("ct-uri", dicom["ct"]), ("mr-uri", dicom["mr"]), ("rgb-struct", dicom["rgb"])):
        image = image_of(kept[id]["images"][0])
        assert image.format == "PNG" and not image.text and not {"exif", "icc_profile"} & set(image.info)
        assert np.array_equal(np.asarray(image), np.asarray(load_image(original)))


def test_rejects_and_outputs_in_every_format_hold_no_patient_data(inputs, judge, tmp_path):
    """Compressed JSONL output and parquet rejects (the rejected raw records are scrubbed too)."""
    result = run("dedup", inputs, tmp_path, judge, None, output_name="out.jsonl.gz", rejects_name="rejects.parquet")
    assert result.result.returncode == 0, result.result.stderr
    check_accounting(result, read=len(GOOD) + len(BAD) + BROKEN_JSON)
    assert {row["id"] for row in read_records(result.output)} == GOOD
    for path in result.files():
        assert markers_in_file(path) == [], f"patient data in {path.name}"
    removed = json.dumps(read_records(result.rejects), default=str)
    assert "embedded DICOM data removed" in removed


@pytest.mark.parametrize("command", COMMANDS)
def test_keep_dicom_bytes_passes_them_through(command, inputs, judge, tiny_model_dir, tmp_path, dicom):
    result = run(command, inputs, tmp_path / command, judge, tiny_model_dir, "--keep-dicom-bytes")
    assert result.result.returncode == 0, result.result.stderr
    check_accounting(result, read=len(GOOD) + len(BAD) + BROKEN_JSON)
    kept = {row["id"]: row for row in read_records(result.output)}
    assert set(kept) == GOOD
    assert markers_in_file(result.output) == sorted(MARKERS)
    assert kept["ct-uri"]["images"][0] == data_uri(dicom["ct"], "image/png")  # byte for byte, as it came
    if command == "score":  # the judge still gets pixels only
        for request in judge.requests:
            assert markers_in(json.dumps(request.body).encode()) == []
