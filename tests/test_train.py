"""aloe train on the tiny offline Qwen2-VL: the data path, the labels, the vision guard, and real CLI runs."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from aloe_cli.data.io import read_items
from aloe_cli.errors import AloeError
from aloe_cli.modeling.chat_template import apply_training_chat_template, has_generation_markers
from aloe_cli.training.collator import IGNORE_INDEX, TrainingCollator
from aloe_cli.training.data import build_dataset, load_dataset
from support import aloe, chat, read_jsonl, write_jsonl

DICOM = Path(__import__("pydicom").data.get_testdata_file("CT_small.dcm"))
# One thread per process: the test machine's cores are shared, and oversubscribed torch threads crawl.
ENV = {"OMP_NUM_THREADS": "1"}
QUESTION = "What colour is the image?"
COLOURS = {"red": "Red.", "blue": "Blue."}


def png(path: Path, colour: str, size: int = 56) -> str:
    Image.new("RGB", (size, size), colour).save(path)
    return path.name


def data_uri(colour: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def colour_task(folder: Path, count: int = 32) -> Path:
    """Red image -> "Red.", blue image -> "Blue.": trivially learnable from the pixels alone."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        colour = list(COLOURS)[i % 2]
        records.append(chat(QUESTION, COLOURS[colour], [png(folder / f"{i}.png", colour)], id=f"c{i}"))
    return write_jsonl(folder / "task.jsonl", records)


def training_processor(model_dir):
    from transformers import AutoProcessor

    loaded = AutoProcessor.from_pretrained(model_dir)
    apply_training_chat_template(loaded)
    return loaded


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return training_processor(tiny_model_dir)


# The model's own template with generation markers, and Qwen2-VL's released one (aloe's training template is used).
TEMPLATES = ["tiny_model_dir", "tiny_released_model_dir"]


def rows_of(records: list[dict], tmp_path: Path, on_error: str = "skip"):
    path = write_jsonl(tmp_path / "records.jsonl", records)
    summary = build_dataset(read_items([str(path)]), tmp_path / "run", on_error=on_error)
    return summary, load_dataset(tmp_path / "run")


# ----------------------------------------------------------------------------- the dataset

def test_heterogeneous_records_become_a_memory_mapped_dataset_of_training_columns(tmp_path):
    import pyarrow as pa

    (tmp_path / "img").mkdir()
    records = [
        chat("Describe.", "A red square.", ["img/" + png(tmp_path / "img" / "a.png", "red")],
             aloe={"score": {"value": 4}}),
        {"messages": [{"role": "user", "content": "Plain string content."},
                      {"role": "assistant", "content": "And a string answer."}],
         "aloe": {"score": {"value": "high", "notes": [1, "two"]}, "mix": {"loss_tokens": 5}}},
        chat("And this one?", "Blue.", [data_uri("blue")], meta={"options": {"A": "x"}}),
    ]
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        pa.Table.from_pylist(records)  # what naive schema inference makes of them
    summary, dataset = rows_of(records, tmp_path)
    assert (summary.read, summary.kept, summary.rejected) == (3, 3, 0)
    assert dataset.column_names == ["index", "messages", "images", "where"]
    assert dataset.cache_files and dataset.cache_files[0]["filename"].endswith("dataset/train.arrow")
    first, second, third = dataset[0], dataset[1], dataset[2]
    assert first["messages"] == records[0]["messages"] and second["messages"] == records[1]["messages"]
    assert first["images"] == [{"bytes": None, "path": str((tmp_path / "img" / "a.png").absolute())}]
    assert second["images"] == [] and third["images"][0]["bytes"].startswith(b"\x89PNG")
    assert third["where"].endswith("records.jsonl:3")


def test_bad_records_are_counted_or_stop_the_run(tmp_path):
    good = chat("Q?", "A.")
    no_answer = {"messages": [{"role": "user", "content": "Only a question."}]}
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps(no_answer) + "\n")
    summary = build_dataset(read_items([str(path)]), tmp_path / "run", on_error="skip")
    assert (summary.read, summary.kept, summary.rejected) == (3, 1, 2)
    assert dict(summary.reasons) == {"invalid_json": 1, "no_answer": 1}
    with pytest.raises(AloeError, match=r"in.jsonl:2"):
        build_dataset(read_items([str(path)]), tmp_path / "run2", on_error="fail")


# ----------------------------------------------------------------------------- labels

def chatml_answer_positions(input_ids: list[int], tokenizer) -> list[int]:
    """Independent oracle: positions after each `<|im_start|>assistant\\n` up to and including its `<|im_end|>\\n`."""
    start, end = tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = tokenizer.encode("assistant\n", add_special_tokens=False)
    positions, i = [], 0
    while i < len(input_ids):
        if input_ids[i] == start and input_ids[i + 1:i + 1 + len(header)] == header:
            j = i + 1 + len(header)
            while input_ids[j] != end:
                positions.append(j)
                j += 1
            positions += [j, j + 1]  # <|im_end|> and the newline after it
            i = j
        i += 1
    return positions


@pytest.mark.parametrize("model", TEMPLATES)
def test_labels_cover_exactly_the_answers_and_their_end_tokens(tmp_path, request, model):
    processor = training_processor(request.getfixturevalue(model))
    record = {"messages": [
        {"role": "system", "content": "You read scans."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which organ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The liver."}]},
        {"role": "user", "content": "Anything abnormal?"},
        {"role": "assistant", "content": "A small nodule in the right lobe."}],
        "images": [str(DICOM)]}
    _, dataset = rows_of([record], tmp_path)
    batch = TrainingCollator(processor, max_length=4096)([dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    expected = chatml_answer_positions(ids, processor.tokenizer)
    assert [i for i, label in enumerate(labels) if label != IGNORE_INDEX] == expected
    assert all(labels[i] == ids[i] for i in expected)
    assert processor.tokenizer.decode([ids[i] for i in expected]) == (
        "The liver.<|im_end|>\nA small nodule in the right lobe.<|im_end|>\n")
    assert batch["pixel_values"].shape[0] > 0 and batch["image_grid_thw"].tolist() == [[1, 8, 8]]  # DICOM decoded


@pytest.mark.parametrize("model", TEMPLATES)
def test_loss_tokens_equal_what_aloe_mix_balanced_on_record_by_record(tmp_path, request, model):
    model_dir = request.getfixturevalue(model)
    processor = training_processor(model_dir)
    (tmp_path / "img").mkdir()
    records = []
    for i in range(12):
        images = [f"img/{png(tmp_path / 'img' / f'{i}.png', 'red' if i % 3 else 'green', 56 + 28 * (i % 3))}"]
        answer = " ".join(["the liver shows a small nodule"] * (1 + i % 4)) + "."
        record = chat(f"Question {i}?", answer, images if i % 2 else [], id=f"r{i}", source="s", domain="medical")
        if i % 4 == 0:  # a second turn
            record["messages"] += [{"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
        records.append(record)
    source = write_jsonl(tmp_path / "src.jsonl", records)
    mixed = tmp_path / "mix.jsonl"
    proc = aloe("mix", "-i", str(source), "--tokenizer", str(model_dir), "--share", "medical/multimodal=0.5",
                "--share", "medical/text=0.5", "--no-cache", "-o", str(mixed))
    assert proc.returncode == 0, proc.stderr
    written = read_jsonl(mixed)
    assert len(written) >= 6
    build_dataset(read_items([str(mixed)]), tmp_path / "run")
    dataset = load_dataset(tmp_path / "run")
    collator = TrainingCollator(processor, max_length=4096)
    for row, record in zip(dataset, written):
        encoded = collator.encode(row)
        assert sum(label != IGNORE_INDEX for label in encoded.labels) == record["aloe"]["mix"]["loss_tokens"], \
            record["id"]


# ----------------------------------------------------------------------------- dropping and skipping

def test_an_over_long_sample_is_dropped_and_replaced_or_its_text_cut(tmp_path, processor):
    long_answer = " ".join(["word"] * 80) + "."
    records = [chat(QUESTION, long_answer, [data_uri("red")]), chat(QUESTION, "Red.", [data_uri("red")])]
    _, dataset = rows_of(records, tmp_path)
    short_length = len(TrainingCollator(processor, max_length=4096).encode(dataset[1]).input_ids)
    dropping = TrainingCollator(processor, max_length=int(short_length) + 5, dataset=dataset)
    batch = dropping([dataset[0]])
    assert batch["aloe_skipped"] == {"too_long": 1}
    assert batch["input_ids"].shape[1] == short_length  # the next record took its place
    cutting = TrainingCollator(processor, max_length=int(short_length) + 5, truncate_text=True, dataset=dataset)
    batch = cutting([dataset[0]])
    assert batch["aloe_skipped"] == {} and batch["input_ids"].shape[1] == short_length + 5
    image_pad = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert int((batch["input_ids"] == image_pad).sum()) == batch["image_grid_thw"].prod(-1).item() // 4
    assert int((batch["labels"] != IGNORE_INDEX).sum()) > 0
    image_cut = TrainingCollator(processor, max_length=10, truncate_text=True, dataset=dataset)
    with pytest.raises(AloeError, match=r"65 consecutive records .* cannot be trained on \(too_long=65\)"):
        image_cut([dataset[0]])  # no record fits without cutting its image tokens


def test_a_broken_image_is_skipped_and_counted_or_stops_the_run(tmp_path, processor):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    png(tmp_path / "gone.png", "red")
    records = [chat(QUESTION, "Red.", [str(tmp_path / "broken.png")]), chat(QUESTION, "Red.", ["gone.png"]),
               chat(QUESTION, "Blue.", [data_uri("blue")])]
    _, dataset = rows_of(records, tmp_path)
    (tmp_path / "gone.png").unlink()  # removed after the records were read: found missing while training
    batch = TrainingCollator(processor, max_length=4096, dataset=dataset)([dataset[0], dataset[2]])
    assert batch["aloe_skipped"] == {"image_corrupt": 1, "image_missing": 1}
    assert batch["input_ids"].shape[0] == 2 and batch["image_grid_thw"].shape[0] == 2
    with pytest.raises(AloeError, match=r"records.jsonl:1: .*broken.png"):
        TrainingCollator(processor, max_length=4096, on_error="fail", dataset=dataset)([dataset[0]])


def test_a_text_only_batch_has_no_pixels(tmp_path, processor):
    _, dataset = rows_of([chat("Hi?", "Hello."), chat("Why?", "Because.")], tmp_path)
    batch = TrainingCollator(processor, max_length=4096)([dataset[0], dataset[1]])
    assert "pixel_values" not in batch and batch["attention_mask"].sum() < batch["input_ids"].numel()  # padded


# ----------------------------------------------------------------------------- the vision guard

def test_the_guard_runs_the_vision_tower_on_text_only_batches_without_changing_the_loss(tmp_path, tiny_model_dir,
                                                                                       processor):
    import torch
    from transformers import AutoModelForImageTextToText

    from aloe_cli.training.guard import VisionGuard

    _, dataset = rows_of([chat("Hi?", "Hello there."), chat(QUESTION, "Red.", [data_uri("red")])], tmp_path)
    collator = TrainingCollator(processor, max_length=4096)
    text_batch = {k: v for k, v in collator([dataset[0]]).items() if k != "aloe_skipped"}
    image_batch = {k: v for k, v in collator([dataset[1]]).items() if k != "aloe_skipped"}
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).train()
    visual = model.model.visual

    def loss_and_vision_grad(batch):
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        grads = [p.grad for p in visual.parameters()]
        return loss.item(), grads

    plain_loss, plain_grads = loss_and_vision_grad(text_batch)
    assert all(g is None for g in plain_grads)  # what makes ZeRO-3 ranks disagree
    guard = VisionGuard(model).install()
    guarded_loss, guarded_grads = loss_and_vision_grad(text_batch)
    assert guarded_loss == plain_loss and guard.calls == 1
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in guarded_grads)
    loss_and_vision_grad(image_batch)
    assert guard.calls == 1  # batches with images need no dummy
    model.eval()
    with torch.no_grad():
        model(**text_batch)
    assert guard.calls == 1  # nor does evaluation
    guard.remove()


# ----------------------------------------------------------------------------- the CLI

TRAIN_FLAGS = ("--global-batch-size", "8", "--micro-batch-size", "8", "--learning-rate", "2e-3", "--lr-scheduler",
               "constant", "--warmup-ratio", "0", "--precision", "fp32", "--no-gradient-checkpointing", "--deepspeed",
               "none", "--dataloader-workers", "0", "--logging-steps", "10")


def train(*args: str, timeout: float = 300):
    return aloe("train", *TRAIN_FLAGS, *args, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tiny_released_model_dir, tmp_path_factory):
    """40 steps on the colour task, checkpoints every 20 steps, from a model with Qwen2-VL's released template
    (no generation markers: aloe's training template defines the loss, as for the published checkpoints)."""
    folder = tmp_path_factory.mktemp("colour")
    task = colour_task(folder / "data")
    run = folder / "run"
    proc = train("-i", str(task), "--model", str(tiny_released_model_dir), "--output-dir", str(run), "--max-steps",
                 "40", "--save-steps", "20")
    return proc, run, task


def greedy_answers(model_dir: Path) -> dict[str, str]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    answers = {}
    for colour in COLOURS:
        conversation = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (56, 56), colour)},
                                                     {"type": "text", "text": QUESTION}]}]
        inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        answers[colour] = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:],
                                                     skip_special_tokens=True)
    return answers


def test_training_drives_the_loss_down_and_the_saved_model_answers(trained):
    proc, run, _ = trained
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # training writes no data
    assert "optimizer steps" in proc.stderr and "records kept" in proc.stderr
    assert "Setting accelerator to CPU" not in proc.stderr  # DeepSpeed's notice on machines without a GPU
    log = read_jsonl(run / "log.jsonl")
    losses = [line["loss"] for line in log if "loss" in line]
    assert [line["step"] for line in log if "loss" in line] == [1, 10, 20, 30, 40]
    assert losses[-1] < losses[0] / 3
    assert all(line["tokens_per_s"] > 0 for line in log if "loss" in line and line["step"] > 1)
    assert all(isinstance(line["lr"], float) for line in log if "loss" in line)
    resolved = yaml.safe_load((run / "aloe-train.yaml").read_text())
    assert resolved["sft_config"]["max_steps"] == 40 and resolved["aloe"]["deepspeed"] == "none"
    assert (run / "checkpoint-20").is_dir()
    # the processor is saved with the template it was trained with, so the next stage learns the same tokens
    assert has_generation_markers((run / "chat_template.jinja").read_text())
    assert greedy_answers(run) == COLOURS


def test_the_trained_model_works_with_aloe_perplexity(trained, tmp_path):
    _, run, task = trained
    proc = aloe("perplexity", "-i", str(task), "--model", str(run), "--device", "cpu", "-o", str(tmp_path / "p.jsonl"),
                env=ENV)
    assert proc.returncode == 0, proc.stderr
    scored = read_jsonl(tmp_path / "p.jsonl")
    assert len(scored) == 32 and all(r["aloe"]["perplexity"]["value"] < 3 for r in scored)  # it learnt the answers


def test_the_trained_model_answers_through_aloe_infer(trained, tmp_path):
    _, run, _ = trained
    for colour, answer in COLOURS.items():
        image = tmp_path / f"{colour}.png"
        Image.new("RGB", (56, 56), colour).save(image)
        proc = aloe("infer", "--model", str(run), "--device", "cpu", "--image", str(image), QUESTION, env=ENV)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == answer


def test_resume_continues_from_the_last_checkpoint_to_the_same_final_step(trained, tmp_path,
                                                                          tiny_released_model_dir):
    _, run, task = trained
    interrupted = tmp_path / "run"
    shutil.copytree(run / "checkpoint-20", interrupted / "checkpoint-20")  # as if stopped after step 20
    proc = train("-i", str(task), "--model", str(tiny_released_model_dir), "--output-dir", str(interrupted),
                 "--max-steps", "40", "--save-steps", "20", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from {interrupted / 'checkpoint-20'}" in proc.stderr
    resumed = [line for line in read_jsonl(interrupted / "log.jsonl") if "loss" in line]
    assert [line["step"] for line in resumed] == [30, 40]
    original = {line["step"]: line["loss"] for line in read_jsonl(run / "log.jsonl") if "loss" in line}
    assert resumed[-1]["loss"] == pytest.approx(original[40], rel=1e-3)  # the same run, continued
    assert json.loads((interrupted / "checkpoint-40" / "trainer_state.json").read_text())["global_step"] == 40


def test_resume_without_a_checkpoint_is_an_error(tmp_path, tiny_model_dir):
    task = colour_task(tmp_path / "data", count=4)
    proc = train("-i", str(task), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run"), "--resume")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
        "aloe: error: --resume: no checkpoint-* folder in")


def test_a_broken_image_is_skipped_in_a_run_and_counted(tmp_path, tiny_model_dir):
    """Also: --freeze-vision keeps the vision encoder as it was (the projector trains), --attn-implementation."""
    import torch
    from safetensors.torch import load_file

    task = colour_task(tmp_path / "data", count=8)
    (tmp_path / "data" / "3.png").write_bytes(b"not a png")
    proc = train("-i", str(task), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run"),
                 "--max-steps", "1", "--micro-batch-size", "8", "--no-shuffle", "--freeze-vision",
                 "--attn-implementation", "eager", "--on-error", "skip", "--max-skipped", "0.2")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"samples skipped \(image_corrupt\)\s+1\n", proc.stderr), proc.stderr
    assert re.search(r"records kept\s+7\n", proc.stderr), proc.stderr  # what was trained on
    assert "aloe: warning: 1 of 8 records were not trained on: only 7 were kept" in proc.stderr
    logged = [line for line in read_jsonl(tmp_path / "run" / "log.jsonl") if "loss" in line]
    assert logged[-1]["skipped_image_corrupt"] == 1
    assert "float32 weights, eager attention" in proc.stderr
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    vision = [name for name in before if "visual" in name]
    assert vision and all(torch.equal(before[n], after[n]) for n in vision if "merger" not in n)
    assert not all(torch.equal(before[n], after[n]) for n in vision if "merger" in n)


def test_freeze_options_choose_the_vision_encoder_or_the_projector(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    from aloe_cli.training.trainer import freeze

    for vision, projector in ((True, False), (False, True), (True, True)):
        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
        freeze(model, vision=vision, projector=projector)
        for name, parameter in model.named_parameters():
            frozen = "visual" in name and (projector if "merger" in name else vision)
            assert parameter.requires_grad is not frozen, name


def test_every_input_format_and_image_form_reaches_the_collator(tmp_path, processor):
    import datasets

    from aloe_cli.data.io import RecordWriter

    records = [chat(QUESTION, "Red.", [data_uri("red")], id="a"), chat(QUESTION, "Blue.", [str(DICOM)], id="b")]
    with RecordWriter(tmp_path / "r.parquet") as writer:  # images become HF Image structs {bytes, path}
        for record in records:
            writer.write(record)
    with RecordWriter(tmp_path / "r.jsonl.gz") as writer:
        for record in records:
            writer.write(record)
    folder_records = [{**chat(QUESTION, "Red.", [data_uri("red")]), "images": [{"bytes": base64.b64decode(
        data_uri("red").partition(",")[2]), "path": None}]}]
    datasets.Dataset.from_list(folder_records).save_to_disk(str(tmp_path / "folder"))
    inputs = [str(tmp_path / name) for name in ("r.parquet", "r.jsonl.gz", "folder")]
    summary = build_dataset(read_items(inputs), tmp_path / "run")
    assert (summary.read, summary.kept) == (5, 5)
    dataset = load_dataset(tmp_path / "run")
    assert dataset[0]["images"][0]["bytes"] and dataset[1]["images"][0]["path"] == str(DICOM)
    batch = TrainingCollator(processor, max_length=4096)([dataset[i] for i in range(len(dataset))])
    assert batch["image_grid_thw"].shape[0] == 5 and batch["aloe_skipped"] == {}


def test_pixel_limits_are_set_on_the_processor(tiny_model_dir, tmp_path):
    from aloe_cli.training.config import TrainConfig, resolve
    from aloe_cli.training.trainer import prepare_processor

    config = TrainConfig(model=str(tiny_model_dir), max_pixels=56 * 56, min_pixels=56 * 56, deepspeed="none")
    processor = prepare_processor(resolve(config, 1))
    assert processor.image_processor.size["longest_edge"] == processor.image_processor.size["shortest_edge"] == 3136
    path = write_jsonl(tmp_path / "r.jsonl", [chat(QUESTION, "Red.", [str(DICOM)])])  # 128 x 128 pixels
    build_dataset(read_items([str(path)]), tmp_path / "run")
    batch = TrainingCollator(processor, max_length=4096)([load_dataset(tmp_path / "run")[0]])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56 x 56 pixels: 2 x 2 merged tokens


@pytest.mark.parametrize(("args", "message"), [
    (("--use-liger",), "--use-liger needs the liger-kernel package"),
    (("--report-to", "nosuch"), "--report-to nosuch: unknown"),
])
def test_options_that_need_a_package_fail_before_training(tmp_path, tiny_model_dir, args, message):
    import importlib.util

    if args[0] == "--use-liger" and importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    task = colour_task(tmp_path / "data", count=2)
    proc = train("-i", str(task), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run"), *args)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("aloe: error: ") and message in last
    assert not (tmp_path / "run" / "dataset").exists()  # nothing was read


def test_on_error_fail_stops_at_a_broken_image_with_one_line_naming_the_record(tmp_path, tiny_model_dir):
    """In a data-loader worker: under SLURM, without --dataloader-workers, the rank's share of
    SLURM_CPUS_PER_TASK minus one (2 CPUs, one rank: 1 worker)."""
    task = colour_task(tmp_path / "data", count=8)
    (tmp_path / "data" / "3.png").write_bytes(b"not a png")
    proc = aloe("train", *TRAIN_FLAGS[:-4], "-i", str(task), "--model", str(tiny_model_dir), "--output-dir",
                str(tmp_path / "run"), "--max-steps", "1", "--on-error", "fail",
                env={**ENV, "SLURM_CPUS_PER_TASK": "2"}, timeout=300)
    assert proc.returncode == 1
    assert "aloe: data-loader workers per rank: 1 (2 CPU(s) per rank from SLURM_CPUS_PER_TASK=2" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("aloe: error: ") and "task.jsonl:4" in last and "3.png" in last
    assert "Traceback" not in proc.stderr


def test_an_empty_mixture_is_an_error(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = train("-i", str(empty), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "aloe: error: no trainable records: 0 read, 0 kept"


def test_a_model_folder_without_a_chat_template_is_an_error(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").unlink()
    task = colour_task(tmp_path / "data", count=4)
    proc = train("-i", str(task), "--model", str(model), "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("aloe: error: ") and "no chat template" in last and "Traceback" not in proc.stderr


def test_a_missing_model_or_missing_inputs_fail_before_anything_loads(tmp_path):
    proc = train("-i", str(tmp_path / "nope.jsonl"), "--model", str(tmp_path / "nomodel"), "--output-dir", "x")
    assert proc.returncode == 1 and "model folder not found" in proc.stderr
    proc = train("--model", "m", "--output-dir", "x")
    assert proc.returncode == 2 and "Invalid value for --input: is required" in proc.stderr
