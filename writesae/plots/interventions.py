"""Figures of the intervention experiments (claims 8, 9, 10, 13) and the atom card of the explorer.

Each function takes the tidy tables of :mod:`writesae.experiments.interventions` and returns a Figure.
"""
from __future__ import annotations

import numpy as np

from . import figure, panels

__all__ = ["atom_figure", "erasure_figure", "sign_figure", "install_figure", "steering_figure"]


def _heat(ax, M, title, xlabel=None, ylabel=None):
    """A symmetric heatmap; an axis with a label gets its first and last index as ticks, the other none."""
    lim = float(np.abs(M).max()) or 1.0
    im = ax.imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=11)
    rows, cols = M.shape
    ax.set_xticks([0, cols - 1] if xlabel else [])
    ax.set_yticks([0, rows - 1] if ylabel else [])
    ax.set_xlabel(xlabel or "", fontsize=10, labelpad=-6)
    ax.set_ylabel(ylabel or "", fontsize=10, labelpad=-8)
    ax.tick_params(labelsize=10)
    return im


def atom_figure(v, w, cos=None, title=""):
    """Heatmaps of the factors v (d_k) and w (d_v) and of the atom v w^T; with ``cos`` (the atom's cosines
    to the native write over its firings) a histogram of them."""
    v, w = np.asarray(v, float), np.asarray(w, float)
    n = 4 if cos is not None else 3
    fig, ax = figure(1, n, 1.8 * n, 2.7, width_ratios=[0.3, 1, 1, 1.3][:n])
    _heat(ax[0], v[:, None], "v", ylabel="$d_k$")
    _heat(ax[1], w[None, :], "w", xlabel="$d_v$")
    cb = fig.colorbar(_heat(ax[2], np.outer(v, w), "atom $v w^T$", xlabel="$d_v$", ylabel="$d_k$"), ax=ax[2],
                      fraction=0.08)
    cb.ax.tick_params(labelsize=10)
    if cos is not None:
        ax[3].hist(np.asarray(cos, float), bins=20, range=(-1, 1), color="0.4")
        ax[3].set_title("cos(atom, $W_t$) at firings", fontsize=11)
        ax[3].set_xlabel("Frobenius cosine", fontsize=10)
        ax[3].set_ylabel("firings", fontsize=10)
        ax[3].tick_params(labelsize=10)
    fig.suptitle(title, fontsize=11)
    return fig


def erasure_figure(df):
    """Log-prob change of each feature's most-affected token on held-out erasures: firing vs matched
    non-firing positions (left, dose 1) and the median over doses (right)."""
    ev = df[df["split"] == "eval"]
    fig, ax = figure(1, 2, 8, 3.4)
    one = ev[ev["dose"] == 1.0]
    groups = [one.loc[one["where"] == w, "dlogp"].to_numpy() for w in ("firing", "non-firing")]
    ax[0].boxplot(groups, showfliers=False)
    ax[0].set_xticks([1, 2], ["firing", "non-firing"])
    for i, g in enumerate(groups):
        ax[0].scatter(np.full(len(g), i + 1) + np.random.default_rng(0).uniform(-0.15, 0.15, len(g)), g, s=6, alpha=0.5)
    ax[0].axhline(0, color="k", lw=0.5)
    ax[0].set_ylabel("Δ log p (nats)")
    ax[0].set_title("erase the atom's contribution (dose 1)", fontsize=10)
    for w, g in ev.groupby("where"):
        med = g.groupby("dose")["dlogp"].median()
        ax[1].plot(med.index, med.to_numpy(), "o-", label=w)
    ax[1].axhline(0, color="k", lw=0.5)
    ax[1].set_xlabel("dose (x a_i(t) A_i removed)")
    ax[1].set_ylabel("median Δ log p")
    ax[1].legend(fontsize=9)
    return fig


def sign_figure(df):
    """Measured vs first-order predicted logit change of single-position installs."""
    fig, ax = figure(width=4.6, height=4.0)
    ok = df["correct"].to_numpy()
    ax.scatter(df["predicted"][ok], df["measured"][ok], s=8, label="sign correct")
    ax.scatter(df["predicted"][~ok], df["measured"][~ok], s=8, color="C3", label="sign wrong")
    lim = float(np.abs(df[["predicted", "measured"]].to_numpy()).max()) or 1.0
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.5)
    ax.axhline(0, color="k", lw=0.3)
    ax.axvline(0, color="k", lw=0.3)
    ax.set_xlabel("predicted Δ logit (direct path, 1st order)")
    ax.set_ylabel("measured Δ logit")
    ax.set_title(f"sign accuracy {ok.mean():.1%} (n = {len(df)})", fontsize=10)
    ax.legend(fontsize=9)
    return fig


def install_figure(df):
    """Generation install: target inclusion native vs edited per stratum at each m (left), and the pooled
    dose response with the first-step lift (right)."""
    fig, ax = figure(1, 2, 8, 3.6)
    strata = list(dict.fromkeys(df["stratum"]))
    ms = sorted(df["m"].unique())
    width = 0.8 / (len(ms) + 1)
    x = np.arange(len(strata))
    native = df[df["m"] == ms[0]].groupby("stratum")["included_native"].mean().reindex(strata)
    ax[0].bar(x, native.to_numpy(), width, color="0.6", label="native")
    for j, m in enumerate(ms):
        e = df[df["m"] == m].groupby("stratum")["included_edited"].mean().reindex(strata)
        ax[0].bar(x + (j + 1) * width, e.to_numpy(), width, label=f"m = {m:g}")
    ax[0].set_xticks(x + width * len(ms) / 2, strata)
    ax[0].set_ylabel("target in the generated tokens")
    ax[0].set_ylim(0, 1)  # a share: the full range, so a flat line looks flat
    ax[0].legend(fontsize=9)
    pooled = df.groupby("m").agg(edited=("included_edited", "mean"), native=("included_native", "mean"),
                                 lift=("lift", "mean"))
    ax[1].plot(pooled.index, pooled["edited"], "o-", label="edited")
    ax[1].plot(pooled.index, pooled["native"], "o--", color="0.6", label="native")
    ax[1].set_xlabel("m (x ||k_t v_t^T||)")
    ax[1].set_ylabel("inclusion (pooled)")
    ax[1].set_ylim(0, 1)
    tw = ax[1].twinx()
    tw.plot(pooled.index, pooled["lift"], "s:", color="C3", label="first-step lift")
    tw.set_ylabel("mean first-step Δ log p", color="C3")
    lift = pooled["lift"]
    tw.set_ylim(min(0.0, 1.2 * lift.min()), max(0.1, 1.2 * lift.max()))  # from 0: no magnified wiggle
    ax[1].legend(fontsize=9, loc="upper left")
    return fig


def steering_figure(summary):
    """Mean rate (per 100 generated tokens) per condition and alpha with CIs, one panel per counted token
    set; takes :func:`writesae.experiments.interventions.steering_summary`."""
    groups = list(summary.groupby("counted", sort=False))
    fig, axes = panels(len(groups), max_cols=2, panel_width=4.0, panel_height=3.4)
    for ax, (counted, g) in zip(axes, groups):
        labels = [c if c == "baseline" else f"{c} x{a:g}" for c, a in zip(g["condition"], g["alpha"])]
        mean = g["mean_rate"].to_numpy()
        err = np.vstack([mean - g["ci_low"].to_numpy(), g["ci_high"].to_numpy() - mean])
        colors = ["0.6" if c == "baseline" else "C0" if c == "boundary" else "C1" for c in g["condition"]]
        ax.bar(range(len(labels)), mean, yerr=err, color=colors, capsize=3)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", rotation_mode="anchor")
        ax.set_ylabel(f"{counted}\nper 100 generated tokens")
    return fig
