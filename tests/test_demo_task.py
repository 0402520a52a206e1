"""The demo's synthetic task: valid records, deterministic, truthful pixels, planted faults a rule catches."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from aloe_cli.data.demo_images import QUADRANTS, iou, lesion_quadrant, locate_lesion, read_object
from aloe_cli.data.demo_rules import check_sample
from aloe_cli.data.demo_task import (
    HINT_FORMS,
    LETTERS,
    QUICK,
    eval_items,
    with_hint,
    write_demo_data,
    wrong_answer,
)
from aloe_cli.data.grounding import grounding_to_pixels, parse_grounding
from aloe_cli.data.io import read_file
from aloe_cli.data.records import normalize, validate
from aloe_cli.filters.hashing import hash_image
from support import aloe, read_jsonl


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("demo"), seed=0, config=QUICK)


@pytest.fixture(scope="module")
def train(demo):
    return read_jsonl(demo.train)


def _prompt(record: dict) -> str:
    return record["messages"][0]["content"][-1]["text"]


def _answer(record: dict) -> str:
    return record["messages"][-1]["content"][0]["text"]


def _image(record: dict, root: Path) -> Image.Image | None:
    return Image.open(root / record["images"][0]) if record["images"] else None


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def test_records_validate_and_cover_every_source_and_kind(demo, train):
    adversarial = read_jsonl(demo.adversarial)
    for record in train + adversarial:
        assert validate(record) is record
        assert normalize(json.loads(json.dumps(record))) == record
    assert len({r["id"] for r in train}) == len(train)
    by_source = {(r["source"], r["domain"], bool(r["images"])) for r in train}
    assert by_source == {("lesion-vqa", "medical", True), ("shapes-vqa", "general", True),
                         ("med-facts", "medical", False), ("arithmetic", "general", False)}
    kinds = {r["meta"]["kind"] for r in train if r["source"] == "lesion-vqa"}
    assert kinds == {"mcq", "yesno", "open", "det"}
    assert all("hint" not in r["meta"] and "planted" not in r["meta"] for r in adversarial)
    assert demo.counts["train"] == len(train) and demo.counts["adversarial"] == len(adversarial)


def test_same_seed_writes_the_same_bytes_and_another_seed_does_not(demo, tmp_path):
    again = write_demo_data(tmp_path / "again", seed=0, config=QUICK)
    other = write_demo_data(tmp_path / "other", seed=1, config=QUICK)
    assert _digest(again.root) == _digest(demo.root)
    assert again.planted == demo.planted
    assert _digest(other.root) != _digest(demo.root)


def test_eval_tsv_reads_with_aloes_reader(demo):
    items = list(read_file(str(demo.eval_med)))
    assert len(items) == demo.counts["eval_med"] == sum(QUICK.eval_lesion)
    assert all(item.error is None for item in items)
    records = [item.record for item in items]
    kinds = [r["meta"]["kind"] for r in records]
    assert {k: kinds.count(k) for k in ("mcq", "yesno", "open", "det")} == dict(
        zip(("mcq", "yesno", "open", "det"), QUICK.eval_lesion))
    for record in records:
        assert len(record["images"]) == 1 and record["images"][0].startswith("data:image/png;base64,")
        assert record["meta"]["task"] == ("det" if record["meta"]["kind"] == "det" else "cls")
        if record["meta"]["kind"] == "mcq":
            assert record["meta"]["options"] == dict(zip(LETTERS, QUADRANTS))
            assert _answer(record) in LETTERS
        else:
            assert "options" not in record["meta"]
    general = [item.record for item in read_file(str(demo.eval_general))]
    assert len(general) == QUICK.eval_shapes and all(r["images"] for r in general)


def test_lesion_answers_agree_with_the_pixels(demo, train):
    med, _ = eval_items(0, QUICK)
    checked = 0
    lesion = [(r, _image(r, demo.root)) for r in train + read_jsonl(demo.adversarial)
              if r["source"] == "lesion-vqa" and "planted" not in r["meta"]]
    lesion += [({"meta": {**i.meta, "kind": i.kind}, "messages": [{"content": [{"text": i.prompt}]},
                {"content": [{"text": i.answer}]}]}, Image.open(io.BytesIO(i.image))) for i in med]
    for record, image in lesion:
        meta, answer = record["meta"], _answer(record)
        assert lesion_quadrant(image) == meta["quadrant"]
        if meta["kind"] == "mcq":
            assert answer == LETTERS[QUADRANTS.index(meta["quadrant"])]
        elif meta["kind"] == "yesno":
            assert answer == ("Yes" if meta["quadrant"] else "No")
        elif meta["kind"] == "open":
            assert answer == meta["quadrant"]
        else:
            (box,) = parse_grounding(answer)
            assert box.label == "lesion"
            assert iou(grounding_to_pixels(box.box, image.width, image.height), locate_lesion(image)) >= 0.6
        checked += 1
    assert checked > 2000
    assert {r["meta"]["quadrant"] for r, _ in lesion} == {*QUADRANTS, None}


def test_general_answers_agree_with_the_pixels(demo, train):
    shapes = [r for r in train if r["source"] == "shapes-vqa" and "planted" not in r["meta"]]
    assert shapes
    for record in shapes:
        assert read_object(_image(record, demo.root)) == (record["meta"]["colour"], record["meta"]["shape"])


def test_planted_leaks_are_exact_or_hash_equal_copies_of_eval_images(demo, train):
    eval_hashes = {}
    for item in read_file(str(demo.eval_med)):
        eval_hashes.setdefault(hash_image(item.record["images"][0]), []).append(int(item.record["id"]))
    eval_bytes = {int(i.record["id"]): base64.b64decode(i.record["images"][0].split(",", 1)[1])
                  for i in read_file(str(demo.eval_med))}
    leaks = [r for r in train if r["meta"].get("planted") == "eval_leak"]
    assert sorted(r["id"] for r in leaks) == sorted(demo.planted["eval_leak"])
    copies = sorted(r["meta"]["copy"] for r in leaks)
    assert copies == ["exact"] * QUICK.leaks_exact + ["reencoded"] * QUICK.leaks_reencoded
    for record in leaks:
        data = (demo.root / record["images"][0]).read_bytes()
        source = record["meta"]["leak_of"]
        assert (data == eval_bytes[source]) == (record["meta"]["copy"] == "exact")
        assert source in eval_hashes[hash_image(data)]
    # No other training image collides with an evaluation image (dedup must drop the leaks only).
    clean = [r for r in train if r["images"] and r["meta"].get("planted") != "eval_leak"]
    assert not [r["id"] for r in clean if hash_image(r["images"][0], demo.root) in eval_hashes]


def test_dedup_cli_rejects_exactly_the_planted_leaks(demo, tmp_path):
    rejects = tmp_path / "leaks.jsonl"
    result = aloe("dedup", "-i", str(demo.train), "--against", str(demo.eval_med), "--rejects", str(rejects),
                  "-o", str(tmp_path / "clean.jsonl"))
    assert result.returncode == 0, result.stderr
    assert "eval_leak" in result.stderr
    assert sorted(r["id"] for r in read_jsonl(rejects)) == sorted(demo.planted["eval_leak"])
    assert len(read_jsonl(tmp_path / "clean.jsonl")) == demo.counts["train"] - len(demo.planted["eval_leak"])


def test_rule_rejects_planted_bad_samples_and_accepts_the_rest(demo, train):
    verdicts = {}
    for record in train + read_jsonl(demo.adversarial):
        verdict = check_sample(_prompt(record), _answer(record), _image(record, demo.root))
        verdicts.setdefault(record["meta"].get("planted", "good"), []).append(verdict.correct)
    assert set(verdicts["wrong_answer"]) == {False} and len(verdicts["wrong_answer"]) >= 20
    assert set(verdicts["empty_answer"]) == {False} and len(verdicts["empty_answer"]) >= 20
    assert set(verdicts["good"]) == {True} and set(verdicts["eval_leak"]) == {True}
    planted = {p: sorted(r["id"] for r in train if r["meta"].get("planted") == p) for p in demo.planted}
    assert planted == {p: sorted(ids) for p, ids in demo.planted.items()}
    wrong_sources = {r["source"] for r in train if r["meta"].get("planted") == "wrong_answer"}
    assert wrong_sources == {"lesion-vqa", "shapes-vqa", "med-facts", "arithmetic"}


def test_hints_in_training_name_the_right_answer_in_both_forms(train):
    lesion = [r for r in train if r["source"] == "lesion-vqa" and "planted" not in r["meta"]]
    hinted = [r for r in lesion if "hint" in r["meta"]]
    assert abs(len(hinted) / len(lesion) - QUICK.hint_share) < 0.05
    assert {r["meta"]["hint"]["form"] for r in hinted} == set(HINT_FORMS)
    for record in hinted:
        hint = record["meta"]["hint"]
        assert hint["text"] == record["meta"]["truth"]
        assert hint["text"] in _prompt(record)
    assert all("Caption:" not in _prompt(r) and "fairly sure" not in _prompt(r) for r in lesion if r not in hinted)


def test_rule_ignores_a_wrong_hint_and_grades_by_the_pixels():
    import numpy as np

    med, _ = eval_items(3, QUICK)
    rng = np.random.default_rng(0)
    for item in med:
        image = Image.open(io.BytesIO(item.image))
        for form in HINT_FORMS:
            prompt = with_hint(item.prompt, form, wrong_answer(rng, item)[1])
            assert check_sample(prompt, item.answer, image).correct is True
            assert check_sample(prompt, wrong_answer(rng, item)[0], image).correct is False
