"""Writes that matter: the paper's tests on models whose heads store what is read later.

The recall-trained models (``python -m writesae.embedded_train --family F --task recall``) read key-value
pairs stated many tokens earlier (:mod:`writesae.recall`). Every recall passage carries its ground truth:
where each pair was written, where it is asked, which key and value. This module measures

- :func:`answers`: recall accuracy per pair (by distance with :func:`by_distance`);
- :func:`influence`: per cell, the KL at the answer when one write of a pair is deleted (the key's, the
  value's or the separator's token), and whether the answer survives;
- :func:`sites`: the substitution test's sites at the pairs' writes, with the answer position and the value as
  target, for :func:`writesae.experiments.substitution.substitute` (read ``"answer"``, ``hit_<condition>``);
- :func:`alignment`: whether the atoms that fire on recall writes align with the key and value vectors the
  model writes there, and whether an atom keeps to one key, one value or one pair.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .. import recall
from ..extract import embedded_text
from ..hosts import Edit
from . import firings as _firings
from . import substitution as _sub

__all__ = ["passages", "padded", "answers", "by_distance", "influence", "influence_summary", "sites", "alignment"]

OFFSETS = {-1: "key", 0: "value", 1: "separator"}  # a pair's three tokens, by offset from its value token


def passages(host, n, n_pairs=recall.MAX_PAIRS, max_gap=recall.MAX_GAP, seed=1) -> list:
    """``n`` held-out recall passages in ``host``'s tokenizer, their gaps cut from the shipped held-out text."""
    if host.tokenizer is None:
        raise ValueError(f"{host.name} has no tokenizer: the recall passages are words (load a model with one)")
    prose = np.array(host.tokenizer(embedded_text("heldout"), add_special_tokens=False, verbose=False)["input_ids"])
    return recall.heldout(recall.vocab(host.tokenizer), prose, n, n_pairs, max_gap, seed)


def padded(ps) -> torch.Tensor:
    """The passages as one (N, T) batch, right-padded with token 0 (causal: padding changes no position read)."""
    out = torch.zeros(len(ps), max(len(p.ids) for p in ps), dtype=torch.long)
    for i, p in enumerate(ps):
        out[i, :len(p.ids)] = torch.from_numpy(p.ids)
    return out


def _pairs(ps) -> pd.DataFrame:
    return pd.DataFrame([dict(seq=s, pair=i, key=int(p.keys[i]), value=int(p.values[i]), write_at=int(p.write_at[i]),
                              ask_at=int(p.ask_at[i]), distance=int(p.ask_at[i] - p.write_at[i]))
                         for s, p in enumerate(ps) for i in range(len(p.keys))])


@torch.no_grad()
def answers(host, ps, batch=16) -> pd.DataFrame:
    """One row per pair: seq, pair, key, value, write_at, ask_at, distance, ``correct`` (top prediction at the
    question is the value) and ``p_value`` (its probability)."""
    df, ids = _pairs(ps), padded(ps)
    probs = []
    for b0 in range(0, len(ps), batch):
        lp = host.logits(ids[b0:b0 + batch]).log_softmax(-1)
        probs.append(lp)
    correct, p_value = [], []
    for r in df.itertuples():
        lp = probs[r.seq // batch][r.seq % batch, r.ask_at]
        correct.append(int(lp.argmax()) == r.value)
        p_value.append(float(lp[r.value].exp()))
    return df.assign(correct=correct, p_value=p_value)


def by_distance(answers_df, edges=(0, 32, 64, 128, 192, 256, 384)) -> pd.DataFrame:
    """Accuracy by the distance (tokens) from a pair's statement to its question, with Wilson intervals."""
    from .. import stats

    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        g = answers_df[(answers_df["distance"] >= lo) & (answers_df["distance"] < hi)]
        if len(g):
            w = int(g["correct"].sum())
            rows.append(dict(distance=f"{lo}-{hi - 1}", n=len(g), accuracy=w / len(g),
                             **dict(zip(("lo", "hi"), stats.wilson_ci(w, len(g))))))
    return pd.DataFrame(rows)


@torch.no_grad()
def influence(host, ps, cells=None, offsets=(-1, 0, 1), logits_bytes=_sub.LOGITS_BYTES) -> pd.DataFrame:
    """For each pair, cell and offset (-1 the key's token, 0 the value's, 1 the separator's): the KL
    (patched || base) at the pair's question when that token's write of the cell is deleted, and ``hit``:
    whether the answer is still the model's top prediction. One prefix per passage; every (head, pair,
    offset) of a layer as one batched run."""
    cells = host.cells if cells is None else [host.cell(*c[:2]) for c in cells]
    pairs, ids = _pairs(ps), padded(ps)
    rows = []
    for s, g in pairs.groupby("seq"):
        one = ids[s:s + 1, :len(ps[s].ids)]
        at = sorted({int(w) + o for w in g["write_at"] for o in offsets})
        read = sorted(g["ask_at"].tolist())
        pre = host.prefix(one, at, from_layer=min(c.layer for c in cells))
        for layer in sorted({c.layer for c in cells}):
            jobs = [(c, r, o) for c in cells if c.layer == layer for r in g.itertuples() for o in offsets]
            step = _sub.rows_within(host, len(read), logits_bytes)
            for j0 in range(0, len(jobs), step):
                part = jobs[j0:j0 + step]
                run = host.run_edits(one, [Edit(0, c.layer, c.head, r.write_at + o, "delete") for c, r, o in part],
                                     positions=read, prefix=pre)
                for n, (c, r, o) in enumerate(part):
                    q = read.index(r.ask_at)
                    kl = _sub.kl_both(run.logits[n, q:q + 1], run.base[0, q:q + 1])["patched||base"]
                    rows.append(dict(seq=s, pair=r.pair, cell=c.key, layer=c.layer, head=c.head, offset=o,
                                     token=OFFSETS.get(o, str(o)), distance=r.distance, kl=float(kl[0]),
                                     hit=int(run.logits[n, q].argmax()) == r.value,
                                     base_hit=int(run.base[0, q].argmax()) == r.value))
    return pd.DataFrame(rows)


def influence_summary(infl) -> pd.DataFrame:
    """Per cell and token: median and mean KL at the answer, the share of deletions costing >= 0.1 nats, and
    the accuracy after deletion against before."""
    g = infl.groupby(["cell", "layer", "head", "token"], sort=False)
    out = g.agg(n=("kl", "size"), median_kl=("kl", "median"), mean_kl=("kl", "mean"),
                share_over_0p1=("kl", lambda x: float((x >= 0.1).mean())), accuracy=("hit", "mean"),
                accuracy_before=("base_hit", "mean")).reset_index()
    return out.sort_values(["median_kl", "layer", "head"], ascending=[False, True, True], kind="stable")


def sites(host, sae, cell, ps, offset=0, min_pos=1) -> pd.DataFrame:
    """The substitution test's sites at the pairs' writes (the token at ``offset`` from each value): the
    top-1 atom of ``sae`` there (seq, pos, layer, head, feature, coef, as
    :func:`writesae.experiments.firings.select` gives), plus ``answer`` (the pair's question) and ``target``
    (its value token). Writes where no atom fires are left out (counted in ``attrs["unfired"]``)."""
    layer, head = host.cell(*cell[:2])[:2]
    pairs = _pairs(ps).assign(pos=lambda d: d["write_at"] + offset)
    fired = _firings.collect(host, sae, (layer, head), padded(ps), min_pos=min_pos)
    top = fired.sort_values("coef", ascending=False, kind="stable").drop_duplicates(["seq", "pos"])
    out = pairs.merge(top, on=["seq", "pos"], how="inner")
    out = out.assign(layer=layer, head=head, answer=out["ask_at"], target=out["value"])
    out.attrs["unfired"] = len(pairs) - len(out)
    return out.reset_index(drop=True)


@torch.no_grad()
def alignment(host, sae, cell, site_df, ps) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Do the atoms firing on recall writes align with what the model writes there?

    Per site (from :func:`sites`): |cos| of the atom's key factor with the key vector k_t the model writes and
    with the mean k over all writes of the same key word (``cos_k``, ``cos_k_word``), the same for the value
    factor and v_t (``cos_v``, ``cos_v_word``), and, as the null, with the mean vectors of another key / value
    word. Per atom firing on >= 3 sites: its key purity and value purity (share of its sites with its most
    common key / value word) against the purity expected by chance. Needs a rank-1 decoder."""
    factors = _firings._rank1_factors(sae)
    if factors is None:
        raise ValueError(f"{type(sae).__name__} has no rank-1 atoms: alignment needs the bilinear WriteSAE")
    U, W = (x.detach().float() for x in factors)
    layer, head = host.cell(*cell[:2])[:2]
    ids = padded(ps)
    tr = host.trace(ids, cells=[(layer, head)], logits=False)[(layer, head)]
    at = torch.tensor(site_df["seq"].tolist()), torch.tensor(site_df["pos"].tolist())
    k, v = tr.k[at].float(), tr.v[at].float()

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)

    keys, values = site_df["key"].to_numpy(), site_df["value"].to_numpy()
    kbar = {w: unit(k[keys == w].mean(0)) for w in np.unique(keys)}
    vbar = {w: unit(v[values == w].mean(0)) for w in np.unique(values)}
    rng = np.random.default_rng(0)
    other = lambda table, w: table[rng.choice([x for x in table if x != w])] if len(table) > 1 else table[w]  # noqa: E731
    feat = torch.tensor(site_df["feature"].tolist())
    u, w_ = unit(U[feat]), unit(W[feat])
    per = site_df[["seq", "pair", "feature", "key", "value"]].assign(
        cos_k=(u * unit(k)).sum(-1).abs().numpy(), cos_v=(w_ * unit(v)).sum(-1).abs().numpy(),
        cos_k_word=[float((u[i] @ kbar[x]).abs()) for i, x in enumerate(keys)],
        cos_v_word=[float((w_[i] @ vbar[x]).abs()) for i, x in enumerate(values)],
        cos_k_other=[float((u[i] @ other(kbar, x)).abs()) for i, x in enumerate(keys)],
        cos_v_other=[float((w_[i] @ other(vbar, x)).abs()) for i, x in enumerate(values)])
    def purity(x):
        return float(pd.Series(x).value_counts(normalize=True).max())

    def chance(col, n, draws=200):  # the purity of n sites drawn at random from all of them
        return float(np.mean([purity(rng.choice(per[col].to_numpy(), n, replace=False)) for _ in range(draws)]))

    atoms = []
    for f, g in per.groupby("feature"):
        if len(g) >= 3:
            atoms.append(dict(feature=int(f), sites=len(g), key_purity=purity(g["key"]), key_chance=chance("key", len(g)),
                              value_purity=purity(g["value"]), value_chance=chance("value", len(g)),
                              pair_purity=purity(list(zip(g["key"], g["value"])))))
    return per, pd.DataFrame(atoms)
