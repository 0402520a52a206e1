"""Adversarial perturbations (cap, pmt, syc, leg, region), shared by `aloe adv-train` and `aloe eval --perturb`.

    from aloe_cli.perturb import KINDS, WrongAnswerPicker, perturb_record

    picker = WrongAnswerPicker(records)               # the answer pool, for records without options
    wrong = picker.pick(record, seed=0)               # a wrong option, the opposite yes/no, or another answer
    copy = perturb_record(record, "cap", wrong, seed=0)
    stage = PerturbStage(KINDS, seed=0, samples=17200)   # 1 -> N on the stage runner

The names (`KINDS`, eval's `EVAL_NAMES`, the table titles) live in `aloe_cli.perturb.names`, which
imports nothing heavy: option parsing and --help read them without loading image code. See
docs/perturb.md for what each perturbation does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aloe_cli.perturb.names import BASE, EVAL_NAMES, KINDS, PUBLISHED_COLUMNS, TITLES

if TYPE_CHECKING:
    from aloe_cli.perturb.answers import WrongAnswerPicker
    from aloe_cli.perturb.record import perturb_record
    from aloe_cli.perturb.stage import PerturbStage

_LAZY = {"WrongAnswerPicker": "aloe_cli.perturb.answers", "perturb_record": "aloe_cli.perturb.record",
         "PerturbStage": "aloe_cli.perturb.stage"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BASE", "EVAL_NAMES", "KINDS", "PUBLISHED_COLUMNS", "PerturbStage", "TITLES",
           "WrongAnswerPicker", "perturb_record"]
