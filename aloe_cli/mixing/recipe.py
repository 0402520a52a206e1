"""The mixing recipe: what to mix, in which proportions, counted with which tokenizer.

A recipe is a YAML file (see docs/mix.md) or, for small jobs, built from
command-line options (`inline_recipe`). Every mistake is reported as one line
that names the file and the key, e.g. `recipe.yaml: sources[2].domain: must
be 'medical' or 'general', got 'medicine'`.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aloe_cli.data.grounding import BBOX_FORMATS
from aloe_cli.data.records import DOMAINS
from aloe_cli.errors import AloeError

MODALITIES = ("multimodal", "text")
CELLS = tuple(f"{domain}/{modality}" for domain in DOMAINS for modality in MODALITIES)
BALANCE_MODES = ("loss_tokens", "samples")
SHARE_TOLERANCE = 1e-6
# Ranges of the numbers a recipe holds. Outside them a plan would overflow (copies are 2-byte counts, the output
# order 4 bytes a sample) or mean nothing (a share below one in a million loss tokens, a weight ratio beyond 1e12).
MIN_SHARE = 1e-6  # a share is 0 or at least this
MAX_REPEATS = 65535
MIN_WEIGHT, MAX_WEIGHT = 1e-6, 1e6
MAX_SAMPLES = 2 ** 32 - 1  # the largest mixture `aloe mix` writes
MAX_TOKENS = 2 ** 53  # loss tokens are summed in float64: exact up to here
# A cell misses its target when its achieved share is further than this from it (an absolute difference of shares:
# 0.01 = one percentage point of the mixture's loss tokens). `tolerance:` / --tolerance change it.
DEFAULT_TOLERANCE = 0.01

_TOP_KEYS = ("tokenizer", "chat_template", "seed", "total_samples", "total_tokens", "targets", "sources",
             "balance", "cache", "strict", "tolerance")
_SOURCE_KEYS = ("name", "paths", "domain", "weight", "max_repeats", "image_root", "bbox_format")


class RecipeError(AloeError):
    """A recipe (file or options) that cannot be used."""


@dataclass(frozen=True)
class SourceSpec:
    """One source of the mixture.

    `name=None` groups records by their own `source` field (inline form);
    `domain=None` takes each record's own `domain`. `paths` are files, globs
    already expanded; `-` is stdin.
    """

    name: str | None
    paths: tuple[str, ...]
    domain: str | None = None
    weight: float = 1.0
    max_repeats: float = 1.0
    image_root: str | None = None
    bbox_format: str = "xyxy"


@dataclass(frozen=True)
class Recipe:
    tokenizer: str
    targets: dict[str, float]
    sources: tuple[SourceSpec, ...]
    seed: int = 0
    total_samples: int | None = None
    total_tokens: int | None = None
    chat_template: str | None = None
    balance: str = "loss_tokens"
    cache: str | None = None
    origin: str = "options"  # the recipe file, for messages and the report
    default_domain: str | None = field(default=None)  # inline form: for records without a domain
    strict: bool = False  # a missed target is an error (exit 1), not a warning
    tolerance: float = DEFAULT_TOLERANCE  # how far a cell's achieved share may be from its target

    def with_overrides(self, **values: Any) -> Recipe:
        """A copy with the given fields replaced (None means keep), checked again."""
        changed = {key: value for key, value in values.items() if value is not None}
        if "total_samples" in changed or "total_tokens" in changed:
            # A size given on the command line replaces the recipe's, whichever kind it is.
            changed.setdefault("total_samples", None)
            changed.setdefault("total_tokens", None)
        recipe = replace(self, **changed)
        _check_sizes(recipe.total_samples, recipe.total_tokens, recipe.origin)
        check_tolerance(recipe.tolerance, recipe.origin)
        return recipe


# ----------------------------------------------------------------------------- checks shared by both forms

def _fail(origin: str, key: str, message: str) -> RecipeError:
    return RecipeError(f"{origin}: {key}: {message}" if key else f"{origin}: {message}")


def check_targets(targets: Any, origin: str, key: str = "targets") -> dict[str, float]:
    """Shares of loss tokens per cell: known cells, numbers in [0, 1], summing to 1."""
    if not isinstance(targets, dict) or not targets:
        raise _fail(origin, key, f"must map cells to shares, e.g. {{{CELLS[0]}: 0.4, ...}} (cells: {', '.join(CELLS)})")
    shares: dict[str, float] = {}
    for cell, share in targets.items():
        if cell not in CELLS:
            raise _fail(origin, f"{key}.{cell}", f"unknown cell (expected one of {', '.join(CELLS)})")
        if not _is_number(share) or not 0 <= share <= 1:
            raise _fail(origin, f"{key}.{cell}", f"must be a number between 0 and 1, got {share!r}")
        if 0 < share < MIN_SHARE:
            raise _fail(origin, f"{key}.{cell}", f"must be 0 or at least {MIN_SHARE:g} (one in a million), "
                        f"got {share!r}")
        shares[cell] = float(share)
    total = sum(shares.values())
    if abs(total - 1) > SHARE_TOLERANCE:
        listed = ", ".join(f"{cell}={share:g}" for cell, share in shares.items())
        raise _fail(origin, key, f"shares must sum to 1, got {total:.6g} ({listed})")
    return {cell: shares.get(cell, 0.0) for cell in CELLS}


def _check_sizes(total_samples: Any, total_tokens: Any, origin: str) -> None:
    if total_samples is not None and total_tokens is not None:
        raise _fail(origin, "total_samples", "give total_samples or total_tokens, not both")
    for key, value, limit in (("total_samples", total_samples, MAX_SAMPLES),
                              ("total_tokens", total_tokens, MAX_TOKENS)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise _fail(origin, key, f"must be a positive integer, got {value!r}")
        if value is not None and value > limit:
            raise _fail(origin, key, f"{value:,} is too large to plan (at most {limit:,})")


def check_max_repeats(value: Any, origin: str, key: str) -> float:
    if not _is_number(value) or not 1 <= value <= MAX_REPEATS:
        raise _fail(origin, key, f"must be a number from 1 (never repeat) to {MAX_REPEATS}, got {value!r}")
    return float(value)


def check_tolerance(value: Any, origin: str, key: str = "tolerance") -> float:
    if not _is_number(value) or not 0 <= value <= 1:
        raise _fail(origin, key, f"must be a share between 0 and 1 (0.01 = one percentage point), got {value!r}")
    return float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_share(text: str) -> tuple[str, float]:
    """`medical/multimodal=0.4` -> ("medical/multimodal", 0.4); ValueError with a readable message."""
    cell, sep, value = text.partition("=")
    cell = cell.strip()
    if not sep:
        raise ValueError(f"expected CELL=SHARE (e.g. medical/multimodal=0.4), got {text!r}")
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r} (expected one of {', '.join(CELLS)})")
    try:
        share = float(value)
    except ValueError:
        raise ValueError(f"share of {cell} must be a number, got {value!r}") from None
    return cell, share


# ----------------------------------------------------------------------------- YAML recipes

def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe file. Relative paths in it resolve against its folder."""
    import yaml

    from aloe_cli.data.textfile import read_text_file

    origin = str(path)
    text = read_text_file(path, "recipe")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{origin}: not valid YAML{where}: {problem}") from None
    return recipe_from_dict(data, origin=origin, base=Path(path).resolve().parent)


def recipe_from_dict(data: Any, *, origin: str = "recipe", base: Path | None = None) -> Recipe:
    base = base or Path.cwd()
    if not isinstance(data, dict):
        raise _fail(origin, "", "a recipe must be a mapping with tokenizer, targets and sources")
    _reject_unknown(data, _TOP_KEYS, origin, "")
    for key in ("tokenizer", "targets", "sources"):
        if key not in data or data[key] in (None, "", [], {}):
            raise _fail(origin, key, "missing (every recipe needs tokenizer, targets and sources)")
    tokenizer = data["tokenizer"]
    if not isinstance(tokenizer, str):
        raise _fail(origin, "tokenizer", f"must be a model folder or Hub id, got {tokenizer!r}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise _fail(origin, "seed", f"must be a non-negative integer, got {seed!r}")
    _check_sizes(data.get("total_samples"), data.get("total_tokens"), origin)
    balance = data.get("balance", "loss_tokens")
    if balance not in BALANCE_MODES:
        raise _fail(origin, "balance", f"must be one of {', '.join(BALANCE_MODES)}, got {balance!r}")
    chat_template = data.get("chat_template")
    if chat_template is not None and not isinstance(chat_template, str):
        raise _fail(origin, "chat_template", "must be a .jinja file or a built-in name")
    cache = data.get("cache")
    if cache is not None and not isinstance(cache, str):
        raise _fail(origin, "cache", "must be a file path")
    strict = data.get("strict", False)
    if not isinstance(strict, bool):
        raise _fail(origin, "strict", f"must be true or false, got {strict!r}")
    tolerance = check_tolerance(data.get("tolerance", DEFAULT_TOLERANCE), origin)
    sources = _sources(data["sources"], origin, base)
    return Recipe(
        tokenizer=_local_or_id(tokenizer, base),
        targets=check_targets(data["targets"], origin),
        sources=sources,
        seed=seed,
        total_samples=data.get("total_samples"),
        total_tokens=data.get("total_tokens"),
        chat_template=_local_or_id(chat_template, base) if chat_template else None,
        balance=balance,
        cache=str(base / cache) if cache else None,
        origin=origin,
        strict=strict,
        tolerance=tolerance,
    )


def _reject_unknown(data: dict, allowed: Iterable[str], origin: str, prefix: str) -> None:
    allowed = tuple(allowed)
    for key in data:
        if key not in allowed:
            raise _fail(origin, f"{prefix}{key}", f"unknown key (expected one of {', '.join(allowed)})")


def _local_or_id(value: str, base: Path) -> str:
    """A relative path that exists next to the recipe wins over a Hub id of the same spelling."""
    candidate = base / os.path.expanduser(value)
    return str(candidate) if candidate.exists() else value


def _sources(raw: Any, origin: str, base: Path) -> tuple[SourceSpec, ...]:
    if not isinstance(raw, list):
        raise _fail(origin, "sources", "must be a list of sources (name, paths, domain, ...)")
    specs, names, owners = [], set(), {}
    for i, entry in enumerate(raw):
        key = f"sources[{i}]"
        spec = _source(entry, origin, key, base)
        if spec.name in names:
            raise _fail(origin, f"{key}.name", f"duplicate source name {spec.name!r}")
        names.add(spec.name)
        for path in spec.paths:
            same = os.path.realpath(path)  # one file, however it is spelled or linked
            if same in owners:
                raise _fail(origin, f"{key}.paths", f"{path} is already a file of source {owners[same]!r}")
            owners[same] = spec.name
        specs.append(spec)
    return tuple(specs)


def _source(entry: Any, origin: str, key: str, base: Path) -> SourceSpec:
    if not isinstance(entry, dict):
        raise _fail(origin, key, "must be a mapping with name, paths and domain")
    _reject_unknown(entry, _SOURCE_KEYS, origin, f"{key}.")
    for required in ("name", "paths", "domain"):
        if entry.get(required) in (None, "", []):
            raise _fail(origin, f"{key}.{required}", "missing (every source needs name, paths and domain)")
    name = entry["name"]
    if not isinstance(name, str):
        raise _fail(origin, f"{key}.name", f"must be a string, got {name!r}")
    key = f"{key} ({name})"
    domain = entry["domain"]
    if domain not in DOMAINS:
        raise _fail(origin, f"{key}.domain", f"must be 'medical' or 'general', got {domain!r}")
    weight = entry.get("weight", 1)
    if not _is_number(weight) or not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise _fail(origin, f"{key}.weight", f"must be a number from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}, got {weight!r}")
    max_repeats = check_max_repeats(entry.get("max_repeats", 1), origin, f"{key}.max_repeats")
    bbox_format = entry.get("bbox_format", "xyxy")
    if bbox_format not in BBOX_FORMATS:
        raise _fail(origin, f"{key}.bbox_format", f"must be one of {', '.join(BBOX_FORMATS)}, got {bbox_format!r}")
    image_root = entry.get("image_root")
    if image_root is not None and not isinstance(image_root, str):
        raise _fail(origin, f"{key}.image_root", "must be a folder path")
    return SourceSpec(
        name=name,
        paths=_expand_paths(entry["paths"], origin, f"{key}.paths", base),
        domain=domain,
        weight=float(weight),
        max_repeats=max_repeats,
        image_root=str(base / os.path.expanduser(image_root)) if image_root else None,
        bbox_format=bbox_format,
    )


def _expand_paths(value: Any, origin: str, key: str, base: Path) -> tuple[str, ...]:
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
        raise _fail(origin, key, "must be a path, a glob, or a list of them")
    paths: list[str] = []
    for pattern in patterns:
        if pattern == "-":
            raise _fail(origin, key, "stdin ('-') cannot be a recipe source; pipe into the inline form instead")
        full = str(base / os.path.expanduser(pattern))
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(full, recursive=True))
            if not matches:
                raise _fail(origin, key, f"{pattern!r} matches no file")
            paths.extend(matches)
        elif not os.path.exists(full):
            raise _fail(origin, key, f"{pattern!r} not found")
        else:
            paths.append(full)
    return tuple(dict.fromkeys(paths))


# ----------------------------------------------------------------------------- inline form

def inline_recipe(inputs: list[str], shares: list[str], *, tokenizer: str, seed: int = 0,
                  total_samples: int | None = None, total_tokens: int | None = None, max_repeats: float = 1.0,
                  domain: str | None = None, chat_template: str | None = None, balance: str = "loss_tokens",
                  cache: str | None = None, image_root: str | None = None, bbox_format: str = "xyxy",
                  strict: bool = False, tolerance: float = DEFAULT_TOLERANCE) -> Recipe:
    """`-i a.jsonl -i b.jsonl --share medical/multimodal=0.4 ...`: one source per record `source` field."""
    from aloe_cli.data.io import expand_inputs

    origin = "--share"
    targets: dict[str, float] = {}
    for text in shares:
        try:
            cell, share = parse_share(text)
        except ValueError as exc:
            raise RecipeError(f"{origin}: {exc}") from None
        if cell in targets:
            raise RecipeError(f"{origin}: {cell} is given twice")
        targets[cell] = share
    _check_sizes(total_samples, total_tokens, "options")
    paths = expand_inputs(inputs)
    seen: dict[str, str] = {}
    for path in paths:
        same = path if path == "-" else os.path.realpath(path)  # one file, however it is spelled or linked
        if same in seen:
            again = ("stdin" if path == "-" else path if path == seen[same]
                     else f"{path} (the same file as {seen[same]})")
            raise RecipeError(f"-i: {again} is given twice; its records would be counted twice")
        seen[same] = path
    spec = SourceSpec(name=None, paths=tuple(paths), domain=None, weight=1.0,
                      max_repeats=check_max_repeats(max_repeats, "options", "max_repeats"), image_root=image_root,
                      bbox_format=bbox_format)
    return Recipe(tokenizer=tokenizer, targets=check_targets(targets, origin, key="shares"), sources=(spec,),
                  seed=seed, total_samples=total_samples, total_tokens=total_tokens, chat_template=chat_template,
                  balance=balance, cache=cache, origin="options", default_domain=domain, strict=strict,
                  tolerance=check_tolerance(tolerance, "options"))
