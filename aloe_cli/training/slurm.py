"""An sbatch script that runs an `aloe train` / `aloe adv-train` command on N nodes x G GPUs.

One SLURM task per node; `srun` starts the launcher once on every node, and
the node rank is expanded there (`$SLURM_NODEID`), not when the script is
written or submitted. The master address is the first host of the job's node
list. The aloe flags travel as a bash array, so values with spaces or quotes
arrive unchanged.

The task gets `--cpus-per-task` CPUs (default: the CPUs of a node, as
`sinfo` reports them for the job's partition, divided by the one task per
node; this machine's count where `sinfo` is missing), and `srun` passes it
on to the step explicitly (since 22.05, srun does not always inherit it). The
ranks' data-loader workers follow `SLURM_CPUS_PER_TASK` at run time.

    print(sbatch_script(SlurmJob(argv=["train", "-i", "mix.jsonl", ...], nodes=8, gpus_per_node=4)))
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aloe_cli.errors import AloeError

LAUNCHERS = ("torchrun", "accelerate")


@dataclass
class SlurmJob:
    argv: list[str]  # the aloe arguments, starting with the command name
    nodes: int = 1
    gpus_per_node: int = 8
    launcher: str = "torchrun"
    job_name: str = "aloe-train"
    sbatch_options: list[str] = field(default_factory=list)  # KEY=VALUE or KEY
    workdir: Path = field(default_factory=Path.cwd)
    python: str = field(default_factory=lambda: sys.executable)
    master_port: int = 29500
    cpus_per_task: int | None = None  # None: default_cpus_per_task()
    cpus_source: str = ""  # where cpus_per_task came from, for the script's comment

    def partition(self) -> str | None:
        """The partition an `--sbatch partition=NAME` option names, if any."""
        for option in self.sbatch_options:
            key, _, value = option.partition("=")
            if key.strip().lstrip("-") in ("partition", "p") and value.strip():
                return value.strip()
        return None


TASKS_PER_NODE = 1  # one launcher per node, which starts the node's ranks


THIS_MACHINE = "this machine's CPUs (sinfo unavailable)"


def restart_count() -> int:
    """How many times SLURM has requeued this job (preempted, or its node failed): SLURM_RESTART_COUNT, 0 on a
    job's first run and outside SLURM."""
    try:
        return max(0, int(os.environ.get("SLURM_RESTART_COUNT", "0")))
    except ValueError:
        return 0


def default_cpus_per_task(partition: str | None = None) -> tuple[int, str]:
    """A node's CPUs divided by the tasks per node, and where the number came from. A node's CPUs are what
    `sinfo` reports for `partition` (else for the default partition, the one it marks with `*`), the fewest
    where nodes differ, so the job fits on any of them; where `sinfo` is missing or says nothing, this machine's
    count (THIS_MACHINE)."""
    command = ["sinfo", "--noheader", "--Node", "--format=%c %P"] + (["--partition", partition] if partition else [])
    try:
        reply = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
        rows = re.findall(r"^\s*(\d+)\s+(\S+)", reply.stdout, re.MULTILINE) if not reply.returncode else []
    except (OSError, subprocess.SubprocessError):
        rows = []
    if not partition and any(name.endswith("*") for _, name in rows):
        rows = [(cpus, name) for cpus, name in rows if name.endswith("*")]
    counts = [int(cpus) for cpus, _ in rows if int(cpus) > 0]
    if counts:
        named = partition or rows[0][1].rstrip("*")
        return max(1, min(counts) // TASKS_PER_NODE), f"a node's CPUs per sinfo, partition {named}"
    return max(1, (os.cpu_count() or 1) // TASKS_PER_NODE), THIS_MACHINE


def cpus_given(job: SlurmJob) -> bool:
    """Whether an `--sbatch cpus-per-task=N` option sets the CPUs itself."""
    return any(option.partition("=")[0].strip().lstrip("-") in ("cpus-per-task", "c") for option in job.sbatch_options)


def _sbatch_line(option: str) -> str:
    key, sep, value = option.partition("=")
    key = key.strip().lstrip("-")
    if not key or any(c.isspace() for c in key):
        raise AloeError(f"--sbatch {option!r}: expected KEY=VALUE (e.g. partition=gpu) or KEY (e.g. exclusive)")
    return f"#SBATCH --{key}={value}" if sep else f"#SBATCH --{key}"


def _launch(job: SlurmJob) -> str:
    world = job.nodes * job.gpus_per_node
    if job.launcher == "torchrun":
        return ('"$ALOE_PYTHON" -m torch.distributed.run --nnodes "$SLURM_NNODES" '
                f'--nproc-per-node {job.gpus_per_node} --node-rank "$SLURM_NODEID" '
                '--master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -m aloe_cli "$@"')
    return ('"$ALOE_PYTHON" -m accelerate.commands.launch --multi_gpu --num_machines "$SLURM_NNODES" '
            f'--num_processes {world} --machine_rank "$SLURM_NODEID" '
            '--main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" --module aloe_cli "$@"')


def sbatch_script(job: SlurmJob) -> str:
    if job.launcher not in LAUNCHERS:
        raise AloeError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {job.launcher!r}")
    custom = [_sbatch_line(option) for option in job.sbatch_options]
    custom_keys = {line.split("=")[0] for line in custom}
    cpus_per_task, cpus_source = job.cpus_per_task, job.cpus_source or "as given"
    if cpus_given(job):
        cpus_per_task, cpus_source = 1, "from --sbatch"  # (the default line is replaced below)
    elif cpus_per_task is None:
        cpus_per_task, cpus_source = default_cpus_per_task(job.partition())
    defaults = [f"#SBATCH --job-name={job.job_name}", f"#SBATCH --nodes={job.nodes}",
                f"#SBATCH --ntasks-per-node={TASKS_PER_NODE}", f"#SBATCH --gpus-per-node={job.gpus_per_node}",
                f"#SBATCH --cpus-per-task={cpus_per_task}", f"#SBATCH --output={job.job_name}-%j.out",
                f"#SBATCH --chdir={job.workdir}"]
    header = [line for line in defaults if line.split("=")[0] not in custom_keys] + custom
    args = " ".join(shlex.quote(arg) for arg in job.argv)
    return "\n".join([
        "#!/bin/bash",
        f"# aloe {job.argv[0]} on {job.nodes} node(s) x {job.gpus_per_node} GPU(s), one task per node.",
        "# Submit with: sbatch THIS_FILE",
        f"# The task's CPUs (--cpus-per-task, {cpus_source}) are shared by the node's {job.gpus_per_node} rank(s);",
        "# each rank's data-loader workers default to its share minus one (from SLURM_CPUS_PER_TASK at run time).",
        *header,
        "",
        "set -euo pipefail",
        "# The Python environment aloe is installed in (override: ALOE_PYTHON=/path/to/python sbatch ...).",
        f"ALOE_PYTHON=${{ALOE_PYTHON:-{shlex.quote(job.python)}}}",
        "# The first host (sed reads every line; `head` would close the pipe early, failing the job under pipefail).",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        f"MASTER_PORT=${{MASTER_PORT:-{job.master_port}}}",
        "export ALOE_PYTHON MASTER_ADDR MASTER_PORT",
        f"ALOE_ARGS=({args})",
        "",
        "# One launcher per node; $SLURM_NODEID is expanded on each node (single quotes).",
        "# The step gets the task's CPUs explicitly: some SLURM releases do not pass --cpus-per-task to srun.",
        f"srun --nodes=\"$SLURM_NNODES\" --ntasks-per-node={TASKS_PER_NODE} "
        "--cpus-per-task=\"$SLURM_CPUS_PER_TASK\" --kill-on-bad-exit=1 bash -c \\",
        f"  'exec {_launch(job)}' \\",
        '  aloe "${ALOE_ARGS[@]}"',
        "",
    ])


def flags_from_values(config_cls: type, values: dict[str, Any]) -> list[str]:
    """The given (non-None) config values as command-line flags, in field order."""
    argv: list[str] = []
    for f in dataclasses.fields(config_cls):
        value = values.get(f.name)
        if value is None or value == []:
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(value, bool):
            spelled = (f.metadata.get("flags") or (flag,))[0]
            positive, _, negative = spelled.partition("/")
            if value:
                argv.append(positive)
            elif negative:
                argv.append(negative)
        elif isinstance(value, list):
            for entry in value:
                argv += [flag, str(entry)]
        else:
            argv += [flag, str(value)]
    return argv


__all__ = ["LAUNCHERS", "TASKS_PER_NODE", "SlurmJob", "THIS_MACHINE", "cpus_given",
           "default_cpus_per_task", "flags_from_values", "sbatch_script"]
