"""Deciding how many copies of each record go into the mixture (pure numpy, no I/O).

The records are grouped by (source, cell). Balancing works in *units*: loss
tokens by default, samples with `balance: samples`.

1. Size. With `total_tokens` or `total_samples` the unit budget T is found by
   bisection (the achieved size is monotone in T). Without either, T is the
   largest budget at which every cell that has data meets its share exactly
   (so nothing is repeated beyond `max_repeats`).
2. Cells. T is split over the four cells by their target shares, no cell above
   its capacity (units available x max_repeats of its sources). What a short
   cell cannot take is spread over the others in proportion to their targets
   ("water filling"), so the total stays as requested and the shortfall is
   reported, not hidden.
3. Sources. A cell's budget is split over its sources by weight, the same way.
4. Records. A source with budget B and A units available gets floor(B / A)
   complete passes over its records (never more than max_repeats) plus a
   random subset, without replacement, whose units come closest to the rest.

Everything random is drawn from generators seeded by (seed, source, cell), so
a plan depends only on the seed and the data, and changing one source does not
reshuffle the others.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np

from aloe_cli.mixing.recipe import CELLS

NOT_AVAILABLE = -1  # group_of value of a record that was rejected
_BISECTION_STEPS = 200
_RELATIVE_EPS = 1e-9


@dataclass(frozen=True)
class Group:
    """The records of one source that fall into one cell."""

    source: str
    cell: str
    weight: float = 1.0
    max_repeats: float = 1.0


@dataclass
class Tally:
    """Samples and loss tokens of a group or cell, before (available) and after (selected) mixing."""

    samples_available: int = 0
    tokens_available: int = 0
    samples_selected: int = 0  # copies included
    unique_selected: int = 0
    tokens_selected: int = 0  # copies included

    def add(self, other: Tally) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def repeat_factor(self) -> float:
        """Selected / available loss tokens (1.0 = every token once; < 1 = subsampled)."""
        return self.tokens_selected / self.tokens_available if self.tokens_available else 0.0


@dataclass
class Plan:
    copies: np.ndarray  # per record read: how many times it goes into the mixture
    groups: list[Group]
    group_tallies: list[Tally]
    cell_tallies: dict[str, Tally]
    targets: dict[str, float]
    balance: str
    budget_units: float
    notes: list[str] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return int(self.copies.sum(dtype=np.int64))

    def shares(self, which: str) -> dict[str, float]:
        """Loss-token share per cell, `which` = 'available' or 'selected'."""
        totals = {cell: getattr(t, f"tokens_{which}") for cell, t in self.cell_tallies.items()}
        grand = sum(totals.values())
        return {cell: (value / grand if grand else 0.0) for cell, value in totals.items()}


# ----------------------------------------------------------------------------- allocation

def water_fill(budget: float, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Split `budget` in proportion to `weights` with no entry above its cap.

    An entry that reaches its cap keeps it, and the rest of the budget is split
    again among the others, until the budget is spent or everyone is capped.
    """
    weights = np.asarray(weights, dtype=np.float64)
    caps = np.asarray(caps, dtype=np.float64)
    alloc = np.zeros(len(weights))
    open_ = (weights > 0) & (caps > 0)
    remaining = float(budget)
    while open_.any() and remaining > 0:
        want = remaining / weights[open_].sum() * weights
        capped = open_ & (want >= caps)
        if not capped.any():
            alloc[open_] = want[open_]
            break
        alloc[capped] = caps[capped]
        remaining -= float(caps[capped].sum())
        open_ &= ~capped
    return alloc


@dataclass
class _Pool:
    """Per-group sums the allocation needs."""

    samples: np.ndarray
    tokens: np.ndarray
    units: np.ndarray
    caps: np.ndarray
    weights: np.ndarray
    cell_of: np.ndarray  # index into CELLS

    def cell_caps(self) -> np.ndarray:
        return np.bincount(self.cell_of, weights=self.caps, minlength=len(CELLS))


def _allocate(budget: float, pool: _Pool, shares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Units per cell, then per group."""
    per_cell = water_fill(budget, shares, pool.cell_caps())
    per_group = np.zeros(len(pool.units))
    for c in range(len(CELLS)):
        members = np.flatnonzero(pool.cell_of == c)
        if len(members):
            per_group[members] = water_fill(per_cell[c], pool.weights[members], pool.caps[members])
    return per_cell, per_group


def _largest_exact_budget(pool: _Pool, shares: np.ndarray) -> float:
    """The largest budget at which every targeted cell with data gets exactly its share."""
    caps = pool.cell_caps()
    usable = (shares > 0) & (caps > 0)
    if not usable.any():
        return 0.0
    level = float(np.min(caps[usable] / shares[usable]))
    return level * float(shares[usable].sum())


def _budget_for_goal(goal_kind: str, goal: int, pool: _Pool, shares: np.ndarray) -> float:
    """The unit budget whose allocation yields `goal` samples or loss tokens (bisection)."""
    measure = pool.samples if goal_kind == "samples" else pool.tokens
    per_unit = np.divide(measure, pool.units, out=np.zeros(len(pool.units)), where=pool.units > 0)

    def achieved(budget: float) -> float:
        return float((_allocate(budget, pool, shares)[1] * per_unit).sum())

    low, high = 0.0, float(pool.caps.sum())
    if achieved(high) <= goal:
        return high
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if achieved(middle) < goal:
            low = middle
        else:
            high = middle
        if high - low <= _RELATIVE_EPS * high:
            break
    return high


# ----------------------------------------------------------------------------- selection

def group_rng(seed: int, source: str, cell: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"{source}\0{cell}".encode())])


def output_rng(seed: int) -> np.random.Generator:
    """The generator of the output order (independent of every group's)."""
    return np.random.default_rng([seed, zlib.crc32(b"\0aloe mix output order")])


def pick_copies(units: np.ndarray, budget: float, max_repeats: float, rng: np.random.Generator) -> np.ndarray:
    """Copies per record of one group so that their units come as close as possible to `budget`."""
    copies = np.zeros(len(units), dtype=np.uint16)
    total = float(units.sum())
    if budget <= 0 or total <= 0:
        return copies
    passes = min(int(math.floor(budget / total + _RELATIVE_EPS)), int(math.floor(max_repeats)))
    copies[:] = passes
    rest = budget - passes * total
    if rest <= _RELATIVE_EPS * total:
        return copies
    order = rng.permutation(len(units))
    running = np.cumsum(units[order], dtype=np.int64)
    take = int(np.searchsorted(running, rest))  # shortest prefix reaching `rest` is take + 1 records
    if take < len(units):
        below = running[take - 1] if take else 0.0
        if running[take] - rest <= rest - below:
            take += 1
    copies[order[:take]] += 1
    return copies


# ----------------------------------------------------------------------------- the plan

def make_plan(group_of: np.ndarray, tokens: np.ndarray, groups: list[Group], targets: dict[str, float], *,
              seed: int = 0, balance: str = "loss_tokens", total_samples: int | None = None,
              total_tokens: int | None = None) -> Plan:
    """Copies per record for a mixture that meets `targets` (share of units per cell).

    `group_of[i]` is the group index of record i (NOT_AVAILABLE if rejected),
    `tokens[i]` its loss tokens. Apart from the result (2 bytes a record), the
    work arrays are one index per record plus one group at a time.
    """
    group_of = np.asarray(group_of)
    tokens = np.asarray(tokens)
    members = _members(group_of, len(groups))

    def units_of(rows: np.ndarray) -> np.ndarray:
        return tokens[rows] if balance == "loss_tokens" else np.ones(len(rows), dtype=np.int64)

    pool = _pool(members, tokens, units_of, groups)
    shares = np.array([targets.get(cell, 0.0) for cell in CELLS])

    if total_samples is not None:
        budget = _budget_for_goal("samples", total_samples, pool, shares)
    elif total_tokens is not None:
        budget = _budget_for_goal("tokens", total_tokens, pool, shares)
    else:
        budget = _largest_exact_budget(pool, shares)
    per_cell, per_group = _allocate(budget, pool, shares)

    copies = np.zeros(len(group_of), dtype=np.uint16)
    for g, group in enumerate(groups):
        rows = members[g]
        copies[rows] = pick_copies(units_of(rows), per_group[g], group.max_repeats,
                                   group_rng(seed, group.source, group.cell))
    group_tallies = [_tally(copies[rows], tokens[rows]) for rows in members]
    cell_tallies = {cell: Tally() for cell in CELLS}
    for group, tally in zip(groups, group_tallies):
        cell_tallies[group.cell].add(tally)
    plan = Plan(copies, groups, group_tallies, cell_tallies, dict(targets), balance, budget)
    plan.notes = _notes(plan, pool, per_cell, per_group, shares, total_samples, total_tokens)
    return plan


def _members(group_of: np.ndarray, group_count: int) -> list[np.ndarray]:
    """Record indices of each group, in input order (rejected records, NOT_AVAILABLE, sort first)."""
    order = np.argsort(group_of, kind="stable")
    sizes = np.bincount(group_of + 1, minlength=group_count + 1)  # index 0 counts NOT_AVAILABLE
    bounds = np.cumsum(sizes)
    return [order[bounds[g]:bounds[g + 1]] for g in range(group_count)]


def _pool(members: list[np.ndarray], tokens: np.ndarray, units_of, groups: list[Group]) -> _Pool:
    unit_sums = np.array([float(units_of(rows).sum(dtype=np.int64)) for rows in members])
    return _Pool(
        samples=np.array([float(len(rows)) for rows in members]),
        tokens=np.array([float(tokens[rows].sum(dtype=np.int64)) for rows in members]),
        units=unit_sums,
        caps=unit_sums * np.array([g.max_repeats for g in groups], dtype=np.float64),
        weights=np.array([g.weight for g in groups], dtype=np.float64),
        cell_of=np.array([CELLS.index(g.cell) for g in groups], dtype=np.int64),
    )


def _tally(copies: np.ndarray, tokens: np.ndarray) -> Tally:
    return Tally(
        samples_available=len(copies),
        tokens_available=int(tokens.sum(dtype=np.int64)),
        samples_selected=int(copies.sum(dtype=np.int64)),
        unique_selected=int(np.count_nonzero(copies)),
        tokens_selected=int((copies.astype(np.int64) * tokens).sum()),
    )


def _notes(plan: Plan, pool: _Pool, per_cell: np.ndarray, per_group: np.ndarray, shares: np.ndarray,
           total_samples: int | None, total_tokens: int | None) -> list[str]:
    unit = "loss tokens" if plan.balance == "loss_tokens" else "samples"
    notes = []
    budget = plan.budget_units
    short_cells = set()
    for c, cell in enumerate(CELLS):
        wanted = shares[c] * budget
        if shares[c] > 0 and per_cell[c] < wanted * (1 - 1e-6):
            short_cells.add(c)
            got = per_cell[c] / budget if budget else 0.0
            notes.append(f"{cell} cannot reach its {shares[c]:.1%} target: it supplies {got:.1%} "
                         f"(short by {wanted - per_cell[c]:,.0f} {unit}, {shares[c] - got:.1%} of the mixture); "
                         "the other cells were scaled up to fill the gap. Add data or raise max_repeats of its "
                         "sources.")
    for g, group in enumerate(plan.groups):
        cell = pool.cell_of[g]
        if cell in short_cells:
            continue  # every source of a short cell is exhausted; the cell's note says it
        fair = per_cell[cell] * pool.weights[g] / pool.weights[pool.cell_of == cell].sum()
        if per_group[g] < fair * (1 - 1e-6):
            notes.append(f"source {group.source} ({group.cell}) supplies only {per_group[g]:,.0f} of its "
                         f"{fair:,.0f} weighted {unit} in the cell (max_repeats {group.max_repeats:g}); the cell's "
                         "other sources made up the difference.")
    if total_samples is not None and plan.samples < total_samples * 0.99:
        notes.append(f"total_samples {total_samples:,} is out of reach: the mixture has {plan.samples:,} samples "
                     "with these sources and max_repeats.")
    selected_tokens = sum(t.tokens_selected for t in plan.group_tallies)
    if total_tokens is not None and selected_tokens < total_tokens * 0.99:
        notes.append(f"total_tokens {total_tokens:,} is out of reach: the mixture has {selected_tokens:,} loss "
                     "tokens with these sources and max_repeats.")
    return notes
