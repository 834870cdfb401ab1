"""The seed study's figure (``seed_analysis.py`` writes it as seeds.png): per-group test Dice, a bar per method
(mean over seeds) and a dot per seed, one panel per dataset and test."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def plot(summary: dict, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = list(summary["by_method"])
    cols = min(2, max(len(keys), 1))  # two panels a row: site A and site B of one dataset side by side
    rows = -(-max(len(keys), 1) // cols)
    fig = Figure(figsize=(5.2 * cols, 3.4 * rows + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    colours = {"baseline": "#888888", "febs": "#4c9be8", "moe": "#f0a030", "dmoe": "#d0413e"}
    for ax, key in zip(axes, keys):
        runs = [r for r in summary["runs"] if f"{r['dataset']}/{r['test']}" == key]
        methods = list(summary["by_method"][key])
        groups = list(runs[0]["groups"])
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            x = np.arange(len(groups)) + (j - (len(methods) - 1) / 2) * width
            agg = summary["by_method"][key][m]["groups"]
            ax.bar(x, [agg[g]["mean"] for g in groups], width, color=colours.get(m, "k"), alpha=0.6, label=m)
            for r in (r for r in runs if r["method"] == m):  # one dot per seed
                ax.plot(x, [r["groups"][g] for g in groups], "o", color="k", ms=2.5)
        shipped = summary["shipped"].get(key)
        if shipped:
            j = methods.index("dmoe") if "dmoe" in methods else (len(methods) - 1) / 2  # over the dMoE bars
            ax.plot(np.arange(len(groups)) + (j - (len(methods) - 1) / 2) * width,
                    [shipped["groups"][g] for g in groups], "*", color="#d0413e", mec="k", mew=0.5, ms=10,
                    label="shipped dmoe")
        ax.set_xticks(np.arange(len(groups)), groups)
        lo = min(min(r["groups"].values()) for r in runs)
        ax.set_ylim(max(0.0, lo - 0.1), 1.0)
        ax.set_title(key.replace("/", ", "), fontsize=9)
        ax.set_ylabel("per-group test Dice")
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("bars: mean over seeds; dots: one per seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path
