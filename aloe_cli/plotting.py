"""Shared set-up for every picture (the --plot options, loss.png, aloe report plot): matplotlib (optional
extra) without a display."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from aloe_cli.errors import AloeError

_MISSING = "drawing needs matplotlib: pip install 'aloe-cli[plot]'"


def require_matplotlib() -> None:
    """Fail early (before any model is loaded) when a picture cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise AloeError(_MISSING)


def pyplot():
    """matplotlib.pyplot on the Agg backend: plots are files, never windows."""
    try:
        import matplotlib
    except ImportError:
        raise AloeError(_MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AloeError(f"cannot create the plot folder {folder}: {exc.strerror or exc}") from None
    return folder
