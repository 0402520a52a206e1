"""aloe train: supervised fine-tuning (stage 1) on TRL's SFTTrainer with DeepSpeed ZeRO-3.

Defaults are the published recipe: bf16, global batch 1024, micro batch 16,
1 epoch, max length 4096, learning rate 3.75e-5, cosine, 3% warmup, AdamW,
gradient checkpointing, ZeRO-3. The world size comes from the launcher
(WORLD_SIZE); gradient accumulation = global / (micro x world size). The loss
covers the assistant tokens only (the chat template's generation spans: the
tokens `aloe mix` balanced on). Every flag is also a key of --config YAML;
flags given override it.

The output folder holds the final model and processor (loadable by
AutoModelForImageTextToText / AutoProcessor, so by every aloe --model),
aloe-train.yaml (the resolved configuration), log.jsonl (step, loss, lr,
tokens/s), checkpoints and run.json (the inputs with their SHA-256, the
configuration, the aloe version, and the state: running, complete, failed).
It is never the --model folder and never holds two runs: --resume continues
the same run from its newest whole checkpoint, --overwrite moves an old run
aside. More than --max-skipped (0.1%) of the records lost (unreadable, missing
or broken images) fails the run.

Examples:

    # look at the resolved configuration for 32 GPUs (nothing is loaded)
    WORLD_SIZE=32 aloe train -i mixture.jsonl \\
        --model Qwen/Qwen2-VL-7B-Instruct --output-dir runs/stage1 --dry-run

    # one node, 8 GPUs
    torchrun --nproc-per-node 8 -m aloe_cli train -i mixture.jsonl \\
        --model Qwen/Qwen2-VL-7B-Instruct --output-dir runs/stage1
    accelerate launch --num_processes 8 -m aloe_cli train --config train.yaml
    deepspeed --num_gpus 8 --module aloe_cli train --config train.yaml

    # 8 nodes x 4 GPUs on SLURM: write the job script, then submit it
    aloe train --config train.yaml --slurm --nodes 8 --gpus-per-node 4 \\
        --sbatch partition=gpu > job.sbatch
    sbatch job.sbatch

    # continue after a preemption (the same inputs and configuration only)
    aloe train --config train.yaml --resume

    # replace the run in that folder (the old one is moved aside, not mixed)
    aloe train --config train.yaml --overwrite
"""

from __future__ import annotations

from aloe_cli.commands._train_options import launch_parameters, with_config_flags
from aloe_cli.options import command_app
from aloe_cli.training.config import TrainConfig

app = command_app()


@app.command(help=__doc__, no_args_is_help=True)
@with_config_flags(TrainConfig, launch_parameters("train"))
def train(**options) -> None:
    from aloe_cli.commands._common import check_image_paths
    from aloe_cli.commands._train_run import check_run_paths, plan_or_exit, train_and_report
    from aloe_cli.data.io import read_paths
    from aloe_cli.modeling.loading import check_model_reference

    plan = plan_or_exit("train", TrainConfig, options)
    if plan is None:
        return
    config = plan.config
    config.require("input", "model", "output_dir")
    check_model_reference(config.model)
    paths = check_run_paths(config)  # a missing input or an unwritable run folder fails now, not after the model loads
    # Image paths that do not resolve: one line now under --on-error fail, a loud count under skip.
    check_image_paths("train", paths, config.image_root, config.on_error)
    train_and_report(plan, lambda: read_paths(paths, config.image_root), paths)
