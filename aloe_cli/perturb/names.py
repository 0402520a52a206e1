"""The perturbation names, in one place for every command.

`aloe adv-train --perturb` chooses among `KINDS`; `aloe eval --perturb` among `EVAL_NAMES` (the
unperturbed run, `base`, then the kinds); the adversarial table orders and titles its columns by
them. The published robustness table (DESIGN.md) has the columns in `PUBLISHED_COLUMNS`.
"""

from __future__ import annotations

BASE = "base"  # the item as it is: the reference every perturbation is compared with
KINDS = ("cap", "pmt", "syc", "leg", "region")
EVAL_NAMES = (BASE, *KINDS)  # in the adversarial table's order
TITLES = {BASE: "Base", "cap": "Cap", "pmt": "Pmt", "syc": "Syc", "leg": "Leg", "region": "Region"}
# The published table: classification items under Base, Cap, Pmt, Syc; detection items also under Leg.
PUBLISHED_COLUMNS = {"cls": (BASE, "cap", "pmt", "syc"), "det": (BASE, "cap", "pmt", "syc", "leg")}

__all__ = ["BASE", "EVAL_NAMES", "KINDS", "PUBLISHED_COLUMNS", "TITLES"]
