"""Help and shell completion, through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

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
