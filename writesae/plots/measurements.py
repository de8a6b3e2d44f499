"""Figures of the measurements (claims 1, 3, 5, 6 and §4): each takes the tidy tables of
``writesae.experiments`` and returns a matplotlib Figure; no computation beyond plotting."""
from __future__ import annotations

import numpy as np
import seaborn as sns

from . import PAGE_WIDTH, figure, panels

__all__ = ["partition_histogram", "substitution_kl", "win_rate_strip", "closed_form_scatter", "divergence_curves"]

COLORS = {"register": "tab:blue", "bundle": "tab:orange", "atom": "tab:blue", "delete": "tab:red",
          "random": "tab:gray", "native": "tab:green"}


def partition_histogram(table, summary, bins=40):
    """Claim 1: histogram of the per-atom median cosine to the native write, by class, with each
    class drawn as a normal curve (its members' weight, mean, std), and the BIC of k = 1, 2, 3."""
    fig, ax = figure(width=6.4, height=3.6)
    edges = np.histogram_bin_edges(table["cos"], bins=bins)
    width = edges[1] - edges[0]
    x = np.linspace(edges[0], edges[-1], 400)
    for cls in ("bundle", "register"):
        vals = table.loc[table["class"] == cls, "cos"]
        ax.hist(vals, bins=edges, alpha=0.6, color=COLORS[cls], label=f"{cls} (n={len(vals)})")
        c = summary["components"][cls]
        if c["std"] > 0:
            dens = np.exp(-0.5 * ((x - c["mean"]) / c["std"]) ** 2) / (c["std"] * np.sqrt(2 * np.pi))
            ax.plot(x, dens * c["weight"] * len(table) * width, color=COLORS[cls])
    bic = ", ".join(f"k={k}: {v:.0f}" for k, v in sorted(summary["bic"].items(), key=lambda kv: int(kv[0])))
    ax.set(xlabel="median cos(atom, native write) over firings", ylabel="atoms")
    ax.set_title(f"BIC {bic}; dBIC(2-1) = {summary['dbic']:.1f}", fontsize=10)
    ax.legend(frameon=False)
    return fig


def substitution_kl(df, read="mean", direction="patched||base"):
    """Claim 3: KL_atom against KL_delete per firing (log scale, colour = cos(atom, write)) and the
    distribution of log10 KL per condition."""
    d = df[(df["read"] == read) & (df["direction"] == direction)]
    conds = [c for c in ("atom", "delete", "random", "native") if f"kl_{c}" in d]
    fig, (ax1, ax2) = figure(1, 2, 8, 3.8)
    floor = 1e-12
    sc = ax1.scatter(d["kl_delete"].clip(lower=floor), d["kl_atom"].clip(lower=floor), c=d["cos_native"], s=8,
                     cmap="coolwarm", vmin=-1, vmax=1)
    lim = [max(floor, min(d["kl_delete"].min(), d["kl_atom"].min())), max(d["kl_delete"].max(), d["kl_atom"].max())]
    ax1.plot(lim, lim, "k--", lw=1)
    ax1.set(xscale="log", yscale="log", xlabel="KL delete", ylabel="KL atom")
    ax1.set_title(f"win rate {d['win'].mean():.1%} (n={len(d)})\n{read} read, {direction}", fontsize=10)
    fig.colorbar(sc, ax=ax1, label="cos(atom, write)")
    long = d.melt(value_vars=[f"kl_{c}" for c in conds], var_name="condition", value_name="kl")
    long["log10 KL"] = np.log10(long["kl"].clip(lower=floor))
    long["condition"] = long["condition"].str[3:]
    sns.violinplot(long, x="condition", y="log10 KL", hue="condition", palette=COLORS, ax=ax2, cut=0, legend=False)
    ax2.set_title(f"scaling: {d['scaling'].iloc[0]}, write: {d['write'].iloc[0]}", fontsize=10)
    return fig


def win_rate_strip(summary, chosen=None):
    """Claim 5: per-head win rates (a ``summarize(df, by=("layer", "head", ...))`` table, one read and
    direction) by layer, each point labelled with its head (``H3``), the ``chosen`` (layer, head) in red,
    with its Wilson CI when the table has one."""
    layers = sorted(summary["layer"].unique())
    most = int(summary.groupby("layer").size().max())  # heads in the fullest layer: room for their labels
    fig, ax = figure(width=min(PAGE_WIDTH, max(4.5, 2.2 * len(layers) + 2.5, 2.0 + 0.3 * most * len(layers))),
                     height=3.8)
    for i, layer in enumerate(layers):
        g = summary[summary["layer"] == layer].sort_values("head").reset_index(drop=True)
        xs = i + np.linspace(-0.25, 0.25, len(g)) if len(g) > 1 else np.array([float(i)])
        for x, (_, r) in zip(xs, g.iterrows()):
            mine = chosen is not None and (r["layer"], r["head"]) == tuple(chosen)
            color = "tab:red" if mine else "tab:blue"
            if "wilson_lo" in r:
                ax.plot([x, x], [r["wilson_lo"], r["wilson_hi"]], color=color, lw=1, alpha=0.6)
            ax.plot(x, r["win_rate"], "o", color=color, ms=7)
            ax.annotate(f"H{int(r['head'])}", (x, r["win_rate"]), textcoords="offset points", xytext=(6, 3),
                        fontsize=9, color=color)
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set_xticks(range(len(layers)), [f"layer {l}" for l in layers])
    ax.set(ylabel="win rate (KL atom < KL delete)", ylim=(0, 1), xlim=(-0.6, len(layers) - 0.4))
    if chosen is not None:
        ax.set_title(f"red: the headline head L{chosen[0]}H{chosen[1]}; bars: Wilson 95% CI", fontsize=10)
    return fig


def closed_form_scatter(df, predictor="pred_direct", split="eval"):
    """Claim 6: measured against predicted logit shift (``split`` rows), one colour per eps, per lag."""
    d = df[df["split"] == split].assign(eps=lambda x: x["eps"].map(lambda e: f"{e:g}"))
    lags = sorted(d["lag"].unique())
    order = sorted(d["eps"].unique(), key=float)
    distinct = ["tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:gray"]
    palette = dict(zip(order, (distinct * len(order))[:len(order)]))
    fig, axes = panels(len(lags), max_cols=2, panel_width=4.0, panel_height=3.6)
    for ax, L in zip(axes, lags):
        g = d[d["lag"] == L]
        sns.scatterplot(g, x=predictor, y="measured", hue="eps", hue_order=order, palette=palette, s=14, ax=ax,
                        legend=L == lags[0])
        lim = [min(g[predictor].min(), g["measured"].min()), max(g[predictor].max(), g["measured"].max())]
        ax.plot(lim, lim, "k--", lw=1)
        ax.set(title=f"lag {L}", xlabel=f"predicted ({predictor})", ylabel="measured logit shift")
    return fig


def divergence_curves(curves):
    """§4: median (and quartiles) of the KL and of the relative state change of the edited head and, when a
    recurrent head follows it, of the later heads, per lag after the edit, one line per condition (a
    :func:`writesae.experiments.divergence.curves` table). A panel with nothing to show (no later recurrent
    head) is left out."""
    shown = [(c, label) for c, label in (("kl", "KL(next token)"), ("state_rel", "relative state change, edited head"),
                                         ("state_rel_later", "relative state change, later heads"))
             if f"{c}_median" in curves and (curves[f"{c}_median"] > 0).any()]
    fig, axes = panels(len(shown), max_cols=3, panel_width=3.6, panel_height=3.4)
    for ax, (col, label) in zip(axes, shown):
        for cond, g in curves.groupby("cond"):
            ax.plot(g["lag"], g[f"{col}_median"], label=cond, color=COLORS.get(cond))
            ax.fill_between(g["lag"], g[f"{col}_q25"], g[f"{col}_q75"], alpha=0.2, color=COLORS.get(cond))
        ax.set(yscale="log", xlabel="positions after the edit", ylabel=label)
    axes[0].legend(frameon=False, fontsize=9)
    return fig
