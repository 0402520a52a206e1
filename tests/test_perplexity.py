"""`aloe perplexity` on the tiny offline Qwen2-VL: real forward passes, no mocks."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest

from aloe_cli.data.io import Item, RecordWriter
from aloe_cli.data.stage import RunConfig, run_stage
from aloe_cli.errors import AloeError
from aloe_cli.filters.perplexity import (
    ConversationEncoder,
    Encoded,
    PerplexityConfig,
    PerplexityStage,
    collate,
    turn_ids_from_mask,
)
from aloe_cli.filters.thresholds import parse_thresholds
from aloe_cli.modeling.chat_template import has_generation_markers
from aloe_cli.modeling.loading import ModelSpec, check_model_reference, load_model
from aloe_cli.modeling.loss_tokens import load_counter
from support import aloe, chat, read_jsonl, scan, write_jsonl

torch = pytest.importorskip("torch")  # aloe_cli.filters.perplexity itself imports torch only when it scores
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(ModelSpec(str(tiny_model_dir), device="cpu"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for seed, size in ((1, 64), (2, 150), (3, 90)):
        scan(seed, size).save(folder / f"scan{seed}.png")
    return folder


def two_turns(q1, a1, q2, a2, images=()):
    user = [{"type": "image"} for _ in images] + [{"type": "text", "text": q1}]
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": a1},
                         {"role": "user", "content": q2}, {"role": "assistant", "content": a2}],
            "images": list(images)}


def mixed_records():
    """Text-only and image records of very different lengths, one multi-turn, several sources."""
    return [
        chat("What organ is shown?", "The liver.", ["scan1.png"], id="img-short", source="slake"),
        chat("Describe the findings of this chest film in detail, please, covering every lobe.",
             "There is a small nodule in the right upper lobe, mild pleural thickening, no effusion, and the "
             "heart size is normal. " * 3, ["scan2.png"], id="img-long", source="slake"),
        chat("Is this a CT scan?", "Yes.", id="text-short", source="pmc"),
        chat("Explain what cardiomegaly means for a patient with a long history of hypertension.",
             "Cardiomegaly is an enlarged heart; in long-standing hypertension the muscle thickens. " * 2,
             id="text-long", source="pmc"),
        {**two_turns("What is this?", "A chest film.", "Any fracture?", "No fracture is visible.",
                     ["scan3.png"]), "id": "two-turns", "source": "slake"},
        chat("Two views: compare them.", "The second view shows more edema.", ["scan1.png", "scan3.png"],
             id="two-images", source="pmc"),
    ]


def score(loaded, records, image_dir, *, batch_size=16, ifd=False):
    stage = PerplexityStage(lambda: loaded, PerplexityConfig(batch_size=batch_size, ifd=ifd), model_name="tiny")
    items = [Item(copy.deepcopy(record), f"t:{i}", "t", image_root=image_dir) for i, record in enumerate(records)]
    stage.annotate(items)
    for item in items:
        assert item.error is None, item.error
    return [item.record["aloe"]["perplexity"] for item in items]


def relative(a, b):
    return abs(a - b) / abs(a)


# ----------------------------------------------------------------------------- masking

def test_only_the_answers_and_their_end_of_turn_tokens_are_scored(loaded, image_dir):
    encoder = ConversationEncoder(loaded.processor)
    tokenizer = loaded.processor.tokenizer
    record = two_turns("What is this?", "A chest film.", "Any fracture?", "No fracture is visible.",
                       [str(image_dir / "scan1.png")])
    encoded = encoder.encode(encoder.conversation(record, None))
    scored = encoded.input_ids[encoded.turn_ids >= 0]
    assert tokenizer.decode(scored) == "A chest film.<|im_end|>\nNo fracture is visible.<|im_end|>\n"
    assert sorted(set(encoded.turn_ids.tolist())) == [-1, 0, 1]
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert not bool(((encoded.input_ids == image_pad) & (encoded.turn_ids >= 0)).any())


def test_changing_the_prompt_changes_only_the_conditioning(loaded, image_dir):
    a, b, c = score(loaded, [
        chat("What organ is shown?", "The liver is enlarged.", ["scan1.png"]),
        chat("Please tell me, in one short sentence, which organ of the abdomen this image shows?",
             "The liver is enlarged.", ["scan1.png"]),
        chat("What organ is shown?", "The liver is enlarged.", ["scan2.png"]),
    ], image_dir)
    assert a["tokens"] == b["tokens"] == c["tokens"]  # same answer, same scored tokens
    assert a["value"] != b["value"] and a["value"] != c["value"]  # prompt and image condition the answer


def test_changing_an_answer_token_changes_the_value(loaded, image_dir):
    a, b = score(loaded, [chat("What organ is shown?", "The liver.", ["scan1.png"]),
                          chat("What organ is shown?", "The heart.", ["scan1.png"])], image_dir)
    assert relative(a["value"], b["value"]) > 1e-3


def test_a_released_template_is_scored_with_the_training_template_on_the_tokens_mix_counts(
        loaded, image_dir, tiny_released_model_dir, tiny_model_dir):
    released = load_model(ModelSpec(str(tiny_released_model_dir), device="cpu"))
    assert not has_generation_markers(released.processor.chat_template)
    records = mixed_records()
    marked_values, released_values = score(loaded, records, image_dir), score(released, records, image_dir)
    counts = load_counter(str(tiny_released_model_dir)).count([record["messages"] for record in records])
    assert counts == load_counter(str(tiny_model_dir)).count([record["messages"] for record in records])
    # ChatML's first token is the system turn's <|im_start|>, never a loss token: nothing to subtract.
    assert [value["tokens"] for value in released_values] == counts
    assert [value["tokens"] for value in marked_values] == counts
    # Same weights, same tokens, same scored positions: the same perplexity.
    for marked, unmarked in zip(marked_values, released_values):
        assert relative(marked["value"], unmarked["value"]) < 1e-6


def test_turns_are_numbered_by_their_runs_of_scored_tokens():
    assert turn_ids_from_mask([0, 1, 1, 0, 0, 1, 0, 1]) == [-1, 0, 0, -1, -1, 1, -1, 2]
    assert turn_ids_from_mask([0, 0]) == [-1, -1]


def test_cli_a_template_that_does_not_say_what_training_learns_is_a_one_line_error(tiny_model_dir, tmp_path):
    model = tmp_path / "unmarked-model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    data = write_jsonl(tmp_path / "in.jsonl", [chat("Is this a CT scan?", "Yes.")])
    result = aloe("perplexity", "-i", str(data), "--model", str(model), "-o", str(tmp_path / "out.jsonl"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("aloe: error: ") and "has no {% generation %} markers" in lines[-1], result.stderr


# ----------------------------------------------------------------------------- batching

def test_values_do_not_depend_on_batch_size_or_order(loaded, image_dir):
    records = mixed_records()
    alone = score(loaded, records, image_dir, batch_size=1)
    for batch_size in (2, 4, 16):
        batched = score(loaded, records, image_dir, batch_size=batch_size)
        assert [v["tokens"] for v in batched] == [v["tokens"] for v in alone]
        assert max(relative(a["value"], b["value"]) for a, b in zip(alone, batched)) < 1e-4
    reverse = score(loaded, records[::-1], image_dir, batch_size=16)[::-1]
    assert max(relative(a["value"], b["value"]) for a, b in zip(alone, reverse)) < 1e-4
    for a, b in zip(alone, reverse):
        assert all(relative(x, y) < 1e-4 for x, y in zip(a["per_turn"], b["per_turn"]))


def test_batches_are_padded_on_the_right():
    short = Encoded(torch.tensor([1, 2]), torch.tensor([-1, 0]))
    long = Encoded(torch.tensor([1, 2, 3, 4]), torch.tensor([-1, -1, 0, 0]))
    batch = collate([short, long], pad_token_id=9)
    assert batch["inputs"]["input_ids"].tolist() == [[1, 2, 9, 9], [1, 2, 3, 4]]
    assert batch["turn_ids"].tolist() == [[-1, 0, -1, -1], [-1, -1, 0, 0]]  # pads are never scored


def test_output_order_is_input_order_through_the_runner(loaded, image_dir, tmp_path):
    records = mixed_records()
    stage = PerplexityStage(lambda: loaded, PerplexityConfig(batch_size=2), model_name="tiny")
    items = [Item(copy.deepcopy(r), f"t:{i}", "t", image_root=image_dir) for i, r in enumerate(records)]
    with RecordWriter(tmp_path / "out.jsonl") as out:
        summary = run_stage(stage, items, out, None, RunConfig(batch_size=stage.runner_batch_size()))
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [r["id"] for r in records]
    assert summary.extra["records_scored"] == len(records)
    assert set(summary.extra["percentiles"]) == {"slake", "pmc"}


# ----------------------------------------------------------------------------- record shapes

def test_multi_turn_scores_every_assistant_turn_and_each_turn_is_causal(loaded, image_dir):
    both, first_only = score(loaded, [
        two_turns("What is this?", "A chest film.", "Any fracture?", "No fracture is visible.", ["scan3.png"]),
        chat("What is this?", "A chest film.", ["scan3.png"]),
    ], image_dir)
    assert len(both["per_turn"]) == 2 and both["tokens"] > first_only["tokens"]
    # A later turn cannot change how an earlier one is scored.
    assert relative(both["per_turn"][0], first_only["value"]) < 1e-4
    assert min(both["per_turn"]) <= both["value"] <= max(both["per_turn"])


def test_text_only_records(loaded, image_dir):
    (value,) = score(loaded, [chat("Is this a CT scan?", "Yes, it is an axial CT slice.")], image_dir)
    assert value["tokens"] > 5 and math.isfinite(value["value"]) and len(value["per_turn"]) == 1


def test_ifd_compares_the_answer_with_and_without_its_prompt(loaded, image_dir):
    a, b = score(loaded, [chat("What organ is shown?", "The liver.", ["scan1.png"]),
                          chat("Name the organ in this abdominal CT.", "The liver.", ["scan2.png"])],
                 image_dir, ifd=True)
    assert relative(a["value_alone"], b["value_alone"]) < 1e-6  # the answer alone never sees the prompt
    assert a["ifd"] == pytest.approx(a["value"] / a["value_alone"])


def test_record_errors_follow_on_error(loaded, image_dir):
    stage = PerplexityStage(lambda: loaded, PerplexityConfig(max_tokens=40), model_name="tiny")
    items = [Item(chat("q", "a", ["missing.png"]), "t:1", "t", image_root=image_dir),
             Item({"messages": [{"role": "user", "content": "only a question"}], "images": []}, "t:2", "t"),
             Item(chat("q " * 60, "a"), "t:3", "t"),
             Item(chat("q", "fine"), "t:4", "t")]
    stage.annotate(items)
    assert [i.error.reason if i.error else None for i in items] == ["image_missing", "no_answer", "too_long", None]
    assert items[0].error.field == "images[0]" and items[0].error.where == "t:1"


def test_reuse_keeps_existing_values_without_loading_the_model():
    def no_model():
        raise AssertionError("the model must not be loaded")

    record = chat("q", "a", source="s")
    record["aloe"] = {"perplexity": {"value": 12.5, "tokens": 3, "per_turn": [12.5], "flag": {"reason": "x"},
                                     "model": "m"}}
    stage = PerplexityStage(no_model, PerplexityConfig(reuse=True), parse_thresholds({"s": {"max": 10}},
                                                                                     "perplexity"), model_name="m")
    item = Item(record, "t:1", "t")
    stage.annotate([item])
    assert stage.decide(item).reason == "noisy_answer"
    assert "flag" not in record["aloe"]["perplexity"] and stage.counters.reused == 1


# ----------------------------------------------------------------------------- thresholds

def test_absolute_thresholds_reject_trivial_and_noisy_answers(loaded, image_dir, tmp_path):
    records = mixed_records()
    values = [v["value"] for v in score(loaded, records, image_dir)]
    low, high = sorted(values)[1], sorted(values)[-2]
    thresholds = parse_thresholds({"default": {"min": low, "max": high}}, "perplexity")
    summary, kept, rejected = run_with(loaded, records, image_dir, thresholds, tmp_path)
    assert summary.reasons == {"trivial_answer": 1, "noisy_answer": 1}
    assert len(kept) == len(records) - 2 and summary.read == summary.kept + summary.rejected
    assert all(low <= r["aloe"]["perplexity"]["value"] <= high for r in kept)


def test_percentile_thresholds_decide_after_the_whole_input(loaded, image_dir, tmp_path):
    records = mixed_records() + [chat(f"Question {i}?", f"Answer number {i} " * (1 + i % 4), source="pmc")
                                 for i in range(8)]
    thresholds = parse_thresholds({"default": {"min": "p20", "max": "p80"}}, "perplexity")
    summary, kept, rejected = run_with(loaded, records, image_dir, thresholds, tmp_path, batch_size=2)
    limits = summary.extra["thresholds"]
    for record in kept:
        bounds = limits[record["source"]]
        assert bounds["min"] <= record["aloe"]["perplexity"]["value"] <= bounds["max"]
    assert {r["aloe"]["reject"]["reason"] for r in rejected} == {"trivial_answer", "noisy_answer"}
    assert summary.read == len(records) == summary.kept + summary.rejected


def run_with(loaded, records, image_dir, thresholds, tmp_path, batch_size=16):
    stage = PerplexityStage(lambda: loaded, PerplexityConfig(batch_size=batch_size), thresholds, model_name="tiny")
    assert stage.measure_first == thresholds.needs_distribution()  # percentiles: the runner measures first
    config = RunConfig()  # the stage's own runner batch
    items = [Item(copy.deepcopy(r), f"t:{i}", "t", image_root=image_dir) for i, r in enumerate(records)]
    with RecordWriter(tmp_path / "out.jsonl") as out, RecordWriter(tmp_path / "rej.jsonl") as rej:
        summary = run_stage(stage, items, out, rej, config)
    return summary, read_jsonl(tmp_path / "out.jsonl"), read_jsonl(tmp_path / "rej.jsonl")


# ----------------------------------------------------------------------------- models

def test_missing_or_incomplete_model_folders_are_refused(tmp_path, monkeypatch):
    from aloe_cli.modeling import hub

    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # a Hub that is not there
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "_unreachable", None)
    with pytest.raises(AloeError, match="model folder not found"):
        check_model_reference(str(tmp_path / "nope"))
    with pytest.raises(AloeError, match="has no config.json"):
        check_model_reference(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(AloeError, match="cannot load"):
        load_model(ModelSpec(str(tmp_path), device="cpu"))
    # a Hub id is asked about on the Hub: unreachable and not cached, it is refused at once
    with pytest.raises(AloeError, match="Qwen/Qwen2-VL-2B-Instruct: no such local folder, not in the Hugging Face"):
        check_model_reference("Qwen/Qwen2-VL-2B-Instruct")


def test_cpu_defaults(loaded):
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert loaded.attn_implementation == "sdpa" and not loaded.model.training


# ----------------------------------------------------------------------------- the real CLI

def test_cli_end_to_end_with_percentiles_plot_and_a_missing_image(tiny_model_dir, image_dir, tmp_path):
    records = mixed_records() + [chat("q", "a", ["nowhere.png"], id="broken", source="pmc")]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    thresholds = tmp_path / "t.yaml"
    thresholds.write_text("default: {min: p10, max: p90}\n")
    result = aloe("perplexity", "-i", str(data), "--model", str(tiny_model_dir), "--image-root", str(image_dir),
                  "--thresholds", str(thresholds), "--batch-size", "2", "--on-error", "skip",
                  "--rejects", str(tmp_path / "rej.jsonl"), "--report", str(tmp_path / "report.json"),
                  "--plot", str(tmp_path / "plots"))
    assert result.returncode == 0, result.stderr
    kept, rejected = read_jsonl(result.stdout), read_jsonl(tmp_path / "rej.jsonl")
    assert len(kept) + len(rejected) == len(records)
    reasons = {r["id"]: r["aloe"]["reject"]["reason"] for r in rejected}
    assert reasons.pop("broken") == "image_missing"
    assert set(reasons.values()) <= {"trivial_answer", "noisy_answer"} and reasons
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["percentiles"]["slake"]) == {"count", "p1", "p5", "p50", "p95", "p99"}
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["pmc.png", "slake.png"]
    assert "p50" in result.stderr and "Traceback" not in result.stderr


def test_cli_malformed_record_is_a_one_line_error(tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(chat("q", "a")) + "\n{not json\n")
    output = tmp_path / "out.jsonl"
    result = aloe("perplexity", "-i", str(data), "--model", str(tiny_model_dir), "-o", str(output))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"aloe: error: {data}:2: invalid JSON")
    assert "Traceback" not in result.stderr
    assert not output.exists()  # outputs are atomic: no half-written file


@pytest.mark.parametrize(("thresholds", "model", "message"), [
    (None, "missing-folder/", "model folder not found: missing-folder/"),
    ("slake: {min: lots}\n", "TINY", "slake.min: expected a number or a percentile like p2, got 'lots'"),
])
def test_cli_bad_model_or_thresholds_fail_before_any_work(tiny_model_dir, tmp_path, thresholds, model, message):
    data = write_jsonl(tmp_path / "data.jsonl", [chat("q", "a")])
    args = ["perplexity", "-i", str(data), "--model", str(tiny_model_dir) if model == "TINY" else model]
    if thresholds is not None:
        (tmp_path / "t.yaml").write_text(thresholds)
        args += ["--thresholds", str(tmp_path / "t.yaml")]
    result = aloe(*args, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"aloe: error: {message}" if model != "TINY"
                                                  else f"aloe: error: {tmp_path / 't.yaml'}: {message}"]
