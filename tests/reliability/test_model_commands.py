"""The model commands (train, adv-train, eval, infer) keep the data commands' guarantees, through the real CLI.

Inputs that cannot be read (a closed stdin, a missing file, a record whose `aloe` field is not an object) are one
line naming the file, exit 1; FIFOs are read whole. Outputs that cannot be written are refused before any work
(exit 1), outputs that would overwrite an input too (exit 2). SIGTERM ends a run with exit 143 and keeps only what
is complete: whole checkpoints, whole benchmark runs. API keys are written nowhere. Training runs are a few steps
of the tiny model on the CPU without DeepSpeed; eval and infer ask a local fake OpenAI-compatible server.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal

import pytest
from fake_openai_server import FakeOpenAIServer

from reliability.hostile import (
    FifoWriter,
    assert_one_line_error,
    environment,
    leftovers,
    lines_of,
    mounted_tmpfs,
    run,
    start,
    terminate_when,
)
from support import write_jsonl

TRAIN = ("--global-batch-size", "4", "--micro-batch-size", "4", "--precision", "fp32", "--no-gradient-checkpointing",
         "--deepspeed", "none", "--dataloader-workers", "0", "--logging-steps", "1", "--warmup-ratio", "0")
ENV = environment(OMP_NUM_THREADS="1")  # the test machine's cores are shared
COMMANDS = ("train", "adv-train", "eval", "infer")


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture
def items(tmp_path):
    """Eight yes/no questions: records for train and infer, a benchmark for eval (the served model answers
    what the [answer=...] marker says)."""
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"id": f"q{i}", "question": f"Is there an effusion in case {i}? [answer=yes]",
             "answer": ("yes", "no")[i % 2]} for i in range(8)]
    return write_jsonl(folder / "items.jsonl", rows)


def command_line(command: str, source: str, out: str, model, server) -> list[str]:
    """`command` reading `source` and writing under `out` (a run folder, an --emit file, a results folder, -o)."""
    served = ["--model", "served", "--backend", "openai", "--base-url", server.url, "--max-retries", "0"]
    if command == "train":
        return ["train", *TRAIN, "--model", str(model), "-i", source, "--output-dir", out, "--max-steps", "1",
                "--on-error", "fail"]
    if command == "adv-train":  # no model is loaded: the perturbed records are the run's first output
        return ["adv-train", "-i", source, "--base", str(model), "--emit-only", "--emit", out, "--perturb", "pmt,syc",
                "--samples", "8", "--on-error", "fail"]
    if command == "eval":
        return ["eval", *served, "--benchmark", source, "-o", out]
    return ["infer", *served, "-i", source, "-o", out]


def output_of(command: str, tmp_path):
    return tmp_path / {"train": "run", "adv-train": "adv.jsonl", "eval": "results", "infer": "answers.jsonl"}[command]


def completed(command: str, result, out) -> None:
    """The run succeeded and wrote what it writes, from all eight items."""
    assert result.returncode == 0, result.stderr[-3000:]
    if command == "train":
        assert "8 training record(s) of 8 read" in result.stderr and (out / "model.safetensors").is_file()
    elif command == "eval":
        assert len(lines_of(out / "served" / "items" / "predictions.jsonl")) == 8
        assert (out / "results.md").is_file()
    else:
        assert len(lines_of(out)) == 8


# ----------------------------------------------------------------------------- inputs

@pytest.mark.parametrize("command", COMMANDS)
def test_a_fifo_input_is_read_whole(command, items, server, tiny_model_dir, tmp_path):
    fifo = FifoWriter(tmp_path / "items.jsonl", items.read_bytes(), chunk=97)
    out = output_of(command, tmp_path)
    try:
        result = run(command_line(command, str(fifo.path), str(out), tiny_model_dir, server), env=ENV, timeout=300)
    finally:
        fifo.close()
    completed(command, result, out)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_closed_stdin_is_one_line_before_any_work(command, server, tiny_model_dir, tmp_path):
    out = output_of(command, tmp_path)
    result = run(command_line(command, "-", str(out), tiny_model_dir, server), env=ENV, shell_prefix="ALOE <&-")
    assert_one_line_error(result, 1, "standard input is closed")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_input_is_one_line_naming_it(command, server, tiny_model_dir, tmp_path):
    out = output_of(command, tmp_path)
    missing = str(tmp_path / "nope.jsonl")
    result = run(command_line(command, missing, str(out), tiny_model_dir, server), env=ENV)
    assert_one_line_error(result, 1, "not found", missing)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_an_aloe_field_that_is_not_an_object_names_the_file_and_line(command, items, server, tiny_model_dir,
                                                                      tmp_path):
    rows = lines_of(items)
    rows[2]["aloe"] = 5
    write_jsonl(items, rows)
    out = output_of(command, tmp_path)
    result = run(command_line(command, str(items), str(out), tiny_model_dir, server), env=ENV, timeout=300)
    assert_one_line_error(result, 1, f"{items}:3", "field 'aloe'", "must be an object")
    assert not out.exists()


# ----------------------------------------------------------------------------- destinations

@pytest.mark.parametrize("command", ["train", "eval"])
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(command, items, server, tiny_model_dir,
                                                                     tmp_path):
    for out in (tmp_path / "taken", tmp_path / "taken" / "below"):
        (tmp_path / "taken").write_text("not a folder\n")
        asked = len(server.requests)
        result = run(command_line(command, str(items), str(out), tiny_model_dir, server), env=ENV)
        option = "--output-dir" if command == "train" else "-o"
        assert_one_line_error(result, 1, option, str(out), "is a file")
        assert (tmp_path / "taken").read_text() == "not a folder\n" and len(server.requests) == asked
        assert "training record" not in result.stderr


def test_a_results_or_run_folder_on_a_read_only_filesystem_is_refused_before_any_work(items, server, tiny_model_dir,
                                                                                      tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro"):
        for command, option in (("train", "--output-dir"), ("eval", "-o"), ("adv-train", "--emit")):
            out = tmp_path / "ro" / ("run" if command != "adv-train" else "adv.jsonl")
            result = run(command_line(command, str(items), str(out), tiny_model_dir, server), env=ENV)
            assert_one_line_error(result, 1, option, str(out), "does not take new files")
            assert "training record" not in result.stderr and "perturbed" not in result.stderr


def test_infer_refuses_a_draw_folder_that_is_a_file_before_asking(items, server, tiny_model_dir, tmp_path):
    (tmp_path / "drawn").write_text("not a folder\n")
    asked = len(server.requests)
    result = run([*command_line("infer", str(items), str(tmp_path / "out.jsonl"), tiny_model_dir, server),
                  "--draw", str(tmp_path / "drawn")])
    assert_one_line_error(result, 1, "--draw", "is a file")
    assert len(server.requests) == asked and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("case", ["adv-train-emit", "eval-cache", "eval-output"])
def test_an_output_that_is_an_input_is_a_usage_error_and_the_input_survives(case, items, server, tiny_model_dir,
                                                                            tmp_path):
    before = items.read_bytes()
    if case == "adv-train-emit":  # the perturbed records would replace the records they are made from
        args = command_line("adv-train", str(items), str(items), tiny_model_dir, server)
        option = "--emit"
    elif case == "eval-cache":  # the replies would be appended to the benchmark
        args = [*command_line("eval", str(items), str(tmp_path / "results"), tiny_model_dir, server),
                "--cache", str(items)]
        option = "--cache"
    else:  # a benchmark kept in the results folder, where its predictions would be written
        kept = tmp_path / "results" / "served" / "items" / "predictions.jsonl"
        kept.parent.mkdir(parents=True)
        kept.write_bytes(before)
        items = kept
        args = command_line("eval", f"items={kept}", str(tmp_path / "results"), tiny_model_dir, server)
        option = "-o"
    asked = len(server.requests)
    result = run(args, env=ENV)
    line = assert_one_line_error(result, 2, "the same file as the input")
    assert line.startswith(f"aloe: error: Invalid value for {option}:"), line
    assert items.read_bytes() == before and len(server.requests) == asked


# ----------------------------------------------------------------------------- signals

def stopped_run(items, model, run_dir, signum, *, at: int = 2, max_steps: int = 30) -> tuple[list[str], str, object]:
    """A run of `max_steps` steps (a checkpoint every 2) stopped by `signum` once checkpoint-`at` is complete:
    its arguments, stderr and the process."""
    args = ["train", *TRAIN, "--model", str(model), "-i", str(items), "--output-dir", str(run_dir), "--max-steps",
            str(max_steps), "--save-steps", "2"]
    proc = start(args, env=ENV)
    stderr = terminate_when(lambda: (run_dir / f"checkpoint-{at}" / "trainer_state.json").is_file(), proc,
                            timeout=240, grace=120, signum=signum)
    return args, stderr, proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_keeps_only_complete_checkpoints_and_prints_the_command_that_resumes(items, tiny_model_dir,
                                                                                      tmp_path, signum):
    run_dir = tmp_path / "run"
    args, stderr, proc = stopped_run(items, tiny_model_dir, run_dir, signum)
    assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[signum], stderr[-3000:]
    assert "Traceback" not in stderr
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert checkpoints and all((path / "trainer_state.json").is_file() for path in checkpoints)
    command = "aloe " + shlex.join([*args, "--resume"])
    said = {signal.SIGTERM: "aloe: terminated by SIGTERM", signal.SIGINT: "aloe: interrupted"}[signum]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line == f"{said}; the last complete checkpoint is {checkpoints[-1]}: resume with: {command}", last_line
    # no final model, no staging folder, no temporary file: the folder holds what --resume needs
    assert not (run_dir / "model.safetensors").exists()
    assert [name for name in leftovers(run_dir) if name.startswith(".")] == []
    record = json.loads((run_dir / "run.json").read_text())
    assert record["state"] == "failed"
    assert record["error"] == {signal.SIGTERM: "terminated by SIGTERM", signal.SIGINT: "interrupted (SIGINT)"}[signum]
    if signum == signal.SIGTERM:  # the printed command does what it says
        resumed = run(shlex.split(command)[1:], env=ENV, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resuming from {checkpoints[-1]}" in resumed.stderr
        assert json.loads((run_dir / "run.json").read_text())["state"] == "complete"
        assert (run_dir / "model.safetensors").is_file()


def test_resume_skips_and_removes_a_checkpoint_whose_save_never_finished(items, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    args, stderr, proc = stopped_run(items, tiny_model_dir, run_dir, signal.SIGTERM, at=4, max_steps=20)
    assert proc.returncode == 143, stderr[-3000:]
    for late in run_dir.glob("checkpoint-*"):  # as if stopped while checkpoint-4 was saved
        if int(late.name.split("-")[1]) > 4:
            shutil.rmtree(late)
    (run_dir / "checkpoint-4" / "trainer_state.json").unlink()
    resumed = run([*args, "--resume"], env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"removed the incomplete checkpoint {run_dir / 'checkpoint-4'}" in resumed.stderr
    assert f"resuming from {run_dir / 'checkpoint-2'}" in resumed.stderr
    steps = [line["step"] for line in lines_of(run_dir / "log.jsonl") if "loss" in line]
    assert steps[-18:] == list(range(3, 21)) and (run_dir / "checkpoint-4" / "trainer_state.json").is_file()


def test_a_full_disk_while_a_checkpoint_is_saved_keeps_the_previous_one_and_says_what_a_save_needs(
        items, tiny_model_dir, tmp_path):
    """A real full disk: the run folder is a tmpfs big enough for the records and one checkpoint (3.4 MB of the tiny
    model's weights and AdamW state), not two, so the second save hits ENOSPC in the Trainer's own writers."""
    from aloe_cli.training.run_folder import checkpoint_damage

    with mounted_tmpfs(tmp_path / "small", "size=5m") as run_dir:
        result = run(["train", *TRAIN, "--model", str(tiny_model_dir), "-i", str(items), "--output-dir",
                      str(run_dir), "--max-steps", "4", "--save-steps", "2"], env=ENV, timeout=300)
        line = assert_one_line_error(result, 1, f"cannot write {run_dir}: No space left on device",
                                     "a checkpoint needs about 3.4 MB (the size of checkpoint-2)",
                                     f"{run_dir / 'checkpoint-2'} is intact")
        assert line.startswith("aloe: error: ") and re.search(r", [\d.]+ (KB|MB|bytes) free", line), line
        assert sorted(path.name for path in run_dir.glob("checkpoint-*")) == ["checkpoint-2"]
        assert checkpoint_damage(run_dir / "checkpoint-2") is None
        record = json.loads((run_dir / "run.json").read_text())
        assert record["state"] == "failed" and "No space left on device" in record["error"]


def test_sigterm_during_eval_keeps_the_finished_benchmarks_whole(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", [
        {"id": f"a{i}", "question": f"Effusion in case {i}? [answer=yes]", "answer": "yes"} for i in range(4)])
    second = write_jsonl(tmp_path / "second.jsonl", [
        {"id": "b0", "question": "Effusion? [answer=no]", "answer": "no"},
        {"id": "b1", "question": "Effusion? [action=hang]", "answer": "yes"}])
    out = tmp_path / "results"
    with FakeOpenAIServer(hang_seconds=120) as server:
        proc = start(["eval", "--model", "served", "--backend", "openai", "--base-url", server.url, "--max-retries",
                      "0", "--batch-size", "1", "--concurrency", "1", "--benchmark", str(first), "--benchmark",
                      str(second), "-o", str(out)], env=ENV)
        stderr = terminate_when(lambda: any("[action=hang]" in prompt for prompt in server.prompts()), proc, grace=60)
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "the predictions and scores of 1 finished benchmark run(s) are kept" in stderr.strip().splitlines()[-1]
    model_dir = out / "served"
    assert len(lines_of(model_dir / "first" / "predictions.jsonl")) == 4
    assert list(json.loads((model_dir / "scores.json").read_text())["benchmarks"]) == ["first"]
    assert "first" in (out / "results.md").read_text() and "first" in (out / "results.csv").read_text()
    assert not (model_dir / "second").exists()  # nothing of the benchmark under way, not even its folder
    hidden = [path for path in out.rglob(".*")]
    assert hidden == [], hidden


def test_sigterm_during_infer_leaves_no_output(tmp_path):
    questions = write_jsonl(tmp_path / "questions.jsonl", [
        {"id": "q0", "question": "Effusion? [answer=yes]"}, {"id": "q1", "question": "Effusion? [action=hang]"}])
    with FakeOpenAIServer(hang_seconds=120) as server:
        proc = start(["infer", "--model", "served", "--backend", "openai", "--base-url", server.url, "-i",
                      str(questions), "-o", str(tmp_path / "answers.jsonl"), "--concurrency", "1"], env=ENV)
        stderr = terminate_when(lambda: any("[action=hang]" in prompt for prompt in server.prompts()), proc, grace=60)
    assert proc.returncode == 143, stderr[-3000:]
    assert "terminated by SIGTERM; nothing was written" in stderr and "Traceback" not in stderr
    assert leftovers(tmp_path) == ["questions.jsonl"]


# ----------------------------------------------------------------------------- privacy

def test_no_api_key_reaches_the_results_cache_logs_or_errors_of_eval_and_infer(items, tmp_path):
    model_key, judge_key = "sk-model-k3y-never-written", "sk-judge-k3y-never-written"
    open_items = write_jsonl(tmp_path / "open.jsonl", [
        {"id": f"o{i}", "question": f"Describe case {i}. [answer=a small effusion]", "answer": "small effusion"}
        for i in range(3)] + [{"id": "o-fail", "question": "Describe. [action=500]", "answer": "x"}])
    env = environment(OMP_NUM_THREADS="1", MODEL_KEY=model_key, OPENAI_API_KEY=judge_key)
    with FakeOpenAIServer(echo_key=True) as model_server, FakeOpenAIServer(echo_key=True) as judge_server:
        evaluated = run(["eval", "--model", "served", "--backend", "openai", "--base-url", model_server.url,
                         "--api-key-env", "MODEL_KEY", "--max-retries", "0", "--judge", "judge", "--judge-backend",
                         "openai", "--judge-base-url", judge_server.url, "--benchmark", str(items), "--benchmark",
                         str(open_items), "-o", str(tmp_path / "results"), "--cache", str(tmp_path / "cache.jsonl"),
                         "--on-error", "skip"], env=env)
        answered = run(["infer", "--model", "served", "--backend", "openai", "--base-url", model_server.url,
                        "--api-key-env", "MODEL_KEY", "--max-retries", "0", "-i", str(open_items), "-o",
                        str(tmp_path / "answers.jsonl"), "--rejects", str(tmp_path / "rejects.jsonl"), "--report",
                        str(tmp_path / "report.json"), "--on-error", "skip"], env=env)
        failed = run(["infer", "--model", "served", "--backend", "openai", "--base-url", model_server.url,
                      "--api-key-env", "MODEL_KEY", "--max-retries", "0", "Describe. [action=401]"], env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert answered.returncode == 0, answered.stderr[-3000:]
    assert failed.returncode == 1 and "401" in failed.stderr and "Traceback" not in failed.stderr
    # the servers did get the keys (and echoed them back in every reply and error)
    assert {r.authorization for r in model_server.requests} == {f"Bearer {model_key}"}
    assert {r.authorization for r in judge_server.requests} == {f"Bearer {judge_key}"}
    written = [path for path in tmp_path.rglob("*") if path.is_file() and path.suffix != ".png"]
    assert {path.name for path in written} >= {"predictions.jsonl", "scores.json", "results.md", "results.csv",
                                                "cache.jsonl", "answers.jsonl", "rejects.jsonl", "report.json"}
    texts = [*(path.read_text(errors="replace") for path in written),
             *(proc.stdout + proc.stderr for proc in (evaluated, answered, failed))]
    assert "Bearer ***" in "".join(texts)  # the echoes are there, masked
    assert all(model_key not in text and judge_key not in text for text in texts)

