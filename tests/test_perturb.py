"""Adversarial perturbations on real images: pixels, prompts, wrong answers, determinism, PHI."""

from __future__ import annotations

import base64
import copy
import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from aloe_cli.data.grounding import format_object, parse_grounding, without_grounding
from aloe_cli.data.images import load_image, to_data_uri
from aloe_cli.data.io import Item, read_items, tsv_row_to_record
from aloe_cli.data.records import text_of, validate
from aloe_cli.data.shard import Shard
from aloe_cli.data.stage import RunConfig, run_stage
from aloe_cli.errors import RecordError
from aloe_cli.perturb import KINDS, PerturbStage, WrongAnswerPicker, perturb_record
from aloe_cli.perturb.geometry import intersection
from aloe_cli.perturb.render import MIN_FONT_PX
from support import chat, scan, write_jsonl

DICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
DICOMS = ("CT_small.dcm", "MR_small.dcm")


def png_file(path: Path, image: Image.Image, **chunks: str) -> str:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    image.save(path, format="PNG", pnginfo=info)
    return str(path)


@pytest.fixture
def images(tmp_path) -> dict[str, str]:
    """Image entries by name: the bundled DICOM files and synthetic scans at 448 and 56 pixels."""
    return {
        "CT_small.dcm": str(DICOM_DIR / "CT_small.dcm"),
        "MR_small.dcm": str(DICOM_DIR / "MR_small.dcm"),
        "scan448": png_file(tmp_path / "scan448.png", scan(1, size=448)),
        "scan56": png_file(tmp_path / "scan56.png", scan(2, size=256).resize((56, 56), Image.LANCZOS)),
    }


def organ_record(image: str | None, answer: str = "The liver.", record_id: str = "r1", **extra) -> dict:
    return chat("Which organ is abnormal?", answer, [image] if image else [], id=record_id, source="rad", **extra)


def changed_pixels(before: Image.Image, after: Image.Image) -> np.ndarray:
    """Mask of pixels whose value changed (colour images compared in RGB)."""
    mode = "RGB" if "RGB" in (before.mode, after.mode) else "L"
    a = np.asarray(before.convert(mode), dtype=np.int16)
    b = np.asarray(after.convert(mode), dtype=np.int16)
    diff = np.abs(a - b)
    return diff.max(axis=-1) > 0 if diff.ndim == 3 else diff > 0


def inside(mask_shape: tuple[int, int], box) -> np.ndarray:
    x1, y1, x2, y2 = (int(v) for v in box)
    region = np.zeros(mask_shape, dtype=bool)
    region[y1:y2, x1:x2] = True
    return region


def best_match(crop: np.ndarray, text: str, px: int, background: int) -> float:
    """Smallest mean absolute difference between a fresh rendering of `text` and any window of `crop`."""
    font = ImageFont.load_default(size=px)
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (right + 2, bottom + 2), background)
    ImageDraw.Draw(canvas).text((0, 0), text, font=font, fill=255 - background)
    template = np.asarray(canvas.crop(canvas.point(lambda v: 255 if v != background else 0).getbbox()),
                          dtype=np.float64)
    th, tw = template.shape
    windows = np.lib.stride_tricks.sliding_window_view(crop.astype(np.float64), (th, tw))
    if windows.size == 0:
        return float("inf")
    return float(np.abs(windows - template).mean(axis=(-2, -1)).min())


def ink_runs(crop: np.ndarray, background: int) -> list[int]:
    """Heights of the bands of rows that hold text (one band per line of text)."""
    rows = (np.abs(crop.astype(np.int16) - background) > 127).any(axis=1)
    runs, length = [], 0
    for has_ink in rows:
        if has_ink:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs + ([length] if length else [])


# ----------------------------------------------------------------------------- cap and leg: text in the pixels

@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "scan448", "scan56"])
@pytest.mark.parametrize("kind", ["cap", "leg"])
def test_drawn_text_changes_pixels_inside_its_block_only_and_reads_back(images, name, kind):
    record = organ_record(images[name])
    out = perturb_record(record, kind, "spleen", seed=3)
    info = out["aloe"]["perturb"]
    before, after = load_image(images[name]), load_image(out["images"][0])
    assert after.size == before.size and out["images"][0].startswith("data:image/png;base64,")
    changed = changed_pixels(before, after)
    block = inside(changed.shape, info["box"])
    assert changed.any() and not (changed & ~block).any()  # nothing changed outside the block
    assert changed[block].mean() > 0.3  # the block is an opaque box, not a faint overlay
    crop = np.asarray(after.convert("L"))[info["box"][1]:info["box"][3], info["box"][0]:info["box"][2]].copy()
    background = int(crop[1, -2])
    if kind == "leg":  # the key swatch is not text: paint it over with the background before reading
        kx1, ky1, kx2, ky2 = (v - o for v, o in zip(info["key_box"], info["box"]))
        crop[max(0, ky1):ky2, max(0, kx1):kx2] = background
        assert np.asarray(after.convert("RGB"))[info["key_box"][1] + 2, info["key_box"][0] + 2].tolist() == \
            info["key_colour"]
    assert "spleen" in info["text"] and info["lines"]
    for line in info["lines"]:
        assert best_match(crop, line, info["font_px"], background) < 1.0, line
    assert best_match(crop, "kidney", info["font_px"], background) > 10  # a word that is not there does not match


@pytest.mark.parametrize("size,min_glyph_px", [(56, 8), (448, 15)])
@pytest.mark.parametrize("kind", ["cap", "leg"])
def test_drawn_text_is_legible_at_the_models_input_sizes(tmp_path, kind, size, min_glyph_px):
    image = png_file(tmp_path / "s.png", scan(5, size=max(size, 128)).resize((size, size)))
    out = perturb_record(chat("Is there a lesion?", "No.", [image], id="q"), kind, "Yes", seed=0)
    info = out["aloe"]["perturb"]
    x1, y1, x2, y2 = info["box"]
    crop = np.asarray(load_image(out["images"][0]).convert("L"))[y1:y2, x1:x2].copy()
    background = int(crop[1, -2])
    if kind == "leg":
        kx1 = info["key_box"][2] - x1 + 1  # read only the label, right of the key
        crop = crop[:, kx1:]
    runs = ink_runs(crop, background)
    assert runs and min(runs) >= min_glyph_px, runs
    assert info["font_px"] >= MIN_FONT_PX
    assert info["font_px"] >= 0.04 * size  # scales with the image, not a fixed size


def test_caption_stays_off_a_known_finding(images):
    finding = [20, 20, 260, 240]
    for seed in range(25):
        record = organ_record(images["scan448"], objects=[{"bbox": finding, "label": "mass"}])
        info = perturb_record(record, "cap", "spleen", seed=seed)["aloe"]["perturb"]
        assert intersection(info["box"], finding) == 0 and info["overlaps_finding"] is False
    # The same finding known only from grounding text in the answer (0..1000 of the 448-pixel image).
    grounded = organ_record(images["scan448"], answer="The liver. " + format_object("mass", (45, 45, 580, 536)))
    for seed in range(25):
        info = perturb_record(grounded, "leg", "spleen", seed=seed)["aloe"]["perturb"]
        assert intersection(info["box"], finding) == 0


def test_a_finding_covering_the_image_is_reported_not_hidden(images):
    record = organ_record(images["scan448"], objects=[{"bbox": [0, 0, 448, 448], "label": "diffuse"}])
    info = perturb_record(record, "cap", "spleen")["aloe"]["perturb"]
    assert info["overlaps_finding"] is True


def test_a_long_wrong_answer_wraps_shrinks_and_is_cut_within_half_the_image(images):
    sentence = "a large heterogeneous mass of the left adrenal gland with central necrosis and calcification"
    wrapped = perturb_record(organ_record(images["scan448"]), "cap", sentence, seed=1)["aloe"]["perturb"]
    assert len(wrapped["lines"]) in (2, 3) and wrapped["font_px"] == 22  # 5% of 448: wrapping was enough
    assert " ".join(wrapped["lines"]).endswith("calcification")
    long = perturb_record(organ_record(images["scan448"]), "cap", f"{sentence}; {sentence}; {sentence}",
                          seed=1)["aloe"]["perturb"]
    x1, y1, x2, y2 = long["box"]
    assert MIN_FONT_PX <= long["font_px"] < 22 and len(long["lines"]) == 3 and long["lines"][-1].endswith("...")
    assert x2 <= 448 and (y2 - y1) <= 0.5 * 448


# ----------------------------------------------------------------------------- prompt forms

def test_pmt_puts_a_caption_with_the_wrong_answer_before_or_after_the_question(images):
    record = organ_record(images["CT_small.dcm"])
    positions = set()
    for seed in range(12):
        out = perturb_record(record, "pmt", "spleen", seed=seed)
        info = out["aloe"]["perturb"]
        question = text_of(out["messages"][0])
        assert "caption" in info["text"].lower() or info["text"].startswith("Report excerpt:")
        assert "Spleen." in info["text"]
        expected = (f"{info['text']}\nWhich organ is abnormal?" if info["position"] == "before"
                    else f"Which organ is abnormal?\n{info['text']}")
        assert question == expected
        assert out["messages"][1] == record["messages"][1]  # the target stays correct
        assert out["images"] == record["images"]  # a prompt perturbation leaves the image as it was
        positions.add(info["position"])
    assert positions == {"before", "after"}


def test_syc_appends_a_confident_wrong_opinion_in_several_phrasings(images):
    record = organ_record(images["scan448"])
    phrasings = set()
    for seed in range(20):
        out = perturb_record(record, "syc", "The spleen.", seed=seed)
        info = out["aloe"]["perturb"]
        assert text_of(out["messages"][0]) == "Which organ is abnormal?\n" + info["text"]
        assert "the spleen" in info["text"] and ".." not in info["text"]
        assert out["messages"][1] == record["messages"][1]
        phrasings.add(info["text"])
    assert len(phrasings) >= 4


def test_yes_no_caption_names_the_question():
    record = chat("Is there a pleural effusion?", "No, there is none.", id="y")
    wrong = WrongAnswerPicker().pick(record)
    assert wrong == "Yes"
    out = perturb_record(record, "pmt", wrong, seed=0)
    assert 'the answer to "Is there a pleural effusion?" is Yes.' in out["aloe"]["perturb"]["text"]


# ----------------------------------------------------------------------------- region

def test_region_moves_a_quoted_box_to_a_clear_area_of_the_same_size():
    true_box = (120, 300, 420, 640)
    answer_box = (600, 80, 760, 200)
    question = "What is in " + format_object("the marked area", true_box) + "?"
    record = chat(question, "A nodule. " + format_object("nodule", answer_box), id="g")
    for seed in range(15):
        out = perturb_record(record, "region", "mass", seed=seed)
        moved = parse_grounding(text_of(out["messages"][0]))
        assert len(moved) == 1 and moved[0].label == "the marked area"
        x1, y1, x2, y2 = moved[0].box
        assert (x2 - x1, y2 - y1) == (true_box[2] - true_box[0], true_box[3] - true_box[1])
        assert 0 <= x1 and 0 <= y1 and x2 <= 1000 and y2 <= 1000
        assert intersection(moved[0].box, true_box) == 0 and intersection(moved[0].box, answer_box) == 0
        assert out["messages"][1] == record["messages"][1]
        assert out["aloe"]["perturb"]["from"] == [list(true_box)]


@pytest.mark.parametrize("name", ["CT_small.dcm", "scan448"])
def test_region_draws_the_box_on_a_wrong_area_of_the_image(images, name):
    size = load_image(images[name]).size
    finding = [size[0] * 0.55, size[1] * 0.5, size[0] * 0.8, size[1] * 0.75]
    record = organ_record(images[name], objects=[{"bbox": finding, "label": "lesion"}])
    out = perturb_record(record, "region", "spleen", seed=2)
    info = out["aloe"]["perturb"]
    drawn = info["to"]
    assert intersection(drawn, finding) == 0
    assert round(drawn[2] - drawn[0]) == round(finding[2] - finding[0])
    changed = changed_pixels(load_image(images[name]), load_image(out["images"][0]))
    assert changed.any() and not (changed & inside(changed.shape, finding)).any()
    assert not (changed & ~inside(changed.shape, drawn)).any()
    assert not changed[inside(changed.shape, [drawn[0] + info["line_px"], drawn[1] + info["line_px"],
                                              drawn[2] - info["line_px"], drawn[3] - info["line_px"]])].any()
    assert parse_grounding(info["text"])[0].label == "lesion"


def test_kinds_that_cannot_apply_say_why():
    text_only = chat("Which organ is abnormal?", "The liver.", id="t", source="rad")
    for kind in ("cap", "leg"):
        with pytest.raises(RecordError) as caught:
            perturb_record(text_only, kind, "spleen")
        assert caught.value.reason == "perturb_needs_image"
    with pytest.raises(RecordError) as caught:
        perturb_record(text_only, "region", "spleen")
    assert caught.value.reason == "perturb_needs_box"
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb_record(text_only, "blur", "spleen")
    with pytest.raises(ValueError, match="correct answer"):
        perturb_record(text_only, "syc", "the liver")


# ----------------------------------------------------------------------------- wrong answers

def test_yes_no_gets_the_opposite():
    picker = WrongAnswerPicker()
    for answer, wrong in (("Yes", "No"), ("no", "yes"), ("No, there is no effusion.", "Yes"), ("yes.", "no")):
        assert picker.pick(chat("Is it?", answer, id=answer)) == wrong
    # "No abnormality" is a finding, not a yes/no answer: it needs a pool.
    with pytest.raises(RecordError) as caught:
        picker.pick(chat("What do you see?", "No abnormality.", id="n"))
    assert caught.value.reason == "perturb_no_wrong_answer"


def test_options_give_a_wrong_option_whether_the_answer_is_a_letter_or_text(images):
    row = {"index": "7", "question": "Which side is affected?", "A": "left", "B": "right", "C": "both",
           "D": "neither", "answer": "B", "image_path": images["scan448"]}
    record = tsv_row_to_record(row, "bench", {})
    by_text = chat("Which side is affected?", "right", id="8", options=["left", "right", "both", "neither"])
    picker = WrongAnswerPicker()
    for candidate in (record, by_text):
        picks = {picker.pick(candidate, seed=seed) for seed in range(40)}
        assert picks == {"left", "both", "neither"}  # every wrong option, never the correct one
    out = perturb_record(record, "syc", "both", seed=0)
    info = out["aloe"]["perturb"]
    assert info["wrong_option"] == "C" and info["wrong_answer"] == "both" and "C (both)" in info["text"]
    assert text_of(out["messages"][-1]) == "B"
    letter_form = perturb_record(record, "syc", "C", seed=0)["aloe"]["perturb"]
    assert letter_form == info  # a letter and its option's text name the same wrong answer


def test_pool_answers_come_from_the_same_source_and_prefer_the_same_question():
    records = [chat("Which organ is abnormal?", answer, id=f"a{i}", source="rad")
               for i, answer in enumerate(["The liver.", "The spleen.", "the liver", "The pancreas."])]
    records += [chat("What modality is this?", "CT", id="m", source="rad"),
                chat("Which organ is abnormal?", "The heart.", id="o", source="other")]
    picker = WrongAnswerPicker(records)
    target = records[0]
    picks = {picker.pick(target, seed=seed) for seed in range(60)}
    assert picks == {"The spleen.", "The pancreas."}  # same question first; never the liver, never "other"
    lonely = chat("What modality is this?", "MRI", id="z", source="rad")
    assert {picker.pick(lonely, seed=seed) for seed in range(60)} == {"CT"}  # its question's other answer
    with pytest.raises(RecordError):
        picker.pick(chat("Anything?", "Something.", id="x", source="nowhere"))
    shuffled = records[:]
    random.Random(4).shuffle(shuffled)
    again = WrongAnswerPicker(shuffled)
    rad = records[:5]
    assert [again.pick(r, seed=9) for r in rad] == [picker.pick(r, seed=9) for r in rad]  # the pool is a set


# ----------------------------------------------------------------------------- determinism, ids, untouched input

def test_same_seed_same_record_same_output_whatever_the_order(images):
    records = [organ_record(images[name], record_id=name) for name in images]
    records.append(chat("Which organ is abnormal?", "The liver.", id="text-only", source="rad"))

    def run(batch, seed):
        outputs = {}
        for record in batch:
            for kind in KINDS:
                try:
                    outputs[f"{record['id']}/{kind}"] = perturb_record(record, kind, "spleen", seed=seed)
                except RecordError as error:
                    outputs[f"{record['id']}/{kind}"] = error.reason
        return outputs

    first = run(records, seed=11)
    shuffled = records[::-1]
    shards = [shuffled[0::2], shuffled[1::2]]
    again = {**run(shards[1], seed=11), **run(shards[0], seed=11)}
    assert json.dumps(first, sort_keys=True, default=str) == json.dumps(
        {key: again[key] for key in first}, sort_keys=True, default=str)
    other_seed = run(records, seed=12)
    assert any(first[key] != other_seed[key] for key in first if first[key] is not None)


def test_input_is_untouched_and_output_is_a_valid_record(images):
    record = organ_record(images["scan448"], objects=[{"bbox": [10, 10, 90, 90], "label": "x"}],
                          aloe={"dedup": {"phash": ["00"]}})
    snapshot = copy.deepcopy(record)
    for kind in KINDS:
        out = perturb_record(record, kind, "spleen", seed=0)
        assert record == snapshot
        validate(out)
        assert out["id"] == f"r1#{kind}" and out["aloe"]["perturb"]["of"] == "r1"
        assert out["aloe"]["dedup"] == {"phash": ["00"]}  # other annotations travel along
        assert out["aloe"]["perturb"]["kind"] == kind and out["aloe"]["perturb"]["wrong_answer"] == "spleen"
        assert out["messages"][-1] == record["messages"][-1]
    unnamed = {k: v for k, v in record.items() if k != "id"}
    ids = {perturb_record(unnamed, "syc", "spleen")["id"] for _ in range(2)}
    assert len(ids) == 1 and ids.pop().endswith("#syc")


# ----------------------------------------------------------------------------- no DICOM header, no metadata

@pytest.mark.parametrize("name", DICOMS)
def test_no_dicom_header_or_patient_data_in_any_output(name):
    path = DICOM_DIR / name
    patient = str(pydicom.dcmread(path).PatientName)
    embedded = to_data_uri(path.read_bytes())
    for entry in (str(path), embedded, {"bytes": path.read_bytes(), "path": None}):
        record = organ_record(entry, objects=[{"bbox": [2, 2, 20, 20], "label": "x"}])
        for kind in KINDS:
            out = perturb_record(record, kind, "spleen", seed=1)
            dumped = json.dumps(out, default=lambda value: "<bytes>")
            assert patient not in dumped
            for image in out["images"]:
                if image == str(path):  # an untouched DICOM path stays a path: nothing was copied
                    continue
                assert image.startswith("data:image/png;base64,")
                data = base64.b64decode(image.partition(",")[2])
                assert b"DICM" not in data and patient.encode() not in data


def test_changed_images_carry_no_source_metadata(tmp_path):
    source = png_file(tmp_path / "tagged.png", scan(3, size=200), PatientName="Doe^Jane", Comment="ward 7")
    assert Image.open(source).text["PatientName"] == "Doe^Jane"
    for kind in ("cap", "leg"):
        out = perturb_record(organ_record(source), kind, "spleen")
        decoded = Image.open(io.BytesIO(base64.b64decode(out["images"][0].partition(",")[2])))
        assert decoded.format == "PNG" and not getattr(decoded, "text", {}) and not decoded.info.get("icc_profile")
        assert b"Doe^Jane" not in base64.b64decode(out["images"][0].partition(",")[2])


# ----------------------------------------------------------------------------- the stage, through the runner

class ListWriter:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


def stage_inputs(tmp_path, count: int, text_only_every: int = 0) -> list[Item]:
    """Records of one source with images, boxes and varied answers; every n-th one text-only."""
    image = png_file(tmp_path / "stage.png", scan(7, size=160))
    organs = ["liver", "spleen", "left kidney", "pancreas", "heart"]
    items = []
    for i in range(count):
        text_only = text_only_every and i % text_only_every == 0
        record = chat("Which organ is abnormal?", f"The {organs[i % len(organs)]}.", [] if text_only else [image],
                      id=f"s{i}", source="rad",
                      **({} if text_only else {"objects": [{"bbox": [100, 100, 150, 150], "label": "lesion"}]}))
        items.append(Item(record, f"in.jsonl:{i + 1}", "in.jsonl", image_root=tmp_path))
    return items


def run(stage, items, **config):
    out, rejects = ListWriter(), ListWriter()
    summary = run_stage(stage, items, out, rejects, RunConfig(**{"batch_size": 7, **config}))
    return out.records, rejects.records, summary


def test_stage_rotation_gives_each_input_one_kind_balanced_across_kinds(tmp_path):
    items = stage_inputs(tmp_path, 40)
    out, rejects, summary = run(PerturbStage(KINDS, seed=5), items)
    kinds = Counter(record["aloe"]["perturb"]["kind"] for record in out)
    assert kinds == {kind: 8 for kind in KINDS}
    assert [record["aloe"]["perturb"]["of"] for record in out] == [item.record["id"] for item in items]
    assert (summary.read, summary.kept, summary.rejected, summary.emitted) == (40, 40, 0, 40)
    assert summary.extra["kinds"] == dict(kinds)
    first_five = [record["aloe"]["perturb"]["kind"] for record in out[:5]]
    assert sorted(first_five) == sorted(KINDS)  # a rotation: each kind once before any repeats
    orders = {tuple(r["aloe"]["perturb"]["kind"] for r in run(PerturbStage(KINDS, seed=seed), items[:5])[0])
              for seed in range(6)}
    assert len(orders) > 1  # the rotation is seeded


def test_stage_balances_around_kinds_that_do_not_apply(tmp_path):
    items = stage_inputs(tmp_path, 60, text_only_every=3)
    out, rejects, summary = run(PerturbStage(KINDS, seed=0), items)
    assert len(out) == 60 and not rejects
    text_only = {f"s{i}" for i in range(0, 60, 3)}
    # Balanced within each group of records the same kinds apply to, not over all: the 40 records with an image
    # and a box take every kind 8 times, the 20 text-only ones pmt and syc 10 times each.
    with_image = Counter(r["aloe"]["perturb"]["kind"] for r in out if r["aloe"]["perturb"]["of"] not in text_only)
    text = Counter(r["aloe"]["perturb"]["kind"] for r in out if r["aloe"]["perturb"]["of"] in text_only)
    assert with_image == {kind: 8 for kind in KINDS} and text == {"pmt": 10, "syc": 10}
    skipped = summary.extra["skipped"]
    assert set(skipped) <= {"cap", "leg", "region"} and all(
        set(reasons) <= {"perturb_needs_image", "perturb_needs_box"} for reasons in skipped.values())


def test_stage_every_kind_per_item_for_evaluation(tmp_path):
    items = stage_inputs(tmp_path, 6, text_only_every=2)
    out, rejects, summary = run(PerturbStage(("pmt", "cap", "syc", "leg"), seed=1, per_record=None), items)
    by_input = {}
    for record in out:
        by_input.setdefault(record["aloe"]["perturb"]["of"], []).append(record["aloe"]["perturb"]["kind"])
    assert by_input == {f"s{i}": (["pmt", "syc"] if i % 2 == 0 else ["pmt", "cap", "syc", "leg"]) for i in range(6)}
    assert summary.emitted == 18 and summary.kept == 6
    assert summary.extra["skipped"] == {"cap": {"perturb_needs_image": 3}, "leg": {"perturb_needs_image": 3}}
    wrong = {record["aloe"]["perturb"]["of"]: set() for record in out}
    for record in out:
        wrong[record["aloe"]["perturb"]["of"]].add(record["aloe"]["perturb"]["wrong_answer"])
    assert all(len(answers) == 1 for answers in wrong.values())  # one wrong answer per item, whatever the kind


def test_stage_sample_cap_stays_balanced_and_accounts_for_every_input(tmp_path):
    items = stage_inputs(tmp_path, 40)
    out, rejects, summary = run(PerturbStage(KINDS, seed=2, samples=15), items)
    assert len(out) == 15 and Counter(r["aloe"]["perturb"]["kind"] for r in out) == {kind: 3 for kind in KINDS}
    assert {r["aloe"]["reject"]["reason"] for r in rejects} == {"sample_limit"} and len(rejects) == 25
    assert summary.read == summary.kept + summary.rejected == 40


def test_stage_results_do_not_depend_on_sharding_or_batching(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [item.record for item in stage_inputs(tmp_path, 12, 4)])
    picker = WrongAnswerPicker(item.record for item in read_items([str(source)]))  # the whole input's answers

    def shard(k: int, n: int) -> list[Item]:
        return list(read_items([str(source)], shard=Shard(k, n)))

    whole = run(PerturbStage(KINDS, seed=3, per_record=None, picker=picker), shard(0, 1), batch_size=5)[0]
    halves = [run(PerturbStage(KINDS, seed=3, per_record=None, picker=picker), shard(k, 2), batch_size=2)[0]
              for k in (1, 0)]
    assert len(whole) == 12 * 2 + 9 * 3  # text-only records take pmt and syc only
    assert {r["id"]: r for r in whole} == {r["id"]: r for half in halves for r in half}
    rotated = run(PerturbStage(KINDS, seed=3, picker=picker), shard(1, 2))[0]
    by_id = {r["id"]: r for r in whole}
    assert rotated and all(by_id[r["id"]] == r for r in rotated)  # same (record, kind): same copy


def test_stage_rejects_records_without_a_wrong_answer_and_fails_on_broken_images(tmp_path):
    lonely = Item(chat("What is it?", "A cyst.", id="only", source="alone"), "in.jsonl:1", "in.jsonl")
    out, rejects, summary = run(PerturbStage(KINDS), [lonely])
    assert not out and rejects[0]["aloe"]["reject"]["reason"] == "perturb_no_wrong_answer"
    broken = stage_inputs(tmp_path, 3)
    broken[1].record["images"] = ["missing.png"]
    with pytest.raises(RecordError) as caught:
        run(PerturbStage(("cap",)), broken)
    assert caught.value.reason == "image_missing" and caught.value.where == "in.jsonl:2"
    skipped = stage_inputs(tmp_path, 3)
    skipped[1].record["images"] = ["missing.png"]
    out, rejects, summary = run(PerturbStage(("cap",)), skipped, on_error="skip")
    assert [r["id"] for r in out] == ["s0#cap", "s2#cap"]
    assert [(r["id"], r["aloe"]["reject"]["reason"]) for r in rejects] == [("s1", "image_missing")]


def test_stage_refuses_bad_settings():
    with pytest.raises(ValueError, match="unknown perturbation 'blur'"):
        PerturbStage(("cap", "blur"))
    with pytest.raises(ValueError, match="different"):
        PerturbStage(("cap", "cap"))
    with pytest.raises(ValueError, match="per_record"):
        PerturbStage(("cap",), per_record=2)


def test_wrong_answers_are_words_even_when_answers_carry_regions(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [item.record for item in stage_inputs(tmp_path, 5)])
    records = [item.record for item in read_items([str(source)])]
    assert "<|box_start|>" in text_of(records[0]["messages"][-1])  # objects became grounding text on read
    detection = chat("Where is the lesion?", format_object("lesion", (10, 10, 200, 200)), id="det", source="rad")
    picker = WrongAnswerPicker([*records, detection])
    picks = {picker.pick(records[0], seed=seed) for seed in range(40)}
    assert picks == {"The spleen.", "The left kidney.", "The pancreas.", "The heart."}
    info = perturb_record(records[0], "cap", picker.pick(records[0]), seed=0)["aloe"]["perturb"]
    assert "<|" not in " ".join(info["lines"])
    assert without_grounding("The liver shows <|object_ref_start|>a cyst<|object_ref_end|>"
                             "<|box_start|>(1,2),(30,40)<|box_end|>.\n" + format_object("cyst", (1, 2, 30, 40))) == \
        "The liver shows a cyst."
