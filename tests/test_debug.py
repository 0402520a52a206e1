"""ALOE_DEBUG=1: the traceback behind a one-line error, through the real CLI."""

from __future__ import annotations

import pytest

from support import aloe, chat, scan, write_jsonl


@pytest.fixture
def bad_box(tmp_path):
    scan(1, size=64).save(tmp_path / "a.png")
    return write_jsonl(tmp_path / "train.jsonl", [
        chat("Where?", "", ["a.png"], id="ok", objects=[{"bbox": [0, 0, 10, 10], "label": "x"}]),
        chat("Where?", "", ["a.png"], id="bad", objects=[{"bbox": [0, 0, 500, 10], "label": "x"}])])


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("aloe: error:")]


def test_without_debug_a_record_error_is_one_line(bad_box):
    result = aloe("dedup", "-i", str(bad_box), "--within")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == error_lines(result.stderr)  # nothing but the error line
    assert error_lines(result.stderr) == [
        f"aloe: error: {bad_box}:2: field 'objects[0].bbox': box [0.0, 0.0, 500.0, 10.0] lies outside the 64x64 image"]


@pytest.mark.parametrize("value", ["1", "true"])
def test_debug_prints_the_traceback_from_where_the_problem_was_found(bad_box, value):
    result = aloe("dedup", "-i", str(bad_box), "--within", env={"ALOE_DEBUG": value})
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "in _check_inside" in result.stderr  # the frame in grounding.py that found the bad box
    assert result.stderr.strip().splitlines()[-1] == error_lines(result.stderr)[0]  # the one line comes last
    assert "lies outside the 64x64 image" in error_lines(result.stderr)[0]


def test_debug_shows_the_exception_a_one_line_error_hides(bad_box, tmp_path):
    folder = tmp_path / "eval.idx"  # a folder where the saved index should be
    folder.mkdir()
    args = ["dedup", "-i", str(bad_box), "--against", str(folder)]
    quiet = aloe(*args)
    assert quiet.returncode == 1 and "IsADirectoryError" not in quiet.stderr
    assert len(error_lines(quiet.stderr)) == 1 and "cannot read hash index" in error_lines(quiet.stderr)[0]
    loud = aloe(*args, env={"ALOE_DEBUG": "1"})
    assert loud.returncode == 1
    assert "IsADirectoryError" in loud.stderr  # raised `from None` behind the AloeError, shown anyway
    assert loud.stderr.strip().splitlines()[-1].startswith("aloe: error: cannot read hash index")
