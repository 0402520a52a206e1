"""Stage 2's data: the perturbation stage of `aloe_cli.perturb`, emitting a file training reads back.

`perturb` leaves the images it does not draw on as they were, so a relative
path would resolve against the emitted file's folder when it is read back,
not against the input's. The stage here makes those paths absolute first.
"""

from __future__ import annotations

from aloe_cli.data.images import resolve_path
from aloe_cli.data.io import Item
from aloe_cli.perturb import PerturbStage
from aloe_cli.training.config import AdvTrainConfig


class AdversarialStage(PerturbStage):
    """PerturbStage whose records name their images by absolute path (or embed them)."""

    def annotate(self, batch: list[Item]) -> None:
        for item in batch:
            images = item.record.get("images")
            if images:
                root = item.image_root if item.image_root is not None else self.image_root
                item.record["images"] = [
                    str(resolve_path(entry, root).absolute()) if isinstance(entry, str) and not
                    entry.startswith("data:") else entry for entry in images]
        super().annotate(batch)


def adversarial_stage(config: AdvTrainConfig) -> AdversarialStage:
    """One perturbation per record, balanced over `--perturb`, `--samples` in all, deterministic for `--seed`."""
    return AdversarialStage(config.perturb_kinds(), seed=config.seed, samples=config.samples,
                            image_root=config.image_root)


__all__ = ["AdversarialStage", "adversarial_stage"]
