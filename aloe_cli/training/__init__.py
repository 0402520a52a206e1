"""Stage-1 and stage-2 SFT on TRL + DeepSpeed ZeRO-3 (`aloe train`, `aloe adv-train`) and SLURM launch scripts."""
