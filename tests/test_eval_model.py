"""`aloe eval` end to end through the CLI on the tiny offline model: every benchmark format, a model trained
on one benchmark first (accuracy well above chance), a second model's row, perturbations, bad images."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from eval_fixtures import (
    ORGANS,
    adversarial_jsonl,
    mcq_tsv,
    open_jsonl,
    paired_jsonl,
    text_jsonl,
    write_items,
    write_tsv,
    yesno_tsv,
)

from aloe_cli.evaluation.benchmarks import EvalItem
from aloe_cli.evaluation.prompts import prompt_text
from support import aloe, read_jsonl

pytestmark = pytest.mark.slow
FAST = ["--batch-size", "4", "--max-new-tokens", "6"]
LINE_FIELDS = {"id", "benchmark", "model", "kind", "question", "options", "answer", "prediction", "extracted",
               "correct", "perturb"}


def constant_answer_items(count: int, start: int = 0) -> list[EvalItem]:
    """Text-only multiple choice whose answer is always B: what the tiny model is trained on."""
    return [EvalItem(id=str(start + index), benchmark="organs_b", kind="mcq",
                     question=f"Case {start + index}: which organ is enlarged?", answer="B",
                     options=dict(zip("ABCD", ORGANS))) for index in range(count)]


@pytest.fixture(scope="module")
def trained_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model after a few dozen SFT steps (TRL) on the constant-answer task, saved like a run folder."""
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    out = tmp_path_factory.mktemp("trained_tiny")
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": prompt_text(item)}]},
                          {"role": "assistant", "content": [{"type": "text", "text": item.answer}]}]}
            for item in constant_answer_items(48, start=1000)]
    config = SFTConfig(output_dir=str(out / "run"), max_steps=30, learning_rate=5e-4, per_device_train_batch_size=4,
                       lr_scheduler_type="constant", warmup_steps=0, assistant_only_loss=True, use_cpu=True,
                       report_to=[], save_strategy="no", logging_steps=10, seed=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=processor.tokenizer)
    trainer.train()
    model_dir = out / "model"
    trainer.save_model(str(model_dir))
    processor.save_pretrained(str(model_dir))
    return model_dir


def trained_benchmark(path: Path) -> Path:
    """The held-out items of the trained task as a VLMEvalKit TSV (answers: B; chance: 25%)."""
    rows = [{"index": item.id, "question": item.question, **item.options, "answer": item.answer,
             "category": "organ"} for item in constant_answer_items(12)]
    return write_tsv(path, rows)


def scores_of(out: Path, label: str) -> dict:
    return json.loads((out / label / "scores.json").read_text())["benchmarks"]


def test_every_benchmark_format_end_to_end(tmp_path, tiny_model_dir):
    benchmarks = {"mcq": mcq_tsv(tmp_path / "mcq.tsv"), "yn": yesno_tsv(tmp_path / "yn.tsv"),
                  "open": open_jsonl(tmp_path / "open.jsonl"), "paired": paired_jsonl(tmp_path / "paired.jsonl"),
                  "text": text_jsonl(tmp_path / "text.jsonl")}
    args = [arg for name, path in benchmarks.items() for arg in ("--benchmark", f"{name}={path}")]
    out = tmp_path / "results"
    result = aloe("eval", "--model", f"tiny={tiny_model_dir}", *args, "-o", str(out), *FAST,
                  "--judge", str(tiny_model_dir), "--judge-parse-retries", "1", timeout=600,
                  env={"ALOE_PROGRESS_INTERVAL": "0"})  # a heartbeat line at every batch
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert re.search(r"\] aloe eval: tiny on mcq: 6/6 items \(100%\), [\d.e+]+ items/s, done in .*accuracy",
                     result.stderr), result.stderr
    assert "read = " in result.stderr
    counts = {"mcq": 6, "yn": 4, "open": 3, "paired": 6, "text": 4}
    for name, count in counts.items():
        lines = read_jsonl(out / "tiny" / name / "predictions.jsonl")
        assert len(lines) == count and all(LINE_FIELDS <= set(line) for line in lines)
        assert all(line["model"] == "tiny" and line["perturb"] is None for line in lines)
    mcq = read_jsonl(out / "tiny" / "mcq" / "predictions.jsonl")
    assert mcq[0]["options"] == dict(zip("ABCD", ORGANS)) and all(isinstance(m["correct"], bool) for m in mcq)
    assert all(m["correct"] == (m["extracted"] == m["answer"]) for m in mcq)
    opened = read_jsonl(out / "tiny" / "open" / "predictions.jsonl")
    assert all(line["options"] is None and "judge" in line for line in opened)
    # a random-weight judge rarely writes a valid verdict: unparseable ones are retried, then left unjudged
    assert all(line["correct"] in (0.0, 0.5, 1.0, None) for line in opened)
    assert all(line["judge"]["attempts"] in (1, 2) for line in opened if line["prediction"].strip())
    # the tiny judge has a vision part: it was shown each item's image with the question, and served every request
    assert all(line["scored_by"] == "judge" and "request failed" not in (line["judge"].get("error") or "")
               for line in opened)
    scores = scores_of(out, "tiny")
    assert set(scores) == set(counts)
    assert scores["paired"]["pairs"]["count"] == 3 and scores["paired"]["main"] == scores["paired"]["pairs"]["accuracy"]
    assert scores["open"]["unjudged"] + scores["open"]["judged"] == 3
    assert scores["mcq"]["categories"].keys() == {"chest", "abdomen"}
    table = (out / "results.md").read_text()
    assert "| model | mcq | yn | open | paired | text |" in table and "| tiny |" in table


def test_a_trained_model_scores_above_chance_and_adds_its_row(tmp_path, tiny_model_dir, trained_model_dir):
    bench = trained_benchmark(tmp_path / "organs_b.tsv")
    out = tmp_path / "results"
    asked = ("--protocol", "aloe")  # the model was trained on aloe's wording of the question (prompt_text)
    before = aloe("eval", "--model", f"untrained={tiny_model_dir}", "--benchmark", str(bench), "-o", str(out), *FAST,
                  *asked)
    assert before.returncode == 0, before.stderr
    after = aloe("eval", "--model", f"trained={trained_model_dir}", "--benchmark", str(bench), "-o", str(out), *FAST,
                 *asked)
    assert after.returncode == 0, after.stderr
    trained = scores_of(out, "trained")["organs_b"]["accuracy"]
    untrained = scores_of(out, "untrained")["organs_b"]["accuracy"]
    assert trained >= 75.0 and trained >= untrained + 25.0, (trained, untrained)
    lines = read_jsonl(out / "trained" / "organs_b" / "predictions.jsonl")
    assert sum(line["extracted"] == "B" for line in lines) >= 9
    table = aloe("eval", "--table", str(out))
    assert table.returncode == 0
    rows = [line for line in table.stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == "| model | organs_b |" and rows[1] == f"| untrained | {untrained:.1f} |"
    assert rows[2] == f"| trained | {trained:.1f} |"


def test_perturbations_fill_the_robustness_table(tmp_path, tiny_model_dir):
    bench = adversarial_jsonl(tmp_path / "adv.jsonl", count=4)
    text = text_jsonl(tmp_path / "text.jsonl", count=2)
    out = tmp_path / "results"
    result = aloe("eval", "--model", f"tiny={tiny_model_dir}", "--benchmark", f"adv={bench}",
                  "--benchmark", f"text={text}", "--perturb", "base,cap,pmt,syc,leg", "-o", str(out), *FAST)
    assert result.returncode == 0, result.stderr
    lines = read_jsonl(out / "tiny" / "adv" / "predictions.jsonl")
    by_kind = {}
    for line in lines:
        by_kind.setdefault(line["perturb"], []).append(line)
    assert {kind: len(group) for kind, group in by_kind.items()} == {None: 4, "cap": 4, "pmt": 4, "syc": 4, "leg": 4}
    syc = by_kind["syc"][0]
    assert syc["wrong_answer"] and syc["wrong_answer"] != syc["options"][syc["answer"]]
    assert syc["wrong_answer"] in syc["prompt"] and syc["prompt"] != by_kind[None][0]["prompt"]
    assert by_kind["cap"][0]["prompt"] == by_kind[None][0]["prompt"]  # the caption went into the image
    # text-only items cannot carry an image caption or legend: only pmt and syc apply
    kinds = {line["perturb"] for line in read_jsonl(out / "tiny" / "text" / "predictions.jsonl")}
    assert kinds == {None, "pmt", "syc"}
    scores = scores_of(out, "tiny")["adv"]
    assert set(scores["robustness"]) == {"cls", "det"}
    assert set(scores["robustness"]["cls"]) == {"base", "cap", "pmt", "syc", "leg"}
    assert scores["robustness"]["cls"]["base"]["items"] == 2
    table = (out / "results.md").read_text()
    assert ("| model | cls Base | cls Cap | cls Pmt | cls Syc | det Base | det Cap | det Pmt | det Syc "
            "| det Leg |") in table  # the published columns: cls Leg only when asked


def test_a_broken_image_fails_with_its_place_or_is_counted(tmp_path, tiny_model_dir):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(Path(__file__).with_name("conftest.py"), images / "broken.png")  # not an image
    bench = write_items(tmp_path / "b.jsonl", [
        {"id": "1", "question": "Is this a CT?", "answer": "yes", "images": ["images/broken.png"]},
        {"id": "2", "question": "Is this a CT?", "answer": "no"},
    ])
    out = tmp_path / "out"
    failed = aloe("eval", "--model", str(tiny_model_dir), "--benchmark", str(bench), "-o", str(out), *FAST)
    assert failed.returncode == 1 and f"{bench}:1: field 'images[0]'" in failed.stderr, failed.stderr
    skipped = aloe("eval", "--model", str(tiny_model_dir), "--benchmark", str(bench), "-o", str(out), *FAST,
                   "--on-error", "skip")
    assert skipped.returncode == 0, skipped.stderr
    assert "2 read = 1 written + 1 skipped (image_corrupt=1)" in skipped.stderr
    label = tiny_model_dir.name
    assert len(read_jsonl(out / label / "b" / "predictions.jsonl")) == 1
    assert json.loads((out / label / "scores.json").read_text())["benchmarks"]["b"]["skipped"] == {"image_corrupt": 1}
