"""The Axes that every medveil plot draws on, and saving it: matplotlib imported only when plotting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DPI = 150


def axes(ax: Any, path: str | Path | None, figsize: tuple[float, float]) -> Any:
    """The caller's Axes, a figure outside pyplot when saving to a file (no display needed), else pyplot's."""
    if ax is not None:
        return ax
    try:
        if path is not None:
            from matplotlib.figure import Figure

            return Figure(figsize=figsize).subplots()
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'medveil[stats]'") from exc
    return plt.subplots(figsize=figsize)[1]


def save(ax: Any, path: str | Path | None) -> Any:
    """Write the Axes' figure as PNG when `path` is given; return the Axes."""
    if path is not None:
        ax.figure.savefig(path, dpi=DPI, bbox_inches="tight", format="png")
    return ax
