"""aloe adv-train: perturbed medical records (through aloe_cli.perturb) and stage-2 SFT from a stage-1 folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pydicom
import pytest
import yaml

from aloe_cli.data.images import load_image
from aloe_cli.data.io import read_items
from aloe_cli.data.records import text_of
from support import ROOT, aloe, chat, read_jsonl, scan, write_jsonl

DICOM = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
ENV = {"OMP_NUM_THREADS": "1"}
FLAGS = ("--global-batch-size", "4", "--micro-batch-size", "4", "--precision", "fp32", "--no-gradient-checkpointing",
         "--deepspeed", "none", "--dataloader-workers", "0", "--logging-steps", "1", "--learning-rate", "1e-3")
ORGANS = ("The liver.", "The spleen.", "The left kidney.", "The pancreas.")


def medical_records(folder: Path, count: int = 20) -> Path:
    """One source: yes/no questions, open questions and multiple choice, on PNG scans (with a lesion box) and a
    DICOM file."""
    (folder / "img").mkdir(parents=True)
    shutil.copy(DICOM, folder / "img" / "ct.dcm")
    records = []
    for i in range(count):
        image = "img/ct.dcm" if i % 5 == 0 else f"img/{i}.png"
        if i % 5:
            scan(i, size=112).save(folder / image)
        if i % 3 == 0:
            record = chat("Is there a nodule?", "Yes." if i % 2 else "No.", [image])
        elif i % 3 == 1:
            record = chat("Which organ is abnormal?", ORGANS[i % 4], [image])
        else:
            record = chat("Which side is affected?\nOptions:\nA. left\nB. right", "B", [image],
                          meta={"options": {"A": "left", "B": "right"}})
        if i % 5:  # a lesion box on the scans: `region` needs one to move
            record["objects"] = [{"bbox": [20, 24, 60, 70], "label": "lesion"}]
        records.append({**record, "id": f"m{i}", "source": "rad", "domain": "medical"})
    return write_jsonl(folder / "medical.jsonl", records)


def test_emit_only_writes_balanced_perturbed_records_without_loading_a_model(tmp_path, tiny_model_dir):
    source = medical_records(tmp_path / "data")
    emitted = tmp_path / "out" / "adversarial.jsonl"
    emitted.parent.mkdir()
    probe = ("import sys; from aloe_cli.app import main\n"
             "try:\n    main()\nexcept SystemExit as exit:\n    code = exit.code\n"
             "heavy = sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'transformers', 'trl', 'deepspeed'})\n"
             "sys.stderr.write(f'heavy imports: {heavy}\\n'); sys.exit(code)\n")
    args = ["adv-train", "-i", str(source), "--base", str(tiny_model_dir), "--samples", "15", "--emit", str(emitted),
            "--emit-only"]
    proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "heavy imports: []" in proc.stderr and "aloe perturb" in proc.stderr
    records = read_jsonl(emitted)
    assert len(records) == 15
    kinds = Counter(r["aloe"]["perturb"]["kind"] for r in records)
    assert set(kinds) == {"cap", "pmt", "syc", "leg", "region"} and max(kinds.values()) - min(kinds.values()) <= 1
    originals = {item.record["id"]: item.record for item in read_items([str(source)])}  # as normalised on read
    for record in records:
        perturb = record["aloe"]["perturb"]
        original = originals[perturb["of"]]
        assert text_of(record["messages"][-1]) == text_of(original["messages"][-1])  # the target stays correct
        assert perturb["wrong_answer"] and perturb["wrong_answer"] != text_of(original["messages"][-1])
        for entry in record["images"]:  # readable from the emitted file's folder: absolute paths or embedded
            assert entry.startswith(("data:", "/"))
            load_image(entry, emitted.parent)


def test_adv_train_chains_from_a_stage_1_folder(tmp_path, tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    source = medical_records(tmp_path / "data", count=12)
    stage1 = tmp_path / "stage1"
    proc = aloe("train", "-i", str(source), "--model", str(tiny_model_dir), "--output-dir", str(stage1),
                "--max-steps", "2", *FLAGS, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stage2 = tmp_path / "stage2"
    proc = aloe("adv-train", "-i", str(source), "--base", str(stage1), "--output-dir", str(stage2), "--samples", "10",
                "--max-steps", "2", *FLAGS, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "aloe perturb" in proc.stderr and "optimizer steps" in proc.stderr
    emitted = read_jsonl(stage2 / "adversarial.jsonl")
    assert len(emitted) == 10 and all("perturb" in r["aloe"] for r in emitted)
    resolved = yaml.safe_load((stage2 / "aloe-train.yaml").read_text())
    assert resolved["command"] == "adv-train"
    assert resolved["aloe"]["base"] == resolved["aloe"]["model"] == str(stage1)
    assert resolved["sft_config"]["learning_rate"] == pytest.approx(1e-3)
    assert (stage2 / "chat_template.jinja").read_text() == (stage1 / "chat_template.jinja").read_text()
    AutoModelForImageTextToText.from_pretrained(stage2)
    # the stage-2 folder is a run of its own: refused as an output, resumed only from the same --base
    again = ["adv-train", "-i", str(source), "--output-dir", str(stage2), "--samples", "10", "--max-steps", "2", *FLAGS]
    proc = aloe(*again, "--base", str(stage1), env=ENV, timeout=300)
    assert proc.returncode == 2 and "holds a run of aloe adv-train (complete, step 2" in proc.stderr, proc.stderr
    proc = aloe(*again, "--base", str(tiny_model_dir), "--resume", env=ENV, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert f"holds another run: --base: {stage1} then, {Path(tiny_model_dir).resolve()} now" in proc.stderr
    proc = aloe(*again, "--base", str(stage1), "--resume", env=ENV, timeout=300)
    assert proc.returncode == 0 and "is complete (step 2): nothing to resume" in proc.stderr, proc.stderr
    # --perturb none: train on records that are already perturbed, as they are
    stage2b = tmp_path / "stage2b"
    proc = aloe("adv-train", "-i", str(stage2 / "adversarial.jsonl"), "--base", str(stage1), "--output-dir",
                str(stage2b), "--perturb", "none", "--max-steps", "1", *FLAGS, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "aloe perturb" not in proc.stderr and not (stage2b / "adversarial.jsonl").exists()
    assert yaml.safe_load((stage2b / "aloe-train.yaml").read_text())["aloe"]["perturb"] == "none"


def test_adv_train_resolves_the_same_optimisation_as_train():
    proc = aloe("adv-train", "-i", "medical.jsonl", "--base", "runs/stage1", "--output-dir", "runs/stage2",
                "--dry-run", env={"WORLD_SIZE": "32"})
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    train = yaml.safe_load(aloe("train", "--model", "m", "--dry-run", env={"WORLD_SIZE": "32"}).stdout)
    ignore = {"output_dir"}
    assert {k: v for k, v in resolved["sft_config"].items() if k not in ignore} == {
        k: v for k, v in train["sft_config"].items() if k not in ignore}
    assert resolved["deepspeed"] == train["deepspeed"]
    assert resolved["aloe"]["samples"] == 17200 and resolved["aloe"]["perturb"] == "cap,pmt,syc,leg,region"


@pytest.mark.parametrize(("args", "message"), [
    (("--perturb", "cap,blur"), "--perturb: must be distinct names among cap, pmt, syc, leg, region"),
    (("--perturb", "cap,cap"), "--perturb: must be distinct names"),
    (("--emit-only",), "--emit-only: needs --emit FILE"),
    (("--samples", "0"), "--samples: must be at least 1"),
])
def test_bad_adv_train_options_are_usage_errors(args, message):
    proc = aloe("adv-train", "-i", "medical.jsonl", "--base", "runs/stage1", "--dry-run", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aloe: error: Invalid value for ") and message in lines[0], \
        proc.stderr


def test_adv_train_needs_a_base_model(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [chat("Q?", "A.")])
    proc = aloe("adv-train", "-i", str(path), "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 2 and "--base: is required" in proc.stderr
    proc = aloe("adv-train", "-i", str(path), "--base", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "r"))
    assert proc.returncode == 1 and "model folder not found" in proc.stderr


def test_adv_train_writes_its_sbatch_script(tmp_path):
    proc = aloe("adv-train", "-i", "medical.jsonl", "--base", "runs/stage1", "--output-dir", "runs/stage2",
                "--slurm", "--nodes", "8", "--gpus-per-node", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --job-name=aloe-adv-train" in proc.stdout
    assert "ALOE_ARGS=(adv-train --input medical.jsonl --output-dir runs/stage2 --base runs/stage1)" in proc.stdout
    path = tmp_path / "job.sbatch"
    path.write_text(proc.stdout)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
