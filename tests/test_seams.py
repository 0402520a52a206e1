"""Where one command hands over to the next: a mixture of sources from two folders whose image paths resolve
from the mixture; commands that check image paths before work; every data command with stderr closed."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT, aloe, chat, read_jsonl, scan, write_jsonl

SHARES = ("--share", "medical/multimodal=0.5", "--share", "general/multimodal=0.5")


def source(folder: Path, name: str, domain: str, count: int, seed: int) -> Path:
    """A source in its own folder, its images in a subfolder, paths relative to the source file."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        scan(seed + index, size=64).save(folder / "img" / f"{name}{index}.png")
        records.append(chat(f"What is in {name} image {index}?", f"Finding {index}.", [f"img/{name}{index}.png"],
                            id=f"{name}-{index}", source=name, domain=domain))
    return write_jsonl(folder / f"{name}.jsonl", records)


@pytest.fixture
def two_folders(tmp_path):
    return (source(tmp_path / "med", "med", "medical", 4, 0),
            source(tmp_path / "gen", "gen", "general", 4, 50))


def mix(tiny_model_dir, inputs, output, *extra):
    args = [arg for path in inputs for arg in ("-i", str(path))]
    return aloe("mix", *args, "--tokenizer", str(tiny_model_dir), *SHARES, "--no-cache", "-o", str(output), *extra)


def test_a_mixture_of_two_folders_holds_paths_relative_to_itself(tmp_path, two_folders, tiny_model_dir):
    output = tmp_path / "mixtures" / "mix.jsonl"
    output.parent.mkdir()
    result = mix(tiny_model_dir, two_folders, output)
    assert result.returncode == 0, result.stderr
    records = read_jsonl(output)
    assert {r["id"] for r in records} == {f"{name}-{i}" for name in ("med", "gen") for i in range(4)}
    for record in records:
        [path] = record["images"]
        assert not os.path.isabs(path) and path.startswith("../"), path
        assert (output.parent / path).is_file()
    # the next command finds every image from the mixture's own folder: dedup hashes them all
    dedup = aloe("dedup", "-i", str(output), "--against", str(two_folders[0]), "--keep-all")
    assert dedup.returncode == 0, dedup.stderr
    assert "8 read = 8 kept + 0 rejected" in dedup.stderr
    # the mixture and its images move together: the paths still resolve
    moved = tmp_path / "elsewhere"
    for name in ("med", "gen", "mixtures"):
        shutil.copytree(tmp_path / name, moved / name)
    again = aloe("dedup", "-i", str(moved / "mixtures" / "mix.jsonl"), "--against", str(two_folders[0]), "--keep-all")
    assert again.returncode == 0 and "8 read = 8 kept + 0 rejected" in again.stderr, again.stderr


def test_absolute_paths_on_request_and_on_stdout(tmp_path, two_folders, tiny_model_dir):
    output = tmp_path / "mix.jsonl"
    result = mix(tiny_model_dir, two_folders, output, "--absolute-paths")
    assert result.returncode == 0, result.stderr
    for record in read_jsonl(output):
        assert os.path.isabs(record["images"][0]) and Path(record["images"][0]).is_file()
    piped = aloe("mix", "-i", str(two_folders[0]), "-i", str(two_folders[1]), "--tokenizer", str(tiny_model_dir),
                 *SHARES, "--no-cache")
    assert piped.returncode == 0, piped.stderr
    records = read_jsonl(piped.stdout)
    assert len(records) == 8 and all(os.path.isabs(r["images"][0]) for r in records)


def test_a_mixture_read_from_stdin_in_a_pipe_keeps_resolvable_paths(tmp_path, two_folders, tiny_model_dir):
    """stdin's relative paths resolve against the working directory; the mixture written to a file in another
    folder still finds them."""
    text = two_folders[0].read_text()
    output = tmp_path / "out" / "mix.jsonl"
    output.parent.mkdir()
    result = aloe("mix", "--tokenizer", str(tiny_model_dir), "--share", "medical/multimodal=1", "--no-cache",
                  "-o", str(output), stdin=text, cwd=two_folders[0].parent)
    assert result.returncode == 0, result.stderr
    assert all((output.parent / r["images"][0]).is_file() for r in read_jsonl(output))


def test_kept_and_rejected_records_keep_images_that_resolve_from_their_own_files(tmp_path, two_folders):
    med, gen = two_folders
    leak = write_jsonl(tmp_path / "eval.jsonl", [chat("?", "!", [str(med.parent / "img" / "med0.png")], id="e")])
    kept, rejects = tmp_path / "kept" / "kept.jsonl", tmp_path / "rejected" / "rejects.jsonl"
    kept.parent.mkdir()
    rejects.parent.mkdir()
    result = aloe("dedup", "-i", str(med), "--against", str(leak), "-o", str(kept), "--rejects", str(rejects))
    assert result.returncode == 0, result.stderr
    assert "4 read = 3 kept + 1 rejected" in result.stderr
    [rejected] = read_jsonl(rejects)
    assert rejected["id"] == "med-0" and rejected["images"] == ["../med/img/med0.png"]
    assert all((kept.parent / r["images"][0]).is_file() for r in read_jsonl(kept))
    # the rejects, looked at and fed back, find their images
    again = aloe("dedup", "-i", str(rejects), "--against", str(gen))
    assert again.returncode == 0 and "1 read = 1 kept + 0 rejected" in again.stderr, again.stderr


def test_model_commands_check_image_paths_before_work(tmp_path, two_folders, tiny_model_dir):
    """A mixture moved away from its images (or written with paths relative to each source): one line before
    the model loads under --on-error fail; a loud count, then counted skips, under skip."""
    moved = tmp_path / "moved.jsonl"
    moved.write_text(two_folders[0].read_text())  # paths relative to med/, now read from tmp_path
    failed = aloe("perplexity", "--model", str(tiny_model_dir), "-i", str(moved))
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    assert lines[-1].startswith("aloe: error: 4 of 4 record(s) have image paths that do not resolve (first: "
                                f"{moved}:1: field 'images[0]': image file not found"), failed.stderr
    assert "scoring with" not in failed.stderr  # the model never loaded
    skipped = aloe("perplexity", "--model", str(tiny_model_dir), "-i", str(moved), "--on-error", "skip",
                   "--rejects", str(tmp_path / "rejects.jsonl"))
    assert skipped.returncode == 0, skipped.stderr
    assert "aloe: warning: perplexity: 4 of 4 record(s) have image paths that do not resolve" in skipped.stderr
    assert "4 read = 0 kept + 4 rejected" in skipped.stderr
    assert {r["aloe"]["reject"]["reason"] for r in read_jsonl(tmp_path / "rejects.jsonl")} == {"image_missing"}
    fixed = aloe("perplexity", "--model", str(tiny_model_dir), "-i", str(moved), "--image-root",
                 str(two_folders[0].parent))
    assert fixed.returncode == 0 and "4 read = 4 kept + 0 rejected" in fixed.stderr, fixed.stderr


def test_train_checks_the_mixture_image_paths_before_the_model_loads(tmp_path, two_folders, tiny_model_dir):
    moved = tmp_path / "moved.jsonl"
    moved.write_text(two_folders[0].read_text())
    run = tmp_path / "run"
    result = aloe("train", "--model", str(tiny_model_dir), "-i", str(moved), "--output-dir", str(run), "--max-steps",
                  "1", "--deepspeed", "none", "--precision", "fp32", "--on-error", "fail")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"aloe: error: 4 of 4 record(s) have image paths that do not resolve (first: {moved}:1: "), result.stderr
    assert not (run / "model.safetensors").exists()


def test_score_and_infer_check_image_paths_before_the_first_request(tmp_path, two_folders):
    from fake_openai_server import FakeOpenAIServer

    moved = tmp_path / "moved.jsonl"
    moved.write_text(two_folders[1].read_text())
    with FakeOpenAIServer() as server:
        score = aloe("score", "-i", str(moved), "--judge", "j", "--base-url", server.url)
        infer = aloe("infer", "--model", "m", "--base-url", server.url, "-i", str(moved))
        sent = len(server.requests)
    for result in (score, infer):
        assert result.returncode == 1
        assert "aloe: error: 4 of 4 record(s) have image paths that do not resolve" in result.stderr, result.stderr
        assert result.stdout == ""
    assert sent == 0


def test_eval_checks_benchmark_image_paths_before_the_model_loads(tmp_path, tiny_model_dir):
    (tmp_path / "images").mkdir()
    scan(1, size=64).save(tmp_path / "images" / "here.png")
    bench = write_jsonl(tmp_path / "bench.jsonl", [
        {"id": "1", "question": "Is this a CT?", "answer": "yes", "images": ["images/here.png"]},
        {"id": "2", "question": "Is this a CT?", "answer": "no", "images": ["images/gone.png"]}])
    out = tmp_path / "out"
    failed = aloe("eval", "--model", str(tiny_model_dir), "--benchmark", str(bench), "-o", str(out),
                  "--max-new-tokens", "2")
    assert failed.returncode == 1
    assert (f"aloe: error: benchmark bench: 1 of 2 record(s) have image paths that do not resolve (first: {bench}:2: "
            "field 'images[0]'") in failed.stderr, failed.stderr
    assert " on cpu " not in failed.stderr  # the model never loaded
    skipped = aloe("eval", "--model", str(tiny_model_dir), "--benchmark", str(bench), "-o", str(out),
                   "--max-new-tokens", "2", "--on-error", "skip")
    assert skipped.returncode == 0, skipped.stderr
    assert "2 read = 1 written + 1 skipped (image_missing=1)" in skipped.stderr


# ----------------------------------------------------------------------------- stderr closed

def closed_stderr(args: list[str], stdin_path: Path | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m aloe_cli ARGS 2>&-` through the shell: descriptor 2 really closed, not redirected."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY")}
    command = " ".join(shlex.quote(part) for part in [sys.executable, "-m", "aloe_cli", *args]) + " 2>&-"
    if stdin_path is not None:
        command += f" < {shlex.quote(str(stdin_path))}"
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_data_commands_write_their_output_with_stderr_closed(tmp_path, two_folders, tiny_model_dir):
    from fake_openai_server import FakeOpenAIServer

    med, gen = two_folders
    against = str(gen)
    dedup = closed_stderr(["dedup", "-i", str(med), "--against", against, "-o", str(tmp_path / "dedup.jsonl"),
                           "--report", str(tmp_path / "dedup.json")])
    assert dedup.returncode == 0 and dedup.stdout == "" and dedup.stderr == ""
    assert len(read_jsonl(tmp_path / "dedup.jsonl")) == 4 and (tmp_path / "dedup.json").is_file()
    # to stdout: the records only (the summary, with nowhere to go, is not written into the data)
    piped = closed_stderr(["dedup", "--against", against, "--image-root", str(med.parent)], stdin_path=med)
    assert piped.returncode == 0 and len(read_jsonl(piped.stdout)) == 4, piped.stdout[:300]
    mixed = closed_stderr(["mix", "-i", str(med), "-i", str(gen), "--tokenizer", str(tiny_model_dir), *SHARES,
                           "--no-cache", "-o", str(tmp_path / "mix.jsonl")])
    assert mixed.returncode == 0, mixed.stdout
    assert len(read_jsonl(tmp_path / "mix.jsonl")) == 8
    with FakeOpenAIServer() as server:
        scored = closed_stderr(["score", "-i", str(med), "--judge", "j", "--base-url", server.url])
    assert scored.returncode == 0 and len(read_jsonl(scored.stdout)) == 4
    ppl = closed_stderr(["perplexity", "--model", str(tiny_model_dir), "-i", str(gen), "-o",
                         str(tmp_path / "ppl.jsonl")])
    assert ppl.returncode == 0 and len(read_jsonl(tmp_path / "ppl.jsonl")) == 4


def test_an_error_with_stderr_closed_still_exits_1_and_writes_nothing(tmp_path, two_folders):
    output = tmp_path / "out.jsonl"
    result = closed_stderr(["dedup", "-i", str(tmp_path / "missing.jsonl"), "--against", str(two_folders[0]),
                            "-o", str(output)])
    assert result.returncode == 1 and result.stdout == "" and not output.exists()
