"""Help and shell completion, through the CLI."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys

import pytest

from support import ROOT, aloe

# ----------------------------------------------------------------------------- shell completion


def test_show_completion_prints_the_script_for_the_shell_named():
    proc = aloe("--show-completion", "bash")
    assert proc.returncode == 0, proc.stderr
    assert "_ALOE_COMPLETE=complete_bash" in proc.stdout
    assert proc.stdout.rstrip().endswith("complete -o default -F _aloe_completion aloe")
    proc = aloe("--show-completion", "zsh")
    assert proc.returncode == 0 and proc.stdout.startswith("#compdef aloe")
    proc = aloe("--show-completion", "tcsh")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "'tcsh' is not a shell aloe completes: name one of bash, zsh, fish, powershell, pwsh" in proc.stderr


def test_the_bash_script_completes_commands_options_and_choices(tmp_path):
    """The script, sourced in bash, asks `aloe` itself (here: this checkout) for the words."""
    script = aloe("--show-completion", "bash").stdout
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "aloe"
    stub.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m aloe_cli "$@"\n')
    stub.chmod(0o755)
    (tmp_path / "aloe.sh").write_text(script)

    def complete(*words: str) -> list[str]:
        words_array = " ".join(f"'{word}'" for word in words)
        line = (f"source {tmp_path / 'aloe.sh'}; COMP_WORDS=({words_array}); COMP_CWORD={len(words) - 1}; "
                '_aloe_completion aloe; printf "%s\\n" "${COMPREPLY[@]}"')
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert complete("aloe", "tr") == ["train"]
    assert complete("aloe", "train", "--lr-sch") == ["--lr-scheduler"]
    assert complete("aloe", "eval", "--protocol", "") == ["vlmevalkit", "aloe"]


def test_install_completion_writes_the_script_where_the_shell_reads_it(tmp_path):
    proc = aloe("--install-completion", "bash", env={"HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "bash completion installed in" in proc.stdout
    installed = tmp_path / ".bash_completions" / "aloe.sh"
    assert "_ALOE_COMPLETE=complete_bash" in installed.read_text()
    assert f"source '{installed}'" in (tmp_path / ".bashrc").read_text()


# ----------------------------------------------------------------------------- help at 80 columns

WIDTH = 80
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")
INVOCATION = re.compile(r"\baloe(?:_cli)? ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?")


def command_tree():
    """Every command path (("train",), ("report", "merge"), ...) with its click command."""
    import typer

    from aloe_cli.app import app

    root = typer.main.get_command(app)
    ctx = typer.Context(root, info_name="aloe")
    found = {(): root}

    def walk(path, command):
        if hasattr(command, "list_commands"):
            for name in command.list_commands(ctx):
                child = command.get_command(ctx, name)
                if child is not None and not child.hidden:
                    found[(*path, name)] = child
                    walk((*path, name), child)

    walk((), root)
    return found


COMMANDS = command_tree()


def options_of(command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names.update(opt for opt in (*param.opts, *getattr(param, "secondary_opts", ())) if opt.startswith("--"))
    return names


def render_help(path: tuple[str, ...]) -> str:
    proc = aloe(*path, "--help", env={"COLUMNS": str(WIDTH), "TERM": "dumb"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Usage: aloe {' '.join(path)}".rstrip()), proc.stdout[:200]
    return proc.stdout


def example_commands(text: str) -> list[str]:
    """The command lines of the help's indented paragraphs (its examples), continuation lines joined."""
    commands, current = [], ""
    for line in inspect.cleandoc(text).splitlines():
        if not line.startswith(" ") or line.strip().startswith("#"):
            continue
        current += " " + line.strip()
        if current.endswith("\\"):
            current = current[:-1]
            continue
        commands.append(current.strip())
        current = ""
    return commands


# Flags of other commands that a help text refers to on purpose.
ELSEWHERE = {("report",): {"--report"}, ("report", "merge"): {"--report"}}


def wrong_flags(path: tuple[str, ...], text: str) -> list[str]:
    """Flags named in the help that the command they are given to does not have: in an example, the aloe command
    the flag follows on its line (flags of torchrun, sbatch, ... before it are not aloe's); in prose, this one."""
    wrong = []
    examples = example_commands(text)
    for line in examples:
        for segment in re.split(r"\||&&|;|>", line):
            match = INVOCATION.search(segment)
            if not match:
                continue
            target = (match.group(1),)
            if match.group(2) and (match.group(1), match.group(2)) in COMMANDS:
                target = (match.group(1), match.group(2))
            if target not in COMMANDS:
                wrong.append(f"aloe {' '.join(target)} (no such command)")
                continue
            known = options_of(COMMANDS[target]) | options_of(COMMANDS[()])
            wrong += [f"{flag} (in: {line})" for flag in FLAG.findall(segment[match.end():]) if flag not in known]
    prose = "\n".join(line for line in inspect.cleandoc(text).splitlines() if not line.startswith(" "))
    known = options_of(COMMANDS[path]) | options_of(COMMANDS[()]) | ELSEWHERE.get(path, set())
    wrong += [flag for flag in FLAG.findall(prose) if flag not in known]
    return wrong


@pytest.mark.parametrize("path", [path for path in COMMANDS if path], ids=" ".join)
def test_help_reads_at_80_columns(path):
    """No word cut with an ellipsis, no line the terminal would wrap, every example printed as written (so it can
    be pasted), and no flag named that its command does not have."""
    out = render_help(path)
    command = COMMANDS[path]
    assert "…" not in out, [line for line in out.splitlines() if "…" in line]
    assert [line for line in out.splitlines() if len(line) > WIDTH] == []
    lines = {line.strip() for line in out.splitlines()}
    written = [line.strip() for line in inspect.cleandoc(command.help or "").splitlines() if line.startswith(" ")]
    assert [line for line in written if line not in lines] == []  # examples are not rewrapped
    assert "<bool>" not in out
    assert wrong_flags(path, command.help or "") == []
    # and in the options' own help: flags of this command (or of the aloe root)
    known = options_of(command) | options_of(COMMANDS[()]) | ELSEWHERE.get(path, set())
    named = {flag for param in command.params for flag in FLAG.findall(getattr(param, "help", None) or "")}
    assert sorted(named - known) == []


def test_flags_show_both_spellings_and_no_metavar():
    out = render_help(("train",))
    assert re.search(r"^  --gradient-checkpointing / --no-gradient-checkpointing\n", out, re.MULTILINE)
    assert re.search(r"^  --freeze-vision +Do not train", out, re.MULTILINE)
    assert re.search(r"^  --nodes N +--slurm: nodes\.", out, re.MULTILINE)
    out = render_help(("dedup",))
    assert re.search(r"^  --within +Also drop repeated images", out, re.MULTILINE)
    assert "--bbox-format [xyxy|xywh]" in out
    assert "[x1, y1, x2, y2] (xyxy)" in " ".join(out.split())  # brackets are text, not markup
