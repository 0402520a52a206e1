"""The README's pipe, `aloe dedup | aloe score | aloe perplexity | aloe mix`, end to end through real
subprocess pipes on the bundled sample data (grounding records included) and the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from aloe_cli.demo.sample_data import write_sample_data
from support import ROOT, read_jsonl

pytestmark = pytest.mark.slow


def run_pipe(stages: list[list[str]], folder, stdin_path) -> list[tuple[int, str]]:
    """Chain `python -m aloe_cli ARGS` processes stdout -> stdin; return (exit code, stderr) per stage."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY")}
    processes, logs = [], []
    upstream = open(stdin_path, "rb")
    try:
        for index, args in enumerate(stages):
            log = open(folder / f"stage{index}.stderr", "w+b")
            last = index == len(stages) - 1
            process = subprocess.Popen([sys.executable, "-m", "aloe_cli", *args], stdin=upstream,
                                       stdout=subprocess.DEVNULL if last else subprocess.PIPE, stderr=log,
                                       env=env, cwd=ROOT)
            upstream.close()  # the child holds its own copy; the next stage must see EOF when it exits
            upstream = process.stdout
            processes.append(process)
            logs.append(log)
        codes = [process.wait(timeout=600) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    results = []
    for code, log in zip(codes, logs):
        log.seek(0)
        results.append((code, log.read().decode()))
        log.close()
    return results


def expected_boxes(record: dict, folder) -> list[str]:
    """The box text each object should become, computed here from the pixel boxes and the image size."""
    width, height = Image.open(folder / record["images"][0]).size
    lines = []
    for obj in record["objects"]:
        x1, y1, x2, y2 = obj["bbox"]
        corners = (round(x1 / width * 1000), round(y1 / height * 1000), round(x2 / width * 1000),
                   round(y2 / height * 1000))
        lines.append(f"<|object_ref_start|>{obj['label']}<|object_ref_end|>"
                     f"<|box_start|>({corners[0]},{corners[1]}),({corners[2]},{corners[3]})<|box_end|>")
    return lines


def test_readme_pipe_runs_end_to_end_with_grounding_records(tmp_path, tiny_model_dir):
    data = write_sample_data(tmp_path / "data")
    folder = data.train.parent
    reports = {name: tmp_path / f"{name}.json" for name in ("dedup", "score", "perplexity", "mix")}
    mixture = tmp_path / "mixture.jsonl"
    stages = [
        ["dedup", "--against", str(data.eval_tsv), "--image-root", str(folder), "--rejects",
         str(tmp_path / "leaks.jsonl"), "--report", str(reports["dedup"])],
        ["score", "--backend", "hf", "--judge", str(tiny_model_dir), "--image-root", str(folder), "--keep-all",
         "--max-new-tokens", "8", "--report", str(reports["score"])],
        ["perplexity", "--model", str(tiny_model_dir), "--image-root", str(folder), "--keep-all",
         "--report", str(reports["perplexity"])],
        # medical/multimodal gets the largest share so that it is the cell that limits the mixture:
        # every one of its records, the grounding ones included, is then selected.
        ["mix", "--tokenizer", str(tiny_model_dir), "--image-root", str(folder), "--share", "medical/multimodal=0.7",
         "--share", "medical/text=0.1", "--share", "general/multimodal=0.1", "--share", "general/text=0.1",
         "--no-cache", "--report", str(reports["mix"]), "-o", str(mixture)],
    ]
    results = run_pipe(stages, tmp_path, data.train)
    for (code, stderr), args in zip(results, stages):
        assert code == 0, f"aloe {args[0]} exited {code}:\n{stderr}"
        assert "Traceback" not in stderr

    train = read_jsonl(data.train)
    leaked = set(data.leaked_ids)
    dedup, score, perplexity, mix = (json.loads(reports[name].read_text()) for name in reports)
    assert dedup["read"] == len(train) and dedup["rejected"] == len(leaked)
    assert {r["id"] for r in read_jsonl(tmp_path / "leaks.jsonl")} == leaked
    for report in (dedup, score, perplexity):
        assert report["read"] == report["kept"] + report["rejected"], report
    assert score["read"] == perplexity["read"] == mix["read"] == len(train) - len(leaked)
    assert mix["read"] == mix["rejected"] + mix["available"] and mix["rejected"] == 0

    written = read_jsonl(mixture)
    assert written and len(written) == mix["written"]
    grounding = {r["id"]: r for r in written if r["id"] in data.grounding_ids}
    assert set(grounding) == set(data.grounding_ids)
    originals = {r["id"]: r for r in train}
    for record_id, record in grounding.items():
        answer = record["messages"][-1]
        assert answer["role"] == "assistant"
        text = answer["content"][0]["text"]
        boxes = expected_boxes(originals[record_id], folder)
        assert text.split("\n")[-len(boxes):] == boxes  # grounded once, by dedup, and kept by every later stage
        assert text.count("<|box_start|>") == len(boxes)
        assert record["aloe"]["grounding"]["boxes"] == len(boxes)
        assert {"dedup", "score", "perplexity", "mix"} <= set(record["aloe"])
