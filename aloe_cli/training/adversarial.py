"""Stage 2's data: the perturbation stage of `aloe_cli.perturb`, emitting a file training reads back, and the
clean records replayed beside it.

`perturb` leaves the images it does not draw on as they were; the stage runner writes their paths so that they
resolve from the emitted file (absolute, for a file in the run folder: `adv-train`'s emit asks for that).

Replay (`--replay FILE --replay-share S`): a share S of stage 2's training
records are clean records (stage 1's mixture, say), drawn uniformly at random
for the seed, so a small model does not forget what stage 1 taught it while it
learns to ignore misleading hints. With P perturbed samples, P * S / (1 - S) (rounded)
records are drawn (reservoir sampling: one pass, memory for the sample only).
"""

from __future__ import annotations

from collections.abc import Iterable

from aloe_cli.data.io import Item
from aloe_cli.data.stage import RunSummary
from aloe_cli.perturb import PerturbStage
from aloe_cli.perturb.keys import record_rng
from aloe_cli.training.config import AdvTrainConfig


def adversarial_stage(config: AdvTrainConfig) -> PerturbStage:
    """One perturbation per record, balanced over `--perturb`, `--samples` in all, deterministic for `--seed`."""
    return PerturbStage(config.perturb_kinds(), seed=config.seed, samples=config.samples,
                        image_root=config.image_root)


def shortfall(summary: RunSummary, samples: int | None) -> str | None:
    """Why fewer than `samples` perturbed samples were emitted, with the counts per kind; None when none are missing."""
    if samples is None or summary.emitted >= samples:
        return None
    kinds = summary.extra.get("kinds") or {}
    rejected = {reason: n for reason, n in sorted(summary.reasons.items()) if reason != "sample_limit"}
    why = f"the input holds {summary.read} record(s), each perturbed once"
    if rejected:
        why += "; " + ", ".join(f"{n} {reason}" for reason, n in rejected.items()) + " could not be perturbed"
    skipped = summary.extra.get("skipped") or {}
    if skipped:
        why += "; kinds that did not apply: " + ", ".join(
            f"{kind} ({', '.join(f'{r} {n}' for r, n in reasons.items())})" for kind, reasons in skipped.items())
    per_kind = ", ".join(f"{kind} {n}" for kind, n in kinds.items())
    return f"{summary.emitted} perturbed sample(s) emitted of --samples {samples} ({per_kind}): {why}"


def replay_count(perturbed: int, share: float) -> int:
    """How many clean records make `share` of a training set that holds `perturbed` perturbed ones."""
    return int(perturbed * share / (1 - share) + 0.5) if share > 0 else 0  # half up


def replay_sample(items: Iterable[Item], count: int, seed: int) -> tuple[list[Item], int]:
    """`count` items drawn uniformly at random for `seed` (all of them when there are fewer), and how many were read."""
    rng = record_rng(seed, "", "replay")
    chosen: list[Item] = []
    read = 0
    for read, item in enumerate(items, start=1):
        if len(chosen) < count:
            chosen.append(item)
        else:
            slot = rng.randrange(read)
            if slot < count:
                chosen[slot] = item
    return chosen, read


__all__ = ["adversarial_stage", "replay_count", "replay_sample", "shortfall"]
