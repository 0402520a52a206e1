"""`aloe demo`: the stand-in judge grades like the rule through the real `aloe score` and `aloe eval` clients,
and the whole demo, run through the CLI, meets the recipe's claims with a report a program can check."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from aloe_cli.demo.judge_server import RuleJudgeServer, grade_request
from aloe_cli.demo.task import QUICK, write_demo_data
from aloe_cli.evaluation.judge import JudgeCase, judge_prompt
from aloe_cli.filters.judge import Rubric
from support import aloe, read_jsonl


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("demo"), seed=3, config=QUICK)


def test_judge_reads_both_rubrics_and_refuses_anything_else():
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is 7 plus 5?"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "12"}]}]}
    assert grade_request(Rubric().render(record), [])["score"] == 5
    record["messages"][1]["content"][0]["text"] = "13"
    assert grade_request(Rubric().render(record), [])["score"] == 1
    box = "<|object_ref_start|>lesion<|object_ref_end|><|box_start|>(100,100),(300,300)<|box_end|>"
    case = JudgeCase(question="Locate the lesion.", reference=box, prediction=box)
    assert grade_request(judge_prompt(case), [])["score"] == 1.0
    far = "<|object_ref_start|>lesion<|object_ref_end|><|box_start|>(600,600),(900,900)<|box_end|>"
    assert grade_request(judge_prompt(JudgeCase("Locate the lesion.", box, far)), [])["score"] == 0.0
    assert grade_request("Rate this poem from 1 to 10.", []) is None


def test_aloe_score_against_the_stand_in_rejects_the_planted_faults_and_keeps_the_rest(demo, tmp_path):
    records = read_jsonl(demo.train)
    planted = {r["id"] for r in records if r["meta"].get("planted") in ("wrong_answer", "empty_answer")}
    assert len(planted) >= 20
    with RuleJudgeServer() as judge:
        result = aloe("score", "-i", str(demo.train), "--judge", "rule-judge", "--base-url", judge.url,
                      "--concurrency", "8", "--rejects", str(tmp_path / "low.jsonl"),
                      "-o", str(tmp_path / "kept.jsonl"), "--report", str(tmp_path / "score.json"))
        assert judge.requests >= len(records)
    assert result.returncode == 0, result.stderr
    rejected = {r["id"] for r in read_jsonl(tmp_path / "low.jsonl")}
    kept = read_jsonl(tmp_path / "kept.jsonl")
    assert rejected == planted
    assert len(kept) == len(records) - len(planted)
    assert all(r["aloe"]["score"]["value"] == 5 for r in kept if r["meta"].get("planted") != "eval_leak")
    report = json.loads((tmp_path / "score.json").read_text())
    assert report["unparseable"] == 0 and report["reasons"] == {"low_score": len(planted)}


def test_demo_refuses_a_folder_that_holds_files_and_a_report_that_is_a_folder(tmp_path):
    (tmp_path / "old.txt").write_text("a previous run\n")
    result = aloe("demo", "--workdir", str(tmp_path))
    assert result.returncode == 1
    assert "is not empty" in result.stderr and "Traceback" not in result.stderr
    result = aloe("demo", "--workdir", str(tmp_path / "new"), "--report", str(tmp_path))
    assert result.returncode == 1
    assert "--report" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.timeout(1800)
def test_the_console_follows_the_newest_heartbeat_a_step_writes_to_its_log(tmp_path, capsys):
    """LogTail reads what was appended since it last looked (a line half written waits for its end) and keeps
    the newest heartbeat; live_line prints a changed line, at most once per interval, when stderr is no terminal."""
    from aloe_cli.console import live_line
    from aloe_cli.demo.run import LogTail

    log = tmp_path / "stage1.log"
    log.write_bytes(b"aloe train: 3200 training record(s) of 3200 read\n")
    tail = LogTail(log)
    assert tail.newest_heartbeat() is None
    with log.open("ab") as handle:
        handle.write(b"[2026-12-07 12:40:29] aloe train: 330/1200 steps (28%), ETA 1:19, loss 0.9128\n\xff\xfe\n"
                     b"[2026-12-07 12:40:59] aloe train: 658/1200 st")
    assert tail.newest_heartbeat() == "aloe train: 330/1200 steps (28%), ETA 1:19, loss 0.9128"
    with log.open("ab") as handle:
        handle.write(b"eps (55%), ETA 0:50, loss 0.3587\nTraceback (not a heartbeat)\n")
    assert tail.newest_heartbeat() == "aloe train: 658/1200 steps (55%), ETA 0:50, loss 0.3587"

    with live_line(interval=0) as show:
        for text in ("a 1", "a 1", "a 2"):
            show(text)
    with live_line(interval=3600) as show:
        show("b 1")
        show("b 2")  # too soon after the first
    assert capsys.readouterr().err.splitlines() == ["a 1", "a 2", "b 1"]


def test_on_a_terminal_the_live_line_is_redrawn_in_place_and_leaves_nothing_behind():
    """On a terminal, live_line is one rich line: each text drawn over the last (cursor moved back up), and
    erased when the step ends, so the lines printed after it follow on."""
    import pty
    import textwrap

    code = textwrap.dedent("""
        import sys, time
        from aloe_cli.console import live_line, log
        with live_line() as show:
            show("aloe train: 1/2 steps (50%), ETA 0:01")
            time.sleep(0.7)
            show("aloe train: 2/2 steps (100%), ETA 0:00")
            time.sleep(0.7)
        log("  done in 1 s")
    """)
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100"}
    env.pop("NO_COLOR", None)
    proc = subprocess.run([sys.executable, "-c", code], stderr=slave, stdout=subprocess.PIPE, env=env, timeout=60)
    os.close(slave)
    received = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        received += chunk
    os.close(master)
    screen = received.decode("utf-8", "replace")
    assert proc.returncode == 0 and proc.stdout == b""
    assert "1/2 steps (50%)" in screen and "2/2 steps (100%)" in screen, screen
    assert "\x1b[?25l" in screen and "\x1b[2K" in screen, screen  # cursor hidden, the line erased to redraw it
    assert screen.rstrip().endswith("done in 1 s"), screen


def test_demo_shows_the_recipe_learning(tmp_path):
    """The README's first command, as CI runs it: every stage, every claim, the report's shape."""
    work, report_path = tmp_path / "run", tmp_path / "demo.json"
    result = aloe("demo", "--workdir", str(work), "--report", str(report_path), "--check", timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == ""  # stdout carries data only; the demo has none
    # The console followed the training steps and the evaluation while they ran (stderr is no terminal here:
    # a line at most every 30 s; on a terminal one line redrawn in place).
    assert re.search(r"^  aloe train: \d+/1200 steps \(\d+%\), .*ETA \d+:\d\d", result.stderr, re.M), result.stderr
    assert re.search(r"^  aloe adv-train: \d+/600 steps ", result.stderr, re.M), result.stderr
    assert re.search(r"^  aloe eval: \w+ on demo-med: \d+/\d+ items ", result.stderr, re.M), result.stderr
    for heading in ("aloe dedup", "| aloe perplexity", "| aloe score", "aloe mix", "aloe train", "aloe adv-train",
                    "aloe eval", "aloe infer", "Curation", "Robustness on demo-med", "The published table in miniature",
                    "Cls Base", "Det Leg", "The recipe's claims", "--replay mixture.jsonl",
                    "--perturb cap,pmt,syc,leg,region"):
        assert heading in result.stderr
    report = json.loads(report_path.read_text())
    assert report["seconds"] > 0
    for stage in ("dedup", "perplexity", "score", "mix"):
        counts = report["curation"][stage]
        assert counts["read"] == counts["kept"] + counts["rejected"] > 0
    assert report["curation"]["dedup"]["reasons"] == {"eval_leak": 6}
    planted = report["planted"]
    assert planted["eval_leak"] == {"planted": 6, "caught": 6}
    for fault in ("wrong_answer", "empty_answer"):
        assert planted[fault]["caught"] == planted[fault]["planted"] > 0
    assert planted["clean_rejected"] == 0
    for model in ("untrained", "stage1", "stage2"):
        assert set(report["accuracy"][model]) == {"demo-med", "demo-general"}
        assert set(report["robustness"][model]) == {"base", "cap", "pmt", "syc", "leg", "cls_base", "cls_cap",
                                                     "cls_pmt", "cls_syc", "det_base", "det_cap", "det_pmt",
                                                     "det_syc", "det_leg"}
        assert all(0 <= value <= 100 for value in report["robustness"][model].values())
    assert len(report["claims"]) == 13 and all(report["claims"].values()), report["claims"]
    s1, s2, untrained = report["robustness"]["stage1"], report["robustness"]["stage2"], report["accuracy"]["untrained"]
    assert report["accuracy"]["stage1"]["demo-med"] - untrained["demo-med"] >= 30
    assert min(s1["base"] - s1["pmt"], s1["base"] - s1["syc"]) >= 25
    for column in ("cls_cap", "cls_pmt", "cls_syc", "det_cap", "det_pmt", "det_syc", "det_leg"):
        assert s2[column] - s1[column] >= 5, column
    assert s2["cls_base"] >= s1["cls_base"] - 5 and s2["det_base"] >= s1["det_base"] - 5
    assert report["accuracy"]["stage2"]["demo-general"] >= report["accuracy"]["stage1"]["demo-general"] - 5
    drawn = work / report["infer"]["drawn"][0]
    assert drawn.suffix == ".png" and drawn.stat().st_size > 0
    assert (work / "mixture.jsonl").stat().st_size > 0 and (work / "runs" / "stage2" / "config.json").exists()


@pytest.mark.timeout(900)
def test_the_same_seed_prints_the_same_tables_and_report(tmp_path):
    """The quick demo (every step, a sliver of the data) twice with one seed: byte-equal tables and figures."""
    runs = []
    for name in ("a", "b"):
        report = tmp_path / f"{name}.json"
        result = aloe("demo", "--quick", "--seed", "1", "--workdir", str(tmp_path / name), "--report", str(report),
                      timeout=800)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "The published table in miniature" in result.stderr
        figures = json.loads(report.read_text())
        for varying in ("seconds", "steps", "workdir"):
            del figures[varying]
        tables = result.stderr[result.stderr.index("Curation"):result.stderr.rindex("total ")]
        logs = [tmp_path / name / "runs" / stage / "log.jsonl" for stage in ("stage1", "stage2")]
        losses = [{k: v for k, v in line.items() if "runtime" not in k and "per_second" not in k}
                  for log in logs for line in read_jsonl(log)]
        answers = [line["prediction"] for line in read_jsonl(tmp_path / name / "results" / "stage2" / "demo-med" /
                                                             "predictions.jsonl")]
        runs.append((figures, tables, losses, answers))
    assert runs[0] == runs[1]  # to the last digit of every loss
    assert runs[0][0]["accuracy"]["stage1"]["demo-med"] is not None


def _processes_in(folder) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd").startswith(str(folder)):
                    found.append(int(entry))
            except OSError:
                continue
    return found


def test_sigterm_stops_every_command_of_the_running_step(tmp_path):
    work = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "aloe_cli", "demo", "--workdir", str(work)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (work / "logs" / "curate.log").exists() or len(_processes_in(work)) < 3:  # bash + the pipe
        assert time.monotonic() < deadline and process.poll() is None, "the curation pipe never started"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-2000:]
    assert "terminated by SIGTERM" in stderr and "Traceback" not in stderr and stdout == ""
    assert _processes_in(work) == []
