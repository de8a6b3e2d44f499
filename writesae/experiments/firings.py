"""Firings: where an SAE's atoms fire on a cell, and which of them an experiment uses.

A *firing* is a (position, atom) with a non-zero TopK coefficient on the state ``S_t`` of one cell
(PAPER.md §3); ``rank`` 0 is the top-1 atom ``i* = argmax_i a_i(t)``. :func:`collect` runs the host
over windows and returns every firing as one row, with the signed Frobenius cosine between the atom
and the write at that position — the quantity that decides the substitution results and that every
table carries. :func:`select` picks the *pool* an experiment runs on and writes its name into the table.

Cosines, for an atom ``A`` and the rank-1 additive write ``W_t = b_t k_t v_t^T = k_t u_t^T`` (``u_t = b_t v_t``)::

    cos(A, k u^T) = k^T A u / (||A||_F ||k|| ||u||)

and for a rank-1 atom ``A = v_i w_i^T`` this is ``cos(v_i, k_t) * cos(w_i, u_t)``; the paper's ``cos_v`` =
``cos(v_i, k_t)`` (k-side factor) and ``cos_w`` = ``cos(w_i, v_t)`` (v-side factor) are reported too.
``cos_update`` is the Frobenius cosine with the full update ``U_t = S_t - D_t * S_{t-1}`` (rank 2 for RWKV-7).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..ops import recurrence

__all__ = ["collect", "traced", "select", "top1_at", "write_cosine", "POOLS"]

POOLS = ("top1", "registers")
TRACE_BYTES = 2 ** 28  # a traced (N, T, d_k, d_v) float32 tensor at most this (a trace holds several): 4 windows of
                       # 1,024 tokens at 128 x 128 heads, one recall passage of 310 tokens at GLA-1.3B's 256 x 512
ATOM_BYTES = 2 ** 28   # (n, d_k, d_v) atoms (and the updates beside them) built at once for the cosines


def write_cosine(atoms, k, u):
    """Signed Frobenius cosine between atoms ``(n, d_k, d_v)`` and rank-1 writes ``k u^T`` (``(n, d_k)``, ``(n, d_v)``)."""
    num = torch.einsum("nk,nkv,nv->n", k, atoms, u)
    den = atoms.flatten(1).norm(dim=1) * k.norm(dim=1) * u.norm(dim=1)
    return num / den.clamp_min(1e-30)


def _rank1_factors(sae):
    """(v (n, d_k), w (n, d_v)) of a rank-1 decoder, else None."""
    if getattr(sae, "dec_v", None) is None or sae.cfg.rank != 1:
        return None
    return sae.v, sae.w


def _mean_decay(a):
    """The decay as one number per position: itself (scalar per head) or its mean over key rows."""
    return recurrence.mean_decay(a)


@torch.no_grad()
def traced(host, cell, ids, batch_size=16):
    """(first row, ``host.trace`` of ``cell``) over the windows ``ids`` (N, T), at most ``batch_size`` windows a
    piece, fewer where the cell's states are large (:data:`TRACE_BYTES`); no logits."""
    ids = torch.as_tensor(ids)
    c = host.cell(*cell[:2])
    step = max(1, min(batch_size, TRACE_BYTES // (4 * c.d_k * c.d_v * ids.shape[1])))
    for s0 in range(0, len(ids), step):
        yield s0, host.trace(ids[s0:s0 + step], cells=[(c.layer, c.head)], logits=False)[(c.layer, c.head)]


@torch.no_grad()
def collect(host, sae, cell, ids, *, min_pos=8, batch_size=16, chunk=8192, progress=False) -> pd.DataFrame:
    """Every firing of ``sae`` on ``cell`` = (layer, head) over the windows ``ids`` (N, T), positions >= min_pos.
    At most ``batch_size`` windows are traced at once and ``chunk`` firings' atoms built at once, fewer where a
    state is large (:data:`TRACE_BYTES`, :data:`ATOM_BYTES`: a FlatSAE's 8,192 atoms of GLA-1.3B's 256 x 512
    heads are 4.3 GB, and the updates beside them as much again).

    One row per firing: seq (row of ``ids``), pos, token, layer, head, feature, rank (0 = top-1), coef
    (the TopK coefficient), cos (atom vs the additive write ``W_t``), cos_v = cos(v_i, k_t) and
    cos_w = cos(w_i, v_t) (its k- and v-side factors; NaN for dense atoms), cos_update (atom vs the full update ``U_t``), write_norm
    ``||W_t||_F``, update_norm ``||U_t||_F``, state_norm ``||S_t||_F``, a (the decay; its mean over key rows
    for families with a per-row decay), b (write gate).
    ``df.attrs["params"]`` records what produced it (positions scanned = n_windows * (window - min_pos)).
    """
    ids = torch.as_tensor(ids)
    layer, head = host.cell(*cell)[:2]
    sae.check_cell(host.cell(layer, head))
    N, T = ids.shape
    chunk = max(1, min(chunk, ATOM_BYTES // (4 * host.d_k * host.d_v)))
    factors = _rank1_factors(sae)
    parts = []
    for s0, tr in traced(host, (layer, head), ids, batch_size):
        B = tr.q.shape[0]
        P = T - min_pos
        sl = (slice(None), slice(min_pos, None))
        a = _mean_decay(tr.a)[sl].reshape(B * P, 1)
        k, v, b = (x[sl].reshape(B * P, -1) for x in (tr.k, tr.v, tr.b[..., None]))
        S, U = (x[sl].reshape(B * P, host.d_k, host.d_v) for x in (tr.state, tr.update))
        u_add = b * v
        enc = sae.encode(S)
        acts, order = enc.top_acts.sort(dim=1, descending=True)
        feats = enc.top_indices.gather(1, order)
        row, rank = (acts > 0).nonzero(as_tuple=True)
        feat, coef = feats[row, rank], acts[row, rank]
        cos, cos_u = torch.empty(len(row)), torch.empty(len(row))
        for c0 in range(0, len(row), chunk):
            c = slice(c0, c0 + chunk)
            A = sae.atoms(feat[c]).float()
            cos[c] = write_cosine(A, k[row[c]], u_add[row[c]])
            Uc = U[row[c]]
            cos_u[c] = (A * Uc).flatten(1).sum(1) / (A.flatten(1).norm(dim=1) * Uc.flatten(1).norm(dim=1)).clamp_min(1e-30)
        if factors is not None:
            fv, fw = factors[0][feat].float(), factors[1][feat].float()
            cos_v = torch.cosine_similarity(fv, k[row], dim=1)
            cos_w = torch.cosine_similarity(fw, v[row], dim=1)
        else:
            cos_v = cos_w = torch.full((len(row),), float("nan"))
        seq = row // P + s0
        pos = row % P + min_pos
        parts.append(pd.DataFrame({
            "seq": seq.numpy(), "pos": pos.numpy(), "token": ids[seq, pos].numpy(),
            "layer": layer, "head": head, "feature": feat.numpy(), "rank": rank.numpy(),
            "coef": coef.float().numpy(), "cos": cos.numpy(), "cos_v": cos_v.numpy(), "cos_w": cos_w.numpy(),
            "cos_update": cos_u.numpy(), "write_norm": u_add.norm(dim=1)[row].mul(k.norm(dim=1)[row]).numpy(),
            "update_norm": U.flatten(1).norm(dim=1)[row].numpy(),
            "state_norm": S.flatten(1).norm(dim=1)[row].numpy(), "a": a[row, 0].numpy(), "b": b[row, 0].numpy(),
        }))
        if progress:
            print(f"firings: windows {s0 + B}/{N}")
    df = pd.concat(parts, ignore_index=True)
    df.attrs["params"] = dict(model=host.name, cell=[layer, head], n_windows=N, window=T, min_pos=min_pos,
                              sae=dict(variant=sae.cfg.variant, n_feat=sae.cfg.n_feat, k=sae.cfg.k,
                                       **{k_: sae.info[k_] for k_ in ("cell", "model") if k_ in sae.info}))
    return df


def select(firings, pool="top1", *, classes=None, min_per_atom=1, max_per_atom=None, max_firings=None,
           seed=0) -> pd.DataFrame:
    """The firings an experiment runs on; adds a ``pool`` column naming the choice.

    pool: ``"top1"`` every top-1 firing; ``"registers"`` the top-1 firings of register atoms (the paper's
    headline pool; needs ``classes``, the table of :func:`writesae.experiments.partition.partition`);
    or a list of atom ids: every firing (any rank) of those atoms (pool name ``"atoms"``).
    Atoms with fewer than ``min_per_atom`` firings in the pool are dropped; then at most ``max_per_atom``
    firings per atom and ``max_firings`` in all are drawn (seeded). Rows come back sorted by (seq, pos).
    """
    if isinstance(pool, str):
        if pool not in POOLS:
            raise ValueError(f"pool {pool!r} is not one of {POOLS} or a list of atoms")
        df = firings[firings["rank"] == 0]
        if pool == "registers":
            if classes is None:
                raise ValueError("pool 'registers' needs classes= (the partition table)")
            reg = classes.loc[classes["class"] == "register", "feature"]
            df = df[df["feature"].isin(reg)]
        name = pool
    else:
        df = firings[firings["feature"].isin([int(f) for f in pool])]
        name = "atoms"
    rng = np.random.default_rng(seed)
    counts = df.groupby("feature")["feature"].transform("size")
    df = df[counts >= min_per_atom]
    if max_per_atom is not None:
        draw = pd.Series(rng.random(len(df)), index=df.index)
        df = df[draw.groupby(df["feature"]).rank(method="first") <= max_per_atom]
    if max_firings is not None and len(df) > max_firings:
        df = df.iloc[np.sort(rng.permutation(len(df))[:max_firings])]
    df = df.sort_values(["seq", "pos", "rank"]).reset_index(drop=True).assign(pool=name)
    df.attrs["params"] = dict(firings.attrs.get("params", {}), pool=name if name != "atoms" else sorted(map(int, pool)),
                              min_per_atom=min_per_atom, max_per_atom=max_per_atom, max_firings=max_firings,
                              select_seed=seed)
    return df


def top1_at(firings, sites) -> pd.DataFrame:
    """The positions (seq, pos) of ``sites``, each with the top-1 atom of another SAE's ``firings`` there
    (its feature, coef, cos, cos_update); positions where that SAE has no active atom are dropped. Used to
    run a second decoder (e.g. a FlatSAE, App. F.4) on the same firings as the first."""
    top = firings[firings["rank"] == 0][["seq", "pos", "feature", "coef", "cos", "cos_update"]]
    out = sites.drop(columns=["feature", "coef", "cos", "cos_update", "cos_v", "cos_w"], errors="ignore").merge(
        top, on=["seq", "pos"], how="inner")
    out.attrs["params"] = dict(sites.attrs.get("params", {}), decoder=firings.attrs.get("params", {}).get("sae"))
    return out.sort_values(["seq", "pos"]).reset_index(drop=True)
