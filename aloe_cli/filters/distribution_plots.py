"""Per-source distributions drawn for tuning thresholds: one histogram per source, the limits marked.

Used by `aloe perplexity --plot` (and any stage that collects a `thresholds.Distribution`).
"""

from __future__ import annotations

import re
from pathlib import Path

from aloe_cli.errors import AloeError
from aloe_cli.filters.thresholds import Distribution, ResolvedThresholds


def safe_file_name(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("._") or "source"


def plot_histograms(distribution: Distribution, resolved: ResolvedThresholds | None, out_dir: str | Path,
                    *, label: str = "answer perplexity") -> list[Path]:
    """One PNG per source: the histogram of values with the min/max thresholds drawn."""
    import numpy as np

    from aloe_cli.plotting import plot_folder, pyplot

    plt = pyplot()
    out = plot_folder(out_dir)
    written = []
    for source in distribution.sources():
        values = distribution.values(source)
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        figure, axes = plt.subplots(figsize=(7, 4))
        log_scale = bool(values.min() > 0 and values.max() / values.min() > 20)
        bins = np.geomspace(values.min(), values.max(), 50) if log_scale and values.max() > values.min() else 50
        axes.hist(values, bins=bins, color="#4C72B0", alpha=0.85)
        if log_scale:
            axes.set_xscale("log")
        limits = resolved.limits_for(source) if resolved is not None else None
        _draw_limit(axes, limits.min if limits else None, "min (trivial below)", "#DD8452")
        _draw_limit(axes, limits.max if limits else None, "max (noisy above)", "#C44E52")
        axes.set_title(f"{source}: {label} (n={values.size}, median {np.median(values):.4g})")
        axes.set_xlabel(label)
        axes.set_ylabel("records")
        if limits is not None and (limits.min is not None or limits.max is not None):
            axes.legend()
        figure.tight_layout()
        path = out / f"{safe_file_name(source)}.png"
        try:
            figure.savefig(path, dpi=100)
        except OSError as exc:
            raise AloeError(f"cannot write {path}: {exc.strerror}") from None
        finally:
            plt.close(figure)
        written.append(path)
    return written


def _draw_limit(axes, value: float | None, label: str, color: str) -> None:
    if value is not None:
        axes.axvline(value, color=color, linestyle="--", linewidth=1.5, label=f"{label}: {value:.4g}")
