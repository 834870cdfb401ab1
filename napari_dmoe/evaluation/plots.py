"""Figures of a fairness evaluation, as PNG files: Dice per group (violins) and the expert-usage heatmap.

A bare matplotlib ``Figure`` renders with the Agg canvas and never touches pyplot's global state or a Qt
backend, so these work headless and inside napari alike.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from napari_dmoe.evaluation.metrics import FairnessError, PerImage, metric_values
from napari_dmoe.io.files import atomic_write

__all__ = ["plot_violins", "plot_expert_usage"]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_violins(records: Sequence[PerImage], class_names: Sequence[str], path: str | Path) -> Path:
    """Dice distribution per group, one panel per class (paper figure 3 style); writes a PNG."""
    groups = sorted({r.group for r in records})
    fig = _figure(3.2 * len(class_names) + 0.8, 3.6)
    axes = fig.subplots(1, len(class_names), squeeze=False)[0]
    jitter = np.random.default_rng(0)
    for ax, cname in zip(axes, class_names):
        values = metric_values(records, cname, "dice")
        labels = np.array([r.group for r in records])
        data = [values[labels == g] for g in groups]
        spread = [k for k, d in enumerate(data) if d.size > 1 and np.ptp(d) > 0]  # KDE needs spread
        if spread:
            parts = ax.violinplot([data[k] for k in spread], positions=[k + 1 for k in spread], showmeans=True)
            for body in parts["bodies"]:
                body.set_alpha(0.4)
        for k, d in enumerate(data):
            ax.scatter(k + 1 + jitter.uniform(-0.08, 0.08, d.size), d, s=8, color="black", alpha=0.6)
        ax.set_xticks(range(1, len(groups) + 1), groups, rotation=30)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(cname)
        ax.set_ylabel("Dice")
    return _save(fig, path)


def plot_expert_usage(matrix, group_names: Sequence[str], path: str | Path) -> Path:
    """Heatmap of mean gate weight per attribute value (rows) and expert (columns), annotated; writes a PNG."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] != len(group_names):
        raise FairnessError(f"expert usage must be [groups, experts] with {len(group_names)} rows, got {m.shape}")
    fig = _figure(0.7 * m.shape[1] + 2.5, 0.5 * m.shape[0] + 1.8)
    ax = fig.subplots()
    image = ax.imshow(m, cmap="viridis", vmin=0.0, aspect="auto")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                color="white" if v < 0.6 * (m.max() or 1.0) else "black")
    ax.set_xticks(range(m.shape[1]), [str(j) for j in range(m.shape[1])])
    ax.set_yticks(range(m.shape[0]), list(group_names))
    ax.set_xlabel("expert")
    ax.set_ylabel("attribute")
    fig.colorbar(image, ax=ax, label="mean gate weight")
    return _save(fig, path)




def _save(fig, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
