"""Claims 2-5 (PAPER.md §3.2, App. F): single-write substitution, its population and all-heads
versions, and the passage NLL of deleting register writes.

At each firing (seq, pos, feature i, coefficient a) of a cell, the native write ``N`` (``W_t = b k v^T``
by default, or the full delta-rule update ``U_t`` with ``write="update"``) is replaced, in one batched
edited forward from the cached prefix, by:

=========  ==============================================================================
atom       ``a A_i`` (``scaling="coef"``) or ``A_i / ||A_i|| * ||N||`` (``scaling="norm"``, matched norm)
delete     nothing (``S_t <- S_t - N``)
random     a fresh random rank-1 unit matrix (seeded per firing) at the atom's Frobenius norm
native     ``N`` itself (a check: KL 0)
=========  ==============================================================================

The KL between patched and baseline next-token distributions is read at every position from the
edit to the window's end and reduced three ways (``reads``): ``next`` (the distribution at t),
``final`` (the window's last position), ``mean`` (mean over t..end). ``direction`` is
``"patched||base"`` (the paper's text) or ``"base||patched"`` (the released script); both can be
stored at no extra cost. A firing is a *win* when KL_atom < KL_delete.

The geometric null model (PAPER.md §4): the atom leaves a smaller state residual than deletion,
``||s A - N|| < ||N||`` with ``s`` the atom's scale (unit ``A``), exactly when ``s < 2 ||N|| cos(A, N)``
(coefficient scaling; with matched norm, when cos > 1/2). ``geom_win`` records it per firing;
:func:`summarize` reports its agreement with the measured win and the share of wins it does not explain.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .. import stats
from ..verdicts import difference_text, paired_difference, rate_difference
from ..cache import write_text
from ..hosts import Edit
from . import firings as _firings
from . import partition as _partition

__all__ = ["READS", "DIRECTIONS", "CONDITIONS", "SCALINGS", "LOGITS_BYTES", "rows_within", "condition_matrices",
           "kl_by_position", "kl_both",
           "substitute", "summarize", "binned", "population", "substitute_cells", "passage_nll",
           "passage_summary", "decoder_gap", "compare_pools"]

READS = ("next", "final", "mean")
DIRECTIONS = ("patched||base", "base||patched")
CONDITIONS = ("atom", "delete", "random", "native")
SCALINGS = ("coef", "norm")


def _generator(seed, *keys):
    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1)[0]))


def random_rank1(d_k, d_v, generator):
    """A random rank-1 matrix ``g h^T`` with unit Gaussian factors (unit Frobenius norm)."""
    g, h = torch.randn(d_k, generator=generator), torch.randn(d_v, generator=generator)
    return torch.outer(g / g.norm(), h / h.norm())


def condition_matrices(atom, coef, native, scaling, generator):
    """{condition: (edit kind, matrix)} for one firing; see the module docstring.

    atom: the SAE's decoder atom ``A_i`` (d_k, d_v); coef: its TopK coefficient; native: the write replaced."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling {scaling!r} is not one of {SCALINGS}")
    norm = atom.norm()
    scale = coef * norm if scaling == "coef" else native.norm()
    return {"atom": ("replace", atom / norm * scale), "delete": ("delete", None),
            "random": ("replace", random_rank1(*atom.shape, generator) * scale), "native": ("replace", native)}


LOGITS_BYTES = 2 ** 30  # float32 logits a measurement holds at once (a 248k vocabulary: 1 GB per 1,024 positions)


def rows_within(host, positions: int, budget: int = LOGITS_BYTES) -> int:
    """How many rows of float32 logits over ``positions`` positions fit in ``budget`` bytes (at least one)."""
    return max(1, budget // (4 * positions * host.vocab_size))


def kl_by_position(logits, base, direction="patched||base"):
    """KL per position between ``logits`` (..., T, V) (patched) and ``base`` (T, V) or (..., T, V): (..., T)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} is not one of {DIRECTIONS}")
    return kl_both(logits, base)[direction]


def kl_both(logits, base, max_bytes=2 ** 28) -> dict:
    """Both KL directions per position, ``{"patched||base": (..., T), "base||patched": (..., T)}``; positions
    in slices of at most ``max_bytes`` of ``logits`` (each position's KL is its own: the same numbers), since the
    terms below are several temporaries of the logits' size (at a 248k vocabulary, 3 GB for three rows of 1,024).

    Written in the logit difference ``d = z_patched - z_base`` (centred on its mean under the baseline), with
    ``b = softmax(z_base)`` and ``m = E_b[e^d - 1]``: ``KL(p||b) = E_p[d] - log1p(m)`` and
    ``KL(b||p) = log1p(m) - E_b[d]``, ``E_p[d] = E_b[e^d d] / (1 + m)``. Every term is a sum of small
    numbers, so float32 is exact to ~1e-7 of |d| (log-softmax differences in float32 would lose ~1e-6 to the
    log-normaliser); it is the same math as ``sum p (log p - log b)`` and about twice as fast as it in float64."""
    T = logits.shape[-2]
    step = max(1, max_bytes // (4 * logits[..., :1, :].numel()))
    if step < T:
        parts = [kl_both(logits[..., t:t + step, :], base[..., t:t + step, :], max_bytes) for t in range(0, T, step)]
        return {k: torch.cat([p[k] for p in parts], -1) for k in parts[0]}
    z, z0 = logits.float(), base.float()
    b = z0.softmax(-1)  # broadcast over the leading dimensions of logits
    d = z - z0
    d = d - (b * d).sum(-1, keepdim=True)  # KL is blind to a constant shift; centring keeps the terms small
    be = b * torch.expm1(d)
    m = be.sum(-1)
    lr = torch.log1p(m)  # log Z_p / Z_b
    e_b = (b * d).sum(-1)
    e_p = (e_b + (be * d).sum(-1)) / (1 + m)
    out = {"patched||base": e_p - lr, "base||patched": lr - e_b}
    far = d.amax(-1) > 30  # e^d would overflow float32: those positions in float64 log-softmax form
    if far.any():
        lp, lb = F.log_softmax(z[far].double(), -1), F.log_softmax(z0.expand_as(z)[far].double(), -1)
        out["patched||base"][far] = (lp.exp() * (lp - lb)).sum(-1).float()
        out["base||patched"][far] = (lb.exp() * (lb - lp)).sum(-1).float()
    return out


def _native(ct, r, p, write):
    W = ct.write[r, p]
    return W if write == "additive" else ct.update[r, p]


@torch.no_grad()
def substitute(host, sae, ids, sites, *, conditions=("atom", "delete", "random"), scaling="coef", write="additive",
               direction="patched||base", reads=READS, chunk=8, trace_batch=16, reuse_prefix=True, seed=0,
               resume=None, progress=False, logits_bytes=LOGITS_BYTES) -> pd.DataFrame:
    """Substitution test at each firing of ``sites`` (rows of :func:`writesae.experiments.firings.select`:
    seq, pos, layer, head, feature, coef, ...; one cell) on the windows ``ids``.

    Returns a long table, one row per (firing, read, direction): the site's columns, ``firing`` (row of
    ``sites``), scaling, write, cos_native (atom vs the write replaced), native_norm, atom_scale, resid_atom
    (``||atom matrix - N|| / ||N||``; deletion's is 1), geom_win (resid_atom < 1), read, direction,
    ``kl_<condition>`` for each condition, win (kl_atom < kl_delete) and chain (kl_atom < kl_delete < kl_random).
    ``direction`` may be a tuple (e.g. ``DIRECTIONS``) to store both from the same runs.
    Sites with an ``answer`` column (a later position of the same sequence) allow the read ``"answer"``: the KL
    there; with a ``target`` column (a token) too, ``hit_<condition>`` says whether the edited model's top
    prediction at the answer is still the target (the recall chapter's accuracy).
    ``reuse_prefix=False`` runs every condition as a full forward from position 0 (the naive reference).
    ``resume``: a folder (inside the cached table's artifact folder, so keyed by the same parameters) where
    each batch of ``trace_batch`` sequences is stored when done; an interrupted run picks up there.
    ``logits_bytes``: the float32 logits one call may hold, unedited ``(trace_batch, T, V)`` and edited
    ``(chunk x conditions, T, V)``; both batches shrink to fit it (at a 248k vocabulary and 1,024 tokens: one
    window, one firing); the KLs stay the same to float rounding.
    """
    directions = (direction,) if isinstance(direction, str) else tuple(direction)
    for r in reads:
        if r not in READS and not (r == "answer" and "answer" in sites):
            raise ValueError(f"read {r!r} is not one of {READS}" + (" ('answer' needs an answer column in sites)"
                                                                     if r == "answer" else ""))
    for c in conditions:
        if c not in CONDITIONS:
            raise ValueError(f"condition {c!r} is not one of {CONDITIONS}")
    if write not in ("additive", "update"):
        raise ValueError(f"write {write!r} is not 'additive' or 'update'")
    cells = sites[["layer", "head"]].drop_duplicates()
    if len(cells) != 1:
        raise ValueError(f"sites must hold one head, got {len(cells)}")
    layer, head = (int(x) for x in cells.iloc[0])
    sae.check_cell(host.cell(layer, head))
    ids = torch.as_tensor(ids)
    sites = sites.reset_index(drop=True)
    trace_batch = min(trace_batch, rows_within(host, ids.shape[1], logits_bytes))
    chunk = min(chunk, rows_within(host, ids.shape[1] * len(conditions), logits_bytes))
    per_site, kls, hits = [], {}, {}
    seqs = sorted(sites["seq"].unique())
    for b0 in range(0, len(seqs), trace_batch):
        part = None if resume is None else Path(resume) / f"batch_{b0:06d}.json"
        if part is not None and part.exists():  # done before an interruption
            got = json.loads(part.read_text())
            per_site += got["sites"]
            kls.update({(j, d, c): v for j, d, c, v in got["kls"]})
            hits.update({(j, c): v for j, c, v in got.get("hits", [])})
            continue
        n0, done = len(per_site), {}
        batch = seqs[b0:b0 + trace_batch]
        ids_b = ids[torch.as_tensor(batch)]
        mine = sites[sites["seq"].isin(batch)]
        # one unedited pass per batch of sequences: the states every edited run starts from, and the trace
        # of the cell at the firings (the writes the conditions replace)
        at = sorted(mine["pos"].unique())
        pre = host.prefix(ids_b, at, cells=[(layer, head)], from_layer=layer) if reuse_prefix else None
        ct = pre.trace if reuse_prefix else host.trace(ids_b, cells=[(layer, head)], positions=at, logits=False)
        col = {int(p): i for i, p in enumerate(ct.positions.tolist())}
        ct = ct[(layer, head)]
        for r, s in enumerate(batch):
            idx = sites.index[sites["seq"] == s].tolist()
            for c0 in range(0, len(idx), chunk):
                rows, keys = [], []
                for j in idx[c0:c0 + chunk]:
                    site = sites.loc[j]
                    p, f = int(site["pos"]), int(site["feature"])
                    N = _native(ct, r, col[p], write)
                    A = sae.atom(f).float()
                    mats = condition_matrices(A, float(site["coef"]), N, scaling, _generator(seed, s, p, f))
                    am = mats["atom"][1]
                    per_site.append(dict(firing=j, cos_native=float((A * N).sum() / (A.norm() * N.norm())),
                                         native_norm=float(N.norm()), atom_scale=float(am.norm()),
                                         resid_atom=float((am - N).norm() / N.norm())))
                    for cond in conditions:
                        kind, m = mats[cond]
                        rows.append(Edit(r, layer, head, p, kind, m, write=write))
                        keys.append((j, cond, p))
                # the positions read: every one from the first edit on for a mean, else each edit's, the last
                # and the sites' answers
                first, T = min(k[2] for k in keys), ids.shape[1]
                answers = {int(sites.loc[k[0], "answer"]) for k in keys} if "answer" in sites else set()
                read = range(first, T) if "mean" in reads else sorted({k[2] for k in keys} | {T - 1} | answers)
                if reuse_prefix:
                    run = host.run_edits(ids_b, rows, positions=read, prefix=pre)
                else:
                    run = host.run_edits(ids_b[r:r + 1], [e._replace(seq=0) for e in rows],
                                         positions=read, reuse_prefix=False)
                base_r = run.base[0 if not reuse_prefix else r]
                i0 = 0
                while i0 < len(keys):  # the conditions of one firing: consecutive rows, one edited position
                    p = keys[i0][2]
                    i1, k = i0 + len(conditions), int(torch.searchsorted(run.positions, p))
                    kl = kl_both(run.logits[i0:i1, k:], base_r[k:])  # positions p.. (all, or p and the last)
                    if answers:  # the answer's place among the positions read from p on
                        q = int(torch.searchsorted(run.positions[k:], int(sites.loc[keys[i0][0], "answer"])))
                    for n, (j, cond, _) in enumerate(keys[i0:i1]):
                        for d in directions:
                            x = kl[d][n]
                            done[(j, d, cond)] = {rd: float(x[0] if rd == "next" else x[-1] if rd == "final"
                                                            else x[q] if rd == "answer" else x.mean()) for rd in reads}
                        if "target" in sites:  # is the answer still the model's top prediction?
                            hits[(j, cond)] = int(run.logits[i0 + n, k + q].argmax()) == int(sites.loc[j, "target"])
                    i0 = i1
            if progress:
                print(f"substitution: sequence {s} done ({len(per_site)}/{len(sites)} firings)")
        kls.update(done)
        if part is not None:
            write_text(part, json.dumps(dict(sites=per_site[n0:], kls=[[j, d, c, v] for (j, d, c), v in done.items()],
                                             hits=[[j, c, hits[(j, c)]] for j, c in sorted({(j, c) for j, _, c in done}) if (j, c) in hits])))
    geo = pd.DataFrame(per_site).set_index("firing").sort_index()
    geo["geom_win"] = geo["resid_atom"] < 1
    base = sites.assign(firing=sites.index, scaling=scaling, write=write).join(geo, on="firing")
    out = []
    for d in directions:
        for rd in reads:
            t = base.assign(read=rd, direction=d)
            for cond in conditions:
                t[f"kl_{cond}"] = [kls[(j, d, cond)][rd] for j in t["firing"]]
                if hits:
                    t[f"hit_{cond}"] = [hits[(j, cond)] for j in t["firing"]]
            out.append(t)
    df = pd.concat(out, ignore_index=True)
    if "atom" in conditions and "delete" in conditions:
        df["win"] = df["kl_atom"] < df["kl_delete"]
        if "random" in conditions:
            df["chain"] = df["win"] & (df["kl_delete"] < df["kl_random"])
    df.attrs["params"] = dict(sites.attrs.get("params", {}), conditions=list(conditions), scaling=scaling,
                              write=write, directions=list(directions), reads=list(reads), seed=seed)
    return df


def _summary(g, n_boot, seed):
    win = g["win"].to_numpy(bool)
    n, w = len(win), int(win.sum())
    lo, hi = stats.wilson_ci(w, n)
    row = dict(n=n, wins=w, win_rate=w / n if n else np.nan, wilson_lo=lo, wilson_hi=hi)
    for name, col in (("feature", "feature"), ("passage", "seq")):
        ok = g[col].nunique() > 1
        ci = stats.bootstrap_ci(win.astype(float), n_boot=n_boot, seed=seed, clusters=g[col].to_numpy()) if ok else (np.nan, np.nan)
        row[f"boot_{name}_lo"], row[f"boot_{name}_hi"] = ci
    conds = [c for c in ("atom", "delete", "random") if f"kl_{c}" in g]
    for c in conds:
        row[f"median_kl_{c}"] = float(g[f"kl_{c}"].median())
    ratio = stats.median_ratio(*(g[f"kl_{c}"] for c in conds))
    for c, x in zip(conds[1:], ratio[1:]):
        row[f"ratio_{c}"] = float(x)
    if "chain" in g:
        row["chain_rate"] = float(g["chain"].mean())
    row["cliffs_delta"] = stats.cliffs_delta(g["kl_delete"], g["kl_atom"])
    diff = g["kl_atom"].to_numpy() - g["kl_delete"].to_numpy()
    row["wilcoxon_p"] = stats.paired_wilcoxon(g["kl_atom"], g["kl_delete"]).pvalue if np.any(diff != 0) else np.nan
    geo = g["geom_win"].to_numpy(bool)
    row.update(geom_win_rate=float(geo.mean()), geom_agree=float((geo == win).mean()),
               wins_unexplained=float((~geo[win]).mean()) if w else np.nan,
               median_cos=float(g["cos_native"].median()))
    hi_cos = g["cos_native"] > 0.1
    row.update(n_cos_gt_0_1=int(hi_cos.sum()), win_rate_cos_gt_0_1=float(win[hi_cos.to_numpy()].mean()) if hi_cos.any() else np.nan)
    return row


def summarize(df, by=("read", "direction"), *, n_boot=1000, seed=0) -> pd.DataFrame:
    """One row per group of a :func:`substitute` table: n, wins, win_rate with Wilson CI and cluster
    bootstrap CIs by feature and by passage (seq), median KLs and the median ratio atom:delete:random
    (``ratio_delete``, ``ratio_random``), chain_rate (atom < delete < random), Cliff's delta of KL_delete
    over KL_atom (unpaired), paired Wilcoxon p (atom vs delete), the geometric null model's win rate,
    agreement with the measured win and share of wins it does not explain, median cos_native and the
    win rate over firings with cos_native > 0.1. ``by=("layer", "read", "direction")`` is the per-layer
    table; ``("layer", "head", ...)`` per head."""
    by = list(by)
    rows = [dict(zip(by, key if isinstance(key, tuple) else (key,)), **_summary(g, n_boot, seed))
            for key, g in df.groupby(by, sort=True)]
    out = pd.DataFrame(rows)
    out.attrs["params"] = dict(df.attrs.get("params", {}), by=by, n_boot=n_boot, boot_seed=seed)
    return out


def binned(df, col="cos_native", value="win", bins=(-1.0, 0.0, 0.1, 0.2, 0.3, 0.5, 1.0), by=()) -> pd.DataFrame:
    """Mean of ``value`` per bin of ``col`` (and per ``by`` groups): columns bin, n, mean, lo, hi
    (Wilson CI when ``value`` is 0/1)."""
    keys = list(by) + ["bin"]
    t = df.assign(bin=pd.cut(df[col], bins=list(bins)).astype(str))
    rows = []
    for key, g in t.groupby(keys, sort=False):
        x = g[value].astype(float)
        ci = stats.wilson_ci(int(x.sum()), len(x)) if set(x.unique()) <= {0.0, 1.0} else (np.nan, np.nan)
        rows.append(dict(zip(keys, key), n=len(x), mean=float(x.mean()), lo=ci[0], hi=ci[1]))
    order = {str(c): i for i, c in enumerate(pd.cut(pd.Series([], dtype=float), bins=list(bins)).cat.categories)}
    out = pd.DataFrame(rows)
    return out.sort_values(list(by) + ["bin"], key=lambda s: s.map(order) if s.name == "bin" else s).reset_index(drop=True)


def population(df, classes=None, *, read="mean", direction="patched||base", min_firings=5, n_boot=1000, seed=0):
    """Claim 4: per-atom win rates from a :func:`substitute` table run on an atom-list pool (e.g.
    ``select(firings, alive_atoms, min_per_atom=5, max_per_atom=30)``).

    Returns (per_atom, summary): per_atom has feature, n, win_rate and (with ``classes``) class and the
    atom's median cos; summary: n_atoms, mean_win_rate with a bootstrap CI over atoms, and per class
    the mean win rate and the Mann-Whitney p of registers vs bundles."""
    g = df[(df["read"] == read) & (df["direction"] == direction)]
    per = g.groupby("feature").agg(n=("win", "size"), win_rate=("win", "mean"), cos_firings=("cos_native", "median")).reset_index()
    per = per[per["n"] >= min_firings].reset_index(drop=True)
    if classes is not None:
        per = per.merge(classes[["feature", "class", "cos"]], on="feature", how="left")
    rates = per["win_rate"].to_numpy()
    ci = stats.bootstrap_ci(rates, n_boot=n_boot, seed=seed) if len(rates) > 1 else (np.nan, np.nan)
    summary = dict(n_atoms=len(per), n_firings=int(per["n"].sum()), mean_win_rate=float(rates.mean()) if len(rates) else np.nan,
                   ci_lo=ci[0], ci_hi=ci[1], read=read, direction=direction, min_firings=min_firings)
    if classes is not None:
        reg, bun = (per.loc[per["class"] == c, "win_rate"].to_numpy() for c in ("register", "bundle"))
        summary.update(n_register=len(reg), n_bundle=len(bun),
                       register_win_rate=float(reg.mean()) if len(reg) else np.nan,
                       bundle_win_rate=float(bun.mean()) if len(bun) else np.nan,
                       mann_whitney_p=stats.mann_whitney(reg, bun).pvalue if len(reg) and len(bun) else np.nan)
    per.attrs["params"] = dict(df.attrs.get("params", {}), **summary)
    return per, summary


def substitute_cells(host, saes, ids, *, pool="top1", min_pos=8, max_firings=None, max_per_atom=None,
                     min_per_atom=1, select_seed=0, progress=False, **kw) -> pd.DataFrame:
    """Claims 3 and 5: :func:`substitute` on several cells, ``saes`` = {(layer, head): sae}; each cell's
    firings are collected on ``ids`` and its pool drawn with :func:`writesae.experiments.firings.select`
    (``pool="registers"`` partitions that cell's atoms first). The tables are concatenated; use
    ``summarize(df, by=("layer", "head", "read", "direction"))`` for the per-head win rates."""
    out = []
    for cell, sae in saes.items():
        fir = _firings.collect(host, sae, cell, ids, min_pos=min_pos)
        classes = None
        if pool == "registers":
            classes, _ = _partition.partition(_partition.atom_table(fir))
        sites = _firings.select(fir, pool, classes=classes, max_firings=max_firings, max_per_atom=max_per_atom,
                                min_per_atom=min_per_atom, seed=select_seed)
        out.append(substitute(host, sae, ids, sites, progress=progress, **kw))
        if progress:
            print(f"head L{cell[0]}H{cell[1]}: {len(sites)} firings")
    df = pd.concat(out, ignore_index=True)
    df.attrs["params"] = dict(out[0].attrs["params"], cell=[list(map(int, c)) for c in saes],
                              pool=pool, max_firings=max_firings, max_per_atom=max_per_atom)
    return df


def _bits(logits, ids):
    """Mean next-token cross-entropy in bits of logits (R, T, V) on ids (T,): (R,)."""
    lp = F.log_softmax(logits[:, :-1].double(), -1)
    return -lp.gather(-1, ids[1:].expand(len(logits), -1)[..., None])[..., 0].mean(-1) / math.log(2)


@torch.no_grad()
def passage_nll(host, ids, firings, features, *, seed=0) -> pd.DataFrame:
    """Claim 2: per passage (row of ``ids``), bits/token of the unmodified model, with the additive
    write deleted at every position where one of ``features`` fires (any rank; e.g. the registers), and
    with each of those writes replaced by a random rank-1 matrix of the same Frobenius norm (fresh per
    position, seeded). Columns seq, n_edited, bits_base, bits_delete, bits_random, d_delete, d_random."""
    ids = torch.as_tensor(ids)
    layer, head = (int(x) for x in firings[["layer", "head"]].iloc[0])
    hit = firings[firings["feature"].isin(list(features))]
    rows = []
    for s in range(len(ids)):
        pos = sorted(hit.loc[hit["seq"] == s, "pos"].unique().tolist())
        x = ids[s]
        if pos:
            dele = [Edit(0, layer, head, p, "delete") for p in pos]
            rand = [Edit(0, layer, head, p, "replace", random_rank1(host.d_k, host.d_v, _generator(seed, s, p)), scale="write")
                    for p in pos]
            run = host.run_edits(x[None], [dele, rand])
            b0, (bd, br) = _bits(run.base, x)[0], _bits(run.logits, x)
        else:
            b0 = bd = br = _bits(host.logits(x[None]), x)[0]
        rows.append(dict(seq=s, n_edited=len(pos), bits_base=float(b0), bits_delete=float(bd), bits_random=float(br)))
    out = pd.DataFrame(rows)
    out["d_delete"] = out["bits_delete"] - out["bits_base"]
    out["d_random"] = out["bits_random"] - out["bits_base"]
    out.attrs["params"] = dict(firings.attrs.get("params", {}), features=sorted(map(int, features)), seed=seed)
    return out


def passage_summary(df, *, n_boot=1000, seed=0) -> dict:
    """Mean bits/token change of deletion and of random writes over passages with a bootstrap CI,
    their ratio, and the Wilcoxon p of d_random vs d_delete."""
    out = dict(n_passages=len(df), edits_per_passage=float(df["n_edited"].mean()))
    for c in ("d_delete", "d_random"):
        out[c] = float(df[c].mean())
        out[f"{c}_lo"], out[f"{c}_hi"] = stats.bootstrap_ci(df[c].to_numpy(), n_boot=n_boot, seed=seed)
    out["ratio"] = out["d_random"] / out["d_delete"] if out["d_delete"] else np.nan
    out["wilcoxon_p"] = stats.paired_wilcoxon(df["d_random"], df["d_delete"]).pvalue
    # the paper's contrast as a paired difference over passages (a ratio of two means near zero has no interval)
    out["d_gap"], out["d_gap_lo"], out["d_gap_hi"] = paired_difference(df["d_random"], df["d_delete"], seed=seed,
                                                                       n_boot=n_boot)
    return out


def decoder_gap(df, a="WriteSAE", b=None, *, read="mean", direction="patched||base") -> dict:
    """App. F.4's contrast on a table with a ``decoder`` column (two decoders at the same firings): the win rate
    of decoder ``a`` minus that of ``b`` (default: the other one) over the firings both cover, with a paired
    bootstrap interval. Returns gap, lo, hi, n (NaN without both decoders)."""
    g = df[(df["read"] == read) & (df["direction"] == direction)] if len(df) else df
    names = list(dict.fromkeys(g["decoder"])) if len(g) else []
    b = b or next((d for d in names if d != a), None)
    if a not in names or b not in names:
        return dict(gap=np.nan, lo=np.nan, hi=np.nan, n=0)
    on = [c for c in ("layer", "head", "seq", "pos") if c in g]
    pair = g[g["decoder"] == a].drop_duplicates(on).merge(g[g["decoder"] == b].drop_duplicates(on), on=on,
                                                           suffixes=("_a", "_b"))
    gap, lo, hi = paired_difference(pair["win_a"].astype(float), pair["win_b"].astype(float))
    return dict(gap=gap, lo=lo, hi=hi, n=len(pair))


def compare_pools(a, b) -> dict:
    """Two rows of :func:`summarize` (e.g. the top-1 pool against the register pool): the difference of their win
    rates with Newcombe's interval (the pools are treated as independent samples) and a sentence saying whether
    it is inside the noise. Returns diff, lo, hi, text."""
    d, lo, hi = rate_difference(int(a["wins"]), int(a["n"]), int(b["wins"]), int(b["n"]))
    return dict(diff=d, lo=lo, hi=hi, text=difference_text(d, lo, hi))
