"""Records in four foreign formats, from two folders, through `aloe dedup | aloe score | aloe mix` (real
subprocess pipes, the fake judge), then `aloe train` on the mixture (tiny model, 2 steps) and `aloe eval` of
the trained model: every record is accounted for at every step (read = kept + rejected)."""

from __future__ import annotations

import json
import re

import pytest
from test_pipeline import run_pipe

from support import aloe, read_jsonl, scan, write_jsonl

pytestmark = pytest.mark.slow


def images(folder, prefix, count, seed):
    (folder / "img").mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        name = f"img/{prefix}{index}.png"
        scan(seed + index, size=64).save(folder / name)
        names.append(name)
    return names


def llama_factory_folder(folder):
    """LLaMA-Factory's two file formats as JSON arrays: sharegpt and alpaca, medical."""
    names = images(folder, "lf", 6, 0)
    sharegpt = [{"id": f"sg-{i}", "domain": "medical", "images": [names[i]],
                 "conversations": [{"from": "human", "value": f"<image>\nWhich organ is in scan {i}?"},
                                   {"from": "gpt", "value": f"The liver, scan {i}. [score=4]"}]} for i in range(3)]
    alpaca = [{"id": f"al-{i}", "domain": "medical", "images": [names[3 + i]], "instruction": "<image>Describe it.",
               "input": f"Scan {i}.", "output": f"A normal scan {i}. [score={5 if i else 1}]"} for i in range(3)]
    alpaca.append({"id": "al-text", "domain": "medical", "instruction": "What is a CT?", "output": "An X-ray scan."})
    (folder / "sharegpt.json").write_text(json.dumps(sharegpt, indent=2))
    (folder / "alpaca.json").write_text(json.dumps(alpaca, indent=2))
    return [folder / "sharegpt.json", folder / "alpaca.json"], names


def openai_and_trl_folder(folder):
    """TRL prompt/completion and OpenAI image_url records as JSON lines, general."""
    names = images(folder, "gen", 6, 40)
    trl = [{"id": f"trl-{i}", "domain": "general", "images": [names[i]],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": f"A circle {i}."}]}]}
           for i in range(3)]
    trl.append({"id": "trl-text", "domain": "general", "prompt": "Say hi.", "completion": "Hi."})
    openai = [{"id": f"oa-{i}", "domain": "general",
               "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": names[3 + i]}},
                                                         {"type": "text", "text": "What colour?"}]},
                            {"role": "assistant", "content": f"Grey {i}."}]} for i in range(3)]
    missing = {"type": "image_url", "image_url": {"url": "img/none.png"}}  # no such file: dedup rejects it
    openai.append({"id": "oa-broken", "domain": "general",
                   "messages": [{"role": "user", "content": [missing, {"type": "text", "text": "What?"}]},
                                {"role": "assistant", "content": "Nothing."}]})
    return [write_jsonl(folder / "trl.jsonl", trl), write_jsonl(folder / "openai.jsonl", openai)], names


def stage_counts(report: dict) -> tuple[int, int, int]:
    return report["read"], report["kept"], report["rejected"]


def test_four_foreign_formats_from_two_folders_reach_train_and_eval(tmp_path, tiny_model_dir):
    from fake_openai_server import FakeOpenAIServer

    medical, medical_images = llama_factory_folder(tmp_path / "llamafactory")
    general, _ = openai_and_trl_folder(tmp_path / "openai")
    total = sum(len(json.loads(path.read_text())) for path in medical) + sum(len(read_jsonl(p)) for p in general)
    assert total == 15
    # the evaluation set shares one image with the training data: dedup removes that record (sg-0)
    bench_folder = tmp_path / "bench"
    bench_folder.mkdir()
    (bench_folder / "leak.png").write_bytes((tmp_path / "llamafactory" / medical_images[0]).read_bytes())
    scan(90, size=64).save(bench_folder / "other.png")
    bench = write_jsonl(bench_folder / "bench.jsonl", [
        {"id": "b1", "question": "Is this a scan?", "answer": "yes", "images": ["leak.png"]},
        {"id": "b2", "question": "Is this a scan?", "answer": "no", "images": ["other.png"]}])
    (tmp_path / "thresholds.yaml").write_text("default: {min: 3}\n")
    reports = {name: tmp_path / f"{name}.json" for name in ("dedup", "score", "mix")}
    mixture = tmp_path / "mixture" / "mix.jsonl"
    mixture.parent.mkdir()
    inputs = [arg for path in medical + general for arg in ("-i", str(path))]
    empty = tmp_path / "empty"
    empty.write_text("")
    with FakeOpenAIServer() as judge:
        stages = [
            ["dedup", *inputs, "--against", str(bench), "--on-error", "skip", "--rejects",
             str(tmp_path / "dedup.rejects.jsonl"), "--report", str(reports["dedup"])],
            ["score", "--judge", "j", "--base-url", judge.url, "--thresholds", str(tmp_path / "thresholds.yaml"),
             "--rejects", str(tmp_path / "score.rejects.jsonl"), "--report", str(reports["score"])],
            ["mix", "--tokenizer", str(tiny_model_dir), "--share", "medical/multimodal=0.4", "--share",
             "medical/text=0.1", "--share", "general/multimodal=0.4", "--share", "general/text=0.1", "--no-cache",
             "--report", str(reports["mix"]), "-o", str(mixture)],
        ]
        results = run_pipe(stages, tmp_path, empty)
    for (code, stderr), args in zip(results, stages):
        assert code == 0, f"aloe {args[0]} exited {code}:\n{stderr}"
        assert "Traceback" not in stderr
    dedup, score, mix = (json.loads(reports[name].read_text()) for name in ("dedup", "score", "mix"))

    # dedup: every record of the four files read; the leak and the broken image rejected, with their reasons
    assert stage_counts(dedup) == (15, 13, 2)
    dedup_rejects = {r["id"]: r["aloe"]["reject"]["reason"] for r in read_jsonl(tmp_path / "dedup.rejects.jsonl")}
    assert dedup_rejects == {"sg-0": "eval_leak", "oa-broken": "image_missing"}
    # score: what dedup kept, one record below the threshold
    assert stage_counts(score) == (13, 12, 1)
    assert [r["id"] for r in read_jsonl(tmp_path / "score.rejects.jsonl")] == ["al-0"]
    # mix: what score kept, nothing rejected; every record written at least once, paths resolving from the mixture
    assert mix["read"] == 12 and mix["rejected"] == 0 and mix["available"] == 12
    written = read_jsonl(mixture)
    assert len(written) == mix["written"]
    assert len({r["id"] for r in written}) == mix["selected_unique"]
    kept_by_score = {"sg-1", "sg-2", "al-1", "al-2", "al-text", "trl-0", "trl-1", "trl-2", "trl-text", "oa-0", "oa-1",
                     "oa-2"}
    assert {r["id"] for r in written} <= kept_by_score
    assert mix["selected_unique"] + mix["not_selected"] == mix["available"]
    for record in written:
        for path in record["images"]:
            assert (mixture.parent / path).is_file(), path

    # train on the mixture (from another working directory: paths resolve from the mixture's folder)
    run = tmp_path / "run"
    trained = aloe("train", "--model", str(tiny_model_dir), "-i", str(mixture), "--output-dir", str(run),
                   "--max-steps", "2", "--global-batch-size", "4", "--micro-batch-size", "4", "--precision", "fp32",
                   "--no-gradient-checkpointing", "--deepspeed", "none", "--dataloader-workers", "0",
                   "--warmup-ratio", "0", "--on-error", "fail", env={"OMP_NUM_THREADS": "1"}, timeout=600,
                   cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    read = int(re.search(r"records read\s+(\d+)", trained.stderr).group(1))
    kept = int(re.search(r"records kept\s+(\d+)", trained.stderr).group(1))
    assert read == kept == len(written), trained.stderr
    assert "samples skipped" not in trained.stderr

    # eval of the trained model: every benchmark item answered
    out = tmp_path / "eval"
    evaluated = aloe("eval", "--model", f"trained={run}", "--benchmark", str(bench), "-o", str(out),
                     "--max-new-tokens", "2")
    assert evaluated.returncode == 0, evaluated.stderr
    assert len(read_jsonl(out / "trained" / "bench" / "predictions.jsonl")) == 2
