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

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .. import cache, pipeline, recall
from ..data import cell_key, cell_tuple
from ..extract import embedded_text
from ..hosts import Edit
from . import firings as _firings
from . import substitution as _sub
from . import zoo as _zoo
from .section import Section

__all__ = ["passages", "padded", "answers", "by_distance", "influence", "influence_summary", "sites", "alignment",
           "Model", "cell_influence", "setup", "accuracy_table", "deletions", "influence_tables", "substitutions", "summarize",
           "alignments", "claims", "overview", "glue_values"]

OFFSETS = {-1: "key", 0: "value", 1: "separator"}  # a pair's three tokens, by offset from its value token
TOKENS = {name: offset for offset, name in OFFSETS.items()}


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
    seq, pos = torch.tensor(site_df["seq"].tolist()), torch.tensor(site_df["pos"].tolist())
    k, v = torch.empty(len(seq), host.d_k), torch.empty(len(seq), host.d_v)
    for s0, tr in _firings.traced(host, cell, padded(ps)):  # the k and v written at the sites
        at = torch.nonzero((seq >= s0) & (seq < s0 + len(tr.k))).flatten()
        k[at], v[at] = tr.k[seq[at] - s0, pos[at]].float(), tr.v[seq[at] - s0, pos[at]].float()

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


# ------------------------------------------------------------------------------------ the chapter
RECALL_TEXT = "recall/train.txt"  # in writesae/embedded/: training prose with passages woven in (the SAEs' data)


@dataclass
class Model:
    """One model of the chapter at its family's tested cell: the recall-trained one (``kind`` "recall") or
    the zoo member it was trained from ("zoo"). ``fam`` is its :class:`~writesae.experiments.section.Section`
    (host, cell, sizes, the state-dataset spec on the woven text, held-out prose windows); ``passages``
    the held-out recall passages; ``answers`` their accuracy table; ``influence`` the per-pair deletion
    table at the tested cell (every pair token); ``token`` the pair token whose writes are tested (``key``,
    ``value`` or ``separator``: where the family writes the pair, :func:`_tested_site`)."""

    label: str
    kind: str
    fam: object
    passages: list
    answers: pd.DataFrame
    influence: pd.DataFrame
    token: str = "value"

    @property
    def offset(self) -> int:
        return TOKENS[self.token]

    @property
    def name(self) -> str:
        return f"{_zoo.NAMES.get(self.label, self.label)} ({self.kind})"

    @property
    def cell(self) -> tuple:
        return self.fam.cells[0]


def cell_influence(host, *, cells=None, n_passages=2, seed=1) -> pd.DataFrame:
    """Each cell's recall influence per pair token (cell, token, recall_influence: the median KL at the answer of
    deleting the write at a pair's key, value or separator token): from the model's ``metrics.json`` (the recall
    export) when it has every token's, else measured (cached). ``cells``: only these heads (default every head: a
    batched edited run per layer and passage; on the rehearsal's GLA-1.3B it did not end in 40 minutes of a CPU
    core)."""
    path = _zoo.metrics_path(host.name)
    mem = json.loads(path.read_text()).get("memory", []) if path is not None and path.is_file() else []
    fields = {t: "recall_influence" + ("" if t == "value" else f"_{t}") for t in TOKENS}
    keys = None if cells is None else [cell_key(*cell_tuple(c)) for c in cells]
    if mem and all(f in mem[0] for f in fields.values()):
        return pd.DataFrame([dict(cell=m["cell"], token=t, recall_influence=m[f]) for m in mem
                             for t, f in fields.items() if keys is None or m["cell"] in keys])
    key = dict(model=host.name, n_passages=n_passages, seed=seed, tokens=list(TOKENS), **({"cells": keys} if keys else {}))
    return cache.cached_table("recall_cell_influence", key, lambda: influence_summary(influence(
        host, passages(host, n_passages, seed=seed), cells=None if cells is None else [cell_tuple(c) for c in cells],
        offsets=tuple(OFFSETS)))[["cell", "token", "median_kl"]].rename(columns={"median_kl": "recall_influence"}))


def _tested_site(hosts, given, seed) -> tuple[tuple, str]:
    """The head and pair token one family's models are tested at: the recall model's (head, token) whose writes'
    deletion costs the answers most (:func:`cell_influence`, on other passages than the tests') among the heads
    every model of the pair has (the recall GDN's two former attention layers are not heads of its zoo member):
    where the family writes its pairs (the recall Gated DeltaNet at the separator after the value: its short
    convolution brings key and value to that token). ``given``: the head (its most influential token); without
    a recall model, the zoo chapter's head of the baseline, at the value token."""
    kinds = dict(hosts)
    if "recall" not in kinds:
        return (tuple(cell_tuple(given)) if given else _zoo.choose_cells(_zoo.memory(kinds["zoo"]), 1)[0]), "value"
    shared = set.intersection(*({c.key for c in h.cells} for h in kinds.values()))
    if given:
        want = cell_key(*cell_tuple(given))
        if want not in shared:
            raise ValueError(f"recall_cells: {want} is not a head of every model of the pair; give one they share "
                             f"({', '.join(sorted(shared))})")
        shared = {want}
    ci = cell_influence(kinds["recall"], cells=[cell_tuple(given)] if given else None, seed=seed + 1)
    ci = ci[ci["cell"].isin(shared)].sort_values("recall_influence", ascending=False, kind="stable")
    return tuple(cell_tuple(ci["cell"].iloc[0])), str(ci["token"].iloc[0])


def setup(models, baselines=None, *, cells=None, n_passages=128, influence_passages=4, device=None, dtype="float32",
          trust_remote_code=False, seed=0, **kw) -> list:
    """The chapter's :class:`Model` list: for each family of ``models`` ({family: recall-trained source}) the
    recall model and, from ``baselines`` ({family: source}), the model it was trained from, both at one
    tested head and token (:func:`_tested_site`). A model not
    found here is left out, saying so; none found is an error. ``kw``: fields of the models'
    sections (:class:`~writesae.experiments.section.Section`: sizes, ...) over the zoo chapter's
    :data:`~writesae.experiments.zoo.SIZES`; the SAEs' state datasets are windows of the woven recall text."""
    from ..hosts import EMBEDDED_DIR

    out = []
    for label, source in models.items():
        pair = [("recall", source)] + ([("zoo", baselines[label])] if baselines and label in baselines else [])
        hosts = []
        for kind, src in pair:
            try:
                hosts.append((kind, pipeline.host(src, device, dtype, trust_remote_code)))
            except FileNotFoundError:
                print(f"{_zoo.NAMES.get(label, label)} ({kind}, {src}): not found here, left out")
        if not hosts:
            continue
        cell, token = _tested_site(hosts, (cells or {}).get(label), seed)
        for kind, host in hosts:
            ps = passages(host, n_passages, seed=seed + 1)
            acc = cache.cached_table("recall_answers", dict(model=host.name, n=n_passages, seed=seed + 1),
                                     lambda: answers(host, ps))
            key = dict(model=host.name, cell=list(cell), n=influence_passages, seed=seed + 1)
            infl = cache.cached_table("recall_influence", key, lambda: influence(
                host, ps[:influence_passages], cells=[cell]))
            sec = Section(host, cell, [cell], seed=seed, **{**_zoo.SIZES, **kw})
            sec.data = pipeline.data_spec(host, [cell], window=sec.window, n_windows=sec.n_windows,  # the woven text
                                          positions_per_seq=sec.positions_per_seq, seed=seed,
                                          corpus=str(EMBEDDED_DIR / RECALL_TEXT))
            out.append(Model(label, kind, sec, ps, acc, infl, token))
    if not out:
        raise FileNotFoundError(f"none of the chapter's models is here ({', '.join(map(str, models.values()))}): "
                                "train them with python -m writesae.embedded_train --family F --task recall, or "
                                "pass models you have")
    return out


def accuracy_table(models) -> pd.DataFrame:
    """Recall accuracy by distance for every model (model, family, kind, distance, n, accuracy, lo, hi)."""
    return pd.concat([by_distance(m.answers).assign(model=m.name, family=m.label, kind=m.kind) for m in models],
                     ignore_index=True)


def deletions(models) -> pd.DataFrame:
    """Every deleted write at each model's tested cell (the :func:`influence` rows), with model, family and kind;
    ``tested``: the row's token is the model's tested token."""
    return pd.concat([m.influence.assign(model=m.name, family=m.label, kind=m.kind, tested=m.influence["token"] == m.token)
                      for m in models], ignore_index=True)


def influence_tables(models) -> pd.DataFrame:
    """:func:`influence_summary` at each model's tested cell, with model, family and kind."""
    return pd.concat([influence_summary(m.influence).assign(model=m.name, family=m.label, kind=m.kind)
                      for m in models], ignore_index=True)


def substitutions(models, scalings=_sub.SCALINGS, max_sites=64) -> pd.DataFrame:
    """The substitution test at each model's tested cell, on two kinds of write (column ``text``): the
    pairs' writes at the tested token of the held-out recall passages (reads ``answer``, ``next``, ``mean``; ``hit_*`` say
    whether the answer survives), at most ``max_sites``; and the top-1 firings on held-out prose (the zoo
    chapter's pool and reads). Both KL directions, each scaling; cached."""
    out = []
    for m in models:
        f, cell = m.fam, m.cell
        sae = f.sae(cell)
        site_df = sites(f.host, sae, cell, m.passages, offset=m.offset).head(max_sites)
        parts = []
        for scaling in scalings:
            key = dict(f.spec, cell=list(cell), n=len(m.passages), max_sites=max_sites, scaling=scaling, token=m.token)
            parts.append(cache.cached_table("recall_substitution", key, lambda: _sub.substitute(
                f.host, sae, padded(m.passages), site_df, scaling=scaling, reads=("answer", "next", "mean"),
                direction=_sub.DIRECTIONS, seed=f.seed, resume=cache.parts_dir("recall_substitution", key)
            )).assign(text="recall writes", atom=_zoo.RANK1.name, decoder="WriteSAE"))
        prose = _zoo.substitutions({m.label: f}, scalings)
        parts.append(prose[prose["atom"] == _zoo.RANK1.name].assign(text="prose"))
        out += [d.assign(model=m.name, family=m.label, kind=m.kind) for d in parts]
    return pd.concat(out, ignore_index=True)


def summarize(sub_df, direction=_zoo.DIRECTION) -> pd.DataFrame:
    """Win rates (Wilson and cluster-bootstrap intervals) and median KLs per model, text, scaling and read;
    on recall writes also the accuracy kept by each edit (``hit_atom`` etc.: share of pairs still answered)."""
    by = ("model", "kind", "text", "scaling", "read", "direction")
    s = _zoo.summarize(sub_df, by=by, direction=direction)
    hits = [c for c in ("hit_atom", "hit_delete", "hit_random") if c in sub_df]
    if hits:
        d = sub_df if direction is None else sub_df[sub_df["direction"] == direction]
        acc = d.dropna(subset=hits).groupby(list(by))[hits].mean().reset_index()
        s = s.merge(acc, on=list(by), how="left")
    return s


def alignments(models) -> pd.DataFrame:
    """:func:`alignment` at each model's tested cell, summarised: median |cos| of the firing atom's factors with
    the key / value vector written there, with the word's mean vector, and with another word's (the null);
    the atoms' median key / value / pair purity against chance."""
    rows = []
    for m in models:
        sae = m.fam.sae(m.cell)
        site_df = sites(m.fam.host, sae, m.cell, m.passages, offset=m.offset)
        per, atoms = alignment(m.fam.host, sae, m.cell, site_df, m.passages)
        row = dict(model=m.name, family=m.label, kind=m.kind, sites=len(per), atoms=len(atoms))
        row.update({c: float(per[c].median()) for c in ("cos_k", "cos_k_word", "cos_k_other", "cos_v", "cos_v_word",
                                                         "cos_v_other")})
        for c in ("key_purity", "key_chance", "value_purity", "value_chance", "pair_purity"):
            row[c] = float(atoms[c].median()) if len(atoms) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def claims(acc, infl, summary, *, scaling="coef", read="answer", direction=_zoo.DIRECTION) -> pd.DataFrame:
    """The paper's substitution claims where writes matter, per model: deletion's cost at the answer (target:
    median >= 0.1 nats), the atom beating deletion (paper 92.4%) and the strict chain (paper 89.5%) on recall
    writes at the answer, and the same on prose; the answer kept by each edit. Win rates get the book's one rule
    (:func:`writesae.verdicts.verdict`, against 50% and the paper's value)."""
    from ..verdicts import verdict

    rows = []
    for model, g in infl[infl["tested"]].groupby("model", sort=False):
        med = float(g["kl"].median())
        rows.append(dict(model=model, claim="deleting one write costs the answer (median KL, nats)", paper="1.1-2.8",
                         here=med, lo=np.nan, hi=np.nan, verdict="writes matter" if med >= 0.1 else "writes barely matter"))
        s = summary[(summary["model"] == model) & (summary["scaling"] == scaling) & (summary["direction"] == direction)]
        for text, rd in (("recall writes", read), ("prose", "mean")):
            r = s[(s["text"] == text) & (s["read"] == rd)]
            if not len(r):
                continue
            r = r.iloc[0]
            rows.append(dict(model=model, claim=f"atom beats deletion, {text} ({rd})", paper=0.924, here=r["win_rate"],
                             lo=r["wilson_lo"], hi=r["wilson_hi"],
                             verdict=verdict(r["win_rate"], r["wilson_lo"], r["wilson_hi"], paper=0.924, null=0.5)[0]))
            if "chain_rate" in r:
                rows.append(dict(model=model, claim=f"chain atom < delete < random, {text} ({rd})", paper=0.895,
                                 here=r["chain_rate"], lo=np.nan, hi=np.nan, verdict="(point estimate)"))
            if text == "recall writes" and "hit_atom" in r:
                a = acc[acc["model"] == model]
                before = float((a["accuracy"] * a["n"]).sum() / a["n"].sum())
                rows.append(dict(model=model, claim="answers kept: atom / delete / random (unedited: all pairs)",
                                 paper="not reported", here=f"{r['hit_atom']:.2f} / {r['hit_delete']:.2f} / "
                                 f"{r.get('hit_random', np.nan):.2f} (unedited {before:.2f})",
                                 lo=np.nan, hi=np.nan,
                                 verdict="atom keeps more answers" if r["hit_atom"] > r["hit_delete"] else
                                 "atom keeps no more answers than deletion"))
    return pd.DataFrame(rows)


def overview(models) -> pd.DataFrame:
    """One row per model: what it is, its tested cell, and its held-out recall accuracy."""
    return pd.DataFrame([dict(model=m.name, source=m.fam.host.name, cell=f"L{m.cell[0]}H{m.cell[1]}",
                              token=m.token, passages=len(m.passages), recall_accuracy=float(m.answers["correct"].mean()))
                         for m in models])


def glue_values(acc, dels, summary, *, scaling="coef", direction=_zoo.DIRECTION) -> dict:
    """The chapter's key numbers for its prose and the book's verdicts, per family and kind (recall / zoo):
    ``recall_acc_<family>_<kind>``, ``answer_kl_<family>_<kind>`` (median KL at the answer of deleting a pair's
    write at the tested token), ``token_<family>`` (that token), ``win_answer_*`` / ``win_prose_*`` with ``_lo`` / ``_hi`` (Wilson 95%)."""
    out = {}
    for (fam, kind), a in acc.groupby(["family", "kind"], sort=False):
        out[f"recall_acc_{fam}_{kind}"] = float((a["accuracy"] * a["n"]).sum() / a["n"].sum())
    for (fam, kind), d in dels[dels["tested"]].groupby(["family", "kind"], sort=False):
        out[f"answer_kl_{fam}_{kind}"] = float(d["kl"].median())
        out[f"token_{fam}"] = str(d["token"].iloc[0])
    s = summary[(summary["scaling"] == scaling) & (summary["direction"] == direction)]
    for m in s["model"].unique():
        fam, kind = acc.loc[acc["model"] == m, ["family", "kind"]].iloc[0]
        for text, read, name in (("recall writes", "answer", "win_answer"), ("prose", "mean", "win_prose")):
            r = s[(s["model"] == m) & (s["text"] == text) & (s["read"] == read)]
            if len(r):
                for col, suffix in (("win_rate", ""), ("wilson_lo", "_lo"), ("wilson_hi", "_hi")):
                    out[f"{name}_{fam}_{kind}{suffix}"] = float(r[col].iloc[0])
    return out
