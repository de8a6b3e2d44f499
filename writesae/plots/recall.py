"""Figures of the writes-that-matter chapter: each takes the tables of ``writesae.experiments.recall`` and
returns a matplotlib Figure; no computation beyond plotting."""
from __future__ import annotations

import numpy as np

from . import figure, panels

__all__ = ["accuracy_by_distance", "answer_kl"]

KIND_STYLE = {"recall": dict(color="tab:red", marker="o"), "zoo": dict(color="tab:gray", marker="s")}


def accuracy_by_distance(acc):
    """Recall accuracy against the distance from statement to question, one panel per family, recall-trained
    model and its zoo member (Wilson 95% intervals)."""
    fams = list(dict.fromkeys(acc["family"]))
    fig, axes = panels(len(fams), max_cols=2, panel_width=4.0, panel_height=3.4, sharey=True)
    for ax, fam in zip(axes, fams):
        for (model, kind), g in acc[acc["family"] == fam].groupby(["model", "kind"], sort=False):
            x = np.arange(len(g))
            ax.errorbar(x, g["accuracy"], yerr=[g["accuracy"] - g["lo"], g["hi"] - g["accuracy"]], capsize=3,
                        label=model, **KIND_STYLE.get(kind, {}))
            ax.set_xticks(x, g["distance"], rotation=30, fontsize=9)
        ax.axhline(1 / 8, color="k", lw=0.8, ls=":", label="one of the passage's 8 values at random")
        ax.set(ylim=(-0.02, 1.02), xlabel="distance from statement to question (tokens)", title=fam)
        ax.legend(frameon=False, fontsize=8)
    axes[0].set_ylabel("recall accuracy")
    return fig


def answer_kl(infl):
    """The KL at the answer of deleting one write at the tested head, per pair token (key, value,
    separator), recall-trained model against its zoo member: one dot per deleted write, log scale."""
    models = list(dict.fromkeys(infl["model"]))
    tokens = list(dict.fromkeys(infl["token"]))
    fig, ax = figure(width=7.5, height=0.5 * len(models) * len(tokens) + 1.4)
    y, labels = 0, []
    rng = np.random.default_rng(0)
    for model in models:
        for tok in tokens:
            g = infl[(infl["model"] == model) & (infl["token"] == tok)]
            kind = g["kind"].iloc[0] if len(g) else "zoo"
            x = g["kl"].clip(lower=1e-9).to_numpy()
            ax.scatter(x, y + rng.uniform(-0.15, 0.15, len(x)), s=12, alpha=0.6, color=KIND_STYLE[kind]["color"])
            if len(x):
                ax.plot([np.median(x)] * 2, [y - 0.3, y + 0.3], color="k", lw=2)
            labels.append(f"{model}, {tok}")
            y += 1
    ax.axvline(0.1, color="tab:blue", ls="--", lw=1, label="0.1 nats (the target)")
    ax.set(xscale="log", yticks=range(len(labels)), yticklabels=labels,
           xlabel="KL(patched || base) at the answer, nats (black bar: median)")
    ax.legend(frameon=False, fontsize=9, loc="lower right")
    return fig
