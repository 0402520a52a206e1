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

from aloe_cli.mixing.recipe import CELLS, DEFAULT_TOLERANCE

NOT_AVAILABLE = -1  # group_of value of a record that was rejected
_BISECTION_STEPS = 200
_RELATIVE_EPS = 1e-9
_CHUNK = 1 << 16  # records per chunk where a per-record int64 or float64 temporary would be needed


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


@dataclass(frozen=True)
class Miss:
    """A cell whose achieved share is further than the tolerance from its target (shares of the balanced unit)."""

    cell: str
    target: float
    achieved: float
    units: int  # selected units minus the target's units in this mixture: < 0 short, > 0 over
    reason: str  # "exhausted" (all its records up to max_repeats), "no_data", "filled_gap", "whole_records"

    @property
    def difference(self) -> float:
        return self.achieved - self.target

    def to_dict(self, unit: str) -> dict:
        return {"cell": self.cell, "target_share": round(self.target, 6), "achieved_share": round(self.achieved, 6),
                "difference": round(self.difference, 6), f"{unit}_difference": self.units, "reason": self.reason}


@dataclass
class Plan:
    copies: np.ndarray  # per record read: how many times it goes into the mixture
    groups: list[Group]
    group_tallies: list[Tally]
    cell_tallies: dict[str, Tally]
    targets: dict[str, float]
    balance: str
    budget_units: float
    tolerance: float = DEFAULT_TOLERANCE
    misses: list[Miss] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def unit(self) -> str:
        return "tokens" if self.balance == "loss_tokens" else "samples"

    @property
    def targets_met(self) -> bool:
        return not self.misses

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
    total = float(units.sum(dtype=np.int64))
    if budget <= 0 or total <= 0:
        return copies
    passes = min(int(math.floor(budget / total + _RELATIVE_EPS)), int(math.floor(max_repeats)))
    copies[:] = passes
    rest = budget - passes * total
    if rest <= _RELATIVE_EPS * total:
        return copies
    order = permutation(len(units), rng)
    # A part smaller than half a record would round to nothing: a cell with a target would silently vanish.
    copies[order[:max(_closest_prefix(units, order, rest), 1 if passes == 0 else 0)]] += 1
    return copies


def permutation(n: int, rng: np.random.Generator) -> np.ndarray:
    """`rng.permutation(n)` (the same values from the same generator state) in 4 bytes an entry, not 8."""
    order = np.arange(n, dtype=np.uint32 if n < 2 ** 32 else np.int64)
    rng.shuffle(order)
    return order


def _closest_prefix(units: np.ndarray, order: np.ndarray, rest: float) -> int:
    """How many records, taken in `order`, have units closest to `rest`: the shortest prefix reaching it, or
    one record less when that is closer. Cumulative sums run over chunks so no per-record int64 array is built.
    """
    done = 0  # units of order[:start]
    for start in range(0, len(order), _CHUNK):
        running = np.cumsum(units[order[start:start + _CHUNK]], dtype=np.int64)
        running += done
        k = int(np.searchsorted(running, rest))
        if k < len(running):
            below = int(running[k - 1]) if k else done
            return start + k + (1 if running[k] - rest <= rest - below else 0)
        done = int(running[-1])
    return len(order)


# ----------------------------------------------------------------------------- the plan

def make_plan(group_of: np.ndarray, tokens: np.ndarray, groups: list[Group], targets: dict[str, float], *,
              seed: int = 0, balance: str = "loss_tokens", total_samples: int | None = None,
              total_tokens: int | None = None, tolerance: float = DEFAULT_TOLERANCE) -> Plan:
    """Copies per record for a mixture that meets `targets` (share of units per cell).

    `group_of[i]` is the group index of record i (NOT_AVAILABLE if rejected),
    `tokens[i]` its loss tokens. Apart from the result (2 bytes a record),
    the work memory is a 1-byte mask over the records plus about 12 bytes a
    record of one group at a time: no per-record index of all groups is built.
    """
    group_of = np.asarray(group_of)
    tokens = np.asarray(tokens)
    pool = _pool(group_of, tokens, groups, balance)
    shares = np.array([targets.get(cell, 0.0) for cell in CELLS])

    if total_samples is not None:
        budget = _budget_for_goal("samples", total_samples, pool, shares)
    elif total_tokens is not None:
        budget = _budget_for_goal("tokens", total_tokens, pool, shares)
    else:
        budget = _largest_exact_budget(pool, shares)
    per_cell, per_group = _allocate(budget, pool, shares)

    copies = np.zeros(len(group_of), dtype=np.uint16)
    group_tallies = []
    for g, group in enumerate(groups):
        members = group_of == g  # boolean indexing keeps input order, like an index array would
        group_tokens = tokens[members]
        units = group_tokens if balance == "loss_tokens" else np.ones(len(group_tokens), dtype=np.uint8)
        picked = pick_copies(units, per_group[g], group.max_repeats, group_rng(seed, group.source, group.cell))
        copies[members] = picked
        group_tallies.append(_tally(picked, group_tokens))
        del members, group_tokens, units, picked
    cell_tallies = {cell: Tally() for cell in CELLS}
    for group, tally in zip(groups, group_tallies):
        cell_tallies[group.cell].add(tally)
    plan = Plan(copies, groups, group_tallies, cell_tallies, dict(targets), balance, budget, tolerance)
    plan.misses = _misses(plan, pool, shares)
    plan.notes = _notes(plan, pool, per_cell, per_group, total_samples, total_tokens)
    return plan


def _pool(group_of: np.ndarray, tokens: np.ndarray, groups: list[Group], balance: str) -> _Pool:
    """Samples and loss tokens per group, summed a chunk of records at a time (bincount's float64 weights and
    the shifted group numbers would otherwise be 12 bytes a record)."""
    count = len(groups)
    samples = np.zeros(count + 1, dtype=np.int64)  # index 0 counts NOT_AVAILABLE
    token_sums = np.zeros(count + 1, dtype=np.int64)
    for start in range(0, len(group_of), _CHUNK):
        index = group_of[start:start + _CHUNK].astype(np.int64) + 1
        samples += np.bincount(index, minlength=count + 1)
        # float64 sums are exact here: a chunk's sum stays below 2**48 (2**16 counts under 2**32 each)
        token_sums += np.rint(np.bincount(index, weights=tokens[start:start + _CHUNK],
                                          minlength=count + 1)).astype(np.int64)
    samples, token_sums = samples[1:].astype(np.float64), token_sums[1:].astype(np.float64)
    units = token_sums if balance == "loss_tokens" else samples
    return _Pool(
        samples=samples,
        tokens=token_sums,
        units=units,
        caps=units * np.array([g.max_repeats for g in groups], dtype=np.float64),
        weights=np.array([g.weight for g in groups], dtype=np.float64),
        cell_of=np.array([CELLS.index(g.cell) for g in groups], dtype=np.int64),
    )


def _tally(copies: np.ndarray, tokens: np.ndarray) -> Tally:
    selected = sum(int(np.dot(copies[start:start + _CHUNK].astype(np.int64),
                              tokens[start:start + _CHUNK].astype(np.int64)))
                   for start in range(0, len(copies), _CHUNK))
    return Tally(
        samples_available=len(copies),
        tokens_available=int(tokens.sum(dtype=np.int64)),
        samples_selected=int(copies.sum(dtype=np.int64)),
        unique_selected=int(np.count_nonzero(copies)),
        tokens_selected=selected,
    )


def _misses(plan: Plan, pool: _Pool, shares: np.ndarray) -> list[Miss]:
    """Cells whose achieved share (of the selected units, as the report's table shows them) is further than the
    tolerance from the target."""
    def selected(tally: Tally) -> int:
        return tally.tokens_selected if plan.balance == "loss_tokens" else tally.samples_selected

    total = sum(selected(tally) for tally in plan.cell_tallies.values())
    exhausted = {c: pool.caps[pool.cell_of == c].sum() > 0
                 and selected(plan.cell_tallies[cell]) >= pool.caps[pool.cell_of == c].sum() * (1 - 1e-9)
                 for c, cell in enumerate(CELLS)}
    misses: list[Miss] = []
    for c, cell in enumerate(CELLS):
        achieved = selected(plan.cell_tallies[cell]) / total if total else 0.0
        if abs(achieved - shares[c]) <= plan.tolerance + 1e-12:
            continue
        short = achieved < shares[c]
        if short:
            reason = "exhausted" if exhausted[c] else "no_data" if pool.caps[pool.cell_of == c].sum() == 0 \
                else "whole_records"
        else:
            reason = "whole_records"
        units = int(round(selected(plan.cell_tallies[cell]) - shares[c] * total))
        misses.append(Miss(cell, float(shares[c]), achieved, units, reason))
    if any(m.reason in ("exhausted", "no_data") for m in misses):
        misses = [Miss(m.cell, m.target, m.achieved, m.units, "filled_gap") if m.achieved > m.target else m
                  for m in misses]
    return misses


_WHY = {
    "exhausted": "every record of its sources is in, up to max_repeats; add data or raise max_repeats",
    "no_data": "no record falls in this cell",
    "filled_gap": "it took up what {short} could not supply",
    "whole_records": "whole records cannot come closer in a mixture this small; ask for a larger total_tokens "
                     "or total_samples",
}


def describe_miss(miss: Miss, unit: str, short_cells: list[str] = ()) -> str:
    """One line for people, with the same rounding as the report's table."""
    side = "short" if miss.difference < 0 else "over"
    what = "loss tokens" if unit == "tokens" else "samples"
    why = _WHY[miss.reason].format(short=" and ".join(short_cells) or "the short cells")
    return (f"{miss.cell} misses its {miss.target:.1%} target: it has {miss.achieved:.1%} of the mixture's {what} "
            f"({side} by {abs(miss.difference) * 100:.1f} percentage points, {abs(miss.units):,} {what}); {why}.")


def _notes(plan: Plan, pool: _Pool, per_cell: np.ndarray, per_group: np.ndarray,
           total_samples: int | None, total_tokens: int | None) -> list[str]:
    unit = "loss tokens" if plan.balance == "loss_tokens" else "samples"
    empty = [miss.cell for miss in plan.misses if miss.reason in ("exhausted", "no_data")]
    notes = [describe_miss(miss, plan.unit, empty) for miss in plan.misses]
    short_cells = {CELLS.index(cell) for cell in empty}
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
