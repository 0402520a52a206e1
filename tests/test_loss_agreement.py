"""One definition of loss tokens: what `aloe mix` counts = what TRL trains on = what `aloe perplexity` scores.

For every record of a varied set, record by record, token for token:
- `aloe.mix.loss_tokens`, written by the real `aloe mix` CLI;
- the labels != -100 of the batches TRL's own `SFTTrainer(assistant_only_loss=True)`
  data collator produces (its real code path: SFTConfig, SFTTrainer, its eval
  dataloader over a `datasets.Dataset` with PIL images);
- `aloe.perplexity.tokens`, written by the real `aloe perplexity` CLI (plus the
  first token, which perplexity never scores, when TRL labels it).
On three set-ups of the tiny offline Qwen2-VL: its own template with markers;
the released-style template without markers, where TRL swaps in its training
template for the family; and the released-style one after
`apply_training_chat_template`, where TRL keeps aloe's template.
"""

from __future__ import annotations

import random

import pytest

from aloe_cli.modeling.chat_template import apply_training_chat_template
from support import aloe, read_jsonl, scan, write_jsonl

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

pytestmark = pytest.mark.slow

SETUPS = ("marked", "released", "released+aloe_template")
IMAGE_SIZES = {"a.png": 64, "b.png": 150, "c.png": 90, "d.png": 200}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def turn(role: str, *parts) -> dict:
    return {"role": role, "content": [{"type": "image"} if part is None else text(part) for part in parts]}


def record(id: str, messages: list[dict], images: tuple[str, ...] = ()) -> dict:
    return {"id": id, "source": "agreement", "domain": "medical", "messages": messages, "images": list(images)}


LONG_ANSWER = ("The chest radiograph shows a small nodule in the right upper lobe with mild pleural thickening, "
               "no effusion and a normal heart size; the bones are intact and the lung fields are otherwise "
               "clear. Follow-up imaging in three months is recommended. ") * 6
SPECIAL_LOOKING = ("<|im_end|> then <|im_start|>assistant\nfake turn, <|object_ref_start|>lesion<|object_ref_end|>"
                   "<|box_start|>(10,20),(300,400)<|box_end|>, <|endoftext|> and <|vision_start|> as text")


def hand_written() -> list[dict]:
    return [
        record("one-word-text", [turn("user", "Is this a CT scan?"), turn("assistant", "Yes")]),
        record("one-word-image", [turn("user", None, "Which organ?"), turn("assistant", "Liver")], ("a.png",)),
        record("several-images", [turn("user", None, None, None, "Compare the three scans."),
                                  turn("assistant", "The second shows a new nodule; the third is unchanged.")],
               ("a.png", "b.png", "c.png")),
        record("multi-turn-images", [turn("user", None, "What is shown?"), turn("assistant", "A chest film."),
                                     turn("user", None, "And on this one?"), turn("assistant", "An effusion."),
                                     turn("user", "Any fracture?"), turn("assistant", "No.")], ("b.png", "d.png")),
        record("multi-turn-text", [turn("user", "What is cardiomegaly?"), turn("assistant", "An enlarged heart."),
                                   turn("user", "Is it serious?"), turn("assistant", "It can be.")]),
        record("system", [turn("system", "You are a careful radiologist."), turn("user", None, "Findings?"),
                          turn("assistant", "A small nodule.")], ("c.png",)),
        record("empty-system-text", [turn("system", ""), turn("user", "Organ?"), turn("assistant", "Liver.")]),
        record("empty-system-parts", [{"role": "system", "content": []}, turn("user", "Organ?"),
                                      turn("assistant", "Spleen.")]),
        record("long-answer", [turn("user", None, "Describe everything."), turn("assistant", LONG_ANSWER)],
               ("b.png",)),
        record("special-looking", [turn("user", "Say it."), turn("assistant", SPECIAL_LOOKING)]),
        record("unicode", [turn("user", "肝脏有病变吗？"),
                           turn("assistant", "是的，肝右叶见一低密度灶 🙂 — ½ cm, café")]),
        record("whitespace", [turn("user", "Line one\r\nline two\n"), turn("assistant", "\n  Indented\tanswer\n\n")]),
        record("empty-answer", [turn("user", "Say nothing."), turn("assistant", "")]),
        record("ends-with-question", [turn("user", None, "Q1?"), turn("assistant", "A1."), turn("user", "Q2?")],
               ("d.png",)),
        record("text-parts", [turn("user", "Two", " parts"), turn("assistant", "One answer", " in two parts.")]),
    ]


def random_records(count: int, seed: int = 0) -> list[dict]:
    pieces = ["The liver", " shows", "\n", "  ", "é", "肝脏", "Yes", ".", " 12", "lesion", " ", "<|im_end|>",
              "(100,200),(300,400)", "<|box_start|>", "x", "\t", "nodule", " in the right lobe"]
    rng = random.Random(seed)

    def words(n: int) -> str:
        return "".join(rng.choice(pieces) for _ in range(n)) or "ok"

    records = []
    for i in range(count):
        messages, images = [], []
        if i % 4 == 0:
            messages.append(turn("system", words(rng.randint(0, 3))))
        for _ in range(rng.randint(1, 3)):
            placeholders = [None] * rng.randint(0, 2)
            images += [rng.choice(sorted(IMAGE_SIZES)) for _ in placeholders]
            messages.append(turn("user", *placeholders, words(rng.randint(1, 8))))
            messages.append(turn("assistant", words(rng.randint(1, 40))))
        records.append(record(f"random-{i}", messages, tuple(images)))
    return records


def all_records() -> list[dict]:
    return hand_written() + random_records(35)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("agreement")
    for seed, (name, size) in enumerate(IMAGE_SIZES.items()):
        scan(seed + 1, size).save(folder / name)
    records = all_records()
    write_jsonl(folder / "multimodal.jsonl", [r for r in records if r["images"]])
    write_jsonl(folder / "text.jsonl", [r for r in records if not r["images"]])
    write_jsonl(folder / "all.jsonl", records)
    return folder


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_released_model_dir):
    return {"marked": tiny_model_dir, "released": tiny_released_model_dir}


def mix_counts(model_dir, workdir) -> dict[str, int]:
    """aloe.mix.loss_tokens of every record, from the real CLI (one run per cell, so that every record is kept)."""
    counts = {}
    for name, cell in (("multimodal", "medical/multimodal"), ("text", "medical/text")):
        output = workdir / f"mixed-{model_dir.name}-{name}.jsonl"
        proc = aloe("mix", "-i", str(workdir / f"{name}.jsonl"), "--tokenizer", str(model_dir), "--share",
                    f"{cell}=1", "--no-cache", "-o", str(output))
        assert proc.returncode == 0, proc.stderr
        counts.update({r["id"]: r["aloe"]["mix"]["loss_tokens"] for r in read_jsonl(output)})
    return counts


def perplexity_tokens(model_dir, workdir) -> dict[str, int]:
    output = workdir / f"perplexity-{model_dir.name}.jsonl"
    proc = aloe("perplexity", "-i", str(workdir / "all.jsonl"), "--model", str(model_dir), "--device", "cpu",
                "--batch-size", "8", "-o", str(output), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {r["id"]: r["aloe"]["perplexity"]["tokens"] for r in read_jsonl(output)}


def trl_labels(model_dir, workdir, records: list[dict], setup: str, tmp_path) -> tuple[list[int], list[bool]]:
    """Per record: TRL's labels != -100, and whether TRL labels the first token; also checks who picked the template."""
    from PIL import Image

    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    if setup == "released+aloe_template":
        apply_training_chat_template(processor)
    model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir)
    rows = [{"messages": r["messages"], "images": [Image.open(workdir / name).convert("RGB") for name in r["images"]]}
            for r in records]
    dataset = datasets.Dataset.from_list(rows)
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), assistant_only_loss=True, max_length=None,
                         per_device_eval_batch_size=4, report_to="none", use_cpu=True, bf16=False,
                         dataloader_num_workers=0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    # TRL swaps in its own training template only for the released template; with markers it keeps the processor's.
    assert (trainer.chat_template is not None) == (setup == "released")
    counts, first_labelled = [], []
    for batch in trainer.get_eval_dataloader(dataset):  # sequential: rows come back in dataset order
        labels = batch["labels"]
        counts += (labels != -100).sum(dim=1).tolist()
        first_labelled += (labels[:, 0] != -100).tolist()
    return counts, first_labelled


@pytest.mark.parametrize("setup", SETUPS)
def test_mix_counts_what_trl_trains_on_and_perplexity_scores(setup, models, workdir, tmp_path):
    records = all_records()
    model_dir = models[setup.split("+")[0]]
    mixed = mix_counts(model_dir, workdir)
    assert sorted(mixed) == sorted(r["id"] for r in records)  # every record made it through mix
    trained, first_labelled = trl_labels(model_dir, workdir, records, setup, tmp_path)
    assert len(trained) == len(records) == 50
    mismatches = {r["id"]: (mixed[r["id"]], n) for r, n in zip(records, trained) if mixed[r["id"]] != n}
    assert not mismatches, f"mix vs TRL loss tokens differ (mix, trl): {mismatches}"
    assert min(trained) > 0 and sum(trained) > 2000
    if setup != "released+aloe_template":  # perplexity does not depend on how TRL got the template
        scored = perplexity_tokens(model_dir, workdir)
        expected = {r["id"]: n - first for r, n, first in zip(records, trained, first_labelled)}
        assert scored == expected


def test_a_one_word_answer_learns_its_word_the_end_of_turn_and_the_newline(models, workdir, tmp_path):
    """What changed: the newline after <|im_end|> is trained on too, so a one-word answer has 3 loss tokens."""
    records = hand_written()[:1]
    assert records[0]["messages"][-1]["content"] == [text("Yes")]
    tokenizer = transformers.AutoTokenizer.from_pretrained(models["released"])
    assert len(tokenizer.encode("Yes", add_special_tokens=False)) == 1
    trained, _ = trl_labels(models["released"], workdir, records, "released", tmp_path)
    assert trained == [1 + 2]  # "Yes", then "<|im_end|>" and "\n"
