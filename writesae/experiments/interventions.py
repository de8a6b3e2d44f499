"""Cache interventions (PAPER.md §3, claims 8, 9, 10, 13), through the public host API.

- :func:`erasure` (claim 8): remove an atom's rank-1 contribution ``a_i(t) v_i w_i^T`` from ``S_t`` at its
  firings, and the same matrix at matched non-firing positions of the same windows; the log-prob change
  of the atom's most-affected token at the next-token distribution of ``t``, over doses.
- :func:`sign_prediction` (claim 9): write a target token's cache direction at one position and compare
  the sign (and size) of the measured logit change with the first-order prediction.
- :func:`generation_install` (claim 10): write the direction at three consecutive positions with magnitude
  ``m ||k_t v_t^T||_F`` and decode greedily; target inclusion, first-step log-prob lift, rank shift.
- :func:`steering_probe` (claim 13): amplify the features most active at sentence boundaries during
  generation; count newlines against the baseline and a dose-matched random-feature control.

**The direction of a target token.** The head output ``o_t = S_t^T q_t`` (``S`` is ``d_k x d_v``) reaches
the logits through ``g = host.head_out`` (for Gated DeltaNet the gated RMSNorm ``γ ⊙ o / rms(o) ⊙ silu(z)``
and the head's slice ``W_O[h]`` of ``out_proj``; each family documents its own), the residual stream and
``f = host.unembed`` (final norm and ``W_U``). :func:`token_readout` takes the *direct path* (the later
layers are left out) and linearises it exactly at the run's own values: ``u_T``, the gradient of
``f(r_t + g(o_t))[T]`` with respect to ``o_t`` (``r_t``: the final residual). It reduces to the paper's
``W_O[h]^T W_U[T]`` (``host.head_unembed``) when the norms are frozen and unweighted. The read side is ``q``
(at the read position, or the mean of the last ``window`` q's up to the install position), so the unit
direction is ``D_T = k̂ û_T^T`` and a state change ``dS`` at the read position changes the target logit by
``q_t^T dS u_T`` to first order. A change made ``n`` steps earlier is carried exactly by the layer's own
transport ``dS_s = D_s * dS_{s-1} + e_s (f_s^T dS_{s-1})`` (``closed_form.propagate``): the only
approximations of the prediction are the direct path and first order. What the read-out needs comes from
``host.readout``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats as _st

from .. import stats
from ..hosts import Edit
from ..ops import recurrence
from . import closed_form as _cf
from . import closed_form
from . import firings as _firings

__all__ = ["token_readout", "target_direction", "sign_prediction", "sign_summary", "erasure",
           "erasure_summary", "target_strata", "generation_install", "install_summary", "live_install",
           "sentence_tokens", "boundary_features", "steer", "steering_probe", "steering_summary",
           "SEMANTIC_WORDS"]

SEMANTIC_WORDS = (" water", " music", " king", " war", " city", " money", " love", " river", " gold",
                  " ship", " fire", " food", " church", " horse", " school", " army")


# --------------------------------------------------------------------------------- the readout
def _as_batch(ids):
    ids = torch.as_tensor(ids)
    return ids[None] if ids.ndim == 1 else ids


def token_readout(host, cell, o, context, r, tokens):
    """Direct-path readout vectors ``u_T`` (N, d_v): the gradient of token ``tokens[n]``'s logit with
    respect to the head output, through ``host.head_out`` at (o[n], context[n]) and ``host.unembed`` at r[n]
    (see the module docstring). o: (N, d_v); context: tuple of (N, ...); r: (N, hidden); tokens: (N,)."""
    cell = host.cell(*cell[:2])
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    with torch.enable_grad():
        o = o.detach().requires_grad_(True)
        r = r.detach()
        logits = _cf._logits(host, r.float() + _cf._layer_out(host, cell, o, context)
                             - _cf._layer_out(host, cell, o.detach(), context))
        chosen = logits.gather(-1, tokens[:, None]).sum()
        return torch.autograd.grad(chosen, o)[0].detach()


def _directions(host, cell, ids, seq, tokens, install, read, key="q", window=8, output="direct"):
    """Unit directions D (R, d_k, d_v) for targets ``tokens`` of rows ``seq`` (install at ``install``, read
    at ``read``, both ints), with what predicting their effect needs: dict(D, u, q, kv, trace rows).
    output: the d_v side of D, ``"direct"`` (u_T) or ``"paper"`` (``W_O[h]^T W_U[T]``, no norms)."""
    tr, ctx, o, r, _ = closed_form.readout(host, cell, ids[:, :read + 1])
    seq = torch.as_tensor(seq, dtype=torch.long)
    i_read, i_ins, lo = read, install, max(0, install - window + 1)
    u = token_readout(host, cell, o[seq, i_read], closed_form._at(ctx, seq, i_read), r[seq, i_read], tokens)
    q = tr.q[seq, i_read]
    if key == "q":
        k_dir = q
    elif key == "mean_q":
        k_dir = tr.q[seq, lo:i_ins + 1].mean(1)
    else:
        raise ValueError(f"key {key!r} is not 'q' or 'mean_q'")
    if output == "direct":
        w = u
    elif output == "paper":
        w = host.head_unembed(host.cell(*cell[:2])).float()[torch.as_tensor(tokens, dtype=torch.long)]
    else:
        raise ValueError(f"output {output!r} is not 'direct' or 'paper'")
    D = F.normalize(k_dir, dim=-1)[:, :, None] * F.normalize(w, dim=-1)[:, None, :]
    kv = tr.k[seq, i_ins].norm(dim=-1) * tr.v[seq, i_ins].norm(dim=-1)
    return dict(D=D, u=u, q=q, kv=kv, tr=tr, seq=seq, install=i_ins, read=i_read)


def _predict(d, dS):
    """First-order direct-path logit change of a state change dS (R, d_k, d_v) made at the install position:
    ``(P^T q_t)^T dS u_T`` with P the layer's own recurrence from install to read (exact)."""
    pq = torch.stack([closed_form.propagate(closed_form._seq(d["tr"], int(s)), d["install"], d["read"], d["q"][r])[0]
                      for r, s in enumerate(d["seq"])])
    return (recurrence.read_through(dS, pq) * d["u"]).sum(-1)


@torch.no_grad()
def target_direction(host, cell, ids, token, *, read=None, key="q", window=8):
    """The unit cache direction ``k̂ û_T^T`` (d_k, d_v) that raises ``token`` at position ``read``
    (default: the last) of one sequence ``ids`` (T,), in the code's S layout (o = S^T q)."""
    ids = _as_batch(ids)[:1]
    read = ids.shape[1] - 1 if read is None else int(read)
    return _directions(host, cell, ids, [0], [int(token)], read, read, key, window)["D"][0]


# ----------------------------------------------------------------------- claim 9: sign prediction
@torch.no_grad()
def sign_prediction(host, cell, ids, *, tokens_per_window=5, m=1.0, lag=0, key="q", output="direct", window=8,
                    seed=0):
    """Claim 9: per window, ``tokens_per_window`` random target tokens T, each with a random sign s;
    add ``s m ||k_t0 v_t0^T||_F D_T`` to the state at ``t0 = T_end - 1 - lag`` and read the logit of T at the
    last position. ``output="paper"`` builds D from the paper's ``W_O[h]^T W_U[T]`` instead of u_T; the
    prediction always uses u_T. One row per trial: seq, token, sign, install, read, predicted (first-order
    direct path), measured (logit change), measured_logp (log-prob change), correct (signs agree)."""
    ids = _as_batch(ids)
    layer, head = host.cell(*cell)[:2]
    N, T = ids.shape
    read, install = T - 1, T - 1 - lag
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, host.vocab_size, (N * tokens_per_window,), generator=g)
    sign = (torch.randint(0, 2, (N * tokens_per_window,), generator=g) * 2 - 1).float()
    seq = torch.arange(N).repeat_interleave(tokens_per_window)
    d = _directions(host, (layer, head), ids, seq, tokens, install, read, key, window, output)
    M = sign[:, None, None] * m * d["D"]
    predicted = _predict(d, M * d["kv"][:, None, None])
    rows = [Edit(int(s), layer, head, install, "add", M[r], scale="kv") for r, s in enumerate(seq)]
    run = host.run_edits(ids, rows, positions=[read])
    ar = torch.arange(len(rows))
    edited, base = run.logits[:, 0], run.base[seq, 0]
    measured = edited[ar, tokens] - base[ar, tokens]
    dlogp = edited.log_softmax(-1)[ar, tokens] - base.log_softmax(-1)[ar, tokens]
    out = pd.DataFrame(dict(seq=seq.numpy(), token=tokens.numpy(), sign=sign.numpy().astype(int), install=install,
                            read=read, m=m, predicted=predicted.numpy(), measured=measured.numpy(),
                            measured_logp=dlogp.numpy()))
    out["correct"] = np.sign(out["measured"]) == np.sign(out["predicted"])
    out.attrs["params"] = dict(model=host.name, cell=[layer, head], n_windows=N, window=T,
                               tokens_per_window=tokens_per_window, m=m, lag=lag, key=key, output=output, seed=seed)
    return out


def sign_summary(df) -> pd.DataFrame:
    """One row: n, sign accuracy with its Wilson CI, Pearson r and Spearman rho of predicted vs measured,
    and the median ratio measured / predicted."""
    n, k = len(df), int(df["correct"].sum())
    ci = stats.wilson_ci(k, n)
    return pd.DataFrame([dict(n=n, accuracy=k / n, ci_low=ci.low, ci_high=ci.high,
                              pearson_r=_st.pearsonr(df["predicted"], df["measured"])[0],
                              spearman_rho=_st.spearmanr(df["predicted"], df["measured"])[0],
                              median_ratio=float(np.median(df["measured"] / df["predicted"])))])


# ----------------------------------------------------------------------------- claim 8: erasure
def _delta(host, ids, rows, read, batch=32):
    """Logit and log-prob changes, each (R, V), at each row's own read position; rows: lists of Edits
    (seq = row of ids). Runs one sequence at a time, ``batch`` rows per run."""
    dlogit = torch.empty(len(rows), host.vocab_size)
    dlogp = torch.empty_like(dlogit)
    by_seq = {}
    for j, r in enumerate(rows):
        by_seq.setdefault(r[0].seq, []).append(j)
    for s, idx in by_seq.items():
        for c0 in range(0, len(idx), batch):
            chunk = idx[c0:c0 + batch]
            pos = sorted({read[j] for j in chunk})
            run = host.run_edits(ids[s:s + 1], [[e._replace(seq=0) for e in rows[j]] for j in chunk], positions=pos)
            col = torch.tensor([pos.index(read[j]) for j in chunk])
            ar = torch.arange(len(chunk))
            edited, base = run.logits[ar, col], run.base[0, col]
            dlogit[chunk] = edited - base
            dlogp[chunk] = edited.log_softmax(-1) - base.log_softmax(-1)
    return dlogit, dlogp


@torch.no_grad()
def erasure(host, sae, cell, ids, *, firings=None, features=None, n_features=8, per_feature=16,
            doses=(0.5, 1.0, 2.0), min_pos=8, seed=0):
    """Claim 8: remove ``dose * a_i(t) A_i`` from ``S_t`` (Edit "add" of the negative) and read the
    next-token log-probs at t.

    Per feature (default: the ``n_features`` that fire most, with >= ``per_feature`` firings), up to
    ``per_feature`` firings are drawn and split in half. On the *select* half (dose 1) the
    most-affected token is chosen: the largest mean log-prob drop. On the *eval* half the change of that
    token is measured at every dose, at the firings and at matched non-firing positions (a random
    position of the same window where the feature does not fire, same coefficient). One row per
    erasure: feature, token, seq, pos, coef, where ("firing" / "non-firing"), split, dose, dlogit and dlogp
    (the token's logit and log-prob change), and predicted: the first-order direct-path logit change
    (module docstring)."""
    ids = _as_batch(ids)
    layer, head = host.cell(*cell)[:2]
    sae.check_cell(host.cell(layer, head))
    N, T = ids.shape
    if firings is None:
        firings = _firings.collect(host, sae, (layer, head), ids, min_pos=min_pos)
    if features is None:
        counts = firings["feature"].value_counts()
        features = counts[counts >= max(2, per_feature)].index[:n_features].tolist()
        if not features:
            raise ValueError(f"erasure: no atom fires {max(2, per_feature)} times or more at L{layer}H{head} on these {N} "
                             f"passages of {T} tokens (the most: {int(counts.max()) if len(counts) else 0}): give more "
                             "held-out passages (eval_windows) or lower per_feature")
    rng = np.random.default_rng(seed)
    tr, ctx, o, r, _ = closed_form.readout(host, (layer, head), ids)

    def predicted(sites, token, dose, A):  # first-order direct-path change of token's logit at t
        s, p = torch.tensor(sites["seq"].to_numpy()), torch.tensor(sites["pos"].to_numpy())
        u = token_readout(host, (layer, head), o[s, p], closed_form._at(ctx, s, p), r[s, p], torch.full((len(s),), token))
        c = torch.tensor(sites["coef"].to_numpy(), dtype=torch.float32)
        return (-dose * c * torch.einsum("nk,kv,nv->n", tr.q[s, p], A, u)).numpy()

    parts = []
    for f in features:
        A = sae.atom(int(f)).float()
        fired = firings[firings["feature"] == f]
        pick = fired.iloc[rng.permutation(len(fired))[:per_feature]]
        half = len(pick) // 2
        sel, ev = pick.iloc[:half], pick.iloc[half:]
        busy = set(zip(fired["seq"], fired["pos"]))

        def rows_of(sites, dose):
            return [[Edit(int(s), layer, head, int(p), "add", -dose * float(c) * A)]
                    for s, p, c in zip(sites["seq"], sites["pos"], sites["coef"])]

        l_sel, d_sel = _delta(host, ids, rows_of(sel, 1.0), sel["pos"].tolist())
        token = int(d_sel.mean(0).argmin())
        free = [[p for p in range(min_pos, T) if (s, p) not in busy] for s in range(N)]
        ok = [bool(free[s]) for s in ev["seq"]]
        ev = ev[ok]
        ctrl = ev.assign(pos=[int(rng.choice(free[s])) for s in ev["seq"]])
        parts.append(pd.DataFrame(dict(feature=int(f), token=token, seq=sel["seq"].to_numpy(), pos=sel["pos"].to_numpy(),
                                       coef=sel["coef"].to_numpy(), where="firing", split="select", dose=1.0,
                                       dlogit=l_sel[:, token].numpy(), dlogp=d_sel[:, token].numpy(), predicted=predicted(sel, token, 1.0, A))))
        if ev.empty:  # the feature fires at every position of its evaluation windows: no matched control
            continue
        for where, sites in (("firing", ev), ("non-firing", ctrl)):
            for dose in doses:
                dl, d = _delta(host, ids, rows_of(sites, dose), sites["pos"].tolist())
                parts.append(pd.DataFrame(dict(feature=int(f), token=token, seq=sites["seq"].to_numpy(),
                                               pos=sites["pos"].to_numpy(), coef=sites["coef"].to_numpy(), where=where,
                                               split="eval", dose=float(dose), dlogit=dl[:, token].numpy(),
                                               dlogp=d[:, token].numpy(),
                                               predicted=predicted(sites, token, dose, A))))
    out = pd.concat(parts, ignore_index=True)
    out.attrs["params"] = dict(model=host.name, cell=[layer, head], n_windows=N, window=T, features=list(map(int, features)),
                               per_feature=per_feature, doses=list(doses), min_pos=min_pos, seed=seed)
    return out


def _wilcoxon_p(x, y=None):
    """Two-sided paired Wilcoxon p of x - y (y = 0 when None); 1.0 when every difference is zero."""
    x = np.asarray(x, float)
    y = np.zeros_like(x) if y is None else np.asarray(y, float)
    if len(x) == 0:
        return float("nan")
    if np.all(x == y):
        return 1.0
    return stats.paired_wilcoxon(x, y).pvalue


def erasure_summary(df) -> pd.DataFrame:
    """Eval erasures per (where, dose): n, median and mean log-prob change, bootstrap CI of the median,
    Wilcoxon p against 0, and (firing rows) the paired Wilcoxon p against the matched non-firing rows."""
    ev = df[df["split"] == "eval"]
    rows = []
    for (where, dose), g in ev.groupby(["where", "dose"]):
        ci = stats.bootstrap_ci(g["dlogp"], np.median) if len(g) > 1 else stats.CI(np.nan, np.nan)
        r = dict(where=where, dose=dose, n=len(g), median=g["dlogp"].median(), mean=g["dlogp"].mean(),
                 ci_low=ci.low, ci_high=ci.high, p_zero=_wilcoxon_p(g["dlogp"]))
        if where == "firing":
            c = ev[(ev["where"] == "non-firing") & (ev["dose"] == dose)]
            r["p_vs_nonfiring"] = _wilcoxon_p(g["dlogp"], c["dlogp"]) if len(c) == len(g) else np.nan
        rows.append(r)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------- claim 10: generation install
def _ranks(logits):
    """Rank (0 = top) of every token: (..., V)."""
    return logits.argsort(-1, descending=True).argsort(-1)


@torch.no_grad()
def target_strata(host, prompts, *, corpus=None, n_per_stratum=3, mid=(100, 1000), n_pool=50,
                  semantic=None, seed=0) -> pd.DataFrame:
    """Targets per prompt in four strata: "frequent" (among the ``n_pool`` most frequent tokens of
    ``corpus``), "mid" (native first-step rank in ``[mid[0], mid[1])``), "rare" (among the ``n_pool``
    least frequent tokens seen in ``corpus``), "semantic" (``semantic`` token ids; default: the single-token
    words of :data:`SEMANTIC_WORDS` when the host has a tokenizer, else none). ``corpus`` defaults to the
    prompts. One row per target: seq, token, stratum, native_rank, corpus_count."""
    prompts = _as_batch(prompts)
    V = host.vocab_size
    rank = _ranks(host.logits(prompts)[:, -1]).cpu()
    corpus = prompts if corpus is None else torch.as_tensor(corpus)
    count = torch.bincount(corpus.flatten(), minlength=V)[:V]
    rng = np.random.default_rng(seed)
    tiebreak = torch.as_tensor(rng.random(V))
    seen = (count > 0).nonzero()[:, 0]
    freq = seen[(count[seen] + tiebreak[seen]).argsort(descending=True)]
    if semantic is None and host.tokenizer is not None:
        enc = [host.tokenizer(w, add_special_tokens=False)["input_ids"] for w in SEMANTIC_WORDS]
        semantic = [e[0] for e in enc if len(e) == 1]
    pools = dict(frequent=freq[:n_pool].numpy(), rare=freq[-n_pool:].numpy(),
                 semantic=np.asarray(semantic or [], dtype=int))
    rows = []
    for s in range(len(prompts)):
        by = dict(pools, mid=((rank[s] >= mid[0]) & (rank[s] < mid[1])).nonzero()[:, 0].numpy())
        for stratum in ("frequent", "mid", "rare", "semantic"):
            pool = by[stratum]
            for t in rng.choice(pool, min(n_per_stratum, len(pool)), replace=False) if len(pool) else ():
                rows.append(dict(seq=s, token=int(t), stratum=stratum, native_rank=int(rank[s, t]),
                                 corpus_count=int(count[t])))
    return pd.DataFrame(rows, columns=["seq", "token", "stratum", "native_rank", "corpus_count"])


def _install_edits(seq, cell, positions, matrix, scale="kv"):
    return [Edit(int(seq), cell[0], cell[1], int(p), "add", matrix, scale=scale) for p in positions]


@torch.no_grad()
def generation_install(host, cell, prompts, targets, *, ms=(1.5, 3.0, 6.0), offsets=(-3, -2, -1), n_new=20,
                       key="q", window=8, batch=64) -> pd.DataFrame:
    """Claim 10: for each target (a row of :func:`target_strata`), add ``m ||k_t v_t^T||_F D_T`` at the
    prompt positions ``T + offsets`` (D_T: :func:`target_direction` read at the last prompt position) and
    decode ``n_new`` tokens greedily. One row per (target, m): seq, token, stratum, m, native/edited
    first-step log-prob and rank of the target, lift, rank_shift (native - edited), included_native,
    included_edited (the target among the generated tokens)."""
    prompts = _as_batch(prompts)
    layer, head = host.cell(*cell)[:2]
    T = prompts.shape[1]
    positions = [T + o for o in offsets]
    read = T - 1
    seq = torch.tensor(targets["seq"].to_numpy(), dtype=torch.long)
    tokens = torch.tensor(targets["token"].to_numpy(), dtype=torch.long)
    d = _directions(host, (layer, head), prompts, seq, tokens, min(positions), read, key, window)
    native = host.generate(prompts, n_new)[:, T:].cpu()
    ar = torch.arange(len(seq))
    parts = []
    for m in ms:
        rows = [_install_edits(s, (layer, head), positions, m * d["D"][r]) for r, s in enumerate(seq.tolist())]
        run = host.run_edits(prompts, rows, positions=[read])
        lp, lp0 = run.logits[:, 0].log_softmax(-1), run.base[seq, 0].log_softmax(-1)
        gen = []
        for c0 in range(0, len(rows), batch):
            chunk = range(c0, min(c0 + batch, len(rows)))
            edits = [e._replace(seq=j) for j, r in enumerate(chunk) for e in rows[r]]
            gen.append(host.generate(prompts[seq[c0:c0 + batch]], n_new, edits=edits)[:, T:].cpu())
        gen = torch.cat(gen)
        parts.append(targets[["seq", "token", "stratum"]].reset_index(drop=True).assign(
            m=float(m), native_logp=lp0[ar, tokens].numpy(), edited_logp=lp[ar, tokens].numpy(),
            native_rank=_ranks(run.base[seq, 0])[ar, tokens].numpy(), edited_rank=_ranks(run.logits[:, 0])[ar, tokens].numpy(),
            included_native=(native[seq] == tokens[:, None]).any(1).numpy(),
            included_edited=(gen == tokens[:, None]).any(1).numpy()))
    out = pd.concat(parts, ignore_index=True)
    out["lift"] = out["edited_logp"] - out["native_logp"]
    out["rank_shift"] = out["native_rank"] - out["edited_rank"]
    out.attrs["params"] = dict(model=host.name, cell=[layer, head], n_prompts=len(prompts), prompt_len=T, ms=list(ms),
                               offsets=list(offsets), n_new=n_new, key=key)
    return out


def install_summary(df) -> pd.DataFrame:
    """Per (stratum, m), and pooled ("all"): n, inclusion native and edited (edited with its Wilson CI),
    exact McNemar p of the paired inclusions, mean and median first-step lift, median rank shift."""
    rows = []
    for (stratum, m), g in pd.concat([df, df.assign(stratum="all")]).groupby(["stratum", "m"], sort=False):
        n, k = len(g), int(g["included_edited"].sum())
        gained = int((g["included_edited"] & ~g["included_native"]).sum())
        lost = int((~g["included_edited"] & g["included_native"]).sum())
        ci = stats.wilson_ci(k, n)
        rows.append(dict(stratum=stratum, m=m, n=n, inclusion_native=g["included_native"].mean(), inclusion_edited=k / n,
                         ci_low=ci.low, ci_high=ci.high, gained=gained, lost=lost,
                         p_mcnemar=_st.binomtest(gained, gained + lost).pvalue if gained + lost else 1.0,
                         mean_lift=g["lift"].mean(), median_lift=g["lift"].median(),
                         median_rank_shift=g["rank_shift"].median()))
    return pd.DataFrame(rows)


@torch.no_grad()
def live_install(host, cell, ids, matrix, *, positions, n_new=20, target=None, scale="kv"):
    """Greedy continuation of one prompt ``ids`` (T,) before and after adding ``matrix`` (times
    ``||k_t v_t^T||_F`` when ``scale="kv"``) to the cell's state at each of ``positions``; with ``target``,
    its first-step log-prob and rank before and after. Returns dict(native, edited) token lists and,
    with a target, native_logp, edited_logp, native_rank, edited_rank."""
    ids = _as_batch(ids)[:1]
    layer, head = host.cell(*cell)[:2]
    T = ids.shape[1]
    edits = _install_edits(0, (layer, head), positions, torch.as_tensor(matrix, dtype=torch.float32), scale)
    out = dict(native=host.generate(ids, n_new)[0, T:].tolist(), edited=host.generate(ids, n_new, edits=edits)[0, T:].tolist())
    if target is not None:
        run = host.run_edits(ids, [edits], positions=[T - 1])
        for name, lg in (("native", run.base[0, 0]), ("edited", run.logits[0, 0])):
            out[f"{name}_logp"] = float(lg.log_softmax(-1)[int(target)])
            out[f"{name}_rank"] = int(_ranks(lg)[int(target)])
    return out


# ------------------------------------------------------------------------- claim 13: steering
def sentence_tokens(host):
    """(boundary, newline) token ids of a host with a tokenizer: tokens whose text ends a sentence
    ("." "!" "?" at the end, or a newline anywhere) and tokens containing a newline."""
    if host.tokenizer is None:
        raise ValueError(f"{host.name} has no tokenizer: pass boundary / count token ids explicitly")
    V = host.vocab_size
    text = [host.tokenizer.decode([t]) for t in range(min(V, len(host.tokenizer)))]
    newline = [t for t, s in enumerate(text) if "\n" in s]
    boundary = sorted(set(newline) | {t for t, s in enumerate(text) if s.rstrip(" ").endswith((".", "!", "?"))})
    return boundary, newline


def boundary_features(firings, ids, boundary, *, min_pos=8) -> pd.DataFrame:
    """Mean activation of every feature at sentence-boundary positions (the token at t is in ``boundary``)
    and elsewhere (zeros where it does not fire), positions >= min_pos; sorted by ``score`` = the difference."""
    boundary = list(boundary)
    is_b = np.isin(_as_batch(ids)[:, min_pos:].numpy(), boundary)
    n_b, n_o = int(is_b.sum()), int((~is_b).sum())
    g = firings.assign(at_b=firings["token"].isin(boundary)).groupby(["feature", "at_b"])["coef"].sum().unstack(fill_value=0.0)
    out = pd.DataFrame(dict(feature=g.index, act_boundary=g.get(True, 0.0) / max(n_b, 1),
                            act_other=g.get(False, 0.0) / max(n_o, 1))).reset_index(drop=True)
    out["score"] = out["act_boundary"] - out["act_other"]
    out = out.sort_values("score", ascending=False).reset_index(drop=True)
    out.attrs["params"] = dict(n_boundary_positions=n_b, n_other_positions=n_o, min_pos=min_pos)
    return out


@torch.no_grad()
def steer(host, sae, cell, prompts, features, alpha, *, n_new=100, swap=None):
    """Greedy decoding with features amplified: at every position that predicts a new token, encode the
    cell's state S_p (as the edited run has it) and add ``(alpha - 1) sum_i a_i(p) A_{swap(i)}`` over the
    ``features`` i that fire (``swap``: feature -> atom used instead, the dose-matched control; default
    the feature itself). Returns (ids (B, T + n_new), edits applied)."""
    layer, head = host.cell(*cell)[:2]
    feats = torch.as_tensor(list(features), dtype=torch.long)
    swap = swap or {}
    atoms = sae.atoms([swap.get(int(f), int(f)) for f in feats]).float()
    edits = []

    def amplify(p, S):
        if alpha == 1:
            return []
        enc = sae.encode(S)
        dense = torch.zeros(len(S), sae.cfg.n_feat).scatter(1, enc.top_indices.cpu(), enc.top_acts.float().cpu())
        coef = dense[:, feats]  # (B, n_features)
        new = [Edit(s, layer, head, p, "add", (alpha - 1) * torch.einsum("f,fkv->kv", coef[s], atoms))
               for s in (coef > 0).any(1).nonzero()[:, 0].tolist()]
        edits.extend(new)
        return new

    ids = host.generate(_as_batch(prompts), n_new, steer=((layer, head), amplify)).cpu()
    return ids, edits


@torch.no_grad()
def steering_probe(host, sae, cell, prompts, features, *, count, alphas=(5.0, 10.0), control=None, n_new=100,
                   per=100, seed=0) -> pd.DataFrame:
    """Claim 13: decode ``prompts`` with ``features`` amplified x alpha, with the dose-matched control
    (the same coefficients on ``control`` atoms, default: as many random features not in ``features``,
    seeded) and without edits. ``count``: token ids to count (e.g. newlines), or a dict name -> ids.
    One row per (condition, alpha, prompt, counted): count (generated tokens in the set) and rate (per
    ``per`` generated tokens)."""
    prompts = _as_batch(prompts)
    T = prompts.shape[1]
    features = [int(f) for f in features]
    if control is None:
        rest = np.setdiff1d(np.arange(sae.cfg.n_feat), features)
        control = np.random.default_rng(seed).choice(rest, len(features), replace=False).tolist()
    swap = dict(zip(features, map(int, control)))
    count = count if isinstance(count, dict) else {"count": count}

    def rows(ids, condition, alpha):
        out = []
        for name, toks in count.items():
            c = torch.isin(ids[:, T:], torch.as_tensor(list(toks))).sum(1).numpy()
            out.append(pd.DataFrame(dict(condition=condition, alpha=float(alpha), seq=np.arange(len(ids)), counted=name,
                                         count=c, rate=c * per / n_new)))
        return pd.concat(out, ignore_index=True)

    parts = [rows(host.generate(prompts, n_new).cpu(), "baseline", 1.0)]
    for alpha in alphas:
        parts.append(rows(steer(host, sae, cell, prompts, features, alpha, n_new=n_new)[0], "boundary", alpha))
        parts.append(rows(steer(host, sae, cell, prompts, features, alpha, n_new=n_new, swap=swap)[0], "random", alpha))
    out = pd.concat(parts, ignore_index=True)
    out.attrs["params"] = dict(model=host.name, cell=list(cell), features=features, control=list(map(int, control)),
                               alphas=list(alphas), n_new=n_new, per=per, seed=seed)
    return out


def steering_summary(df) -> pd.DataFrame:
    """Per (counted, condition, alpha): n prompts, mean rate with bootstrap CI, paired Wilcoxon p against
    the baseline and (boundary rows) against the random-feature control at the same alpha."""
    rows = []
    for counted, d in df.groupby("counted", sort=False):
        wide = d.pivot(index="seq", columns=["condition", "alpha"], values="rate")
        base = wide[("baseline", 1.0)]
        for cond, alpha in dict.fromkeys(zip(d["condition"], d["alpha"])):
            g = wide[(cond, alpha)]
            ci = stats.bootstrap_ci(g.to_numpy()) if g.nunique() > 1 else stats.CI(g.mean(), g.mean())
            r = dict(counted=counted, condition=cond, alpha=alpha, n=len(g), mean_rate=g.mean(), ci_low=ci.low,
                     ci_high=ci.high, p_vs_baseline=_wilcoxon_p(g, base) if cond != "baseline" else np.nan)
            if cond == "boundary":
                r["p_vs_random"] = _wilcoxon_p(g, wide[("random", alpha)]) if ("random", alpha) in wide else np.nan
            rows.append(r)
    return pd.DataFrame(rows)
