"""Multi-step divergence (PAPER.md §4): after one substitution, how far the state and the output
distribution drift over the next positions, for atom, delete and random (the conditions of
:mod:`writesae.experiments.substitution`, same matrices).

Per site and condition, at each lag 0..horizon after the edited position t: the KL between edited and
unedited next-token distributions at t + lag, the relative state change ``||S'_{t+lag} - S_{t+lag}|| /
||S_{t+lag}||`` of the edited cell, and the mean relative state change over the recurrent cells of
later layers (NaN when none follows).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..hosts import Edit
from .substitution import _generator, _native, condition_matrices, kl_by_position

__all__ = ["divergence", "curves"]


@torch.no_grad()
def divergence(host, sae, ids, sites, *, horizon=32, conditions=("atom", "delete", "random"), scaling="coef",
               write="additive", direction="patched||base", seed=0) -> pd.DataFrame:
    """One row per (site, condition, lag): the site's feature, seq, pos, coef, cos; cond, lag, kl,
    state_rel (edited cell), state_rel_later (mean over later-layer cells). ``sites``: one cell."""
    layer, head = (int(x) for x in sites[["layer", "head"]].drop_duplicates().iloc[0])
    ids = torch.as_tensor(ids)
    T = ids.shape[1]
    cells = [(layer, head)] + [(c.layer, c.head) for c in host.cells if c.layer > layer]
    rows = []
    for _, st in sites.iterrows():
        s, p, f = int(st["seq"]), int(st["pos"]), int(st["feature"])
        pos = list(range(p, min(p + horizon + 1, T)))
        base = host.trace(ids[s:s + 1], cells=cells, positions=pos)
        mats = condition_matrices(sae.atom(f).float(), float(st["coef"]), _native(base[(layer, head)], 0, 0, write),
                                  scaling, _generator(seed, s, p, f))
        edits = [Edit(i, layer, head, p, mats[c][0], mats[c][1], write=write) for i, c in enumerate(conditions)]
        ed = host.trace(ids[s:s + 1].expand(len(conditions), -1), cells=cells, positions=pos, edits=edits)
        kl = kl_by_position(ed.logits[:, pos], base.logits[0, pos], direction)

        def rel(c):
            d = (ed[c].state - base[c].state).flatten(2).norm(dim=-1)
            return d / base[c].state.flatten(2).norm(dim=-1).clamp_min(1e-30)

        own = rel((layer, head))
        later = torch.stack([rel(c) for c in cells[1:]]).mean(0) if len(cells) > 1 else torch.full_like(own, np.nan)
        for i, c in enumerate(conditions):
            for L in range(len(pos)):
                rows.append(dict(feature=f, seq=s, pos=p, coef=float(st["coef"]), cos=float(st["cos"]), cond=c, lag=L,
                                 kl=float(kl[i, L]), state_rel=float(own[i, L]), state_rel_later=float(later[i, L])))
    out = pd.DataFrame(rows)
    out.attrs["params"] = dict(sites.attrs.get("params", {}), horizon=horizon, conditions=list(conditions),
                               scaling=scaling, write=write, direction=direction, seed=seed)
    return out


def curves(df) -> pd.DataFrame:
    """Median and quartiles of kl, state_rel and state_rel_later per (cond, lag)."""
    g = df.groupby(["cond", "lag"])
    parts = {f"{col}_{name}": g[col].quantile(q) for col in ("kl", "state_rel", "state_rel_later")
             for name, q in (("q25", 0.25), ("median", 0.5), ("q75", 0.75))}
    return pd.DataFrame({"n": g.size(), **parts}).reset_index()
