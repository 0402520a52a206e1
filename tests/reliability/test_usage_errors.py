"""One error style: every usage error of every command, whether click/typer finds it while parsing (an unknown
option, a bad value or choice, a missing value) or the command does (an option it cannot use), is one
`aloe: error:` line on stderr naming the flag, with exit code 2 and nothing on stdout."""

from __future__ import annotations

import pytest

from aloe_cli.app import COMMANDS
from support import aloe

# command -> (arguments before the bad value, the flag, its bad value): every command has one
BAD_VALUES = {
    "dedup": ([], "--batch-size", "many"),
    "sample-data": ([], "--seed", "x"),
    "mix": ([], "--batch-size", "1.5"),
    "perplexity": ([], "--batch-size", "0"),
    "score": ([], "--concurrency", "lots"),
    "eval": ([], "--limit", "ten"),
    "infer": ([], "--temperature", "hot"),
    "report": (["merge"], "--output", None),  # a flag without its value
    "train": ([], "--learning-rate", "fast"),
    "adv-train": ([], "--epochs", "one"),
    "demo": ([], "--seed", "x"),
}


def one_error_line(proc, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stdout == "", proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    [line] = lines
    assert line.startswith("aloe: error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def test_every_command_is_covered():
    assert sorted(BAD_VALUES) == sorted(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_unknown_option_is_one_line_naming_it(command):
    before = BAD_VALUES[command][0]
    line = one_error_line(aloe(command, *before, "--no-such-flag", "1", timeout=60), "--no-such-flag")
    assert "No such option" in line and f"aloe {' '.join([command, *before])} --help" in line


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_value_is_one_line_naming_the_flag(command):
    before, flag, value = BAD_VALUES[command]
    proc = aloe(command, *before, flag, *([value] if value is not None else []), timeout=60)
    line = one_error_line(proc, flag)
    assert f"'{flag}'" not in line  # named bare, like every other aloe message


def test_other_usage_errors_are_one_line_too(tmp_path):
    one_error_line(aloe("no-such-command"), "No such command", "no-such-command")
    one_error_line(aloe("--no-such-flag"), "--no-such-flag")
    one_error_line(aloe("eval", "--backend", "vllm", "--model", "m"), "--backend", "'vllm' is not one of")
    one_error_line(aloe("infer", "--model", "m", "one", "two"), "unexpected extra argument")
    # found by the command, not by the parser
    one_error_line(aloe("score", "-i", str(tmp_path / "a.jsonl")), "--judge", "is required")
    one_error_line(aloe("eval", "--model", "m", "-o", str(tmp_path / "out")), "--benchmark")
    # found after parsing, by the core (aloe's own UsageError)
    one_error_line(aloe("train", "-i", "x.jsonl", "--model", "m", "--output-dir", str(tmp_path / "run"),
                        "--global-batch-size", "7", "--dry-run"), "--global-batch-size", "not a multiple")
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_no_arguments_still_shows_the_help():
    proc = aloe("infer")
    assert proc.returncode == 2 and "--model" in proc.stdout + proc.stderr and "aloe: error" not in proc.stderr
