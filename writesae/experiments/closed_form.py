"""Claims 6 and 7 (PAPER.md §2, App. A): the closed-form logit shift of adding an atom, and its selectivity.

Orientation of this code: the state ``S`` is ``d_k x d_v`` and the head reads ``o_t = S_t^T q_t``. Add
``eps A`` (``A = v w^T``, ``v in R^{d_k}``, ``w in R^{d_v}``, ``||A||_F = 1``) to ``S_{t0}``. The layer's own
inputs do not change, so the perturbation evolves exactly by the family's transport
(:func:`writesae.ops.recurrence.transport`: ``dS_s = D_s * dS_{s-1} + e_s (f_s^T dS_{s-1})``, for Gated
DeltaNet ``a_s (I - b_s k_s k_s^T) dS_{s-1}``, for Mamba-2 and GLA the decay alone)::

    dS_t = P_{t0->t} eps A        do_t = dS_t^T q_t = eps (q_t . P v) w = eps (P^T q_t . v) w   (exact)

The paper's approximation drops the erase factors: ``P ~ G I`` with ``G = prod a_s`` (1 at t = t0), so
``do_t ~ eps G (q_t . v) w``; the q-side pairs with ``v`` (the d_k factor) and the output direction is ``w``.
The head output then reaches the logits through ``host.head_out`` (for Gated DeltaNet the gated RMSNorm
``norm(o, z)`` and the head's ``d_v`` columns ``W_O,h`` of ``out_proj``), the residual stream, later layers,
and ``host.unembed`` (final norm and ``W_U``).

Predicted logit shifts stored per (site, eps, lag, eval token):

- ``pred_paper``: ``eps G (A^T q_t) . (W_U W_O,h)[tok]`` -- the paper's first-order formula: no norms, no
  later layers. Its raw scale is not meaningful; the paper fits one scalar (``c_paper`` per atom in
  :func:`r2`, fitted by least squares on the *fit* prompts only, evaluated on disjoint *eval* prompts).
- ``pred_direct``: no fitted parameter. The exact ``do_t`` pushed through the Jacobians of ``host.head_out``
  and of ``host.unembed`` at the unedited point (torch.func.jvp); the rest of
  the network (the edited layer's MLP and every later layer) is ignored: the change rides the residual
  stream straight to the output.
- ``direct_nonlinear``: the same path without linearising: ``logits(r_t + dy) - logits(r_t)`` with ``dy``
  the exact change of the layer output. ``direct_nonlinear - pred_direct`` is the norms' nonlinearity,
  ``measured - direct_nonlinear`` what the rest of the network adds.

``measured`` is the logit change of a full edited forward (``host.run_edits``, edit kind ``add``).
Eval tokens at each site are ranked by ``|pred_paper|`` (the atom's own token ordering) and kept at
``ranks``. Fitted quantities: none for ``pred_direct``; the scalars ``c_*`` of :func:`r2` only.

What the read-out needs (the head-out context and the final residual) comes from ``host.readout``, so
every host family runs this module unchanged.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.func import jvp

from ..hosts import Edit
from ..ops import recurrence
from ..verdicts import R2_FLOOR, median_ci
from .substitution import _generator, random_rank1

__all__ = ["readout", "propagate", "closed_form", "r2", "r2_summary", "r2_shown", "R2_FLOOR", "edited_layer",
           "selectivity"]


def readout(host, cell, ids, edits=()):
    """``host.readout`` unpacked: (CellTrace, per-position context of ``host.head_out``, head output ``o``
    (B, T, d_v), final residual (B, T, hidden), logits)."""
    ro = host.readout(cell, ids, edits)
    return ro.trace, ro.context, ro.trace.out, ro.residual, ro.logits


def _seq(ct, b):
    """The CellTrace of batch row b."""
    return type(ct)(*(None if x is None else x[b] for x in ct))


def _at(context, *index):
    return tuple(c[index] for c in context)


def _in_model_dtype(host, *xs):
    """Float tensors in the model's weights' dtype (a bf16 model's direct path multiplies by bf16 weights)."""
    return tuple(x.to(host.dtype) if torch.is_tensor(x) and x.is_floating_point() else x for x in xs)


def _layer_out(host, cell, o, context):
    """The edited layer's output as a function of the head output (the rest of the layer at its run values), in
    float32; computed in the model's dtype (a bf16 model: bf16 rounding)."""
    return host.head_out(cell, *_in_model_dtype(host, o, *context)).float()


def _logits(host, r):
    return host.unembed(*_in_model_dtype(host, r)).float()


def propagate(ct, t0, t, q):
    """``P_{t0->t}^T q`` with ``P`` the layer's own transport of a state perturbation over the steps
    t0+1..t (read from the CellTrace ``ct`` of one sequence: a, e, f at every position), and
    ``G = prod a_s`` (the paper's gate product; for a per-key-row or elementwise decay, its mean). Under an
    elementwise decay (Mamba-1) the result is a ``(d_k, d_v)`` matrix, column j what output j reads:
    apply it to a state change with :func:`writesae.ops.recurrence.read_through`."""
    y = q.clone()
    for s in range(t, t0, -1):
        y = recurrence.transport_back(y, ct.a[s].log(), None if ct.e is None else ct.e[s],
                                      None if ct.f is None else ct.f[s])
    G = ct.a[t0 + 1:t + 1].prod(0).mean() if t > t0 else torch.tensor(1.0)
    return y, float(G)


def _unit_atom(sae, f):
    A = sae.atom(int(f)).detach().float()
    return A / A.norm()


def _site_split(sites, fit_frac, seed):
    """"fit" / "eval" per site: for each atom, a seeded ``fit_frac`` of its sequences fits, the rest
    evaluates (an atom's fit and eval prompts are disjoint)."""
    rng = np.random.default_rng(seed)
    split = pd.Series("eval", index=sites.index)
    for _, g in sites.groupby("feature"):
        seqs = rng.permutation(sorted(g["seq"].unique()))
        fit = seqs[:int(round(fit_frac * len(seqs)))]
        split[g.index[g["seq"].isin(fit)]] = "fit"
    return split


@torch.no_grad()
def _added_logits(host, layer, head, ids, items, lags):
    """items: [(seq, pos, [matrices])] -> per item a tensor (n_matrices, len(lags), V) of logit changes
    at positions pos + lag after adding each matrix to S_pos of the cell (one run per sequence)."""
    T = ids.shape[1]
    out = [None] * len(items)
    for s in sorted({it[0] for it in items}):
        mine = [i for i, it in enumerate(items) if it[0] == s]
        rows, where = [], []
        for i in mine:
            _, p, mats = items[i]
            for m in mats:
                where.append(i)
                rows.append(Edit(0, layer, head, p, "add", m))
        positions = sorted({min(items[i][1] + L, T - 1) for i in mine for L in lags})
        run = host.run_edits(ids[s:s + 1], rows, positions=positions)
        delta = run.logits - run.base[0]
        col = {p: n for n, p in enumerate(positions)}
        for i in mine:
            sel = [n for n, w in enumerate(where) if w == i]
            out[i] = delta[sel][:, [col[min(items[i][1] + L, T - 1)] for L in lags]]
    return out


@torch.no_grad()
def closed_form(host, sae, ids, sites, *, eps=(0.1, 0.3, 1.0, 3.0), relative_to=None, lags=(0,),
                ranks=(1, 2, 5, 10, 50), fit_frac=0.5, seed=0, trace_batch=16) -> pd.DataFrame:
    """Measured vs predicted logit shifts of adding ``eps * ref * A_i / ||A_i||`` to the state at each
    site (rows with seq, pos, layer, head, feature; one cell), read at t = pos + lag for the eval tokens
    of ``ranks``; ``ref`` is 1 (``relative_to=None``, the paper's absolute eps), ``||W_t0||_F``
    (``"write"``) or ``||S_t0||_F`` (``"state"``). One row per (site, eps, lag, token rank) with ``norm``
    (the added matrix's Frobenius norm) and ``split`` ("fit" / "eval", per atom by sequence, see
    :func:`r2`). See the module docstring for the predictors."""
    if relative_to not in (None, "write", "state"):
        raise ValueError(f"relative_to {relative_to!r} is not None, 'write' or 'state'")
    layer, head = (int(x) for x in sites[["layer", "head"]].drop_duplicates().iloc[0])
    ids = torch.as_tensor(ids)
    T = ids.shape[1]
    sites = sites[sites["pos"] + max(lags) < T].reset_index(drop=True)
    split = _site_split(sites, fit_frac, seed)
    cell = host.cell(layer, head)
    sae.check_cell(cell)
    U_tok = host.head_unembed(cell).float()  # (V, d_v): the paper's token read-out W_U W_O[head] of the head output
    rows = []
    seqs = sorted(sites["seq"].unique())
    for b0 in range(0, len(seqs), trace_batch):
        batch = seqs[b0:b0 + trace_batch]
        ct, ctx, o, r, _ = readout(host, cell, ids[torch.as_tensor(batch)])
        mine = [(bi, j) for bi, s in enumerate(batch) for j in sites.index[sites["seq"] == s]]
        items, refs = [], []
        for bi, j in mine:
            p, A = int(sites.at[j, "pos"]), _unit_atom(sae, sites.at[j, "feature"])
            ref = {None: 1.0, "write": float(ct.write[bi, p].norm()), "state": float(ct.state[bi, p].norm())}[relative_to]
            refs.append(ref)
            items.append((int(sites.at[j, "seq"]), p, [e * ref * A for e in eps]))
        measured = _added_logits(host, layer, head, ids, items, lags)
        for (bi, j), ref, meas, (s, p, _) in zip(mine, refs, measured, items):
            f = int(sites.at[j, "feature"])
            A = _unit_atom(sae, f)
            order = (U_tok @ (A.T @ ct.q[bi, p])).abs().argsort(descending=True)
            for li, L in enumerate(lags):
                t = p + L
                y, G = propagate(_seq(ct, bi), p, t, ct.q[bi, t])
                do, do_paper = recurrence.read_through(A, y), G * (A.T @ ct.q[bi, t])
                cx = _at(ctx, bi, t)
                dy = jvp(lambda x: _layer_out(host, cell, x, cx), (o[bi, t],), (do,))[1]
                dlog = jvp(lambda x: _logits(host, x), (r[bi, t],), (dy,))[1]
                y0, l0 = _layer_out(host, cell, o[bi, t], cx), _logits(host, r[bi, t])
                for ei, e in enumerate(eps):
                    n = e * ref
                    dlog_nl = _logits(host, r[bi, t] + _layer_out(host, cell, o[bi, t] + n * do, cx) - y0) - l0
                    for rk in ranks:
                        tok = int(order[rk - 1])
                        rows.append(dict(feature=f, seq=s, pos=p, lag=L, t=t, eps=e, norm=n, token_rank=rk, token=tok,
                                         measured=float(meas[ei, li, tok]), pred_direct=float(n * dlog[tok]),
                                         direct_nonlinear=float(dlog_nl[tok]), pred_paper=float(n * U_tok[tok] @ do_paper),
                                         G=G, split=split[j]))
    df = pd.DataFrame(rows)
    df.attrs["params"] = dict(sites.attrs.get("params", {}), eps=list(eps), relative_to=relative_to, lags=list(lags),
                              ranks=list(ranks), fit_frac=fit_frac, seed=seed)
    return df


def _r2(m, p):
    ss = ((m - m.mean()) ** 2).sum()
    return float(1 - ((m - p) ** 2).sum() / ss) if ss > 0 else np.nan


PREDICTORS = ("pred_direct", "direct_nonlinear", "pred_paper")


def r2(df, by=("feature",)) -> pd.DataFrame:
    """R^2 of each predictor against ``measured`` on the *eval* rows, per group of ``by``.

    ``r2_<pred>``: no fitted parameter. ``r2_<pred>_fit``: with one scalar ``c`` per atom,
    ``c = sum(m p) / sum(p^2)`` over that atom's *fit* rows (disjoint prompts), the paper's one fitted
    scalar; ``c_<pred>`` is reported when ``by`` holds ``feature``."""
    by = list(by)
    fit = df[df["split"] == "fit"]
    c = {pred: fit.groupby("feature").apply(lambda g, pr=pred: (g["measured"] * g[pr]).sum() / (g[pr] ** 2).sum(),
                                            include_groups=False) if len(fit) else pd.Series(dtype=float)
         for pred in PREDICTORS}  # no fit rows: the fitted R^2 is NaN
    ev = df[df["split"] == "eval"]
    rows = []
    for key, g in ev.groupby(by, sort=True):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)), n=len(g))
        m = g["measured"].to_numpy()
        for pred in PREDICTORS:
            scale = g["feature"].map(c[pred]).to_numpy()
            row[f"r2_{pred}"] = _r2(m, g[pred].to_numpy())
            row[f"r2_{pred}_fit"] = _r2(m, scale * g[pred].to_numpy())
            if "feature" in by:
                row[f"c_{pred}"] = float(scale[0])
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs["params"] = dict(df.attrs.get("params", {}), by=by)
    return out


def r2_summary(table) -> pd.DataFrame:
    """Median with its bootstrap 95% interval over atoms (median_lo, median_hi), IQR and share above 0.95 of
    every ``r2_*`` column of an :func:`r2` table."""
    cols = [c for c in table if c.startswith("r2_")]
    rows = []
    for c in cols:
        _, lo, hi = median_ci(table[c])
        rows.append(dict(predictor=c[3:], n=int(table[c].notna().sum()), median=table[c].median(), median_lo=lo,
                         median_hi=hi, q25=table[c].quantile(0.25), q75=table[c].quantile(0.75),
                         frac_gt_0_95=float((table[c] > 0.95).mean())))
    return pd.DataFrame(rows)


def r2_shown(df, floor=R2_FLOOR) -> pd.DataFrame:
    """``df`` for a page: every R^2 below ``floor`` written as "below -1". R^2 = 1 - SS_res / SS_tot divides by the
    variance of the measured shift; where that barely varies (a near-constant target) any miss gives R^2 in the
    thousands below zero, a number that says only "worse than predicting the mean". R^2 columns: ``r2_*`` and a
    summary's median / quartiles."""
    out = df.copy()
    cols = [c for c in out if str(c).startswith("r2_") or c in ("median", "median_lo", "median_hi", "q25", "q75")]
    for c in cols:
        v = pd.to_numeric(out[c], errors="coerce")
        if (v < floor).any():
            out[c] = [f"below {floor:g}" if x < floor else x for x in v]
    return out


@torch.no_grad()
def edited_layer(host, sae, ids, sites, *, eps=(1e-3, 1e-2, 0.1, 1.0, 3.0), lags=(0, 2)) -> pd.DataFrame:
    """The closed form at the edited layer itself: per (site, eps, lag), R^2 (over vector components) of
    the exact prediction ``do_t = eps A^T P^T q_t`` against the measured head output change, and of the
    first-order (JVP) prediction of the layer output change ``host.head_out(o)`` against the measured one
    (-> 1 as eps -> 0; the gap at large eps is the output norm's nonlinearity)."""
    layer, head = (int(x) for x in sites[["layer", "head"]].drop_duplicates().iloc[0])
    sae.check_cell(host.cell(layer, head))
    ids = torch.as_tensor(ids)
    T = ids.shape[1]
    rows = []
    for _, st in sites[sites["pos"] + max(lags) < T].iterrows():
        s, p, f = int(st["seq"]), int(st["pos"]), int(st["feature"])
        A = _unit_atom(sae, f)
        x = ids[s:s + 1].expand(len(eps), -1)
        cell = host.cell(layer, head)
        ct, ctx, o, _, _ = readout(host, cell, ids[s:s + 1])
        ce, ctxe, oe, _, _ = readout(host, cell, x, [Edit(i, layer, head, p, "add", e * A) for i, e in enumerate(eps)])
        for L in lags:
            t = p + L
            y, G = propagate(_seq(ct, 0), p, t, ct.q[0, t])
            do = recurrence.read_through(A, y)
            cx = _at(ctx, 0, t)
            dy = jvp(lambda v: _layer_out(host, cell, v, cx), (o[0, t],), (do,))[1]
            y0 = _layer_out(host, cell, o[0, t], cx)
            for i, e in enumerate(eps):
                m_head = ce.out[i, t] - ct.out[0, t]
                m_layer = _layer_out(host, cell, oe[i, t], _at(ctxe, i, t)) - y0
                rows.append(dict(feature=f, seq=s, pos=p, lag=L, eps=e, G=G,
                                 r2_head=_r2(m_head.double().numpy(), (e * do).double().numpy()),
                                 r2_layer=_r2(m_layer.double().numpy(), (e * dy).double().numpy()),
                                 rel_err_layer=float((m_layer - e * dy).norm() / m_layer.norm().clamp_min(1e-30))))
    return pd.DataFrame(rows)


def _orthogonal_rank1(A, generator):
    """A unit rank-1 ``g h^T`` with ``g`` orthogonal to A's top left and ``h`` to its top right singular vector."""
    U, _, Vh = torch.linalg.svd(A)
    u, v = U[:, 0], Vh[0]
    g, h = torch.randn(A.shape[0], generator=generator), torch.randn(A.shape[1], generator=generator)
    g, h = g - (g @ u) * u, h - (h @ v) * v
    return torch.outer(g / g.norm(), h / h.norm())


@torch.no_grad()
def selectivity(host, sae, ids, sites, *, eps=1.0, top=10, seed=0) -> pd.DataFrame:
    """Claim 7: 1 - |top-K overlap| between the tokens an atom promotes most (largest logit change at the
    edited position when ``eps A / ||A||`` is added to the state) and those of matched-norm controls:
    a random rank-1 matrix and a rank-1 matrix orthogonal to the atom's factors. One row per (site, control)."""
    layer, head = (int(x) for x in sites[["layer", "head"]].drop_duplicates().iloc[0])
    sae.check_cell(host.cell(layer, head))
    ids = torch.as_tensor(ids)
    items, meta = [], []
    for s, p, f in zip(sites["seq"], sites["pos"], sites["feature"]):
        A, g = _unit_atom(sae, f), _generator(seed, s, p, f)
        items.append((int(s), int(p), [eps * A, eps * random_rank1(*A.shape, g), eps * _orthogonal_rank1(A, g)]))
        meta.append((int(f), int(s), int(p)))
    deltas = _added_logits(host, layer, head, ids, items, (0,))
    rows = []
    for (f, s, p), d in zip(meta, deltas):
        sets = [set(d[i, 0].topk(top).indices.tolist()) for i in range(3)]
        for name, other in (("random", sets[1]), ("orthogonal", sets[2])):
            ov = len(sets[0] & other) / top
            rows.append(dict(feature=f, seq=s, pos=p, control=name, overlap=ov, selectivity=1 - ov))
    out = pd.DataFrame(rows)
    out.attrs["params"] = dict(sites.attrs.get("params", {}), eps=eps, top=top, seed=seed)
    return out
