"""The one progress facility (console.progress) as people see it through the CLI: a rich bar with rate and ETA
on a terminal, timestamped heartbeat lines otherwise (pipes, SLURM logs)."""

from __future__ import annotations

import re

import pytest

from support import aloe, aloe_on_terminal, chat, write_jsonl

pytestmark = pytest.mark.slow

EVERY_ADVANCE = {"ALOE_PROGRESS_INTERVAL": "0", "OMP_NUM_THREADS": "1"}
STAMP = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] "
TRAIN_FLAGS = ("--global-batch-size", "4", "--micro-batch-size", "4", "--precision", "fp32",
               "--no-gradient-checkpointing", "--deepspeed", "none", "--dataloader-workers", "0",
               "--logging-steps", "1", "--max-steps", "2")


def records(tmp_path, count: int = 6):
    return write_jsonl(tmp_path / "in.jsonl", [chat(f"Question {i}?", f"Answer {i}.", id=f"r{i}")
                                               for i in range(count)])


def test_heartbeat_lines_count_a_files_records_against_its_total(tmp_path, tiny_model_dir):
    data = records(tmp_path)
    result = aloe("perplexity", "-i", str(data), "--model", str(tiny_model_dir), "-o", str(tmp_path / "out.jsonl"),
                  "--batch-size", "2", env=EVERY_ADVANCE)
    assert result.returncode == 0, result.stderr
    beats = re.findall(STAMP + r"aloe perplexity: (\d+)/6 records \(\d+%\), [\d.e+]+ records/s, (.*)$",
                       result.stderr, re.M)
    assert beats, result.stderr
    assert beats[-1][0] == "6" and "done in" in beats[-1][1]
    assert "\x1b[" not in result.stderr  # plain lines, no terminal codes in a log


def test_a_shard_counts_its_share_and_stdin_counts_without_a_total(tmp_path, tiny_model_dir):
    data = records(tmp_path)
    sharded = aloe("perplexity", "-i", str(data), "--model", str(tiny_model_dir), "--shard", "0/2",
                   "-o", str(tmp_path / "shard.jsonl"), env=EVERY_ADVANCE)
    assert sharded.returncode == 0, sharded.stderr
    assert re.search(STAMP + r"aloe perplexity: 3/3 records \(100%\)", sharded.stderr, re.M), sharded.stderr
    piped = aloe("perplexity", "--model", str(tiny_model_dir), stdin=data.read_text(), env=EVERY_ADVANCE)
    assert piped.returncode == 0, piped.stderr
    assert len(piped.stdout.splitlines()) == 6
    assert re.search(STAMP + r"aloe perplexity: 6 records, [\d.e+]+ records/s, done in", piped.stderr, re.M), \
        piped.stderr


def test_no_heartbeat_before_the_interval(tmp_path, tiny_model_dir):
    data = records(tmp_path, 2)
    result = aloe("perplexity", "-i", str(data), "--model", str(tiny_model_dir), "-o", str(tmp_path / "out.jsonl"),
                  env={"ALOE_PROGRESS_INTERVAL": "600"})
    assert result.returncode == 0 and "2 kept" in result.stderr.replace("kept: ", "kept "), result.stderr
    assert not re.search(STAMP + "aloe perplexity:", result.stderr, re.M), result.stderr


def test_a_terminal_gets_a_bar_with_the_total_and_rate(tmp_path, tiny_model_dir):
    data = records(tmp_path)
    result = aloe_on_terminal("perplexity", "-i", str(data), "--model", str(tiny_model_dir),
                              "-o", str(tmp_path / "out.jsonl"), "--batch-size", "2", env=EVERY_ADVANCE)
    assert result.returncode == 0, result.stderr
    assert "\x1b[" in result.stderr and "━" in result.stderr  # a rich bar
    assert "6/6" in result.stderr and "records/s" in result.stderr, result.stderr
    assert not re.search(STAMP + "aloe perplexity:", result.stderr, re.M)  # no heartbeat lines on a terminal


def test_training_heartbeat_shows_steps_loss_lr_samples_per_second_and_eta(tmp_path, tiny_model_dir):
    data = records(tmp_path, 8)
    result = aloe("train", "-i", str(data), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run"),
                  *TRAIN_FLAGS, env=EVERY_ADVANCE, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first = re.search(STAMP + r"aloe train: 1/2 steps \(50%\), [\d.e+]+ steps/s, elapsed \d+:\d\d, "
                      r"ETA \d+:\d\d, .*samples/s [\d.e+]+", result.stderr, re.M)
    assert first, result.stderr[-3000:]
    last = re.findall(STAMP + r"aloe train: 2/2 steps \(100%\), .*$", result.stderr, re.M)
    assert last and "done in" in last[-1] and re.search(r"loss [\d.]+, lr [\d.e+-]+", last[-1]), last


def test_training_on_a_terminal_shows_a_bar(tmp_path, tiny_model_dir):
    data = records(tmp_path, 8)
    result = aloe_on_terminal("train", "-i", str(data), "--model", str(tiny_model_dir), "--output-dir",
                              str(tmp_path / "run"), *TRAIN_FLAGS, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2/2" in result.stderr and "steps/s" in result.stderr and "samples/s" in result.stderr
    assert re.search(r"loss [\d.]+, lr [\d.e+-]+", result.stderr), result.stderr[-3000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- loss curves

def log_lines(path, lines: list[dict]):
    path.mkdir(parents=True, exist_ok=True)
    return write_jsonl(path / "log.jsonl", lines)


def test_training_draws_loss_png_in_the_run_folder(tmp_path, tiny_model_dir):
    from PIL import Image

    data = records(tmp_path, 8)
    run = tmp_path / "run"
    result = aloe("train", "-i", str(data), "--model", str(tiny_model_dir), "--output-dir", str(run),
                  *TRAIN_FLAGS, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss.png" in result.stderr  # the closing summary names it
    with Image.open(run / "loss.png") as picture:
        assert picture.format == "PNG" and picture.size == (800, 600)
    plotted = aloe("report", "plot", str(run), "-o", str(tmp_path / "again.png"))
    assert plotted.returncode == 0 and "1 run(s) (run), 2 logged step(s)" in plotted.stderr, plotted.stderr



def test_loss_png_is_redrawn_only_when_drawing_stays_under_one_percent_of_the_run(tmp_path, monkeypatch):
    """The callback's clock is set by hand: no picture in the first 30 s, then one; the next waits 30 s, or 100
    times the last drawing when that drawing was slow (a slow disk)."""
    from types import SimpleNamespace

    from aloe_cli.training import curves

    clock = {"now": 1000.0}
    monkeypatch.setattr(curves.time, "monotonic", lambda: clock["now"])
    write_jsonl(tmp_path / "log.jsonl", [{"step": 1, "loss": 2.0, "learning_rate": 1e-4}])
    callback = curves.loss_curve_callback(tmp_path, print)
    state = SimpleNamespace(is_world_process_zero=True)
    picture = tmp_path / curves.CURVE_FILE

    def log_at(seconds: float) -> bool:
        clock["now"] = 1000.0 + seconds
        picture.unlink(missing_ok=True)
        callback.on_log(None, state, None, logs={"loss": 2.0})
        return picture.exists()

    callback.on_train_begin(None, state, None)
    assert [log_at(t) for t in (1, 29.9, 30)] == [False, False, True]
    assert [log_at(t) for t in (59.9, 60)] == [False, True]
    real_draw = curves.draw_curves

    def slow_draw(*args, **kwargs):
        clock["now"] += 2.0  # this drawing takes 2 s: the next one waits 200 s
        return real_draw(*args, **kwargs)

    monkeypatch.setattr(curves, "draw_curves", slow_draw)
    assert [log_at(t) for t in (90, 120, 291.9, 292)] == [True, False, False, True]
    callback.on_train_end(None, state, None)
    assert picture.exists()  # the end always draws


def test_training_without_matplotlib_notes_once_and_draws_nothing(tmp_path, tiny_model_dir):
    import os

    absent = tmp_path / "site" / "matplotlib"  # an environment where matplotlib cannot be imported
    absent.mkdir(parents=True)
    (absent / "__init__.py").write_text('raise ImportError("No module named matplotlib")\n')
    data = records(tmp_path, 8)
    run = tmp_path / "run"
    path = os.pathsep.join(filter(None, [str(absent.parent), os.environ.get("PYTHONPATH")]))
    result = aloe("train", "-i", str(data), "--model", str(tiny_model_dir), "--output-dir", str(run),
                  *TRAIN_FLAGS, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": path}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    note = "aloe: note: no loss.png (it needs matplotlib: pip install 'aloe-cli[plot]')"
    assert result.stderr.count(note) == 1, result.stderr[-3000:]
    assert "log.jsonl and run.json in" in result.stderr and not (run / "loss.png").exists()
    assert (run / "model.safetensors").is_file()
    plotted = aloe("report", "plot", str(run), "-o", str(tmp_path / "x.png"), env={"PYTHONPATH": path})
    assert plotted.returncode == 1 and plotted.stderr.strip().endswith("needs matplotlib: pip install "
                                                                       "'aloe-cli[plot]'"), plotted.stderr

def test_report_plot_overlays_runs_with_their_eval_loss(tmp_path):
    from PIL import Image

    first = log_lines(tmp_path / "stage1", [{"step": s, "loss": 3.0 / s, "lr": 1e-4} for s in range(1, 21)]
                      + [{"step": 10, "eval_loss": 0.5}, {"step": 20, "eval_loss": 0.3}])
    log_lines(tmp_path / "stage2", [{"step": s, "loss": 2.0 / s, "lr": 5e-5 * (1 - s / 12)} for s in range(1, 11)])
    out = tmp_path / "both.png"
    result = aloe("report", "plot", str(first.parent), str(tmp_path / "stage2" / "log.jsonl"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "2 run(s) (stage1, stage2), 30 logged step(s): wrote" in result.stderr
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size == (800, 600)


def test_report_plot_errors_name_the_run_and_the_line(tmp_path):
    missing = aloe("report", "plot", str(tmp_path / "nosuch"), "-o", str(tmp_path / "x.png"))
    assert missing.returncode == 1 and missing.stderr.startswith("aloe: error: run "), missing.stderr
    assert "nosuch" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    broken = aloe("report", "plot", str(bad), "-o", str(tmp_path / "x.png"))
    assert broken.returncode == 1 and f"{bad / 'log.jsonl'}:2: not a log line" in broken.stderr, broken.stderr
    log_lines(tmp_path / "early", [{"step": 1, "grad_norm": 1.0}])
    early = aloe("report", "plot", str(tmp_path / "early"), "-o", str(tmp_path / "x.png"))
    assert early.returncode == 1 and "no loss logged yet" in early.stderr, early.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_report_to_a_tracker_whose_package_is_missing_is_one_line(tmp_path, tiny_model_dir, tracker):
    import importlib.util

    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    data = records(tmp_path, 4)
    result = aloe("train", "-i", str(data), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run"),
                  *TRAIN_FLAGS, "--report-to", tracker)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"aloe: error: --report-to {tracker} needs the {tracker} package, which is not "
                                     f"installed (pip install {tracker})"), result.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- totals known before a read

def test_expected_records_counts_what_can_be_counted_cheaply(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from aloe_cli.data.counting import expected_records
    from aloe_cli.data.shard import Shard

    whole = tmp_path / "a.jsonl"
    whole.write_text('{"x": 1}\n{"x": 2}\n{"x": 3}\n')
    open_end = tmp_path / "b.jsonl"
    open_end.write_text('{"x": 1}\n{"x": 2}')  # no newline after the last record
    table = tmp_path / "c.parquet"
    pq.write_table(pa.table({"x": list(range(7))}), table)
    array = tmp_path / "d.json"
    array.write_text('[{"x": 1}, {"x": 2}]')
    packed = tmp_path / "e.jsonl.gz"
    packed.write_bytes(gzip.compress(b'{"x": 1}\n'))
    assert expected_records([str(whole), str(open_end), str(table)], Shard()) == 12
    assert expected_records([str(whole)], Shard(0, 2)) == 2 and expected_records([str(whole)], Shard(1, 2)) == 1
    assert expected_records([str(whole), str(table)], Shard(1, 2)) == 7  # whole files per shard
    for unknown in (array, packed):
        assert expected_records([str(whole), str(unknown)], Shard()) is None
    assert expected_records(["-"], Shard()) is None


# ----------------------------------------------------------------------------- eval

def test_eval_on_a_terminal_shows_items_per_benchmark_and_the_running_accuracy(tmp_path, tiny_model_dir):
    from eval_fixtures import mcq_tsv

    benchmark = mcq_tsv(tmp_path / "mcq.tsv")
    result = aloe_on_terminal("eval", "--model", f"tiny={tiny_model_dir}", "--benchmark", f"organs={benchmark}",
                              "-o", str(tmp_path / "results"), "--batch-size", "2", "--max-new-tokens", "4",
                              env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "aloe eval: tiny on organs" in result.stderr and "6/6" in result.stderr, result.stderr[-3000:]
    assert "items/s" in result.stderr and re.search(r"accuracy \d+\.\d%", result.stderr), result.stderr[-3000:]
    assert not re.search(STAMP + "aloe eval:", result.stderr, re.M)
