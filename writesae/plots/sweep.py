"""Figure of the all-heads sweep (:func:`writesae.sweep.sweep`): win rate and register cosine per layer x head."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from . import PAGE_WIDTH, figure

__all__ = ["grid", "heatmaps"]

COLUMN = 0.55     # inches per head column: room for a "0.00" label at 9 pt
LABEL_FONT = 9


def grid(table, value):
    """(layers, heads, (n_layers, n_heads) array of ``value``; NaN where the table has no such head)."""
    layers, heads = sorted(table["layer"].unique()), sorted(table["head"].unique())
    out = np.full((len(layers), len(heads)), np.nan)
    for _, r in table.iterrows():
        out[layers.index(r["layer"]), heads.index(r["head"])] = r[value]
    return layers, heads, out


def _ink(rgba):
    """Black or white, whichever reads on a background of colour ``rgba`` (by its relative luminance)."""
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    return "black" if 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2] > 0.18 else "white"


def heatmaps(table, values=("win_rate", "cos_register"), titles=None):
    """One heatmap per column of ``values`` (default: the substitution win rate, KL atom < KL delete, and the
    mean cosine of the register atoms to the write), layers down, heads across, each head annotated (in black
    or white by the colour under it); grey where a head was not swept or has no value (no registers). The
    panels sit side by side when they fit the page width, else one above the other; with more heads than a
    page-wide row has room to label, the colours alone (and the colour bar) carry the values."""
    titles = titles or {"win_rate": "win rate (KL atom < KL delete)", "cos_register": "register cosine to the write"}
    n_heads, n_layers = table["head"].nunique(), table["layer"].nunique()
    panel = 1.1 + COLUMN * n_heads  # inches: the heads, the layer labels and a colour bar
    across = len(values) * panel <= PAGE_WIDTH
    rows, cols = (1, len(values)) if across else (len(values), 1)
    width = min(PAGE_WIDTH, cols * panel)
    fig, axes = figure(rows, cols, width, rows * (1.0 + 0.4 * n_layers), squeeze=False)
    column = (width / cols - 1.1) / n_heads
    label = column >= 0.4  # room for the number in each column
    step = max(1, int(np.ceil(0.3 / column)))  # head labels: every step-th where "H12" would not fit each column
    for ax, value in zip(axes.ravel(), values):
        layers, heads, z = grid(table, value)
        cmap = plt.get_cmap("RdBu_r" if value == "win_rate" else "viridis").with_extremes(bad="0.85")
        im = ax.imshow(np.ma.masked_invalid(z), cmap=cmap, aspect="auto",
                       **({"vmin": 0, "vmax": 1} if value == "win_rate" else {}))
        for i in range(len(layers)):
            for j in range(len(heads)):
                if label and np.isfinite(z[i, j]):
                    ax.text(j, i, f"{z[i, j]:.2f}", ha="center", va="center", fontsize=LABEL_FONT,
                            color=_ink(im.cmap(im.norm(z[i, j]))))
        ax.set_xticks(range(0, len(heads), step), [f"H{h}" for h in heads[::step]])
        ax.set_yticks(range(len(layers)), [f"L{l}" for l in layers])
        ax.tick_params(labelsize=9)
        ax.set_title(titles.get(value, value), fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.05).ax.tick_params(labelsize=9)
    return fig
