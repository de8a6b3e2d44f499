"""CE loss recovered: splice an SAE's reconstruction of the state back into the cache (SAELens's metric).

Protocol (the paper's cache-replacement perplexity, App. J: context 0-511, teacher-forced loss on
512-1023): each passage of T tokens runs unedited through positions 0..p-1 (``split = p``, default T/2);
then the matrix state of the chosen cells *after reading token p-1* (what position p starts from) is set
to one of

    clean  the model's own S_{p-1} (no edit)         sae   the SAE's reconstruction S_hat = SAE(S_{p-1})
    zero   0 (zero ablation)                         mean  the SAE's mean state M (mean ablation: the mean
                                                           over its training states, every position)

and the model runs on, teacher-forced; the loss is the mean next-token cross-entropy (nats) of tokens
p+1..T-1, read at positions p..T-2 (the positions that start from the spliced state). Then (SAELens)

    CE loss recovered = (L_ablate - L_sae) / (L_ablate - L_clean)

(1: the reconstruction is as good as the real state; 0: no better than ablating it), against zero and
mean ablation, and the perplexity change ``exp(L_sae - L_clean) - 1`` (the paper: +0.82% for rank-2 vs
+0.76% for rank-1 with all 16 heads of L9 replaced). ``cells`` may be one cell or every head of a layer
(all replaced together). The splice is a host ``add`` edit of ``target - S_{p-1}`` at position p-1
(``writesae.ops.recurrence``: an edit adds a matrix to the freshly written state), so it runs through the
public host API and works for every family.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..cache import computing
from ..hosts import Edit
from .substitution import LOGITS_BYTES, rows_within

__all__ = ["ce_losses", "record", "CONDITIONS", "MIN_ZERO_COST", "not_measurable", "shown", "describe"]

CONDITIONS = ("sae", "zero", "mean")


def _recon(sae, S):
    """S_hat of states S (B, d_k, d_v): ``sae`` is a WriteSAE (run in eval mode) or any callable S -> S_hat."""
    if not isinstance(sae, torch.nn.Module):
        return sae(S)
    was = sae.training
    sae.eval()
    try:
        return sae(S.to(device=sae.device, dtype=sae.dtype)).recon
    finally:
        sae.train(was)


def _mean(sae, like):
    m = getattr(sae, "mean", None)
    if m is None:
        raise ValueError("mean ablation needs the SAE's mean state: pass a WriteSAE (its ``mean`` buffer), or "
                         "conditions=('sae', 'zero')")
    return m.to(like).expand_as(like)


@torch.no_grad()
def ce_losses(host, saes, input_ids, split=None, *, conditions=CONDITIONS, batch=8, progress=True,
              logits_bytes=LOGITS_BYTES) -> dict:
    """Cross-entropy with the states of ``saes``' cells spliced at ``split`` (see the module docstring).

    saes: ``{(layer, head): WriteSAE}`` (one cell, or every head of a layer: replaced together); a value may
    also be any callable mapping states (B, d_k, d_v) to reconstructions. input_ids: (N, T) passages.
    split: the first position that starts from the spliced state (default T // 2; 1 <= split <= T - 2).
    batch: passages per host call (fewer where their logits would exceed ``logits_bytes``). Returns loss_clean
    and loss_<condition> (mean nats per token), with ce_recovered (against zero ablation), ce_recovered_mean
    (against mean ablation), ppl_change (exp(loss_sae - loss_clean) - 1), split, n_tokens, n_passages and cells."""
    ids = torch.as_tensor(input_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    N, T = ids.shape
    split = T // 2 if split is None else int(split)
    if not 1 <= split <= T - 2:
        raise ValueError(f"split={split} must leave context and at least two tokens to score: use 1..{T - 2} for "
                         f"passages of {T} tokens (the paper: 512 of 1024)")
    if not saes:
        raise ValueError("saes is empty: pass {(layer, head): sae} for the heads to splice")
    bad = sorted(set(conditions) - set(CONDITIONS))
    if bad or "sae" not in conditions:
        raise ValueError(f"conditions {tuple(conditions)} must include 'sae' and be among {CONDITIONS}")
    by_cell = {(int(l), int(h)): sae for (l, h), sae in saes.items()}
    cells = [host.cell(l, h) for l, h in by_cell]
    for c in cells:
        if hasattr(by_cell[c.layer, c.head], "check_cell"):
            by_cell[c.layer, c.head].check_cell(c)
    pos, scored = split - 1, list(range(split, T - 1))  # edited state position; positions read for the loss
    targets = ids[:, split + 1:]
    batch = min(batch, rows_within(host, len(scored) * (len(conditions) + 1), logits_bytes))  # edited rows and base
    sums = {k: 0.0 for k in ("clean", *conditions)}
    for s0 in tqdm(range(0, N, batch), disable=not progress, desc="CE loss recovered"):
        chunk = ids[s0:s0 + batch]
        pre = host.prefix(chunk, [pos], cells=list(by_cell))
        rows = []
        for cond in conditions:
            edits = {s: [] for s in range(len(chunk))}
            for key, sae in by_cell.items():
                S = pre.trace[key].state[:, 0].float()  # (n, d_k, d_v): S_{p-1}
                if cond == "sae":
                    target = _recon(sae, S).to(S)
                else:
                    target = torch.zeros_like(S) if cond == "zero" else _mean(sae, S)
                for s in range(len(chunk)):
                    edits[s].append(Edit(s, key[0], key[1], pos, "add", target[s] - S[s]))
            rows += [edits[s] for s in range(len(chunk))]
        run = host.run_edits(chunk, rows, positions=scored, prefix=pre)
        tgt = targets[s0:s0 + batch].to(run.logits.device)
        nll = lambda lg: float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), tgt.reshape(-1), reduction="sum"))  # noqa: E731
        sums["clean"] += nll(run.base)
        n = len(chunk)
        for i, cond in enumerate(conditions):
            sums[cond] += nll(run.logits[i * n:(i + 1) * n])
    n_tok = N * len(scored)
    out = {f"loss_{k}": v / n_tok for k, v in sums.items()}
    clean, sae_loss = out["loss_clean"], out["loss_sae"]
    for cond, name in (("zero", "ce_recovered"), ("mean", "ce_recovered_mean")):
        if cond in conditions:
            gap = out[f"loss_{cond}"] - clean
            out[name] = (out[f"loss_{cond}"] - sae_loss) / gap if abs(gap) > 1e-12 else float("nan")
    out.update(ppl_change=math.expm1(sae_loss - clean), split=split, n_tokens=n_tok, n_passages=N,
               cells=[f"L{c.layer}H{c.head}" for c in cells])
    return out


def _fingerprint(ids) -> str:
    ids = torch.as_tensor(ids).to("cpu", torch.int64).contiguous()
    return hashlib.sha256(ids.numpy().tobytes() + str(tuple(ids.shape)).encode()).hexdigest()[:16]


def record(host, sae, input_ids, split=None, *, key="ce_recovered", progress=True, **kw) -> dict:
    """CE loss recovered of one SAE on its own cell, stored in its ``cfg.json`` metrics (``metrics[key]``)
    and returned; a second call with the same passages and split returns the stored numbers without running.

    The SAE must know its cell (``sae.info["cell"]``, set by the trainer) and, to be stored, the directory
    it was loaded from (``sae.path``: every SAE from ``writesae.pipeline.sae``); otherwise the result is
    only returned. ``kw``: :func:`ce_losses` options (batch, conditions, logits_bytes)."""
    from ..data import cell_tuple

    if not sae.info.get("cell"):
        raise ValueError("the SAE does not know its head (info['cell']); use ce_losses(host, {(layer, head): sae}, ...)")
    ids = torch.as_tensor(input_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    params = dict(model=host.name, passages=_fingerprint(ids), shape=list(ids.shape),
                  split=ids.shape[1] // 2 if split is None else int(split), **{k: list(v) if isinstance(v, tuple) else v
                                                                           for k, v in kw.items()
                                                                           if k not in ("batch", "logits_bytes")})
    old = (sae.info.get("metrics") or {}).get(key)
    if isinstance(old, dict) and old.get("params") == params:
        return old
    if sae.path is None:
        res = ce_losses(host, {cell_tuple(sae.info["cell"]): sae}, ids, split, progress=progress, **kw)
        return {**res, "params": params}
    cfg_json = Path(sae.path) / "cfg.json"
    stored = lambda: json.loads(cfg_json.read_text()).get("metrics") or {}  # noqa: E731
    # another process may be recording into the same cfg.json: decide, compute and write under its lock
    with computing(sae.path, lambda: (stored().get(key) or {}).get("params") == params) as todo:
        metrics = sae.info["metrics"] = {**(sae.info.get("metrics") or {}), **stored()}
        if todo:
            metrics[key] = {**ce_losses(host, {cell_tuple(sae.info["cell"]): sae}, ids, split, progress=progress,
                                        **kw), "params": params}
            sae.save(sae.path)
    return metrics[key]


MIN_ZERO_COST = 1e-3  # nats per token: below this, zeroing the state barely matters and the ratio is noise


def not_measurable(ce_recovered, zero_cost, min_zero_cost=MIN_ZERO_COST) -> str | None:
    """Why CE loss recovered means nothing for this SAE on these passages, or None when it is a measurement:
    the ratio divides by what zeroing the state costs, so where zeroing costs (almost) nothing, or helps, there is
    nothing to recover; and a value above 1 (the reconstruction beats the model's own state) is that noise."""
    if zero_cost is None or not math.isfinite(zero_cost):
        return "no zero-ablation loss"
    if zero_cost < 0:
        return f"zeroing this state lowers the loss by {-zero_cost:.2g} nats/token: nothing to recover"
    if zero_cost < min_zero_cost:
        return f"zeroing this state costs only {zero_cost:.2g} nats/token, below {min_zero_cost:g}: the ratio is noise"
    if ce_recovered is not None and math.isfinite(ce_recovered) and ce_recovered > 1:
        return (f"{ce_recovered:.3f}, above 1: the reconstruction beats the model's own state, below what the metric "
                "resolves")
    return None


def shown(df, min_zero_cost=MIN_ZERO_COST):
    """A table with ``ce_recovered`` / ``zero_cost`` (and ``ppl_change``) columns for a page: CE loss recovered
    (and against the mean, ``ce_recovered_mean``) written as "not measurable here" where :func:`not_measurable`
    says so, with the reason in a ``ce_note`` column (only when some row has one); ``ppl_change`` (a fraction) in
    percent as ``ppl_change_pct``."""
    out = df.copy()
    if "ce_recovered" in out and "zero_cost" in out:
        why = [not_measurable(c, z, min_zero_cost) for c, z in zip(out["ce_recovered"], out["zero_cost"])]
        for col in ("ce_recovered", "ce_recovered_mean"):
            if col in out:
                out[col] = ["not measurable here" if w else v for v, w in zip(out[col], why)]
        if any(why):
            out["ce_note"] = [w or "" for w in why]
    if "ppl_change" in out:
        out.insert(list(out.columns).index("ppl_change"), "ppl_change_pct", 100 * pd.to_numeric(out["ppl_change"]))
        out = out.drop(columns="ppl_change")
    return out


def caption(shown_df, label) -> str | None:
    """One caption for a :func:`shown` table saying why its "not measurable here" entries are, each row named
    by its ``label`` column (instead of a column repeating long reasons on every row); None when nothing needs
    it."""
    notes = [f"{name}: {w}" for name, w in zip(shown_df[label], shown_df.get("ce_note", [""] * len(shown_df))) if w]
    return "CE recovered not measurable here. " + "; ".join(notes) + "." if notes else None


def describe(ce_recovered, zero_cost, ppl_change=None, min_zero_cost=MIN_ZERO_COST) -> str:
    """CE loss recovered for a sentence: "0.950 (perplexity +0.76%)", or "not measurable here (why; perplexity
    +0.76%)" where :func:`not_measurable` says so."""
    ppl = f"perplexity {100 * ppl_change:+.2f}%" if ppl_change is not None and math.isfinite(ppl_change) else ""
    why = not_measurable(ce_recovered, zero_cost, min_zero_cost)
    if why:
        return f"not measurable here: {why}" + (f" ({ppl})" if ppl else "")
    return f"{ce_recovered:.3f}" + (f" ({ppl})" if ppl else "")
