"""Stage 2's data: the perturbation stage of `aloe_cli.perturb`, emitting a file training reads back.

`perturb` leaves the images it does not draw on as they were; the stage runner writes their paths so that they
resolve from the emitted file (absolute, for a file in the run folder: `adv-train`'s emit asks for that).
"""

from __future__ import annotations

from aloe_cli.perturb import PerturbStage
from aloe_cli.training.config import AdvTrainConfig


def adversarial_stage(config: AdvTrainConfig) -> PerturbStage:
    """One perturbation per record, balanced over `--perturb`, `--samples` in all, deterministic for `--seed`."""
    return PerturbStage(config.perturb_kinds(), seed=config.seed, samples=config.samples,
                        image_root=config.image_root)


__all__ = ["adversarial_stage"]
