"""Claim 1 (PAPER.md §3.1): registers and bundles.

Per alive atom, the median signed Frobenius cosine between the atom and the native write over its
firings; a Gaussian mixture with 1, 2, 3 components on these medians (``writesae.stats.gmm_partition``)
with BIC and dBIC = BIC(2) - BIC(1); the atoms of the higher-mean component of the 2-component fit are
the "registers", the others the "bundles". A mixture with unequal variances gives the broader component
both tails, so an atom far *below* the bundles can land in the register component; registers are
therefore the register-component atoms whose cosine also exceeds the bundle component's mean (a
threshold at the upper crossing of the two components), and the summary keeps the raw GMM count. A mixture
always puts some atoms in its upper component: the registers are a *class* only where two components fit
better than one by more than :data:`CLASS_DBIC` (:func:`has_classes`); elsewhere a register cosine is not
reported. The exemplar table adds fire rate, top tokens and the top
reader head: the later recurrent head whose output responds most when the atom is added to the state.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .. import stats
from ..hosts import Edit

__all__ = ["CLASS_DBIC", "has_classes", "atom_table", "partition", "reader_heads", "exemplars"]

CLASS_DBIC = -10.0  # dBIC = BIC(2) - BIC(1) below this: two classes (a BIC difference of 10 is strong evidence)


def has_classes(dbic) -> bool:
    """Whether a partition's ``dbic`` shows two classes of atoms (below :data:`CLASS_DBIC`; NaN: no fit)."""
    return bool(np.isfinite(dbic) and dbic < CLASS_DBIC)


def atom_table(firings) -> pd.DataFrame:
    """One row per atom that fired: n_firings, n_top1, fire_rate (firings / positions scanned, the
    positions being those where any atom fired), and medians over its firings of cos, cos_v, cos_w,
    cos_update, coef."""
    n_pos = len(firings[["seq", "pos"]].drop_duplicates())
    g = firings.groupby("feature")
    out = pd.DataFrame({
        "n_firings": g.size(), "n_top1": g["rank"].apply(lambda r: int((r == 0).sum())),
        "cos": g["cos"].median(), "cos_v": g["cos_v"].median(), "cos_w": g["cos_w"].median(),
        "cos_update": g["cos_update"].median(), "coef": g["coef"].median(),
    }).reset_index()
    out.insert(3, "fire_rate", out["n_firings"] / n_pos)
    out.attrs["params"] = dict(firings.attrs.get("params", {}), n_positions=n_pos)
    return out


def partition(atoms, *, min_firings=1, ks=(1, 2, 3), seed=0):
    """(table, summary): the alive atoms (>= ``min_firings`` firings) with a ``class`` column
    ("register" / "bundle", see the module docstring), and a summary dict: n_alive, n_register,
    n_bundle, n_register_gmm (before the bundle-mean rule), threshold (lowest register cosine), bic
    {k: BIC}, dbic, k (lowest BIC), means (bundle, register) of the fit, mean_cos per class, and
    ``components``: per class (weight, mean, std) of its members (for plotting)."""
    alive = atoms[atoms["n_firings"] >= min_firings].reset_index(drop=True)
    if len(alive) < 2 * max(ks):
        raise ValueError(f"{len(alive)} alive atoms: too few for a {max(ks)}-component mixture")
    fit = stats.gmm_partition(alive["cos"].to_numpy(), ks=ks, seed=seed)
    register = (fit.labels == "register") & (alive["cos"].to_numpy() > fit.means[0])
    table = alive.assign(**{"class": np.where(register, "register", "bundle")})
    comps = {c: dict(weight=float((table["class"] == c).mean()), mean=float(table.loc[table["class"] == c, "cos"].mean()),
                     std=float(table.loc[table["class"] == c, "cos"].std(ddof=0)))
             for c in ("bundle", "register")}
    summary = dict(n_alive=len(alive), n_register=int(register.sum()), n_bundle=int((~register).sum()),
                   n_register_gmm=fit.n_register, threshold=float(alive["cos"][register].min()) if register.any() else np.nan,
                   bic={int(k): v for k, v in fit.bic.items()}, dbic=fit.dbic, k=fit.k, means=list(fit.means),
                   mean_cos={c: comps[c]["mean"] for c in comps}, components=comps,
                   params=dict(atoms.attrs.get("params", {}), min_firings=min_firings, ks=list(ks), seed=seed))
    table.attrs["params"] = summary["params"]
    return table, summary


def _sites(firings, feature, n_sites, seed):
    f = firings[firings["feature"] == feature]
    pick = np.random.default_rng(seed).permutation(len(f))[:n_sites]
    return f.iloc[np.sort(pick)]


@torch.no_grad()
def reader_heads(host, sae, cell, ids, firings, features, *, n_sites=8, batch=4, seed=0) -> pd.DataFrame:
    """How much each later recurrent head's output moves when atom ``f`` (at its coefficient) is added
    to the state of ``cell`` at ``n_sites`` of its firing positions.

    One row per (feature, layer, head) of the later cells: response = mean over sites of
    ``mean_{t>=pos} ||d out_t|| / mean_{t>=pos} ||out_t||`` (out = S_t^T q_t of that head). Empty when no
    recurrent layer follows ``cell``'s layer. The later heads' outputs are read walking up the model once
    (``host.head_outputs``, unedited and edited side by side): no state is kept, so all but the edited steps run
    in the chunked forms."""
    ids = torch.as_tensor(ids)
    layer, head = host.cell(*cell)[:2]
    later = [(c.layer, c.head) for c in host.cells if c.layer > layer]
    rows = []
    for f in features:
        sites = _sites(firings, f, n_sites, seed)
        resp = {c: [] for c in later}
        for b0 in range(0, len(sites), batch) if later else ():
            chunk = sites.iloc[b0:b0 + batch]
            x = ids[torch.tensor(chunk["seq"].tolist())]
            A = sae.atom(int(f)).float()
            edits = [Edit(r, layer, head, int(p), "add", float(c) * A) for r, (p, c) in enumerate(zip(chunk["pos"], chunk["coef"]))]
            p0 = int(chunk["pos"].min())
            pos = range(p0, x.shape[1])
            walks = zip(host.head_outputs(x, cells=later, positions=pos),
                        host.head_outputs(x, cells=later, positions=pos, edits=edits))
            for (_, base), (_, edit) in walks:
                for c in base:
                    d = (edit[c] - base[c]).norm(dim=-1)
                    o = base[c].norm(dim=-1)
                    for r, p in enumerate(chunk["pos"]):
                        resp[c].append(float(d[r, p - p0:].mean() / o[r, p - p0:].mean().clamp_min(1e-30)))
        rows += [dict(feature=int(f), layer=c[0], head=c[1], response=float(np.mean(v))) for c, v in resp.items()]
    out = pd.DataFrame(rows, columns=["feature", "layer", "head", "response"])
    out.attrs["params"] = dict(model=host.name, cell=[layer, head], n_sites=n_sites, seed=seed)
    return out


def exemplars(host, sae, cell, ids, firings, classes, *, n_per_class=3, n_sites=8, n_tokens=3, seed=0) -> pd.DataFrame:
    """The exemplar table: the ``n_per_class`` most frequent atoms of each class with class, cos,
    cos_v, cos_w, fire_rate, the most common tokens at their firings (decoded when the host has a
    tokenizer) and the top reader head (see :func:`reader_heads`; empty when none follows)."""
    pick = (classes.sort_values("fire_rate", ascending=False).groupby("class", sort=True).head(n_per_class)
            .sort_values(["class", "fire_rate"], ascending=[False, False]))
    readers = reader_heads(host, sae, cell, ids, firings, pick["feature"].tolist(), n_sites=n_sites, seed=seed)
    top = readers.sort_values("response", ascending=False).groupby("feature").head(1).set_index("feature")
    tok = host.tokenizer

    def tokens(f):
        common = firings.loc[firings["feature"] == f, "token"].value_counts().index[:n_tokens]
        return " ".join(repr(tok.decode([int(t)])) if tok is not None else str(int(t)) for t in common)

    out = pick[["class", "feature", "cos", "cos_v", "cos_w", "fire_rate", "n_firings"]].copy()
    out["top_tokens"] = [tokens(f) for f in out["feature"]]
    out["reader"] = [f"L{int(top.loc[f, 'layer'])}H{int(top.loc[f, 'head'])}" if f in top.index else "" for f in out["feature"]]
    out["reader_response"] = [float(top.loc[f, "response"]) if f in top.index else np.nan for f in out["feature"]]
    out = out.reset_index(drop=True)
    out.attrs["params"] = dict(classes.attrs.get("params", {}), n_per_class=n_per_class, n_sites=n_sites, seed=seed)
    return out
