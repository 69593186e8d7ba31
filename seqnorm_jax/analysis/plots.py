"""Plotting helpers shared by the analysis tools: Agg figures, saving, smoothing, seed bands.

Every plot function of :mod:`seqnorm_jax.analysis` takes the output ``path`` and writes
one PNG with matplotlib's non-interactive Agg backend, so plots work on machines
without a display.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from seqnorm_jax import checks

__all__ = ["pyplot", "save_figure", "moving_average", "mean_std", "label_colors"]


def pyplot():
    """``matplotlib.pyplot`` with the Agg backend selected (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, *, title: str | None = None,
                dpi: int = 120) -> str:
    """Give ``fig`` a title, lay it out, write it to ``path`` (PNG) and close it.

    Args:
      fig: a matplotlib figure.
      path: the output file; its directory is created if needed.
      title: an optional figure title (``suptitle``).
      dpi: resolution.

    Returns:
      ``path`` as a string.
    """
    plt = pyplot()
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def moving_average(values: Sequence[float] | np.ndarray, window: int = 1) -> np.ndarray:
    """Trailing moving average of ``values`` over ``window`` points, same length.

    The first ``window - 1`` points average over the points available so far, so the
    curve keeps its first value. ``window=1`` returns the values unchanged (as float64).

    Raises:
      ValueError: ``window`` is not a positive int.
    """
    checks.positive_int(window, "smoothing window", fix="use 1 for no smoothing.")
    a = np.asarray(values, np.float64)
    if window == 1 or a.size == 0:
        return a
    cumsum = np.cumsum(np.concatenate([[0.0], a]))
    idx = np.arange(1, a.size + 1)
    lo = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def mean_std(runs: Sequence[Sequence[float]] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one run) over axis 0.

    ``runs`` is ``(runs, points)``: one curve per seed.
    """
    a = np.asarray(runs, np.float64)
    mean = a.mean(axis=0)
    std = a.std(axis=0, ddof=1) if a.shape[0] > 1 else np.zeros_like(mean)
    return mean, std


def label_colors(labels: Sequence[str]) -> dict[str, Any]:
    """One colour per label from matplotlib's default cycle (``tab10`` beyond ten)."""
    plt = pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", [])
    if len(labels) > len(cycle):
        cmap = plt.get_cmap("tab20")
        cycle = [cmap(i % 20) for i in range(len(labels))]
    return {label: cycle[i] for i, label in enumerate(labels)}


def two_panel_figure(curves: Any, who: str) -> tuple[Any, Any, dict[str, Any]]:
    """``(fig, axes, colors)`` for a two-panel plot of ``{label: runs}`` curves.

    Raises ``ValueError`` naming ``who`` when ``curves`` is empty.
    """
    if not curves:
        raise ValueError(f"{who}: curves is empty; pass {{label: [rows, ...]}}.")
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.2))
    return fig, axes, label_colors(list(curves))
