"""aloe adv-train: stage 2, adversarial robustness, from a stage-1 model with the same optimisation.

Medical records are perturbed (aloe_cli.perturb: cap = a misleading caption
rendered into the image, pmt = a misleading caption in the prompt, syc = a
sycophantic user statement pushing a wrong answer, leg = a misleading legend
rendered into the image, region = a box moved to a wrong area), balanced
across the chosen perturbations and deterministic for --seed; the target
answer stays correct. Then SFT continues from --base with exactly the flags,
defaults and YAML keys of `aloe train`. The perturbed set is written to --emit
(default <output-dir>/adversarial.jsonl), each record saying which
perturbation and which wrong answer it carries (aloe.perturb).

Examples:

    # the published stage 2: 17.2 K perturbed samples from the stage-1 run
    torchrun --nproc-per-node 8 -m aloe_cli adv-train -i medical.jsonl \\
        --base runs/stage1 --output-dir runs/stage2

    # look at the perturbed records first (no model is loaded), then train
    # on them as they are
    aloe adv-train -i medical.jsonl --base runs/stage1 --perturb cap,syc \\
        --samples 2000 --emit adversarial.jsonl --emit-only
    aloe adv-train -i adversarial.jsonl --base runs/stage1 \\
        --output-dir runs/stage2 --perturb none

    # on SLURM, like aloe train
    aloe adv-train --config stage2.yaml --slurm --nodes 8 \\
        --gpus-per-node 4 > stage2.sbatch
"""

from __future__ import annotations

from aloe_cli.commands._train_options import launch_parameters, with_config_flags
from aloe_cli.options import command_app
from aloe_cli.training.config import AdvTrainConfig

app = command_app()


def emit(config: AdvTrainConfig, path: str) -> int:
    """Perturb the inputs into `path` through the stage runner (one perturbed copy per record, balanced); a
    shortfall against --samples is a warning, or an error with --strict. Returns how many were emitted."""
    from aloe_cli import console
    from aloe_cli.commands._common import run_data_command
    from aloe_cli.data.records import RecordDefaults
    from aloe_cli.data.stage import RunConfig
    from aloe_cli.errors import AloeError
    from aloe_cli.training.adversarial import adversarial_stage, shortfall

    # Absolute image paths: the emitted file sits in the run folder, which moves apart from the data.
    summary = run_data_command(adversarial_stage(config), config.input, image_root=config.image_root, output=path,
                               rejects=None, report=None, config=RunConfig(on_error=config.on_error),
                               defaults=RecordDefaults(keep_dicom_bytes=config.keep_dicom_bytes),
                               absolute_image_paths=True)
    short = shortfall(summary, config.samples)
    if short and config.strict:
        raise AloeError(f"adv-train --strict: {short}")
    if short:
        console.log(f"aloe: warning: {short}")
    return summary.emitted


def with_replay(config: AdvTrainConfig, items: list, perturbed: int, keep) -> list:
    """The perturbed items and the clean ones drawn from --replay to make --replay-share of the whole."""
    from aloe_cli import console
    from aloe_cli.data.io import read_items
    from aloe_cli.training.adversarial import replay_count, replay_sample

    wanted = replay_count(perturbed, config.replay_share)
    replayed, read = replay_sample(read_items(config.replay, config.image_root, defaults=keep), wanted, config.seed)
    note = "" if len(replayed) == wanted else f" (only {read} there, of {wanted} wanted)"
    console.log(f"aloe adv-train: replaying {len(replayed)} clean record(s) of {read} from --replay beside "
                f"{perturbed} perturbed{note}")
    return items + replayed


@app.command(name="adv-train", help=__doc__, no_args_is_help=True)
@with_config_flags(AdvTrainConfig, launch_parameters("adv-train"), exclude=("model",))
def adv_train(**options) -> None:
    from pathlib import Path

    from aloe_cli.commands._train_run import check_run_paths, plan_or_exit, train_and_report
    from aloe_cli.data.io import expand_inputs, read_items, read_paths
    from aloe_cli.data.records import RecordDefaults
    from aloe_cli.modeling.loading import check_model_reference

    plan = plan_or_exit("adv-train", AdvTrainConfig, options)
    if plan is None:
        return
    config = plan.config
    config.require("input", "base")
    if not config.emit_only:
        config.require("output_dir")
    check_model_reference(config.base)
    path = None if config.perturb == "none" else (
        config.emit or str(Path(config.output_dir) / "adversarial.jsonl"))
    paths = check_run_paths(config, emit=path)  # before any record is read or model loaded
    replay_paths = expand_inputs(config.replay) if config.replay else []
    if config.emit_only:
        emit(config, config.emit)
        return
    keep = RecordDefaults(keep_dicom_bytes=config.keep_dicom_bytes)

    def records():
        if path is None:
            perturbed = read_paths(paths, config.image_root, defaults=keep)
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)  # the run folder (checked above)
            emit(config, path)
            perturbed = read_items([path], defaults=keep)
        if not config.replay:
            return perturbed
        perturbed = list(perturbed)
        return with_replay(config, perturbed, len(perturbed), keep)

    train_and_report(plan, records, paths + replay_paths)
