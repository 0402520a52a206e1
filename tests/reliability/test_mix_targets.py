"""`aloe mix` never passes a missed target silently, and plans the closest mixture whole records allow.

Every check recomputes the shares from the written records with loss tokens counted independently
(transformers' assistant mask, `tests/oracles.reference_count`), then holds the report, the warnings and
the table on stderr to them. Through the real CLI on the tiny model's tokenizer.
"""

from __future__ import annotations

import json

import pytest

from oracles import reference_count
from support import aloe, chat, read_jsonl, write_jsonl

CELLS = ("medical/multimodal", "medical/text", "general/multimodal", "general/text")
LONG = " ".join(["the liver shows a small nodule with mild edema"] * 5)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def issue_input(folder, general=2, general_answer="Yes."):
    """30 long medical answers and a few short general ones: the mixture a 50/50 target cannot get."""
    records = [chat("Describe the scan.", LONG, id=f"med-{i}", source="reports", domain="medical") for i in range(30)]
    records += [chat("Is it normal?", general_answer, id=f"gen-{i}", source="yesno", domain="general")
                for i in range(general)]
    return write_jsonl(folder / "in.jsonl", records)


def shares_of(records, hf_tokenizer):
    """Loss-token share per cell of a written mixture, counted without aloe's counter."""
    tokens = dict.fromkeys(CELLS, 0)
    for record in records:
        cell = f"{record['domain']}/{'multimodal' if record.get('images') else 'text'}"
        tokens[cell] += reference_count(hf_tokenizer, record["messages"])
    total = sum(tokens.values())
    return {cell: value / total for cell, value in tokens.items()}, tokens


def table_row(stderr, cell):
    """The cells table's row of `cell`: [cell, target, before, after, miss, "pt", ...] (a missed cell)."""
    rows = [line.split() for line in stderr.splitlines() if line.startswith(cell + " ")]
    assert len(rows) == 1, stderr
    return rows[0]


def check_misses(report, stderr, shares, tokens, targets, tolerance=0.01):
    """The report and the warnings name exactly the cells whose independently computed share is off target."""
    expected = {cell for cell in CELLS if abs(shares[cell] - targets.get(cell, 0.0)) > tolerance}
    missed = {m["cell"]: m for m in report["targets"]["missed"]}
    assert set(missed) == expected, (missed, shares)
    assert report["targets"]["met"] is (not expected)
    total = sum(tokens.values())
    for cell in expected:
        miss, target = missed[cell], targets.get(cell, 0.0)
        assert miss["target_share"] == target
        assert miss["achieved_share"] == pytest.approx(shares[cell], abs=1e-6)
        assert miss["difference"] == pytest.approx(shares[cell] - target, abs=1e-6)
        assert miss["tokens_difference"] == round(tokens[cell] - target * total)
        side = "short" if shares[cell] < target else "over"
        warning = [line for line in stderr.splitlines() if line.startswith(f"aloe: warning: {cell} misses its")]
        assert len(warning) == 1, stderr
        assert f"{target:.1%} target: it has {shares[cell]:.1%}" in warning[0]
        assert f"{side} by {abs(shares[cell] - target) * 100:.1f} percentage points" in warning[0]
        row = table_row(stderr, cell)  # the warning and the table say the same
        assert row[3] == f"{shares[cell]:.1%}" and row[4] == f"{(shares[cell] - target) * 100:+.1f}", row
    for cell in set(CELLS) - expected:
        assert f"warning: {cell} misses" not in stderr


def test_the_issue_example_keeps_both_cells_and_reports_the_shortfall(tmp_path, tiny_model_dir, hf_tokenizer):
    source = issue_input(tmp_path)
    output, report_path = tmp_path / "mix.jsonl", tmp_path / "mix.json"
    proc = aloe("mix", "-i", str(source), "--tokenizer", str(tiny_model_dir), "--share", "medical/text=0.5",
                "--share", "general/text=0.5", "--no-cache", "-o", str(output), "--report", str(report_path))
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(output)
    ids = [r["id"] for r in records]
    # general is capped by max_repeats (1): both of its records, once; medical fills the rest with whole records,
    # as few as can be, since every extra long answer moves the mixture further from 50/50. Never 0% medical.
    assert sorted(i for i in ids if i.startswith("gen")) == ["gen-0", "gen-1"]
    assert len([i for i in ids if i.startswith("med")]) == 1
    shares, tokens = shares_of(records, hf_tokenizer)
    assert 0.5 < shares["medical/text"] < 1 and 0 < shares["general/text"] < 0.5
    report = json.loads(report_path.read_text())
    assert report["cells"]["medical/text"]["share_after"] == pytest.approx(shares["medical/text"], abs=1e-6)
    check_misses(report, proc.stderr, shares, tokens, {"medical/text": 0.5, "general/text": 0.5})
    short = next(m for m in report["targets"]["missed"] if m["cell"] == "general/text")
    assert short["reason"] == "exhausted" and "add data or raise max_repeats" in proc.stderr
    assert "2 cell(s) miss their target by more than the tolerance of 1 percentage point(s)" in proc.stderr


def test_records_too_long_for_their_part_are_reported_not_dropped(tmp_path, tiny_model_dir, hf_tokenizer):
    """With --max-repeats 3 the exact plan gives medical half a record: it gets one, and the miss is said."""
    source = issue_input(tmp_path)
    proc = aloe("mix", "-i", str(source), "--tokenizer", str(tiny_model_dir), "--share", "medical/text=0.5",
                "--share", "general/text=0.5", "--max-repeats", "3", "--no-cache", "--report",
                str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(proc.stdout)
    assert sorted(r["id"] for r in records if r["id"].startswith("gen")) == ["gen-0"] * 3 + ["gen-1"] * 3
    shares, tokens = shares_of(records, hf_tokenizer)
    assert abs(shares["medical/text"] - 0.5) > 0.01  # whole records cannot do better here
    check_misses(json.loads((tmp_path / "r.json").read_text()), proc.stderr, shares, tokens,
                 {"medical/text": 0.5, "general/text": 0.5})


def test_a_requested_size_with_a_short_cell_is_reported_consistently(tmp_path, tiny_model_dir, hf_tokenizer):
    source = issue_input(tmp_path, general=3)
    targets = {"medical/text": 0.6, "general/text": 0.4}
    proc = aloe("mix", "-i", str(source), "--tokenizer", str(tiny_model_dir), "--share", "medical/text=0.6",
                "--share", "general/text=0.4", "--total-tokens", "600", "--no-cache", "--report",
                str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    shares, tokens = shares_of(read_jsonl(proc.stdout), hf_tokenizer)
    assert shares["general/text"] < 0.1
    check_misses(json.loads((tmp_path / "r.json").read_text()), proc.stderr, shares, tokens, targets)


def test_strict_exits_1_after_the_table_and_writes_nothing(tmp_path, tiny_model_dir):
    source = issue_input(tmp_path)
    output, report_path = tmp_path / "mix.jsonl", tmp_path / "mix.json"
    proc = aloe("mix", "-i", str(source), "--tokenizer", str(tiny_model_dir), "--share", "medical/text=0.5",
                "--share", "general/text=0.5", "--no-cache", "--strict", "-o", str(output), "--report",
                str(report_path))
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("aloe: error: 2 cell(s) miss their target by more than the tolerance of 1 "), lines
    assert "general/text 14.3% for a 50.0% target" in lines[-1] and "nothing written" in lines[-1]
    assert table_row(proc.stderr, "general/text")[3] == "14.3%"  # the table came first, then the one-line error
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "mix.json"]  # no output, no temporary file
    report = json.loads(report_path.read_text())
    assert report["targets"]["strict"] is True and report["targets"]["met"] is False and report["written"] == 0
    # The same on stdout: no record leaks into a pipe.
    proc = aloe("mix", "-i", str(source), "--tokenizer", str(tiny_model_dir), "--share", "medical/text=0.5",
                "--share", "general/text=0.5", "--no-cache", "--strict")
    assert proc.returncode == 1 and proc.stdout == "" and "aloe: error:" in proc.stderr.splitlines()[-1]


def test_strict_in_the_recipe_and_its_override(tmp_path, tiny_model_dir):
    records = read_jsonl(issue_input(tmp_path))  # a recipe source has one domain: one file per domain
    write_jsonl(tmp_path / "medical.jsonl", [r for r in records if r["domain"] == "medical"])
    write_jsonl(tmp_path / "general.jsonl", [r for r in records if r["domain"] == "general"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"tokenizer: {tiny_model_dir}\nstrict: true\ntolerance: 0.05\n"
                      "targets: {medical/text: 0.5, general/text: 0.5}\nsources:\n"
                      "  - {name: reports, paths: medical.jsonl, domain: medical}\n"
                      "  - {name: yesno, paths: general.jsonl, domain: general}\n")
    proc = aloe("mix", "--recipe", str(recipe), "--no-cache", "-o", str(tmp_path / "out.jsonl"))
    assert proc.returncode == 1, proc.stderr
    assert "tolerance of 5 percentage point(s)" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "out.jsonl").exists()
    proc = aloe("mix", "--recipe", str(recipe), "--no-strict", "--no-cache", "-o", str(tmp_path / "out.jsonl"))
    assert proc.returncode == 0, proc.stderr
    assert "warning: general/text misses its 50.0% target" in proc.stderr and (tmp_path / "out.jsonl").exists()


def test_a_reachable_target_passes_strict_without_warnings(tmp_path, tiny_model_dir, hf_tokenizer):
    source = issue_input(tmp_path, general=30, general_answer=LONG.replace("liver", "lung"))
    proc = aloe("mix", "-i", str(source), "--tokenizer", str(tiny_model_dir), "--share", "medical/text=0.5",
                "--share", "general/text=0.5", "--no-cache", "--strict", "--report", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(proc.stdout)
    shares, tokens = shares_of(records, hf_tokenizer)
    assert shares["medical/text"] == pytest.approx(0.5, abs=0.01)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["targets"]["met"] is True and report["targets"]["missed"] == []
    check_misses(report, proc.stderr, shares, tokens, {"medical/text": 0.5, "general/text": 0.5})
    assert "misses its" not in proc.stderr
