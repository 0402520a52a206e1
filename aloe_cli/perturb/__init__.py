"""Adversarial perturbations (cap, pmt, syc, leg, region), shared by `aloe adv-train` and `aloe eval --perturb`.

    from aloe_cli.perturb import KINDS, WrongAnswerPicker, perturb_record

    picker = WrongAnswerPicker(records)               # the answer pool, for records without options
    wrong = picker.pick(record, seed=0)               # a wrong option, the opposite yes/no, or another answer
    copy = perturb_record(record, "cap", wrong, seed=0)
    stage = PerturbStage(KINDS, seed=0, samples=17200)   # 1 -> N on the stage runner

See docs/perturb.md for what each perturbation does.
"""

from aloe_cli.perturb.answers import WrongAnswerPicker
from aloe_cli.perturb.record import KINDS, perturb_record
from aloe_cli.perturb.stage import PerturbStage

__all__ = ["KINDS", "PerturbStage", "WrongAnswerPicker", "perturb_record"]
