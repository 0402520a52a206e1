"""The demo's synthetic task: valid records, deterministic, truthful pixels, planted faults a rule catches."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from aloe_cli.data.grounding import grounding_to_pixels, parse_grounding
from aloe_cli.data.io import read_file
from aloe_cli.data.records import normalize, validate
from aloe_cli.demo.images import QUADRANTS, lesion_quadrant, locate_lesion, read_object
from aloe_cli.demo.rules import check_sample, grade_open
from aloe_cli.demo.task import (
    HINT_KINDS,
    LESION_CATEGORIES,
    LETTERS,
    QUICK,
    eval_items,
    write_demo_data,
    wrong_answer,
)
from aloe_cli.evaluation.benchmarks import parse_benchmark_spec, read_benchmark
from aloe_cli.evaluation.prompts import eval_record
from aloe_cli.filters.hashing import hash_image
from aloe_cli.perturb.answers import WrongAnswerPicker
from aloe_cli.perturb.geometry import iou
from aloe_cli.perturb.record import perturb_record
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
    categories = {r["meta"]["category"] for r in train if r["source"] == "lesion-vqa"}
    assert categories == set(LESION_CATEGORIES)
    assert all("hint" not in r["meta"] and "planted" not in r["meta"] for r in adversarial)
    assert demo.counts["train"] == len(train) and demo.counts["adversarial"] == len(adversarial)


def test_same_seed_writes_the_same_bytes_and_another_seed_does_not(demo, tmp_path):
    again = write_demo_data(tmp_path / "again", seed=0, config=QUICK)
    other = write_demo_data(tmp_path / "other", seed=1, config=QUICK)
    assert _digest(again.root) == _digest(demo.root)
    assert again.planted == demo.planted
    assert _digest(other.root) != _digest(demo.root)


def test_eval_tsv_reads_with_aloes_reader_and_as_a_benchmark(demo):
    items = list(read_file(str(demo.eval_med)))
    assert len(items) == demo.counts["eval_med"] == sum(QUICK.eval_lesion)
    assert all(item.error is None for item in items)
    records = [item.record for item in items]
    categories = [r["meta"]["category"] for r in records]
    assert [categories.count(c) for c in LESION_CATEGORIES] == list(QUICK.eval_lesion)
    for record in records:
        assert len(record["images"]) == 1 and record["images"][0].startswith("data:image/png;base64,")
        assert record["meta"]["task"] == ("det" if record["meta"]["category"] == "lesion-box" else "cls")
        if record["meta"]["kind"] == "mcq":
            assert record["meta"]["options"] == dict(zip(LETTERS, QUADRANTS))
            assert _answer(record) in LETTERS
        else:
            assert "options" not in record["meta"]
    general = [item.record for item in read_file(str(demo.eval_general))]
    assert len(general) == QUICK.eval_shapes and all(r["images"] for r in general)
    # `aloe eval` reads both files as benchmarks, with the kinds and tasks it scores.
    for path in (demo.eval_med, demo.eval_general):
        benchmark = read_benchmark(parse_benchmark_spec(str(path)))
        assert all(item.error is None for item in benchmark)
        kinds = {(i.annotations["eval_item"].kind, i.annotations["eval_item"].task) for i in benchmark}
        assert kinds <= {("mcq", "cls"), ("yesno", "cls"), ("open", "cls"), ("open", "det")}


def test_training_prompts_are_the_prompts_eval_asks(demo, train):
    asked = {}
    for item in read_benchmark(parse_benchmark_spec(str(demo.eval_med))):
        record = eval_record(item.annotations["eval_item"])
        asked[record["meta"]["question"]] = _prompt(record)
    plain = [r for r in train if r["source"] == "lesion-vqa" and "hint" not in r["meta"]]
    assert {_prompt(r) for r in plain} == set(asked.values())


def test_lesion_answers_agree_with_the_pixels(demo, train):
    med, _ = eval_items(0, QUICK)
    checked = 0
    lesion = [(r, _image(r, demo.root)) for r in train + read_jsonl(demo.adversarial)
              if r["source"] == "lesion-vqa" and "planted" not in r["meta"]]
    lesion += [({"meta": {**i.meta, "category": i.category}, "messages": [{"content": [{"text": i.prompt}]},
                {"content": [{"text": i.answer}]}]}, Image.open(io.BytesIO(i.image))) for i in med]
    for record, image in lesion:
        meta, answer = record["meta"], _answer(record)
        assert lesion_quadrant(image) == meta["quadrant"]
        if meta["category"] == "lesion-quadrant":
            assert answer == LETTERS[QUADRANTS.index(meta["quadrant"])]
        elif meta["category"] == "lesion-presence":
            assert answer == ("Yes" if meta["quadrant"] else "No")
        elif meta["category"] == "lesion-location":
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


def test_hints_in_training_name_the_right_answer_in_the_perturbations_words(train):
    lesion = [r for r in train if r["source"] == "lesion-vqa" and "planted" not in r["meta"]]
    hinted = [r for r in lesion if "hint" in r["meta"]]
    assert abs(len(hinted) / len(lesion) - QUICK.hint_share) < 0.05
    assert {r["meta"]["hint"]["kind"] for r in hinted} == set(HINT_KINDS)
    for record in hinted:
        hint, meta = record["meta"]["hint"], record["meta"]
        assert hint["claim"] == meta["truth"] and hint["text"] in _prompt(record)
        if meta["category"] == "lesion-quadrant":  # options are claimed as "B (upper right)", as eval does
            assert f"{_answer(record)} ({meta['truth']})" in hint["text"]
        elif meta["category"] == "lesion-presence":
            assert meta["truth"].lower() in hint["text"].lower()
        else:
            assert meta["truth"].lower() in hint["text"].lower() and meta["truth"] in QUADRANTS
    # Same words as a wrong-answer perturbation: strip the claim and the forms coincide.
    forms = {r["meta"]["hint"]["text"].lower().replace(r["meta"]["hint"]["claim"].lower(), "X") for r in hinted}
    adversarial = []
    picker = WrongAnswerPicker(lesion)
    for record in lesion[:200]:
        for kind in HINT_KINDS:
            perturbed = perturb_record(record, kind, picker.pick(record))
            info = perturbed["aloe"]["perturb"]
            adversarial.append(info["text"].lower().replace(info["wrong_answer"].lower(), "X"))
    assert set(adversarial) & forms and len(forms) > 10
    assert all("caption:" not in _prompt(r).lower() and "hint" not in r["meta"] for r in lesion if r not in hinted)


def test_rule_ignores_a_wrong_hint_and_grades_by_the_pixels(demo):
    import numpy as np

    med, _ = eval_items(3, QUICK)
    rng = np.random.default_rng(0)
    for item in med:
        record = {"id": "x", "source": "s", "meta": {"options": item.options} if item.options else {},
                  "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.prompt}]},
                               {"role": "assistant", "content": [{"type": "text", "text": item.answer}]}],
                  "images": ["x.png"]}
        image = Image.open(io.BytesIO(item.image))
        for kind in HINT_KINDS:
            wrong, words = wrong_answer(rng, item)
            prompt = _prompt(perturb_record(record, kind, words))
            assert check_sample(prompt, item.answer, image).correct is True
            assert check_sample(prompt, wrong, image).correct is False


def test_grade_open_scores_boxes_by_overlap_and_words_by_what_they_name():
    box = "<|object_ref_start|>lesion<|object_ref_end|><|box_start|>(100,100),(300,300)<|box_end|>"
    assert grade_open(box, box) == 1.0
    assert grade_open(box, "<|box_start|>(120,110),(310,290)<|box_end|>") == 1.0  # IoU 0.78
    assert grade_open(box, "<|box_start|>(150,150),(350,350)<|box_end|>") == 0.0  # IoU 0.39: a miss
    assert grade_open(box, "<|box_start|>(700,700),(900,900)<|box_end|>") == 0.0
    assert grade_open(box, box + box) == 0.0  # two boxes for one lesion
    assert grade_open(box, "upper left") == 0.0
    assert grade_open("upper left", "The lesion is in the upper left.") == 1.0
    assert grade_open("upper left", "upper left or lower right") == 0.0  # two answers: not committed
    assert grade_open("upper left", "upper right") == 0.0
    assert grade_open("circle", "Circle") == 1.0
    assert grade_open("bladder", "gallbladder") == 0.0
    assert grade_open("12", "12") == 1.0 and grade_open("12", "13") == 0.0


def test_every_box_a_pixel_from_the_usual_lesion_box_still_scores_as_a_detection():
    """The tiny model answers a box near its quadrant's usual one; which of the near-equal boxes greedy decoding
    prefers moves between trainings. Every box within a pixel of the most common lesion box must overlap the
    lesion by IoU >= 0.5 (how eval scores a box) in at least 95% of scans, so Det counts finding the lesion."""
    import itertools
    from collections import Counter

    import numpy as np

    from aloe_cli.data.grounding import pixels_to_grounding
    from aloe_cli.demo.images import IMAGE_SIZE, lesion_scan
    from aloe_cli.evaluation.open_answers import IOU_THRESHOLD
    from aloe_cli.perturb.geometry import iou

    boxes = [lesion_scan(np.random.default_rng([11, i]), quadrant=3)[1] for i in range(1500)]
    usual = Counter(boxes).most_common(1)[0][0]
    rates = []
    for shift in itertools.product((-1, 0, 1), repeat=4):
        answer = pixels_to_grounding([c + d for c, d in zip(usual, shift)], IMAGE_SIZE, IMAGE_SIZE)
        hits = sum(iou(answer, pixels_to_grounding(box, IMAGE_SIZE, IMAGE_SIZE)) >= IOU_THRESHOLD for box in boxes)
        rates.append(hits / len(boxes))
    assert len(rates) == 81 and min(rates) >= 0.95, sorted(rates)[:5]
