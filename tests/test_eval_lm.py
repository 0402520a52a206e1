"""`aloe eval --lm-eval-tasks`: a local lm-evaluation-harness task on the tiny model, and the missing extra."""

from __future__ import annotations

import json

import pytest

from support import aloe

pytestmark = pytest.mark.slow


def local_task(folder):
    """A four-choice log-likelihood task defined by a YAML file and a JSONL file (no download)."""
    folder.mkdir()
    rows = [{"question": f"Which vitamin is number {i}?", "choices": ["A", "B", "C", "D"], "label": i % 4}
            for i in range(8)]
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "tiny_vitamins.yaml").write_text(
        "task: tiny_vitamins\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


def test_a_local_lm_eval_task_joins_the_table(tmp_path, tiny_model_dir):
    pytest.importorskip("lm_eval")
    tasks = local_task(tmp_path / "tasks")
    out = tmp_path / "results"
    result = aloe("eval", "--model", f"tiny={tiny_model_dir}", "--lm-eval-tasks", "tiny_vitamins",
                  "--lm-eval-include", str(tasks), "-o", str(out), "--device", "cpu",
                  env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    entry = json.loads((out / "tiny" / "scores.json").read_text())["benchmarks"]["tiny_vitamins"]
    assert entry["source"] == "lm-eval" and entry["metric"] == "acc" and entry["items"] == 8
    assert 0.0 <= entry["accuracy"] <= 100.0 and entry["accuracy"] * 8 / 100 == round(entry["accuracy"] * 8 / 100)
    assert f"| tiny | {entry['accuracy']:.1f} |" in (out / "results.md").read_text()
    unknown = aloe("eval", "--model", str(tiny_model_dir), "--lm-eval-tasks", "no_such_task",
                   "--lm-eval-include", str(tasks), "-o", str(out), env={"HF_HUB_OFFLINE": "1"}, timeout=600)
    assert unknown.returncode == 1 and "unknown task(s) no_such_task" in unknown.stderr


def test_missing_extra_is_a_clear_message(tmp_path, tiny_model_dir):
    hidden = tmp_path / "no_lm_eval"
    hidden.mkdir()
    # an installation without the [eval] extra: importing lm_eval fails
    (hidden / "lm_eval.py").write_text("raise ImportError(\"No module named 'lm_eval'\")\n")
    import os

    path = os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")])
    result = aloe("eval", "--model", str(tiny_model_dir), "--lm-eval-tasks", "medqa_4options", "-o",
                  str(tmp_path / "out"), env={"PYTHONPATH": path})
    assert result.returncode == 1
    assert result.stderr == ("aloe: error: --lm-eval-tasks needs lm-evaluation-harness, which is not installed: "
                             "pip install 'aloe-cli[eval]' (lm-evaluation-harness)\n")
