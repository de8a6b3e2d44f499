"""Figures of the across-architectures chapter (in the spirit of the paper's Fig. 4): each takes the tables of
``writesae.experiments.zoo`` and returns a matplotlib Figure; no computation beyond plotting."""
from __future__ import annotations

import numpy as np

from . import figure

__all__ = ["memory_strip", "register_cosine", "win_rates", "k_sweep"]

FAMILY_ORDER = ("GDN", "Mamba-2", "DeltaNet", "GLA", "RWKV-7")
ATOM_MARKERS = {"rank-1 write": "o", "rank-2 update": "s"}
DECODER_COLORS = {"WriteSAE, coef": "tab:blue", "WriteSAE, norm": "tab:cyan", "FlatSAE + top-1 SVD, norm": "tab:orange"}


def _families(*names):
    present = {n for s in names for n in s}
    return [f for f in FAMILY_ORDER if f in present] + sorted(present - set(FAMILY_ORDER))


def _jitter(n, width=0.12, seed=0):
    return np.random.default_rng(seed).uniform(-width, width, n)


def memory_strip(memory):
    """The memory table of every head of every family (a ``zoo.memory_tables`` table): write share
    ``||W_t|| / ||S_t||`` on one axis, the analysed heads in red."""
    fams = _families(memory["family"])
    fig, ax = figure(width=7, height=0.6 * len(fams) + 1.2)
    for y, fam in enumerate(fams):
        g = memory[memory["family"] == fam]
        x = g["write_share"].clip(lower=1e-4).to_numpy()
        ch = g["chosen"].astype(bool).to_numpy()
        yy = y + _jitter(len(g), seed=y)
        ax.scatter(x[~ch], yy[~ch], s=10, color="tab:gray", alpha=0.6, label="head" if y == 0 else None)
        ax.scatter(x[ch], yy[ch], s=40, color="tab:red", zorder=3, label="analysed" if y == 0 else None)
        for xi, yi, c in zip(x[ch], yy[ch], g["cell"][ch]):
            ax.annotate(c, (xi, yi), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.set(xscale="log", yticks=range(len(fams)), yticklabels=fams, ylim=(-0.6, len(fams) - 0.4),
           xlabel=r"median write share $\|W_t\|_F / \|S_t\|_F$ (1: no memory beyond the current write)")
    ax.legend(frameon=False, loc="lower left", fontsize=9)
    return fig


def register_cosine(cells, paper=None):
    """Fig. 4a: the register median cosine of every analysed head of every family on one axis (a
    ``zoo.partitions`` cells table; marker = atom), the paper's value per family as a black cross."""
    fams = _families(cells["family"], (paper or {}).keys())
    fig, ax = figure(width=7, height=0.6 * len(fams) + 1.4)
    for y, fam in enumerate(fams):
        g = cells[cells["family"] == fam]
        for atom, ga in g.groupby("atom"):
            x = ga["register_cos"].to_numpy()
            ok = np.isfinite(x)
            yy = y + _jitter(len(ga), seed=y)
            ax.scatter(x[ok], yy[ok], marker=ATOM_MARKERS.get(atom, "o"), s=45, color=f"C{y}",
                       edgecolor="k", linewidth=0.5, label=atom if y == 0 or atom != "rank-1 write" else None)
            for c in ga["cell"][~ok]:  # no registers at this head: say so on the axis
                ax.annotate(f"{c}: no registers", (0, y), xytext=(2, -12), textcoords="offset points", fontsize=8)
        if paper and fam in paper and np.isfinite(paper[fam]):
            ax.scatter([paper[fam]], [y], marker="x", s=70, color="k", zorder=4,
                       label="paper" if not ax.get_legend_handles_labels()[1].count("paper") else None)
    ax.axvline(0, color="k", lw=0.6, ls=":")
    ax.set(yticks=range(len(fams)), yticklabels=fams, ylim=(-0.6, len(fams) - 0.4),
           xlabel="register median cosine (atom vs native write, median over register atoms)")
    handles, labels = ax.get_legend_handles_labels()
    keep = dict(zip(labels, handles))
    ax.legend(keep.values(), keep.keys(), frameon=False, fontsize=9, loc="best")
    return fig


def win_rates(rows, paper=None):
    """Fig. 4b: substitution win rate per family with its Wilson 95% interval, one point per decoder and
    scaling. ``rows``: columns family, decoder (a label), win_rate, wilson_lo, wilson_hi, n; ``paper``:
    {(family, decoder label): win rate} drawn as black crosses."""
    fams = _families(rows["family"], {f for f, _ in (paper or {})})
    decs = sorted(dict.fromkeys(rows["decoder"]), key=lambda d: (d.startswith("Flat"), d.endswith("norm")))
    fig, ax = figure(width=max(5, 1.3 * len(fams) + 2), height=3.8)
    w = 0.7 / max(len(decs), 1)
    for j, dec in enumerate(decs):
        g = rows[rows["decoder"] == dec].set_index("family")
        xs, ys, lo, hi = [], [], [], []
        for i, fam in enumerate(fams):
            if fam in g.index and np.isfinite(g.loc[fam, "win_rate"]):
                xs.append(i + (j - (len(decs) - 1) / 2) * w)
                ys.append(g.loc[fam, "win_rate"])
                lo.append(g.loc[fam, "win_rate"] - g.loc[fam, "wilson_lo"])
                hi.append(g.loc[fam, "wilson_hi"] - g.loc[fam, "win_rate"])
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, color=DECODER_COLORS.get(dec, f"C{j}"), label=dec)
        for fam, x in zip([f for f in fams if f in g.index and np.isfinite(g.loc[f, "win_rate"])], xs):
            if paper and (fam, dec) in paper:
                ax.scatter([x], [paper[(fam, dec)]], marker="x", s=60, color="k", zorder=4)
    if paper:
        ax.scatter([], [], marker="x", color="k", label="paper")
    ax.axhline(0.5, color="k", lw=0.6, ls=":")
    ax.set(xticks=range(len(fams)), xticklabels=fams, ylim=(0, 1.02), ylabel="win rate (KL atom < KL delete)")
    ax.legend(frameon=False, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(decs) + 1)
    return fig


def k_sweep(sweep, paper=None):
    """Register median cosine and number of registers against k (a ``zoo.k_sweep`` table); the paper's
    values as black crosses (``paper`` = {k: cosine}, NaN = no registers)."""
    fig, (ax1, ax2) = figure(1, 2, 8, 3.4)
    ax1.plot(sweep["k"], sweep["register_cos"], "o-", label="matched zoo")
    if paper:
        ks = [k for k, v in paper.items() if np.isfinite(v)]
        ax1.scatter(ks, [paper[k] for k in ks], marker="x", s=60, color="k", zorder=4, label="paper")
    ax1.set_xscale("log", base=2)
    ax1.minorticks_off()
    ax1.set(xticks=list(sweep["k"]), xticklabels=[str(k) for k in sweep["k"]], xlabel="k",
            ylabel="register median cosine")
    ax1.set_title("no point: no registers at that k", fontsize=10)
    ax1.legend(frameon=False, fontsize=9)
    ax2.bar([str(k) for k in sweep["k"]], sweep["n_register"], color="tab:blue", label="registers")
    ax2.bar([str(k) for k in sweep["k"]], sweep["n_alive"] - sweep["n_register"], bottom=sweep["n_register"],
            color="tab:orange", label="bundles")
    ax2.set(xlabel="k", ylabel="alive atoms")
    ax2.legend(frameon=False, fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
