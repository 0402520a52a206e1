"""Every option of every command, given a value no run can use: a one-line usage error, exit 2, before any work.

And the same for the numbers of a mix recipe (exit 1, naming the file and the key), for binary files given
where text belongs (one line naming the file), and for `--workers` beyond the machine's CPUs (capped, with a
note). All through the real CLI.
"""

from __future__ import annotations

import os
import resource

import pytest

from support import aloe, chat, scan, write_jsonl

NO_SERVER = "http://127.0.0.1:9/v1"  # nothing listens there: a run that got past the options would fail on it
SCORE = ("score", "--judge", "m", "--base-url", NO_SERVER, "--max-retries", "0")
PERPLEXITY = ("perplexity", "--model", "org/model")
MIX = ("mix", "--tokenizer", "unused", "--dry-run", "--no-cache", "--share", "medical/text=0.5",
       "--share", "general/text=0.5")

# (command line after `-i INPUT`, the option the error must name, a fragment of the error)
USAGE_ERRORS = {
    # --shard: every data command
    "dedup-shard-range": (("dedup", "--within", "--shard", "3/2"), "--shard", "need 0 <= K < N"),
    "dedup-shard-text": (("dedup", "--within", "--shard", "x"), "--shard", "K/N"),
    "dedup-shard-zero": (("dedup", "--within", "--shard", "1/0"), "--shard", "need 0 <= K < N"),
    "score-shard": ((*SCORE, "--shard", "2/2"), "--shard", "need 0 <= K < N"),
    "perplexity-shard": ((*PERPLEXITY, "--shard", "1/1x"), "--shard", "K/N"),
    # dedup
    "dedup-workers-zero": (("dedup", "--within", "--workers", "0"), "--workers", "greater than or equal to 1"),
    "dedup-distance": (("dedup", "--within", "--max-distance", "17"), "--max-distance", "less than or equal to 16"),
    "dedup-hash": (("dedup", "--within", "--hash", "md5"), "--hash", "phash"),
    "dedup-batch": (("dedup", "--within", "--batch-size", "0"), "--batch-size", "greater than or equal to 1"),
    "dedup-on-error": (("dedup", "--within", "--on-error", "ignore"), "--on-error", "ignore"),
    "dedup-bbox": (("dedup", "--within", "--bbox-format", "cxcywh"), "--bbox-format", "cxcywh"),
    "dedup-image-root": (("dedup", "--within", "--image-root", "/nonexistent/images"), "--image-root",
                         "does not exist"),
    "dedup-save-index": (("dedup", "--within", "--save-index", "eval.idx"), "--save-index", "needs --against"),
    "dedup-resume": (("dedup", "--within", "--resume"), "--resume", "--report"),
    # score (and every generating command: the options are shared)
    "score-device": ((*SCORE, "--device", "tpu"), "--device", "auto, cpu, cuda or cuda:N"),
    "score-device-index": ((*SCORE, "--device", "cuda:x"), "--device", "auto, cpu, cuda or cuda:N"),
    "score-base-url": (("score", "--judge", "m", "--base-url", "ftp://judge"), "--base-url", "http"),
    "score-base-url-hf": (("score", "--judge", "m", "--backend", "hf", "--base-url", NO_SERVER), "--base-url",
                          "--backend openai"),
    "score-backend": ((*SCORE, "--backend", "vllm"), "--backend", "vllm"),
    "score-timeout-zero": ((*SCORE, "--timeout", "0"), "--timeout", "greater than or equal to 0.01"),
    "score-timeout-inf": ((*SCORE, "--timeout", "inf"), "--timeout", "finite"),
    "score-timeout-overflow": ((*SCORE, "--timeout", "1e400"), "--timeout", "finite"),
    "score-backoff-inf": ((*SCORE, "--retry-backoff", "inf"), "--retry-backoff", "finite"),
    "score-backoff-negative": ((*SCORE, "--retry-backoff", "-1"), "--retry-backoff", "greater than or equal to 0"),
    "score-retries-negative": ((*SCORE, "--max-retries", "-1"), "--max-retries", "greater than or equal to 0"),
    "score-retries-huge": ((*SCORE, "--max-retries", "1000"), "--max-retries", "less than or equal to 100"),
    "score-parse-retries-huge": ((*SCORE, "--parse-retries", "1000"), "--parse-retries", "less than or equal to 100"),
    "score-new-tokens-zero": ((*SCORE, "--max-new-tokens", "0"), "--max-new-tokens", "greater than or equal to 1"),
    "score-new-tokens-huge": ((*SCORE, "--max-new-tokens", "1000000000"), "--max-new-tokens", "less than or equal"),
    "score-concurrency": ((*SCORE, "--concurrency", "5000"), "--concurrency", "less than or equal to 4096"),
    "score-dtype": ((*SCORE, "--dtype", "int4"), "--dtype", "int4"),
    "score-no-judge": (("score",), "--judge", "required"),
    # perplexity
    "perplexity-device": ((*PERPLEXITY, "--device", "tpu"), "--device", "auto, cpu, cuda or cuda:N"),
    "perplexity-device-negative": ((*PERPLEXITY, "--device", "cuda:-1"), "--device", "auto, cpu, cuda or cuda:N"),
    "perplexity-empty-model": (("perplexity", "--model", " "), "--model", "empty"),
    "perplexity-max-tokens": ((*PERPLEXITY, "--max-tokens", "0"), "--max-tokens", "greater than or equal to 1"),
    # mix
    "mix-repeats-huge": ((*MIX, "--max-repeats", "1e308"), "--max-repeats", "less than or equal to 65535"),
    "mix-repeats-inf": ((*MIX, "--max-repeats", "inf"), "--max-repeats", "less than or equal to 65535"),
    "mix-repeats-below-one": ((*MIX, "--max-repeats", "0.5"), "--max-repeats", "greater than or equal to 1"),
    "mix-share-denormal": (("mix", "--tokenizer", "unused", "--share", "medical/text=1e-320", "--share",
                            "general/text=1"), "--share", "at least 1e-06"),
    "mix-share-nan": (("mix", "--tokenizer", "unused", "--share", "medical/text=nan", "--share", "general/text=1"),
                      "--share", "between 0 and 1"),
    "mix-share-inf": (("mix", "--tokenizer", "unused", "--share", "medical/text=inf"), "--share", "between 0 and 1"),
    "mix-share-negative": (("mix", "--tokenizer", "unused", "--share", "medical/text=-0.5", "--share",
                            "general/text=1.5"), "--share", "between 0 and 1"),
    "mix-share-sum": (("mix", "--tokenizer", "unused", "--share", "medical/text=0.5", "--share", "general/text=0.4"),
                      "--share", "sum to 1"),
    "mix-share-cell": (("mix", "--tokenizer", "unused", "--share", "medical/video=1"), "--share", "unknown cell"),
    "mix-share-form": (("mix", "--tokenizer", "unused", "--share", "medical/text"), "--share", "CELL=SHARE"),
    "mix-total-samples-zero": ((*MIX, "--total-samples", "0"), "--total-samples", "greater than or equal to 1"),
    "mix-total-samples-huge": ((*MIX, "--total-samples", "100000000000000"), "--total-samples", "less than or equal"),
    "mix-total-tokens-huge": ((*MIX, "--total-tokens", str(10 ** 24)), "--total-tokens", "less than or equal"),
    "mix-both-totals": ((*MIX, "--total-samples", "5", "--total-tokens", "5"), "--total-samples", "not both"),
    "mix-tolerance-negative": ((*MIX, "--tolerance", "-0.1"), "--tolerance", "greater than or equal to 0"),
    "mix-tolerance-inf": ((*MIX, "--tolerance", "inf"), "--tolerance", "less than or equal to 1"),
    "mix-balance": ((*MIX, "--balance", "words"), "--balance", "loss_tokens or samples"),
    "mix-domain": ((*MIX, "--domain", "veterinary"), "--domain", "medical or general"),
    "mix-seed": ((*MIX, "--seed", "-1"), "--seed", "greater than or equal to 0"),
    "mix-no-share": (("mix", "--tokenizer", "unused"), "--recipe", "--share"),
}

# The model commands, whole command lines (INPUT is replaced by the records file). A value found only after
# parsing (a flag checked against another, the world size, a --deepspeed name) is a usage error too.
TRAIN = ("train", "-i", "INPUT", "--model", "org/model", "--output-dir", "run")
ADV = ("adv-train", "-i", "INPUT", "--base", "org/model", "--output-dir", "run")
EVAL = ("eval", "--model", "m", "--backend", "openai", "--base-url", NO_SERVER, "--benchmark", "INPUT", "-o", "out")
INFER = ("infer", "--model", "m", "--backend", "openai", "--base-url", NO_SERVER, "-i", "INPUT")
MODEL_USAGE_ERRORS = {
    "train-deepspeed": ((*TRAIN, "--deepspeed", "zero4"), "--deepspeed", "zero3, zero2, none or a DeepSpeed JSON"),
    "train-warmup": ((*TRAIN, "--warmup-ratio", "1"), "--warmup-ratio", "at most 0.999"),
    "train-lr-nan": ((*TRAIN, "--learning-rate", "nan"), "--learning-rate", "finite"),
    "train-epochs-inf": ((*TRAIN, "--epochs", "inf"), "--epochs", "finite"),
    "train-batch-divide": ((*TRAIN, "--global-batch-size", "10", "--micro-batch-size", "4"), "--global-batch-size",
                           "not a multiple of --micro-batch-size 4"),
    "train-seed-huge": ((*TRAIN, "--seed", str(2 ** 40)), "--seed", "at most 4294967295"),
    "train-max-length": ((*TRAIN, "--max-length", "0"), "--max-length", "at least 1"),
    "train-save-steps": ((*TRAIN, "--save-steps", "0"), "--save-steps", "at least 1"),
    "train-precision": ((*TRAIN, "--precision", "fp8"), "--dtype", "bfloat16, float16, float32"),
    "train-pixels": ((*TRAIN, "--min-pixels", "100", "--max-pixels", "10"), "--min-pixels", "larger than"),
    "train-no-output-dir": (TRAIN[:-2], "--output-dir", "is required"),
    "adv-train-perturb": ((*ADV, "--perturb", "blur"), "--perturb", "distinct names"),
    "adv-train-samples": ((*ADV, "--samples", "0"), "--samples", "at least 1"),
    "adv-train-emit-only": ((*ADV, "--emit-only"), "--emit-only", "needs --emit"),
    "adv-train-no-base": ((*ADV[:3], *ADV[5:]), "--base", "is required"),
    "eval-perturb": ((*EVAL, "--perturb", "base,blur"), "--perturb", "unknown perturbation(s) blur"),
    "eval-benchmark-names": ((*EVAL, "--benchmark", "INPUT"), "--benchmark", "share the name"),
    "eval-model-names": ((*EVAL, "--model", "m"), "--model", "share the name"),
    "eval-parse-retries": ((*EVAL, "--judge-parse-retries", "1000"), "--judge-parse-retries", "less than or equal"),
    "eval-limit": ((*EVAL, "--limit", "0"), "--limit", "greater than or equal to 1"),
    "eval-protocol": ((*EVAL, "--protocol", "lmms"), "--protocol", "is not one of 'vlmevalkit', 'aloe'"),
    "eval-cache-empty": ((*EVAL, "--cache", ""), "--cache", "empty"),
    "infer-temperature": ((*INFER, "--temperature", "5"), "--temperature", "less than or equal to 2"),
    "infer-shard": ((*INFER, "--shard", "3/2"), "--shard", "need 0 <= K < N"),
    "infer-seed": ((*INFER, "--seed", "-1"), "--seed", "greater than or equal to 0"),
    "infer-system-empty": ((*INFER, "--system", " "), "--system", "empty"),
    "infer-draw-empty": ((*INFER, "--draw", ""), "--draw", "empty"),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("options")
    write_jsonl(folder / "train.jsonl", [chat("Is there a fracture?", "No.", id="1", source="s", domain="medical"),
                                         chat("Which organ?", "The liver.", id="2", source="s", domain="medical")])
    return folder


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_a_bad_option_value_is_a_usage_error(case, data):
    argv, option, fragment = USAGE_ERRORS[case]
    command, *rest = argv
    proc = aloe(command, "-i", str(data / "train.jsonl"), *rest, cwd=data, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    line = last_line(proc.stderr)
    assert line.startswith("aloe: error: Invalid value for") and option in line and fragment in line, proc.stderr
    assert proc.stdout == ""
    assert not (data / "eval.idx").exists()


@pytest.mark.parametrize("case", sorted(MODEL_USAGE_ERRORS))
def test_a_bad_option_value_of_a_model_command_is_a_usage_error(case, data):
    argv, option, fragment = MODEL_USAGE_ERRORS[case]
    argv = [str(data / "train.jsonl") if arg == "INPUT" else arg for arg in argv]
    proc = aloe(*argv, cwd=data, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    line = last_line(proc.stderr)
    assert line.startswith("aloe: error: Invalid value for") and option in line and fragment in line, proc.stderr
    assert proc.stdout == ""
    assert not (data / "run").exists() and not (data / "out").exists()

def test_usage_errors_of_the_other_commands(tmp_path):
    proc = aloe("sample-data", str(tmp_path / "demo"), "--seed", "-1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--seed" in last_line(proc.stderr) and "greater than or equal to 0" in last_line(proc.stderr)
    assert not (tmp_path / "demo").exists()
    proc = aloe("report", "merge")
    assert proc.returncode == 2 and "Missing argument" in last_line(proc.stderr)


def test_the_same_input_twice_is_refused_by_the_inline_mix(data):
    path = data / "train.jsonl"
    for second in (str(path), str(data / "." / ".." / data.name / "train.jsonl")):
        proc = aloe("mix", "-i", str(path), "-i", second, "--tokenizer", "unused", "--share", "medical/text=1",
                    cwd=data, timeout=60)
        assert proc.returncode == 2, proc.stderr
        line = last_line(proc.stderr)
        assert line.startswith("aloe: error: Invalid value for -i") and "given twice" in line and second in line, line


# ----------------------------------------------------------------------------- recipe numbers: exit 1, file and key

RECIPE = """tokenizer: unused
{top}targets: {targets}
sources:
  - name: a
    paths: train.jsonl
    domain: medical
{source}"""

BAD_RECIPE_NUMBERS = {
    "repeats-huge": ({"source": "    max_repeats: 1.0e+308\n"}, "sources[0] (a).max_repeats", "to 65535"),
    "repeats-inf": ({"source": "    max_repeats: .inf\n"}, "sources[0] (a).max_repeats", "to 65535"),
    "repeats-nan": ({"source": "    max_repeats: .nan\n"}, "sources[0] (a).max_repeats", "to 65535"),
    "weight-denormal": ({"source": "    weight: 1.0e-320\n"}, "sources[0] (a).weight", "from 1e-06 to 1e+06"),
    "weight-inf": ({"source": "    weight: .inf\n"}, "sources[0] (a).weight", "from 1e-06 to 1e+06"),
    "weight-zero": ({"source": "    weight: 0\n"}, "sources[0] (a).weight", "from 1e-06 to 1e+06"),
    "share-denormal": ({"targets": "{medical/text: 1.0e-320, general/text: 1}"}, "targets.medical/text",
                       "at least 1e-06"),
    "share-nan": ({"targets": "{medical/text: .nan, general/text: 1}"}, "targets.medical/text", "between 0 and 1"),
    "shares-short": ({"targets": "{medical/text: 0.3, general/text: 0.3}"}, "targets", "sum to 1"),
    "samples-huge": ({"top": "total_samples: 100000000000000000000\n"}, "total_samples", "too large to plan"),
    "tokens-huge": ({"top": "total_tokens: 100000000000000000000\n"}, "total_tokens", "too large to plan"),
    "samples-negative": ({"top": "total_samples: -5\n"}, "total_samples", "positive integer"),
    "tolerance-negative": ({"top": "tolerance: -0.5\n"}, "tolerance", "between 0 and 1"),
    "tolerance-nan": ({"top": "tolerance: .nan\n"}, "tolerance", "between 0 and 1"),
    "strict-text": ({"top": "strict: maybe\n"}, "strict", "true or false"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPE_NUMBERS))
def test_a_recipe_number_out_of_range_names_the_file_and_the_key(case, data, tmp_path):
    parts, key, fragment = BAD_RECIPE_NUMBERS[case]
    fields = {"top": "", "targets": "{medical/text: 0.5, general/text: 0.5}", "source": "", **parts}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(**fields))
    (tmp_path / "train.jsonl").write_bytes((data / "train.jsonl").read_bytes())
    proc = aloe("mix", "--recipe", str(recipe), "--dry-run", "--no-cache", cwd=tmp_path, timeout=60)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"aloe: error: {recipe}: {key}: ") and fragment in lines[0], lines[0]


# ----------------------------------------------------------------------------- binary files where text belongs

@pytest.fixture()
def binaries(tmp_path):
    png = tmp_path / "template.png"
    scan(1, size=64).save(png)
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    return png, blob


def one_line_naming(proc, path) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("aloe: error: ") and str(path) in lines[0], proc.stderr
    assert "text file" in lines[0], lines[0]
    return lines[0]


def test_a_binary_chat_template_in_a_recipe_or_an_option(tiny_model_dir, data, binaries, tmp_path):
    png, blob = binaries
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"tokenizer: {tiny_model_dir}\nchat_template: {png.name}\ntargets: {{medical/text: 1}}\n"
                      f"sources: [{{name: a, paths: {data / 'train.jsonl'}, domain: medical}}]\n")
    proc = aloe("mix", "--recipe", str(recipe), "--dry-run", "--no-cache")
    assert "chat template" in one_line_naming(proc, png)
    proc = aloe("mix", "-i", str(data / "train.jsonl"), "--tokenizer", str(tiny_model_dir), "--share",
                "medical/text=1", "--chat-template", str(blob), "--dry-run", "--no-cache")
    assert "chat template" in one_line_naming(proc, blob)
    proc = aloe("mix", "--recipe", str(png), "--dry-run", "--no-cache")
    assert "recipe" in one_line_naming(proc, png)


def test_binary_thresholds_and_prompt_files(data, binaries):
    png, blob = binaries
    train = str(data / "train.jsonl")
    proc = aloe("score", "-i", train, *SCORE[1:], "--thresholds", str(png))
    assert "thresholds file" in one_line_naming(proc, png)
    proc = aloe("score", "-i", train, *SCORE[1:], "--prompt-file", str(blob))
    assert "prompt file" in one_line_naming(proc, blob)
    proc = aloe("perplexity", "-i", train, "--model", "org/model", "--thresholds", str(blob))
    assert "thresholds file" in one_line_naming(proc, blob)


# ----------------------------------------------------------------------------- --workers beyond the CPUs

def _limit_processes():
    # A safety net for running this against code without the cap: forking past the limit fails at once
    # instead of stalling the machine. The capped run forks a handful of workers, far below it.
    used = len([p for p in os.listdir("/proc") if p.isdigit()])
    resource.setrlimit(resource.RLIMIT_NPROC, (used + 400, used + 400))


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux CPU affinity")
def test_workers_are_capped_at_the_available_cpus(tmp_path):
    import subprocess
    import sys

    from support import ROOT

    cpus = len(os.sched_getaffinity(0))
    images = []
    for i in range(6):
        scan(i, size=64).save(tmp_path / f"{i}.png")
        images.append(chat("q", "a", [f"{i}.png"], id=str(i)))
    write_jsonl(tmp_path / "train.jsonl", images + [images[0] | {"id": "dup"}])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY")}
    proc = subprocess.run([sys.executable, "-m", "aloe_cli", "dedup", "-i", str(tmp_path / "train.jsonl"),
                           "--within", "--workers", "100000", "--batch-size", "4"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120, preexec_fn=_limit_processes)
    assert proc.returncode == 0, proc.stderr
    assert f"--workers 100000 is more than the {cpus} CPU(s) this process may use; using {cpus}" in proc.stderr
    assert "7 read = 6 kept + 1 rejected" in proc.stderr  # the work was done, by the capped pool
    assert len(proc.stdout.splitlines()) == 6
    help_text = aloe("dedup", "--help", env={"COLUMNS": "300"}).stdout
    assert "capped at the CPUs this process may use" in " ".join(help_text.replace("│", " ").split())
