"""Per-source thresholds shared by the model-backed filters (`perplexity`, `score`).

A thresholds file (YAML or JSON) maps a source name to bounds; `default`
applies to every source without an entry of its own:

    default: {min: p2, max: p98}     # percentiles of each source's own distribution
    slake:   {min: 1.5, max: 40}     # absolute values
    pmc_vqa: {max: null}             # null switches a bound off for this source

A bound is a number (absolute) or `pN` (the N-th percentile, 0 <= N <= 100,
of that source's values in this run). A source entry overrides `default`
key by key. One file can also hold several stages in sections:

    perplexity: {default: {min: p2, max: p98}}
    score:      {default: {min: 3}}

Percentiles need the whole distribution before the first decision: a stage
whose thresholds use them declares `measure_first`, and the stage runner
(`data.stage`) annotates its whole shard first, spooled to disk, before it
decides (memory stays flat: only the values, 8 bytes each, are kept).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aloe_cli.data.io import Item, source_name
from aloe_cli.data.stage import Distribution
from aloe_cli.errors import AloeError

DEFAULT_KEY = "default"
STAGE_SECTIONS = ("perplexity", "score")
PERCENTILE_PATTERN = re.compile(r"^p(\d+(?:\.\d+)?)$", re.IGNORECASE)


@dataclass(frozen=True)
class Percentile:
    """A bound given as the q-th percentile (0..100) of a source's values."""

    q: float

    def __str__(self) -> str:
        return f"p{self.q:g}"


Bound = float | Percentile | None


@dataclass(frozen=True)
class Bounds:
    """Bounds as written in the file (numbers or percentiles). None means no bound."""

    min: Bound = None
    max: Bound = None

    def uses_percentiles(self) -> bool:
        return isinstance(self.min, Percentile) or isinstance(self.max, Percentile)


@dataclass(frozen=True)
class Limits:
    """Bounds resolved to numbers for one source. None means no bound."""

    min: float | None = None
    max: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {"min": self.min, "max": self.max}


@dataclass
class Thresholds:
    """The bounds of one stage: per source, with a default."""

    stage: str
    by_source: dict[str, Bounds] = field(default_factory=dict)
    default: Bounds = field(default_factory=Bounds)
    origin: str = "built-in defaults"

    def bounds_for(self, source: str) -> Bounds:
        own = self.by_source.get(source)
        if own is None:
            return self.default
        return own

    def needs_distribution(self) -> bool:
        return self.default.uses_percentiles() or any(b.uses_percentiles() for b in self.by_source.values())

    def resolve(self, distribution: Distribution | None) -> ResolvedThresholds:
        if self.needs_distribution() and (distribution is None or not distribution.complete):
            raise RuntimeError("percentile thresholds need the whole distribution first (Stage.measure_first)")
        return ResolvedThresholds(self, distribution)


class ResolvedThresholds:
    """Numbers per source, percentiles computed on first use from the completed distribution."""

    def __init__(self, thresholds: Thresholds, distribution: Distribution | None):
        self.thresholds = thresholds
        self.distribution = distribution
        self._cache: dict[str, Limits] = {}

    def limits_for(self, source: str) -> Limits:
        limits = self._cache.get(source)
        if limits is None:
            bounds = self.thresholds.bounds_for(source)
            limits = Limits(self._number(bounds.min, source), self._number(bounds.max, source))
            self._cache[source] = limits
        return limits

    def _number(self, bound: Bound, source: str) -> float | None:
        if isinstance(bound, Percentile):
            return self.distribution.percentile(source, bound.q) if self.distribution is not None else None
        return bound

    def resolved(self) -> dict[str, dict[str, float | None]]:
        """Every limit used so far, for the summary."""
        return {source: limits.to_dict() for source, limits in sorted(self._cache.items())}


def check_value(value: float, limits: Limits) -> str | None:
    """'below' the min, 'above' the max, or None when within bounds (bounds themselves are kept)."""
    if limits.min is not None and value < limits.min:
        return "below"
    if limits.max is not None and value > limits.max:
        return "above"
    return None


# ----------------------------------------------------------------------------- reading the file

def load_thresholds(path: str | os.PathLike, stage: str, *, allowed: tuple[str, ...] = ("min", "max"),
                    default: Bounds | None = None, value_range: tuple[float, float] | None = None) -> Thresholds:
    """Read and validate a thresholds file for `stage`. Raises AloeError naming the file and key.

    `default` is the stage's own default bounds (used when the file has no
    `default` entry); `value_range` rejects absolute bounds outside it.
    """
    data = _read_mapping(Path(path))
    return parse_thresholds(data, stage, origin=str(path), allowed=allowed, default=default,
                            value_range=value_range)


def _read_mapping(path: Path) -> Any:
    import yaml

    from aloe_cli.data.textfile import read_text_file

    text = read_text_file(path, "thresholds file")
    try:
        return yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise AloeError(f"{path}{where}: not valid YAML/JSON ({problem})") from None


def parse_thresholds(data: Any, stage: str, *, origin: str = "<thresholds>", allowed: tuple[str, ...] = ("min", "max"),
                     default: Bounds | None = None, value_range: tuple[float, float] | None = None) -> Thresholds:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise AloeError(f"{origin}: expected a mapping of source -> {{min, max}}, got {type(data).__name__}")
    data = _stage_section(data, stage, origin)
    thresholds = Thresholds(stage=stage, default=default or Bounds(), origin=origin)
    written: dict[str, tuple[Bounds, Mapping]] = {}
    for key, entry in data.items():
        source = str(key)
        bounds = _parse_bounds(entry, f"{origin}: {source}", allowed, value_range)
        if source == DEFAULT_KEY:
            thresholds.default = _checked_order(_overlay(bounds, thresholds.default, entry), f"{origin}: {source}")
        else:
            written[source] = (bounds, entry)
    # A source entry falls back to `default` key by key (an explicit null stays null).
    for source, (bounds, entry) in written.items():
        thresholds.by_source[source] = _checked_order(_overlay(bounds, thresholds.default, entry),
                                                      f"{origin}: {source}")
    return thresholds


def _stage_section(data: Mapping, stage: str, origin: str) -> Mapping:
    """A file sectioned by stage (every top-level key is a stage name) -> this stage's section."""
    if not data or not all(key in STAGE_SECTIONS for key in data):
        return data
    section = data.get(stage)
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise AloeError(f"{origin}: section '{stage}' must be a mapping of source -> bounds")
    return section


def _overlay(bounds: Bounds, fallback: Bounds, entry: Mapping) -> Bounds:
    return Bounds(min=bounds.min if "min" in entry else fallback.min,
                  max=bounds.max if "max" in entry else fallback.max)


def _parse_bounds(entry: Any, where: str, allowed: tuple[str, ...],
                  value_range: tuple[float, float] | None) -> Bounds:
    if not isinstance(entry, Mapping):
        raise AloeError(f"{where}: expected a mapping like {{min: ..., max: ...}}, got {entry!r}")
    unknown = [str(key) for key in entry if key not in allowed]
    if unknown:
        raise AloeError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(allowed)})")
    return Bounds(_parse_bound(entry.get("min"), f"{where}.min", value_range),
                  _parse_bound(entry.get("max"), f"{where}.max", value_range))


def _checked_order(bounds: Bounds, where: str) -> Bounds:
    """min above max (after falling back to `default`) would reject everything: refuse it."""
    low, high = bounds.min, bounds.max
    if isinstance(low, float) and isinstance(high, float) and low > high:
        raise AloeError(f"{where}: min {low:g} is greater than max {high:g}")
    if isinstance(low, Percentile) and isinstance(high, Percentile) and low.q > high.q:
        raise AloeError(f"{where}: min {low} is above max {high}")
    return bounds


def _parse_bound(value: Any, where: str, value_range: tuple[float, float] | None) -> Bound:
    if value is None:
        return None
    if isinstance(value, bool):
        raise AloeError(f"{where}: expected a number or a percentile like p2, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
        if not math.isfinite(number):
            raise AloeError(f"{where}: must be a finite number, got {value!r}")
        if value_range is not None and not value_range[0] <= number <= value_range[1]:
            raise AloeError(f"{where}: {number:g} is outside {value_range[0]:g}..{value_range[1]:g}")
        return number
    if isinstance(value, str):
        match = PERCENTILE_PATTERN.match(value.strip())
        if match is not None:
            q = float(match.group(1))
            if not 0 <= q <= 100:
                raise AloeError(f"{where}: percentile must be within p0..p100, got {value!r}")
            return Percentile(q)
    raise AloeError(f"{where}: expected a number or a percentile like p2, got {value!r}")


def describe_bound(bound: Bound) -> str:
    return "-" if bound is None else str(bound) if isinstance(bound, Percentile) else f"{bound:g}"


# ----------------------------------------------------------------------------- sources

def source_of(item: Item) -> str:
    """The record's `source`, else the name of the input it came from."""
    record = item.record or {}
    source = record.get("source")
    if source not in (None, ""):
        return str(source)
    return "stdin" if item.input in ("<stdin>", "-") else source_name(item.input)


__all__ = [
    "Bounds", "Distribution", "Limits", "Percentile", "ResolvedThresholds", "Thresholds", "check_value",
    "describe_bound", "load_thresholds", "parse_thresholds", "source_of",
]
