"""Open-ended answers and the adversarial split: the exact-match fallback (not judged) that follows
VLMEvalKit's VQA scoring, list-literal reference answers, box answers scored by IoU, a vision judge that is
shown the item's images, cls/det inferred when items carry no `task`, and `region` under `--perturb`."""

from __future__ import annotations

import base64
import io
import json

import pytest
from eval_fixtures import image_files, write_items
from fake_openai_server import FakeOpenAIServer
from PIL import Image

from aloe_cli.errors import AloeError
from aloe_cli.evaluation.benchmarks import infer_task
from aloe_cli.evaluation.judge import IMAGE_NOTE, JudgeCase, OpenJudge, judge_vision
from aloe_cli.evaluation.open_answers import (
    alternatives,
    exact_match,
    judge_reference,
    normalize_answer,
    open_verdict,
    vqa_score,
)
from aloe_cli.evaluation.scoring import benchmark_scores, rescore_line
from support import aloe, read_jsonl

FAST = ["--retry-backoff", "0.01", "--concurrency", "4"]
BOX = "<|box_start|>(100,100),(300,300)<|box_end|>"


# ----------------------------------------------------------------------------- the rules

@pytest.mark.parametrize(("text", "normalized"), [
    # VLMEvalKit's answer normalisation at e8e78f05 (these outputs were checked against its process_answer)
    ("The Liver.", "liver"), ("1,000 cells", "1000 cells"), ("x-ray", "x ray"), ("two nodules!", "2 nodules"),
    ("dont know", "don't know"), ("It is 3.5 cm.", "it is 3.5 cm"), ("left - lung", "left lung"),
    ("Heart\nand lungs", "heart and lungs"), ("a (right) kidney", "right kidney"), ("somebody'd", "somebodyd"),
])
def test_answers_are_normalized_as_vlmevalkit_does(text, normalized):
    assert normalize_answer(text) == normalized


def test_vqa_score_and_exact_match_over_alternatives():
    assert alternatives("['red', 'crimson']") == ["red", "crimson"]
    assert alternatives('["left lung", "right lung"]') == ["left lung", "right lung"]  # JSON too
    assert alternatives("[red]") == ["[red]"] and alternatives("the liver") == ["the liver"]
    assert alternatives("[100, 100, 300, 300]") == ["[100, 100, 300, 300]"]  # a box, not four alternatives
    # leave-one-out: each reference is compared with the others; one reference has no other, so 0
    assert vqa_score(["liver"], "The liver.") == 0.0 and exact_match(["liver"], "The liver.")
    assert vqa_score(["red", "crimson"], "Crimson") == pytest.approx(1 / 6)
    assert exact_match(["red", "crimson"], "Crimson")
    assert vqa_score(["left lung"] * 4, "Left lung.") == 1.0
    assert not exact_match(["liver"], "") and vqa_score(["spleen"] * 4, "kidney") == 0.0
    assert judge_reference("['red', 'crimson', 'red']") == 'any one of these is correct: "red"; "crimson"'
    assert judge_reference("the liver") == "the liver"


def test_box_answers_are_scored_by_iou():
    right = open_verdict(BOX, "It is here: <|box_start|>(110,100),(300,310)<|box_end|>")
    assert (right["correct"], right["correct_aloe"], right["scored_by"]) == (True, True, "box_iou")
    assert right["iou"] == 0.9069
    wrong = open_verdict("[100, 100, 300, 300]", "[200, 200, 400, 400]")
    assert (wrong["correct"], wrong["iou"]) == (False, 0.1429)
    assert open_verdict(BOX, "no idea")["correct"] is False


def test_task_is_inferred_from_a_box_answer_or_a_grounding_question():
    assert infer_task("Which organ is abnormal?", BOX) == "det"
    assert infer_task("Which organ is abnormal?", "[10, 20, 300, 400]") == "det"
    assert infer_task("Where is the nodule?", "left upper lobe") == "det"
    assert infer_task("Draw the bounding box of the lesion.", "x") == "det"
    assert infer_task("Which organ is abnormal?", "the liver") == "cls"


def test_rescore_keeps_judge_grades_and_scores_the_rest_by_exact_match():
    base = {"id": "1", "benchmark": "b", "kind": "open", "question": "Organ?", "options": None}
    judged = rescore_line({**base, "answer": "liver", "prediction": "kidney", "correct": 0.5,
                           "judge": {"score": 0.5}})
    assert (judged["correct"], judged["correct_aloe"], judged["scored_by"]) == (0.5, 0.5, "judge")
    fallback = rescore_line({**base, "answer": "['red', 'crimson']", "prediction": "Crimson."})
    assert (fallback["correct"], fallback["correct_aloe"], fallback["scored_by"]) == (pytest.approx(1 / 6), True,
                                                                                      "exact_match")
    again = rescore_line({**fallback, "prediction": "blue"})
    assert (again["correct"], again["correct_aloe"]) == (0.0, False)
    scores = benchmark_scores([judged, fallback])
    assert scores["scored_by"] == {"judge": 1, "exact_match": 1}
    assert scores["accuracy"] == round(100 * (0.5 + 1 / 6) / 2, 2) and scores["accuracy_aloe"] == 75.0


def test_an_hf_judge_with_a_vision_part_is_shown_the_images(tiny_model_dir, tmp_path):
    sees = judge_vision("hf", str(tiny_model_dir), None)
    assert sees() is True and judge_vision("hf", str(tiny_model_dir), False)() is False
    text_only = tmp_path / "text-judge"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    assert judge_vision("hf", str(text_only), None)() is False
    with pytest.raises(AloeError, match="has no vision part"):
        judge_vision("hf", str(text_only), True)()
    assert judge_vision("openai", "served", None)() is True and judge_vision("openai", "served", False)() is False
    images = image_files(tmp_path / "a" / "images", 1)
    judge = OpenJudge(lambda: None, "hf:tiny", vision=sees)
    request = judge._request(JudgeCase("Organ?", "liver", "the liver", tuple(images), tmp_path / "a"), sees())
    assert request.images == images and request.messages[0]["content"][0] == {"type": "image"}
    assert request.messages[0]["content"][1]["text"].startswith(IMAGE_NOTE)
    blind = judge._request(JudgeCase("Organ?", "liver", "the liver", tuple(images), tmp_path / "a"), False)
    assert blind.images == [] and [part["type"] for part in blind.messages[0]["content"]] == ["text"]
    # the images are part of the cache key when they are sent
    other = image_files(tmp_path / "b" / "images", 2)[1:]
    swapped = judge._request(JudgeCase("Organ?", "liver", "the liver", tuple(other), tmp_path / "b"), True)
    assert judge._key(request, 0) != judge._key(swapped, 0)
    assert judge._key(blind, 0) == judge._key(
        judge._request(JudgeCase("Organ?", "liver", "the liver", tuple(other), tmp_path / "b"), False), 0)


# ----------------------------------------------------------------------------- through the CLI

def run_eval(server, bench, out, *extra):
    return aloe("eval", "--model", "served-model", "--backend", "openai", "--base-url", server.url,
                "--benchmark", f"vqa={bench}", "-o", str(out), *FAST, *extra)


def test_open_items_without_a_judge_get_the_vqa_score_and_exact_match_not_judged(tmp_path):
    bench = write_items(tmp_path / "vqa.jsonl", [
        {"id": "o1", "question": "Which organ? [answer=The liver.]", "answer": "liver"},
        {"id": "o2", "question": "Which colour? [answer=Crimson]", "answer": "['red', 'crimson']"},
        {"id": "o3", "question": "Which side? [answer=left lung]", "answer": '["left lung", "left lung", '
                                                                           '"left lung", "left lung"]'},
        {"id": "o4", "question": "Which lesion? [answer=kidney]", "answer": "spleen"},
    ])
    with FakeOpenAIServer() as server:
        result = run_eval(server, bench, tmp_path / "out")
        asked = len(server.requests)
    assert result.returncode == 0, result.stderr
    assert asked == 4
    assert "4 open-ended item(s) not judged (no --judge): scored by exact match" in result.stderr
    lines = {line["id"]: line for line in read_jsonl(tmp_path / "out" / "served-model" / "vqa" / "predictions.jsonl")}
    assert {line["scored_by"] for line in lines.values()} == {"exact_match"}
    assert [lines[i]["correct_aloe"] for i in ("o1", "o2", "o3", "o4")] == [True, True, True, False]
    assert [lines[i]["correct"] for i in ("o1", "o2", "o3", "o4")] == [0.0, pytest.approx(1 / 6), 1.0, 0.0]
    scores = json.loads((tmp_path / "out" / "served-model" / "scores.json").read_text())["benchmarks"]["vqa"]
    assert scores["accuracy"] == round(100 * (1 / 6 + 1) / 4, 2) == 29.17  # VLMEvalKit's VQA score
    assert scores["accuracy_aloe"] == 75.0  # the exact match
    assert scores["scored_by"] == {"exact_match": 4} and scores["unjudged"] == 0
    rescored = aloe("eval", "--rescore", str(tmp_path / "out" / "served-model" / "vqa" / "predictions.jsonl"),
                    "-o", str(tmp_path / "re"))
    assert rescored.returncode == 0, rescored.stderr
    assert "0 line(s) changed" in rescored.stderr and "not judged" in rescored.stderr


def test_a_vision_judge_receives_the_images_and_the_alternatives(tmp_path):
    images = image_files(tmp_path / "images", 2)
    bench = write_items(tmp_path / "vqa.jsonl", [
        {"id": "o1", "question": "Which organ? [answer=hepar]", "answer": "['liver [score=1]', 'hepar']",
         "images": [images[0]]},
        {"id": "o2", "question": "Which side? [answer=left]", "answer": "right [score=0]", "images": [images[1]]},
    ])
    cache = tmp_path / "cache.jsonl"
    with FakeOpenAIServer() as server:
        result = run_eval(server, bench, tmp_path / "out", "--judge", "judge-vl", "--judge-base-url", server.url,
                          "--cache", str(cache))
        judged = [r for r in server.requests if r.body["model"] == "judge-vl"]
        blind = run_eval(server, bench, tmp_path / "blind", "--judge", "judge-vl", "--judge-base-url", server.url,
                         "--no-judge-vision")
        blind_requests = [r for r in server.requests[len(judged) + 2:] if r.body["model"] == "judge-vl"]
        # the same items with their images swapped: the judge's cache keys change, so it is asked again
        swapped = write_items(tmp_path / "vqa.jsonl", [dict(item, images=[images[1 - n]]) for n, item in
                                                        enumerate(read_jsonl(bench))])
        before = len(server.requests)
        again = run_eval(server, swapped, tmp_path / "again", "--judge", "judge-vl", "--judge-base-url", server.url,
                         "--cache", str(cache))
        asked_again = [r for r in server.requests[before:] if r.body["model"] == "judge-vl"]
    assert result.returncode == blind.returncode == again.returncode == 0, result.stderr + blind.stderr
    assert len(judged) == 2 and all(len(r.images) == 1 and r.images[0].startswith("data:image/png;base64,")
                                    for r in judged)
    sent = {r.prompt.split("Question: ")[1].split(" [")[0]: r for r in judged}
    for question, image in (("Which organ?", images[0]), ("Which side?", images[1])):  # each item's own image
        received = Image.open(io.BytesIO(base64.b64decode(sent[question].images[0].split(",", 1)[1])))
        assert received.convert("RGB").tobytes() == Image.open(tmp_path / image).convert("RGB").tobytes()
    assert all(r.prompt.startswith(IMAGE_NOTE) for r in judged)
    assert 'Reference answer: any one of these is correct: "liver [score=1]"; "hepar"' in sent["Which organ?"].prompt
    lines = {line["id"]: line for line in read_jsonl(tmp_path / "out" / "served-model" / "vqa" / "predictions.jsonl")}
    assert (lines["o1"]["correct"], lines["o2"]["correct"]) == (1.0, 0.0)
    assert {line["scored_by"] for line in lines.values()} == {"judge"}
    assert len(blind_requests) == 2 and all(r.images == [] for r in blind_requests)
    assert not any(r.prompt.startswith(IMAGE_NOTE) for r in blind_requests)
    assert len(asked_again) == 2


def test_an_adversarial_benchmark_without_tasks_gets_cls_and_det_rows_and_region(tmp_path):
    images = image_files(tmp_path / "images", 4)
    options = {"A": "Pneumonia", "B": "Normal", "C": "Nodule"}
    bench = write_items(tmp_path / "adv.jsonl", [
        {"id": "c1", "question": "What does the image show? [answer=A]", "options": options, "answer": "A",
         "images": [images[0]]},
        {"id": "c2", "question": "What does the image show? [answer=B]", "options": options, "answer": "C",
         "images": [images[1]]},
        # the fake model answers bare corners (a question quoting a grounding box would have it moved)
        {"id": "d1", "question": "Where is the nodule? [answer=(100,100),(300,300)]", "answer": BOX,
         "images": [images[2]]},
        {"id": "d2", "question": "Locate the nodule. [answer=(500,500),(700,700)]", "answer": BOX,
         "images": [images[3]]},
    ])
    with FakeOpenAIServer() as server:
        result = aloe("eval", "--model", "served-model", "--backend", "openai", "--base-url", server.url,
                      "--benchmark", f"adv={bench}", "--perturb", "base,cap,pmt,syc,leg,region",
                      "-o", str(tmp_path / "out"), *FAST)
    assert result.returncode == 0, result.stderr
    lines = read_jsonl(tmp_path / "out" / "served-model" / "adv" / "predictions.jsonl")
    assert {line["id"]: line["task"] for line in lines if line["perturb"] is None} == {
        "c1": "cls", "c2": "cls", "d1": "det", "d2": "det"}
    region = [line for line in lines if line["perturb"] == "region"]
    assert sorted(line["id"] for line in region) == ["d1", "d2"]  # the cls items have no box to move
    assert all("<|box_start|>" in line["wrong_answer"] for line in region)
    base = {line["id"]: line for line in lines if line["perturb"] is None}
    assert (base["d1"]["scored_by"], base["d1"]["correct"], base["d2"]["correct"]) == ("box_iou", True, False)
    scores = json.loads((tmp_path / "out" / "served-model" / "scores.json").read_text())["benchmarks"]["adv"]
    assert scores["not_perturbed"] == {"region": {"perturb_needs_box": 2}}
    robustness = scores["robustness"]
    assert set(robustness) == {"cls", "det"}
    assert set(robustness["cls"]) == {"base", "cap", "pmt", "syc", "leg"}
    assert set(robustness["det"]) == {"base", "cap", "pmt", "syc", "leg", "region"}
    figures = {"items": 2, "accuracy": 50.0, "accuracy_aloe": 50.0}
    assert robustness["cls"]["base"] == robustness["det"]["base"] == figures
    assert robustness["det"]["region"] == figures  # the fake model ignores the image
    table = (tmp_path / "out" / "results.md").read_text()
    assert "## Adversarial robustness" in table and "cls Base" in table and "det Base" in table
