"""aloe train's configuration: flags and YAML, the published defaults, world-size resolution, the SLURM script."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aloe_cli.errors import AloeError
from aloe_cli.training.config import TrainConfig, resolve
from support import ROOT, aloe

MODEL = "Qwen/Qwen2-VL-7B-Instruct"


def dry_run(*args: str, world: int | None = 32, **kwargs) -> subprocess.CompletedProcess:
    env = {"WORLD_SIZE": str(world)} if world is not None else {}
    return aloe("train", "-i", "mixture.jsonl", "--model", MODEL, "--output-dir", "runs/stage1", "--dry-run", *args,
                env=env, **kwargs)


def test_dry_run_resolves_the_published_recipe_for_32_ranks():
    proc = dry_run()
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    sft = resolved["sft_config"]
    assert resolved["world_size"] == 32 and resolved["effective_global_batch_size"] == 1024
    assert sft["gradient_accumulation_steps"] == 2  # 1024 / (16 x 32)
    assert sft["per_device_train_batch_size"] == 16
    assert sft["learning_rate"] == pytest.approx(3.75e-5)
    assert sft["lr_scheduler_type"] == "cosine" and sft["warmup_steps"] == pytest.approx(0.03)
    assert sft["num_train_epochs"] == 1 and sft["max_length"] == 4096 and sft["optim"] == "adamw_torch"
    assert sft["bf16"] is True and sft["fp16"] is False and sft["gradient_checkpointing"] is True
    assert sft["assistant_only_loss"] is True
    ds = resolved["deepspeed"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        16, 2, 1024)
    assert ds["bf16"]["enabled"] is True
    assert resolved["aloe"]["model"] == MODEL


def test_dry_run_does_not_import_torch():
    probe = ("import sys; sys.argv = ['aloe', 'train', '--model', 'm', '--dry-run']\n"
             "from aloe_cli.app import main\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "heavy = sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'transformers', 'deepspeed', 'trl'})\n"
             "sys.stderr.write(f'heavy imports: {heavy}\\n')\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "8"})
    assert proc.returncode == 0, proc.stderr
    assert "gradient_accumulation_steps: 8" in proc.stdout
    assert "heavy imports: []" in proc.stderr


def test_a_global_batch_that_does_not_divide_is_a_usage_error():
    proc = dry_run(world=24)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "aloe: error: Invalid value for --global-batch-size: 1024 is not a multiple of --micro-batch-size 16 x world "
        "size 24 = 384"]
    assert proc.stdout == ""


def test_world_size_defaults_to_one():
    proc = dry_run(world=None)  # the test environment has no launcher
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["world_size"] == 1 and resolved["sft_config"]["gradient_accumulation_steps"] == 64


def test_flags_override_the_yaml_and_yaml_overrides_the_defaults(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("learning_rate: 1e-5\nmicro_batch_size: 8\nprecision: fp32\ngradient_checkpointing: false\n"
                      "deepspeed: zero2\ninput: [a.jsonl, b.jsonl]\n")
    proc = dry_run("--config", str(config), "--micro-batch-size", "4", world=2)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    sft = resolved["sft_config"]
    assert sft["learning_rate"] == pytest.approx(1e-5)  # from the YAML (a string there: no dot in 1e-5)
    assert sft["per_device_train_batch_size"] == 4  # the flag wins
    assert sft["gradient_accumulation_steps"] == 128  # 1024 / (4 x 2)
    assert sft["bf16"] is False and sft["gradient_checkpointing"] is False
    assert resolved["deepspeed"]["zero_optimization"]["stage"] == 2
    assert resolved["aloe"]["input"] == ["mixture.jsonl"]  # -i given on the command line replaces the YAML list


@pytest.mark.parametrize(("content", "message"), [
    ("lr: 1e-5\n", "unknown key 'lr'"),
    ("micro_batch_size: many\n", "key 'micro_batch_size' must be int"),
    ("- a\n- b\n", "must be a mapping"),
    ("epochs: [1\n", "not valid YAML"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, content, message):
    config = tmp_path / "train.yaml"
    config.write_text(content)
    proc = dry_run("--config", str(config))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aloe: error: ") and message in lines[0], proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("--micro-batch-size", "0"), "--micro-batch-size: must be at least 1, got 0"),
    (("--precision", "fp8"), "--dtype: must be one of bfloat16, float16, float32"),
    (("--dtype", "int4"), "--dtype: must be one of bfloat16, float16, float32"),
    (("--truncate", "images"), "--truncate: must be one of none, text"),
    (("--warmup-ratio", "3"), "--warmup-ratio: must be at most 0.999"),
    (("--deepspeed", "zero9"), "--deepspeed: must be zero3, zero2, none or a DeepSpeed JSON file; no such file: zero9"),
    (("--lr-scheduler", "cosine_annealing"), "--lr-scheduler: must be one of"),
])
def test_bad_flag_values_are_usage_errors(args, message):
    proc = dry_run(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aloe: error: Invalid value for ") and message in lines[0], \
        proc.stderr


def test_a_deepspeed_file_gets_its_auto_values_filled_and_a_conflict_is_an_error(tmp_path):
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
                                "bf16": {"enabled": "auto"}}))
    proc = dry_run("--deepspeed", str(good), world=8)
    assert proc.returncode == 0, proc.stderr
    ds = yaml.safe_load(proc.stdout)["deepspeed"]
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 8
    assert ds["train_batch_size"] == 1024 and ds["bf16"]["enabled"] is True
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    proc = dry_run("--deepspeed", str(bad))
    assert proc.returncode == 1
    assert "train_micro_batch_size_per_gpu is 4 but the training flags give 16" in proc.stderr


def test_no_deepspeed_resolves_without_a_deepspeed_section():
    proc = dry_run("--deepspeed", "none")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["deepspeed"] is None


def test_the_deepspeed_launchers_local_rank_argument_is_accepted():
    # `deepspeed --module aloe_cli train ...` runs `python -m aloe_cli --local_rank=N train ...`
    proc = aloe("--local_rank=3", "train", "--model", MODEL, "--dry-run", env={"WORLD_SIZE": "4"})
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["world_size"] == 4


def test_resolve_in_python_matches_the_cli():
    plan = resolve(TrainConfig(model="m"), 32)
    assert plan.gradient_accumulation_steps == 2 and plan.effective_global_batch_size == 1024
    with pytest.raises(AloeError, match="world size 24"):
        resolve(TrainConfig(model="m"), 24)


# ----------------------------------------------------------------------------- SLURM

STUBS = {
    # srun runs its command once per node, as SLURM does with one task per node.
    # Its own options go to $STUB_LOG.srun.
    "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do echo "$1" >> "$STUB_LOG.srun"; shift; done\n'
            'for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" || exit 1; done\n',
    # A long host list: a script that stops reading after the first line must not die of SIGPIPE under pipefail.
    "scontrol": '#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] || exit 2\nseq -f "gpu-node-%02g" 7 50006\n',
    # Stands in for the Python that would start torchrun: records what each node would run.
    # One line per call, every argument in brackets so that word splitting would show.
    "python-stub": '#!/bin/bash\n'
                   '{ printf "node=%s argv=" "$SLURM_NODEID"; printf "[%s]" "$@"; echo; } >> "$STUB_LOG"\n',
}


def install_stubs(folder: Path) -> Path:
    folder.mkdir()
    for name, body in STUBS.items():
        path = folder / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return folder


def slurm_script(tmp_path, *args: str) -> str:
    proc = aloe("train", "-i", "mix ture.jsonl", "--model", MODEL, "--output-dir", "runs/stage1", "--slurm",
                "--nodes", "8", "--gpus-per-node", "4", "--learning-rate", "2e-5", "--no-gradient-checkpointing",
                *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash")
    return proc.stdout


def run_with_stubs(tmp_path, script: str) -> list[str]:
    stubs = install_stubs(tmp_path / "bin")
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_NNODES": "8", "SLURM_CPUS_PER_TASK": "48",
           "SLURM_JOB_NODELIST": "gpu-node-[07-14]", "ALOE_PYTHON": str(stubs / "python-stub"), "STUB_LOG": str(log)}
    proc = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return log.read_text().splitlines()


def test_the_sbatch_script_runs_torchrun_once_per_node_with_the_node_rank_expanded_there(tmp_path):
    script = slurm_script(tmp_path, "--sbatch", "partition=gpu", "--sbatch", "time=48:00:00")
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=48:00:00", f"#SBATCH --chdir={tmp_path}"):
        assert line in script.splitlines()
    calls = run_with_stubs(tmp_path, script)
    assert len(calls) == 8
    for node, call in enumerate(calls):
        assert call.startswith(f"node={node} argv=[-m][torch.distributed.run][--nnodes][8][--nproc-per-node][4]"
                               f"[--node-rank][{node}][--master-addr][gpu-node-07][--master-port][29500]"
                               "[-m][aloe_cli][train]")
        # the same flags, passed through (a path with a space arrives as one argument)
        assert call.endswith("[train][--input][mix ture.jsonl][--model][Qwen/Qwen2-VL-7B-Instruct]"
                             "[--output-dir][runs/stage1][--learning-rate][2e-05][--no-gradient-checkpointing]")


def test_the_sbatch_script_gives_the_task_a_nodes_cpus_and_srun_passes_them_on(tmp_path):
    # sinfo reports two node sizes in the partition: the job asks for the smaller, so it fits on every node.
    stubs = tmp_path / "sinfo-bin"
    stubs.mkdir()
    sinfo = stubs / "sinfo"
    sinfo.write_text('#!/bin/bash\necho "$@" > "$(dirname "$0")/args"\n'
                     'if [[ "$*" == *--partition* ]]; then printf "96 gpu\\n64 gpu\\n96 gpu\\n"\n'
                     'else printf "8 debug\\n128 cpu*\\n96 gpu\\n"; fi\n')
    sinfo.chmod(0o755)
    path = {"PATH": f"{stubs}:{os.environ['PATH']}"}
    proc = aloe("train", "--model", MODEL, "--slurm", "--nodes", "8", "--gpus-per-node", "4", "--sbatch",
                "partition=gpu", cwd=tmp_path, env=path)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --cpus-per-task=64" in proc.stdout.splitlines()
    assert "a node's CPUs per sinfo, partition gpu" in proc.stdout and "note" not in proc.stderr
    assert (stubs / "args").read_text().split() == ["--noheader", "--Node", "--format=%c", "%P", "--partition",
                                                    "gpu"]
    script = proc.stdout
    # no partition named: the default one, which sinfo marks with *
    proc = aloe("train", "--model", MODEL, "--slurm", "--nodes", "8", "--gpus-per-node", "4", cwd=tmp_path, env=path)
    assert proc.returncode == 0 and "#SBATCH --cpus-per-task=128" in proc.stdout.splitlines()
    assert "partition cpu" in proc.stdout
    # srun hands the task's CPUs to the step itself (some SLURM releases do not pass them on).
    run_with_stubs(tmp_path, script)
    assert "--cpus-per-task=48" in (tmp_path / "calls.log.srun").read_text().split()


def test_cpus_per_task_can_be_set_and_falls_back_to_this_machine_with_a_note(tmp_path):
    script = slurm_script(tmp_path, "--cpus-per-task", "24")
    assert "#SBATCH --cpus-per-task=24" in script.splitlines()
    script = slurm_script(tmp_path, "--sbatch", "cpus-per-task=32")
    assert [line for line in script.splitlines() if "#SBATCH --cpus-per-task" in line] == ["#SBATCH --cpus-per-task=32"]
    # No sinfo that answers: this machine's count, said on stderr (stdout is the script only).
    stubs = tmp_path / "no-sinfo"
    stubs.mkdir()
    (stubs / "sinfo").write_text("#!/bin/bash\nexit 1\n")
    (stubs / "sinfo").chmod(0o755)
    proc = aloe("train", "--model", MODEL, "--slurm", "--nodes", "8", "--gpus-per-node", "4", cwd=tmp_path,
                env={"PATH": f"{stubs}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    assert f"#SBATCH --cpus-per-task={os.cpu_count()}" in proc.stdout.splitlines()
    assert "sinfo is not available here" in proc.stderr and "give --cpus-per-task N" in proc.stderr
    proc = aloe("train", "--model", MODEL, "--slurm", "--cpus-per-task", "0", cwd=tmp_path)
    assert proc.returncode == 2 and "--cpus-per-task" in proc.stderr


def test_the_sbatch_script_can_use_accelerate_launch(tmp_path):
    calls = run_with_stubs(tmp_path, slurm_script(tmp_path, "--launcher", "accelerate"))
    assert calls[3].startswith("node=3 argv=[-m][accelerate.commands.launch][--multi_gpu][--num_machines][8]"
                               "[--num_processes][32][--machine_rank][3][--main_process_ip][gpu-node-07]")
    assert "[--module][aloe_cli][train][--input][mix ture.jsonl]" in calls[3]


def test_slurm_checks_the_global_batch_against_the_jobs_world_size(tmp_path):
    proc = aloe("train", "--model", MODEL, "--slurm", "--nodes", "8", "--gpus-per-node", "3", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "world size 24 = 384" in proc.stderr


def test_shipped_example_scripts_are_valid_bash():
    examples = sorted((ROOT / "examples" / "slurm").glob("*.sbatch"))
    assert examples
    for path in examples:
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, (path, proc.stderr)


TRL_SFT_YAML = """\
# a `trl sft` config, as TRL's documentation writes one
model_name_or_path: Qwen/Qwen2-VL-7B-Instruct
dataset_name: HuggingFaceH4/llava-instruct-mix-vsft
per_device_train_batch_size: 8
gradient_accumulation_steps: 4
learning_rate: 2.0e-4
lr_scheduler_type: cosine
warmup_ratio: 0.03
num_train_epochs: 1
max_length: 2048
bf16: true
gradient_checkpointing: true
deepspeed: zero3
output_dir: runs/qwen2-vl-sft
use_peft: true
lora_r: 32
lora_alpha: 16
lora_dropout: 0.1
lora_target_modules: [q_proj, v_proj]
"""


def test_a_trl_sft_config_is_read_as_is_and_the_mapping_printed(tmp_path):
    config = tmp_path / "trl_sft.yaml"
    config.write_text(TRL_SFT_YAML)
    proc = aloe("train", "--config", str(config), "--dry-run", env={"WORLD_SIZE": "2"})
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    sft, settings = resolved["sft_config"], resolved["aloe"]
    assert (sft["per_device_train_batch_size"], sft["gradient_accumulation_steps"]) == (8, 4)
    assert resolved["effective_global_batch_size"] == 64  # 8 x 4 x 2 ranks, as TRL computes it
    assert sft["learning_rate"] == pytest.approx(2e-4) and sft["max_length"] == 2048 and sft["bf16"] is True
    assert settings["model"] == "Qwen/Qwen2-VL-7B-Instruct" and settings["input"] == [
        "HuggingFaceH4/llava-instruct-mix-vsft"]
    assert settings["dtype"] == "bfloat16" and settings["output_dir"] == "runs/qwen2-vl-sft"
    assert (settings["lora"], settings["lora_r"], settings["lora_alpha"]) == (True, 32, 16)
    assert settings["lora_target_modules"] == "q_proj,v_proj"
    assert resolved["peft"]["r"] == 32 and resolved["peft"]["target_modules"] == ["q_proj", "v_proj"]
    assert proc.stderr.splitlines() == [
        f"aloe train: {config}: keys read as aloe's:",
        "  bf16: true -> --dtype bfloat16",
        "  model_name_or_path -> --model",
        "  dataset_name -> --input",
        "  per_device_train_batch_size -> --micro-batch-size",
        "  lr_scheduler_type -> --lr-scheduler",
        "  num_train_epochs -> --epochs",
        "  use_peft -> --lora"]


@pytest.mark.parametrize(("content", "message"), [
    ("learnig_rate: 1e-5\n", "unknown key 'learnig_rate'; did you mean 'learning_rate'?"),
    ("per_device_train_batch: 4\n",
     "unknown key 'per_device_train_batch'; did you mean 'per_device_train_batch_size'?"),
    ("learning_rate: 1e-5\nseed: 1\nlearning_rate: 2e-5\n",
     "line 3: key 'learning_rate' given twice (first on line 1)"),
    ("bf16: true\nfp16: true\n", "keys 'bf16' and 'fp16' are both true: choose one"),
    ("bf16: true\ndtype: float32\n", "keys 'bf16' and 'dtype' both set the precision: keep one"),
    ("micro_batch_size: 4\nper_device_train_batch_size: 8\n",
     "keys 'micro_batch_size' and 'per_device_train_batch_size' both set 'micro_batch_size': keep one"),
])
def test_config_mistakes_are_one_line_errors_with_a_suggestion(tmp_path, content, message):
    config = tmp_path / "train.yaml"
    config.write_text(content)
    proc = dry_run("--config", str(config))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"aloe: error: {config}: {message}"]


def test_a_binary_config_file_is_a_one_line_error(tmp_path):
    config = tmp_path / "model.safetensors"
    config.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    proc = dry_run("--config", str(config))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"aloe: error: {config}: not a text file (byte 0: invalid start byte); --config takes a YAML file"]


def test_precision_has_one_vocabulary_and_on_error_fails_by_default(tmp_path):
    """--dtype bfloat16|float16|float32 as in eval, infer, score and perplexity; train's former --precision and the
    short names are aliases. A bad record stops every command unless --on-error skip is given."""
    for args in (("--dtype", "float16"), ("--precision", "fp16"), ("--dtype", "FP16")):
        proc = dry_run(*args)
        assert proc.returncode == 0, proc.stderr
        resolved = yaml.safe_load(proc.stdout)
        assert resolved["aloe"]["dtype"] == "float16" and resolved["sft_config"]["fp16"] is True, args
        assert resolved["aloe"]["on_error"] == "fail"
    config = tmp_path / "old.yaml"
    config.write_text("precision: fp32\n")
    proc = dry_run("--config", str(config))
    assert proc.returncode == 0 and yaml.safe_load(proc.stdout)["aloe"]["dtype"] == "float32"
    assert "  precision -> --dtype" in proc.stderr
    from aloe_cli.modeling.loading import canonical_dtype

    assert [canonical_dtype(name) for name in ("bf16", "bfloat16", "auto", "int8")] == [
        "bfloat16", "bfloat16", "auto", None]


def test_lora_options_need_lora_and_accumulation_excludes_the_global_batch():
    proc = dry_run("--lora-r", "8")
    assert proc.returncode == 2 and "--lora-r: needs --lora (LoRA is off)" in proc.stderr
    proc = dry_run("--gradient-accumulation-steps", "2", "--global-batch-size", "64")
    assert proc.returncode == 2 and "--gradient-accumulation-steps: and --global-batch-size exclude each other" in (
        proc.stderr)
    proc = dry_run("--load-in-4bit")  # QLoRA is LoRA
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["aloe"]["lora"] is True
