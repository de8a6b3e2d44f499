"""Figure of the all-cells sweep (:func:`writesae.sweep.sweep`): win rate and register cosine per layer x head."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["grid", "heatmaps"]


def grid(table, value):
    """(layers, heads, (n_layers, n_heads) array of ``value``; NaN where the table has no such cell)."""
    layers, heads = sorted(table["layer"].unique()), sorted(table["head"].unique())
    out = np.full((len(layers), len(heads)), np.nan)
    for _, r in table.iterrows():
        out[layers.index(r["layer"]), heads.index(r["head"])] = r[value]
    return layers, heads, out


def heatmaps(table, values=("win_rate", "cos_register"), titles=None):
    """One heatmap per column of ``values`` (default: the substitution win rate, KL atom < KL delete, and the
    mean cosine of the register atoms to the write), layers down, heads across, each cell annotated; grey
    where a cell was not swept or has no value (no registers)."""
    titles = titles or {"win_rate": "win rate (KL atom < KL delete)", "cos_register": "register cosine to the write"}
    fig, axes = plt.subplots(1, len(values), figsize=(2.2 + 0.55 * table["head"].nunique() * len(values),
                                                       1.2 + 0.5 * table["layer"].nunique()), squeeze=False)
    for ax, value in zip(axes[0], values):
        layers, heads, z = grid(table, value)
        cmap = plt.get_cmap("RdBu_r" if value == "win_rate" else "viridis").with_extremes(bad="0.85")
        im = ax.imshow(np.ma.masked_invalid(z), cmap=cmap, aspect="auto",
                       **({"vmin": 0, "vmax": 1} if value == "win_rate" else {}))
        for i in range(len(layers)):
            for j in range(len(heads)):
                if np.isfinite(z[i, j]):
                    ax.text(j, i, f"{z[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(heads)), [f"H{h}" for h in heads])
        ax.set_yticks(range(len(layers)), [f"L{l}" for l in layers])
        ax.set_title(titles.get(value, value), fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    return fig
