"""What `aloe train` and `aloe adv-train` share after option parsing: resolve, then dry-run, SLURM or train."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from aloe_cli import console
from aloe_cli.training.config import TrainConfig, TrainPlan, resolve, world_size

LAUNCH_OPTIONS = ("config", "dry_run", "slurm", "nodes", "gpus_per_node", "cpus_per_task", "launcher", "sbatch")


def config_from_options(config_cls: type, options: dict[str, Any]) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls.from_sources(options.get("config"), {k: v for k, v in options.items() if k in names})


def print_sbatch(command: str, config_cls: type, config: TrainConfig, options: dict[str, Any]) -> None:
    """--slurm: check the configuration for the job's world size, then print the script on stdout."""
    from aloe_cli.training.slurm import (
        THIS_MACHINE,
        SlurmJob,
        cpus_given,
        default_cpus_per_task,
        flags_from_values,
        sbatch_script,
    )

    world = options["nodes"] * options["gpus_per_node"]
    resolve(config, world, command=command)  # a global batch that does not divide fails here, not on the cluster
    argv = [command]
    if options.get("config") is not None:
        argv += ["--config", str(options["config"])]  # relative paths hold: the job runs in this folder (--chdir)
    argv += flags_from_values(config_cls, {k: v for k, v in options.items() if k not in LAUNCH_OPTIONS})
    job = SlurmJob(argv=argv, nodes=options["nodes"], gpus_per_node=options["gpus_per_node"],
                   launcher=options["launcher"], job_name=f"aloe-{command}", sbatch_options=options.get("sbatch") or [],
                   cpus_per_task=options.get("cpus_per_task"))
    if job.cpus_per_task is None and not cpus_given(job):
        job.cpus_per_task, job.cpus_source = default_cpus_per_task(job.partition())
        if job.cpus_source == THIS_MACHINE:
            console.log(f"aloe: note: sinfo is not available here: --cpus-per-task {job.cpus_per_task} is this "
                        "machine's CPU count; give --cpus-per-task N for the cluster's nodes")
    print(sbatch_script(job), end="")


def plan_or_exit(command: str, config_cls: type, options: dict[str, Any]) -> TrainPlan | None:
    """The resolved plan, or None when --slurm / --dry-run already did all there is to do."""
    config = config_from_options(config_cls, options)
    if config.mapped:
        console.log(f"aloe {command}: {options['config']}: keys read as aloe's:")
        for key, flag in config.mapped:
            console.log(f"  {key} -> {flag}")
    if options.get("slurm"):
        print_sbatch(command, config_cls, config, options)
        return None
    plan = resolve(config, world_size(), command=command)
    if options.get("dry_run"):
        print(plan.to_yaml(), end="")
        return None
    return plan


def check_run_paths(config: TrainConfig, emit: str | None = None) -> list[str]:
    """Before any model is loaded or record read: the inputs exist (exit 1), `--image-root` is a folder (exit 2),
    the run folder is not the model's (exit 2), no output is an input (`--emit` equal to `-i`, a run folder's
    files; exit 2), the run folder and the emitted file can be written (exit 1). Returns the expanded inputs."""
    from pathlib import Path

    from aloe_cli.data.destinations import Named, check_conflicts, check_folder, check_writable
    from aloe_cli.data.io import expand_inputs
    from aloe_cli.errors import UsageError
    from aloe_cli.training.config import CONFIG_FILE
    from aloe_cli.training.data import dataset_path
    from aloe_cli.training.run_folder import LOG_FILE

    paths = expand_inputs(config.input)
    if config.image_root and not Path(config.image_root).is_dir():
        raise UsageError(f"{config.image_root} is not a folder (or does not exist)", "--image-root")
    if config.output_dir:
        check_run_folder(config, paths)
    outputs = []
    if config.output_dir:
        run = Path(config.output_dir)
        outputs += [Named("--output-dir", str(path)) for path in (run / CONFIG_FILE, run / LOG_FILE, dataset_path(run))]
    if emit:
        outputs.append(Named("--emit", emit))
    check_conflicts([Named("-i", path) for path in paths], outputs)
    if config.output_dir:
        check_folder(Named("--output-dir", config.output_dir))
    if emit and not (config.output_dir and Path(emit).parent == Path(config.output_dir)):
        check_writable(Named("--emit", emit))  # (in the run folder, it is made with the run)
    return paths


def _inside(path, folder) -> bool:
    """Whether the resolved `path` is `folder` or lies inside it."""
    return path == folder or folder in path.parents


def check_run_folder(config: TrainConfig, paths: list[str]) -> None:
    """The run folder is never the starting model's folder, inside it or around it (training would write over the
    weights it starts from, or --overwrite would move them aside); with --overwrite, no input lies inside it (it is
    moved aside with the old run). Usage errors (exit 2), before anything is loaded."""
    from pathlib import Path

    from aloe_cli.errors import UsageError
    from aloe_cli.modeling.loading import is_local_reference

    run = Path(config.output_dir).expanduser().resolve()
    flag = "--base" if getattr(config, "base", None) else "--model"
    if config.model and is_local_reference(config.model) and Path(config.model).expanduser().exists():
        model = Path(config.model).expanduser().resolve()
        if run == model:
            raise UsageError(f"{config.output_dir} is the {flag} folder: training would replace the weights it "
                             "starts from; name a new folder", "--output-dir")
        if _inside(run, model):
            raise UsageError(f"{config.output_dir} is inside the {flag} folder {config.model}: name a folder "
                             "outside it", "--output-dir")
        if _inside(model, run):
            raise UsageError(f"{config.output_dir} holds the {flag} folder {config.model}: name a folder that "
                             "does not contain the model", "--output-dir")
    if config.overwrite:
        named = [("-i", path) for path in paths if path != "-"]
        named += [("--image-root", config.image_root)] if config.image_root else []
        for option, path in named:
            if _inside(Path(path).expanduser().resolve(), run):
                raise UsageError(f"{path} ({option}) lies inside {config.output_dir}, which --overwrite moves "
                                 "aside with the old run: move it out first", "--overwrite")


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that resumes this run: the same arguments with --resume (and without --overwrite, which
    would start again). Under a launcher (WORLD_SIZE > 1) it runs under the same launcher."""
    import os
    import shlex
    import sys

    args = [arg for arg in (sys.argv[1:] if argv is None else argv) if arg != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    line = "aloe " + shlex.join(args)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        per_node = os.environ.get("LOCAL_WORLD_SIZE") or os.environ["WORLD_SIZE"]
        line += f" (under the same launcher: e.g. torchrun --nproc-per-node {per_node} -m aloe_cli {shlex.join(args)})"
    return line


def train_and_report(plan: TrainPlan, items: Callable[[], Iterable], paths: list[str]) -> None:
    from aloe_cli.training.trainer import run_training

    try:
        result = run_training(plan, items, paths=paths, log=console.log, resume_command=resume_command(),
                              progress=console.progress)
    except KeyboardInterrupt as interrupt:
        # typer turns Ctrl-C into a silent exit 130 before app.main sees it: say here where to resume from.
        outcome = getattr(interrupt, "outcome", None)
        console.log("aloe: interrupted" + (f"; {outcome}" if outcome else ""))
        raise
    if not result.is_main:
        return
    if result.complete:
        console.log(f"aloe {plan.command}: the run in {result.output_dir} is complete (step {result.global_step}): "
                    "nothing to resume, nothing changed")
        return
    records = result.records
    skipped = sum(result.skipped.values())
    trained_on = max(records.get("kept", 0) - skipped, 0)
    rows = [["records read", records.get("read", 0)], ["records rejected", records.get("rejected", 0)]]
    rows += [[f"samples skipped ({reason})", n] for reason, n in sorted(result.skipped.items())]
    rows += [["records kept", trained_on], ["optimizer steps", result.global_step]]
    console.print_table(f"aloe {plan.command}", ["", "value"], rows)
    if records.get("reasons"):
        console.log("  rejected by reason: " + ", ".join(f"{r}={n}" for r, n in sorted(records["reasons"].items())))
    lost = records.get("rejected", 0) + skipped
    if lost:
        console.warn(f"{lost} of {records.get('read', 0)} records were not trained on: only {trained_on} were kept")
    if result.train_loss is not None:
        console.log(f"  mean training loss {result.train_loss:.4f}")
    console.log("  vision guard: text-only micro batches per rank " + str(result.guard_calls))
    curve = ", loss.png" if (Path(result.output_dir) / "loss.png").is_file() else ""  # drawn when matplotlib is there
    console.log(f"  model, processor, aloe-train.yaml, log.jsonl{curve} and run.json in {result.output_dir}")
