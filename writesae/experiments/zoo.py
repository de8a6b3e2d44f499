"""Across architectures (PAPER.md Sec. 3.3, Fig. 4, Tables 6 and 11, App. F.4): the chapter's protocols on one
model per recurrent family, orchestrated from the building blocks of the other chapters.

The paper compares real checkpoints of different sizes, corpora and tokenizers. The embedded zoo
(``load_host("embedded:<family>")``) holds one ~7.8M-parameter model per family trained here on the same
corpus, tokenizer, context and token budget, so the comparison can be made *matched*. Per family:

1. **Cells that keep a state** (:func:`memory`, :func:`choose_cells`): the memory table of every cell, i.e.
   the median decay and the median *write share* ``||W_t||_F / ||S_t||_F`` (near 1: the state is little more
   than the current write). It is read from the model's ``metrics.json`` when that file holds one (the zoo's
   export writes it) and measured with ``host.trace`` otherwise, by the same formula; next to it each cell's
   *influence*, the median KL that deleting one of its writes causes downstream (also in ``metrics.json``). The chosen cells are the
   ``n_cells`` with the largest influence among cells that keep a state (write share <= 0.3), unless fixed by
   hand (the GPU parameter files fix the paper's cells). Lowest write share alone picked nearly frozen
   states whose writes barely reach the output (KLs ~1e-6, where a win is a coin toss).
2. **The host-matched WriteSAE** (:data:`RANK1`, :data:`RANK2_UPDATE`): rank-1 atoms against the rank-1
   additive write for every family; for RWKV-7, whose update ``S_t - D_t S_{t-1}`` is rank 2, also rank-2
   atoms against that update (a second row everywhere). Alive atoms, the register / bundle partition
   and the register median cosine (:func:`partitions`).
3. **Substitution** (:func:`substitutions`, :func:`summarize`): atom / delete / random at the pool's
   firings, both scalings (SAE coefficient and the native write's norm), every read-out and both KL directions.
4. **FlatSAE + top-r SVD** (:func:`flat_comparison`, App. F.4): at the same firings, the top-1 atom of a
   FlatSAE (dense atoms on ``vec S``) truncated to its best rank-r approximation (r = the matched atom's
   rank) and rescaled to the native write's norm, against the WriteSAE atom at the same scaling
   (``Section.flat_svd_substitution``, as in the substitution chapter).
5. **The closed form** (:func:`closed_forms`): ``writesae.experiments.closed_form`` per family. Its
   ``pred_direct`` is already host-specific: the exact transport of the family (scalar decay for Mamba-2 and
   GDN, per-row decay for GLA / RWKV-7, erase pair for the delta rules) and the host's own read-out Jacobian,
   with no fitted parameter, scored on held-out prompts; ``pred_paper`` is the paper's GDN formula.
6. **DeltaNet register cosine against k** (:func:`k_sweep`).
7. **The numbers the verdicts read** (:func:`glue_values`): the paper's cross-architecture statements are rows
   of the book's verdict table (``writesae.verdicts``), tested on these numbers with their intervals.

Each family runs on a :class:`~writesae.experiments.section.Section` (:func:`setup`), the class every chapter runs
on: its SAEs, firings, partitions and substitution runs are cached (``writesae.cache``) under the chapter's
parameters as in the other chapters.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import cache, pipeline
from ..data import cell_tuple
from ..hosts import Edit
from ..ops import recurrence as _recurrence
from ..verdicts import median_ci, median_difference
from . import closed_form as _cf
from . import firings as _firings
from . import partition as _partition
from . import substitution as _sub
from .section import Section

__all__ = ["FAMILIES", "NAMES", "PAPER", "Atom", "RANK1", "RANK2_UPDATE", "atoms_for", "SIZES",
           "memory_table", "influence_table", "measure_influence", "metrics_path", "memory", "choose_cells", "setup", "memory_tables", "partitions",
           "family_register_cos", "substitutions", "summarize", "headline", "flat_comparison",
           "closed_forms", "k_sweep", "REGISTER_PAIRS", "glue_values", "win_rate_rows"]

FAMILIES = ("gdn", "mamba2", "deltanet", "gla", "rwkv7")
NAMES = {"gdn": "GDN", "mamba2": "Mamba-2", "deltanet": "DeltaNet", "gla": "GLA", "rwkv7": "RWKV-7"}
# host.family -> the chapter's family label
_LABELS = {"gated_deltanet": "gdn", "mamba2": "mamba2", "delta_net": "deltanet", "gla": "gla", "rwkv7": "rwkv7"}
READ, DIRECTION = "mean", "patched||base"  # the headline read-out and KL direction (as in the substitution chapter)

# The paper's cross-architecture numbers (Sec. 3.3, Fig. 4, Tables 6 and 11, App. F.4), on real checkpoints:
# Qwen3.5-0.8B L9 H4 (GDN), Mamba-2-370M L24 H0, RWKV-7-1.5B L12 H0, DeltaNet-1.3B L12 H8.
PAPER = dict(
    register_cos={"gdn": 0.262, "rwkv7": 0.180, "mamba2": 0.0575},
    win_rate={"gdn": 0.924, "mamba2": 0.881},            # headline substitution (coefficient scaling)
    n_firings={"gdn": 4851, "mamba2": 2500},
    mamba2_kl={"atom": 0.97, "delete": 1.62, "random": 2.32},  # median KL on Mamba-2
    matched={"gdn": 0.9125, "mamba2": 0.8285},           # App. F.4: architecture-matched decoder
    flat_svd={"gdn": 0.9136, "mamba2": 0.7630},          # App. F.4: FlatSAE + top-1 SVD
    deltanet_k={32: float("nan"), 128: 0.997},           # register cosine (k = 32: no registers)
    closed_form_r2={"gdn": 0.983},                       # median R^2 of the paper's formula; Mamba-2: negative
)


@dataclass(frozen=True)
class Atom:
    """Which decoder an SAE row uses and which native matrix its atoms stand for."""

    name: str
    variant: str        # writesae.sae variant
    rank: int           # atom rank
    write: str          # the native matrix substituted: "additive" (b k v^T) or "update" (S_t - D_t S_{t-1})
    cos: str            # the firings column the partition reads: cos (vs the write) or cos_update

    @property
    def sae(self) -> dict:
        """The SAE's keywords (``Section.sae``)."""
        return dict(variant=self.variant, rank=self.rank)


RANK1 = Atom("rank-1 write", "bilinear", 1, "additive", "cos")
RANK2_UPDATE = Atom("rank-2 update", "rank", 2, "update", "cos_update")
UPDATE_RANK = {"rwkv7": 2}  # families whose update is not rank 1 (README's family table)


def atoms_for(label) -> tuple:
    """The host-matched atoms of a family: rank 1 against the write; for a family whose update has rank 2
    (RWKV-7), also rank 2 against the update."""
    return (RANK1, RANK2_UPDATE) if UPDATE_RANK.get(label, 1) == 2 else (RANK1,)


# The chapter's sizes where they are not a Section's: a small state dataset per family and small SAEs, trained in
# small batches at a high rate (enough optimizer steps on it); every top-1 firing, at most 24 per cell
SIZES = dict(n_windows=32, eval_windows=8, n_feat=128, k=8, batch_size=32, lr=1e-3, min_firings=3, pool="top1",
             max_firings=24)


# --------------------------------------------------------------------------- which cells keep a state
@torch.no_grad()
def memory_table(host, ids, layers=None) -> pd.DataFrame:
    """Per cell (of ``layers``, default every recurrent layer): the median decay (its mean over key rows for a
    per-row decay) and the median write share ``||W_t||_F / ||S_t||_F`` over every position of ``ids`` (the
    formula of the zoo's ``metrics.json``, ``writesae.embedded_train.memory_table``), traced one layer at a time."""
    ids = torch.as_tensor(ids)
    rows = []
    for layer in (host.recurrent_layers if layers is None else layers):
        cells = [(c.layer, c.head) for c in host.cells if c.layer == layer]
        tr = host.trace(ids, cells=cells, logits=False)
        for c in cells:
            t = tr[c]
            a = _recurrence.mean_decay(t.a)
            share = t.write.flatten(2).norm(dim=-1) / t.state.flatten(2).norm(dim=-1).clamp_min(1e-30)
            rows.append(dict(cell=f"L{c[0]}H{c[1]}", decay=round(float(a.median()), 4),
                             write_share=round(float(share.median()), 4)))
    return pd.DataFrame(rows)


def metrics_path(model):
    """The ``metrics.json`` that goes with a model source (an ``embedded:<family>`` name or a directory), or None."""
    from ..hosts import EMBEDDED_DIR, FAMILIES as _HOST_FAMILIES, ZOO_DIRS

    model = str(model)
    if model.startswith("embedded:"):
        fam = model.split(":", 1)[1]
        fam, sub = (fam[:-len("-recall")], "recall") if fam.endswith("-recall") else (fam, "")
        if fam not in _HOST_FAMILIES:
            return None
        return EMBEDDED_DIR / sub / ZOO_DIRS.get(_HOST_FAMILIES[fam], fam) / "metrics.json"
    if model == "embedded":
        return EMBEDDED_DIR / "metrics.json"
    return Path(model) / "metrics.json" if os.path.isdir(model) else None


def memory(host, *, window=128, n_windows=2, seed=0, influence=True, corpus="embedded") -> pd.DataFrame:
    """The memory table of every cell of ``host`` (columns cell, layer, head, decay, write_share, source): the
    model's ``metrics.json`` table when it has one, else measured (:func:`memory_table`, cached) on
    ``n_windows`` held-out windows of ``window`` tokens; with ``influence``, the column of
    :func:`influence_table` on the first of those windows (cached)."""
    path = metrics_path(host.name)
    table = None
    if path is not None and path.is_file():
        table = json.loads(path.read_text()).get("memory")
    if table:
        df = pd.DataFrame(table)
        df["source"] = f"metrics.json ({path.parent.name})"
    else:
        key = dict(model=host.name, window=window, n_windows=n_windows, seed=seed, **pipeline.run_key(host, corpus))
        df = cache.cached_table("zoo_memory", key, lambda: memory_table(
            host, pipeline.windows(host, "heldout", window, n_windows, seed, corpus)))
        df["source"] = f"measured ({n_windows} x {window} held-out tokens)"
    lh = [cell_tuple(c) for c in df["cell"]]
    df.insert(1, "layer", [l for l, _ in lh])
    df.insert(2, "head", [h for _, h in lh])
    if influence and "influence" not in df:  # the zoo's metrics.json ships it (window 128, seed 0)
        key = dict(model=host.name, window=window, n_windows=1, seed=seed, **pipeline.run_key(host, corpus))
        inf = cache.cached_table("zoo_influence", key, lambda: measure_influence(host, window=window, seed=seed,
                                                                                corpus=corpus))
        df = df.merge(inf, on="cell", how="left")
    return df


@torch.no_grad()
def influence_table(host, ids, positions=None, logits_bytes=_sub.LOGITS_BYTES) -> pd.DataFrame:
    """Per cell: how much its writes matter downstream, ``influence`` = the median over ``positions`` (default
    three spread over each window) of the mean KL(patched || base) from the edit to the window's end when that
    position's write is deleted. One prefix per window, every head of a
    layer as one batched run: about 10 s for RWKV-7's 24 cells, 2 min for Mamba-2's 224 on one busy thread."""
    ids = torch.as_tensor(ids)
    T = ids.shape[1]
    positions = positions or sorted({T // 4, T // 2, 3 * T // 4})
    kls = {}
    for s in range(len(ids)):
        pre = host.prefix(ids[s:s + 1], positions, from_layer=host.recurrent_layers[0])
        for layer in host.recurrent_layers:
            heads = [c.head for c in host.cells if c.layer == layer]
            for p in positions:
                step = _sub.rows_within(host, T - p, logits_bytes)  # heads per run: every one, unless the logits
                for h0 in range(0, len(heads), step):                # of a large vocabulary do not fit
                    hs = heads[h0:h0 + step]
                    run = host.run_edits(ids[s:s + 1], [Edit(0, layer, h, p, "delete") for h in hs],
                                         positions=range(p, T), prefix=pre)
                    kl = _sub.kl_by_position(run.logits, run.base[0]).mean(-1)
                    for h, x in zip(hs, kl.tolist()):
                        kls.setdefault(f"L{layer}H{h}", []).append(x)
    return pd.DataFrame(dict(cell=list(kls), influence=[float(np.median(v)) for v in kls.values()]))


def measure_influence(host, *, window=128, seed=0, corpus="embedded") -> pd.DataFrame:
    """:func:`influence_table` on the first held-out window of ``window`` tokens: what :func:`memory` adds to
    the memory table, and what the zoo's export stores in ``metrics.json`` next to it."""
    return influence_table(host, pipeline.windows(host, "heldout", window, 1, seed, corpus))


def choose_cells(memory_df, n=1, fixed=None, max_write_share=0.3) -> list:
    """The cells to analyse: ``fixed`` ((layer, head) pairs or "L9H4") when given, else the ``n`` cells whose
    writes matter most downstream (largest ``influence``, :func:`influence_table`) among those that keep a state
    (write share at most ``max_write_share``: the state holds more than the current write); ties by layer, head.
    Too few such cells: the ones with the lowest write share fill up. Without an ``influence`` column, the
    lowest write share decides."""
    if fixed:
        return [tuple(int(x) for x in cell_tuple(c)) for c in fixed]
    if "influence" not in memory_df:
        order = memory_df.sort_values(["write_share", "layer", "head"], kind="stable")
        return [(int(l), int(h)) for l, h in zip(order["layer"].head(n), order["head"].head(n))]
    keeps = memory_df[memory_df["write_share"] <= max_write_share].sort_values(
        ["influence", "layer", "head"], ascending=[False, True, True], kind="stable")
    rest = memory_df.drop(keeps.index).sort_values(["write_share", "layer", "head"], kind="stable")
    pick = pd.concat([keeps, rest]).head(n)
    return [(int(l), int(h)) for l, h in zip(pick["layer"], pick["head"])]


def chosen_by(memory_df, cells, fixed=None, max_write_share=0.3) -> list:
    """Per row of ``memory_df``: why :func:`choose_cells` chose it ("" where it did not): fixed by ``zoo_cells``,
    the most influential head that keeps a state, or, where too few heads keep one, the lowest write share."""
    cells = {tuple(c) for c in cells}

    def why(layer, head, share):
        if (int(layer), int(head)) not in cells:
            return ""
        if fixed:
            return "fixed (zoo_cells)"
        if share > max_write_share:
            return f"lowest write share (no other head ≤ {max_write_share:g})"
        return f"most influential with write share ≤ {max_write_share:g}" if "influence" in memory_df else \
            "lowest write share"

    return [why(*row) for row in zip(memory_df["layer"], memory_df["head"], memory_df["write_share"])]


def setup(models, *, zoo_cells=None, n_cells=1, max_write_share=0.3, memory_window=128, memory_windows=2,
          window=128, seed=0, corpus="embedded", device=None, dtype="float32", trust_remote_code=False, **kw) -> dict:
    """{label: :class:`~writesae.experiments.section.Section`} for ``models`` = {label: source}: hosts loaded,
    memory tables read or measured (:func:`memory`, on ``memory_windows`` windows of at most ``memory_window``
    tokens), cells chosen (:func:`choose_cells`; ``zoo_cells`` = {label: [[layer, head], ...]} fixes them per
    family), each family's section on them (its first cell the headline): the state-dataset spec shared by every
    SAE of a family and the held-out windows; each model in ``dtype`` on ``device`` (``trust_remote_code``: see
    :func:`writesae.hosts.load_host`). ``kw``: further Section fields (sizes, pool, ...) over :data:`SIZES`.
    A family whose model is not found here (a zoo member not trained yet) is left out, saying so."""
    out = {}
    for label, source in models.items():
        try:
            host = pipeline.host(source, device, dtype, trust_remote_code)
        except FileNotFoundError as e:  # a zoo member not trained yet: the chapter runs on the others
            print(f"{label}: left out: {e}")
            continue
        mem = memory(host, window=min(window, memory_window), n_windows=memory_windows, seed=seed, corpus=corpus)
        cells = choose_cells(mem, n_cells, (zoo_cells or {}).get(label), max_write_share)
        mem["chosen"] = [(int(l), int(h)) in cells for l, h in zip(mem["layer"], mem["head"])]
        mem["chosen_by"] = chosen_by(mem, cells, (zoo_cells or {}).get(label), max_write_share)
        out[label] = Section(host, cells[0], cells, window=window, seed=seed, corpus=corpus,
                             name=NAMES.get(label, label), memory=mem, **{**SIZES, **kw})
    return out


def memory_tables(fams) -> pd.DataFrame:
    """Every family's memory table, one row per cell, with ``family`` and ``chosen``."""
    return pd.concat([f.memory.assign(family=f.name) for f in fams.values()], ignore_index=True)


# --------------------------------------------------------------------------------------- registers
def partitions(fams):
    """(cells, atoms): one row per (family, cell, atom) with the memory, the SAE's training metrics (FVU, dead
    fraction), alive atoms (>= min_firings firings on the held-out windows), the partition (registers,
    bundles, dBIC, best k) and the register median cosine (median over register atoms of their median
    cosine to the native matrix); and the per-atom table (family, cell, atom, feature, n_firings, cos, class)."""
    rows, per_atom = [], []
    for label, f in fams.items():
        mem = f.memory.set_index("cell")
        for cell in f.cells:
            key = f"L{cell[0]}H{cell[1]}"
            for atom in atoms_for(label):
                sae = f.sae(cell, **atom.sae)
                classes, sm = _partition_of(f, cell, atom)
                m = sae.info.get("metrics", {})
                two = _partition.has_classes(sm["dbic"])  # a register cosine only where registers are a class
                reg = classes.loc[classes["class"] == "register", "cos"] if classes is not None and two else pd.Series([], dtype=float)
                rows.append(dict(family=f.name, cell=key, layer=cell[0], head=cell[1], atom=atom.name,
                                 write_share=float(mem.loc[key, "write_share"]), decay=float(mem.loc[key, "decay"]),
                                 fvu=m.get("fvu", np.nan), dead_fraction=m.get("dead", np.nan) / f.n_feat,
                                 n_alive=sm["n_alive"], n_register=sm["n_register"], n_bundle=sm["n_bundle"],
                                 register_cos=float(reg.median()) if len(reg) else np.nan,
                                 register_cos_mean=sm["mean_cos"]["register"], bundle_cos=sm["mean_cos"]["bundle"],
                                 dbic=sm["dbic"], best_k=sm["k"]))
                if classes is not None:
                    per_atom.append(classes[["feature", "n_firings", "cos", "class"]].assign(
                        family=f.name, cell=key, atom=atom.name, register_class=two))
    cols = ["family", "cell", "atom", "feature", "n_firings", "cos", "class", "register_class"]
    atoms = pd.concat(per_atom, ignore_index=True)[cols] if per_atom else pd.DataFrame(columns=cols)
    return pd.DataFrame(rows), atoms


def registers(atoms, atom=RANK1.name) -> pd.DataFrame:
    """The register atoms of :func:`partitions`' per-atom table, at the cells where registers are a class
    (:func:`writesae.experiments.partition.has_classes`)."""
    if not len(atoms):
        return atoms
    return atoms[(atoms["atom"] == atom) & (atoms["class"] == "register") & atoms["register_class"].astype(bool)]


def family_register_cos(atoms, atom=RANK1.name) -> dict:
    """{family name: median cosine over the register atoms of every analysed cell of that family where registers
    are a class} (a family without one is absent)."""
    return {fam: float(g["cos"].median()) for fam, g in registers(atoms, atom).groupby("family")}


# ------------------------------------------------------------------------------------- substitution
def _partition_of(f, cell, atom):
    """``f.partition`` of ``atom``'s SAE at ``cell`` (by ``atom.cos``); (None, a summary of NaNs) when too few
    atoms are alive to fit it."""
    try:
        return f.partition(cell, atom.cos, **atom.sae)
    except ValueError:  # fewer than 6 alive atoms
        alive = f.n_alive(cell, **atom.sae)
        return None, dict(n_alive=alive, n_register=0, n_bundle=alive, dbic=np.nan, k=np.nan,
                          mean_cos={"register": np.nan, "bundle": np.nan})


def _has_sites(f, cell, atom) -> bool:
    """Whether the family's pool has firings of ``atom``'s SAE at ``cell`` (none without registers)."""
    if f.pool == "registers" and _partition_of(f, cell, atom)[0] is None:
        return False
    return len(f.sites(cell, sae=atom.sae, cos=atom.cos)) > 0


def substitutions(fams, scalings=_sub.SCALINGS) -> pd.DataFrame:
    """The substitution test at every analysed cell of every family, for each host-matched atom and each
    scaling: one long table (``writesae.experiments.substitution.substitute``'s rows, both KL directions, every
    read-out) with family, atom and pool. Cells whose pool is empty contribute no rows."""
    out = []
    for label, f in fams.items():
        for cell in f.cells:
            for atom in atoms_for(label):
                if _has_sites(f, cell, atom):
                    out += [f.substitution(cell, sae=atom.sae, cos=atom.cos, scaling=scaling, write=atom.write)[0]
                            .assign(family=f.name, atom=atom.name, decoder="WriteSAE") for scaling in scalings]
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def summarize(df, by=("family", "atom", "decoder", "scaling", "read", "direction"), *, direction=DIRECTION,
              n_boot=1000, seed=0):
    """``substitution.summarize`` over a table of several cells, for one KL ``direction`` (None: both; the
    tables keep both): atoms are told apart per cell for the cluster bootstrap (feature ids repeat across cells)."""
    if direction is not None and len(df):
        df = df[df["direction"] == direction]
    if not len(df):
        return pd.DataFrame(columns=list(by) + ["n", "win_rate", "wilson_lo", "wilson_hi"])
    d = df.assign(feature=df["layer"].astype(str) + "." + df["head"].astype(str) + "." + df["feature"].astype(str))
    return _sub.summarize(d, by=by, n_boot=n_boot, seed=seed)


def headline(summary, *, atom=RANK1.name, decoder="WriteSAE", scaling="coef", read=READ, direction=DIRECTION):
    """The rows of a :func:`summarize` table for one atom, decoder, scaling, read-out and direction, by family."""
    s = summary
    sel = (s["atom"] == atom) & (s["decoder"] == decoder) & (s["scaling"] == scaling) & (s["read"] == read) & (
        s["direction"] == direction)
    return s[sel].set_index("family")


# ------------------------------------------------------------------------------ FlatSAE + top-r SVD
def flat_comparison(fams) -> pd.DataFrame:
    """App. F.4 at every analysed cell (``Section.flat_svd_substitution``): on the pool's firings, the WriteSAE
    atom against the FlatSAE's top-1 atom truncated to the matched rank (top-1 SVD for rank-1 atoms, top-2 for
    RWKV-7's rank-2 update), both rescaled to the native write's norm (``scaling="norm"``). One long table
    (substitute's rows, column ``decoder``) restricted to the firings both decoders cover."""
    out = []
    for label, f in fams.items():
        for cell in f.cells:
            for atom in atoms_for(label):
                if _has_sites(f, cell, atom):
                    df = f.flat_svd_substitution(cell, rank=atom.rank, sae=atom.sae, cos=atom.cos, write=atom.write)
                    if df is not None:
                        out.append(df.assign(family=f.name, atom=atom.name))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


# ------------------------------------------------------------------------------------- closed form
def _cf_sites(f, cell, cf_atoms, cf_sites):
    """Sites of the closed form: the ``cf_atoms`` most frequent register atoms (then the most frequent other
    alive atoms when there are fewer) that fire on at least two passages, at most ``cf_sites`` firings each,
    drawn (seeded) from as many passages as possible, so each atom has fit and held-out prompts."""
    classes, _ = _partition_of(f, cell, RANK1)
    if classes is None:
        return None
    order = classes.sort_values(["n_firings", "feature"], ascending=[False, True])
    pick = (order[order["class"] == "register"]["feature"].tolist() + order[order["class"] != "register"]["feature"].tolist())
    fir = f.firings(cell)
    seqs = fir.groupby("feature")["seq"].nunique()
    pick = [a for a in pick if seqs.get(a, 0) >= 2][:cf_atoms]
    if not pick:
        return None
    rng = np.random.default_rng(f.seed)
    parts = []
    for a in pick:
        g = fir[fir["feature"] == a]
        g = g.iloc[rng.permutation(len(g))]
        parts.append(g.assign(_turn=g.groupby("seq").cumcount().to_numpy()).sort_values("_turn", kind="stable")
                     .head(cf_sites))
    sites = pd.concat(parts).drop(columns="_turn").sort_values(["seq", "pos", "rank"]).reset_index(drop=True)
    return sites.assign(pool="atoms")


def closed_forms(fams, cf_atoms=3, cf_sites=4, eps=(0.1, 1.0)):
    """(per_atom, by_family): the closed form (``closed_form.closed_form``, ``eps`` in units of the write's norm,
    lag 0) at every analysed cell with the rank-1 atoms, on ``cf_sites`` firings of each of ``cf_atoms`` atoms
    (registers first); ``per_atom`` is ``closed_form.r2`` by atom on the held-out (eval) prompts, with family and
    cell; ``by_family`` the median per family of each predictor's R^2."""
    per = []
    for f in fams.values():
        for cell in f.cells:
            sites = _cf_sites(f, cell, cf_atoms, cf_sites)
            if sites is None or not len(sites):
                continue
            sae = f.sae(cell)
            key = dict(f.spec, cell=list(cell), cf_atoms=cf_atoms, cf_sites=cf_sites, eps=list(eps),
                       min_firings=f.min_firings)
            cf = cache.cached_table("zoo_closed_form", key, lambda: _cf.closed_form(
                f.host, sae, f.eval_ids, sites, eps=tuple(eps), lags=(0,), relative_to="write", seed=f.seed))
            if not (cf["split"] == "eval").any() or not (cf["split"] == "fit").any():
                continue
            per.append(_cf.r2(cf, by=("feature",)).assign(family=f.name, cell=f"L{cell[0]}H{cell[1]}"))
    if not per:
        return pd.DataFrame(), pd.DataFrame(columns=["family"])
    per = pd.concat(per, ignore_index=True)
    cols = [c for c in per if c.startswith("r2_")]
    by_family = per.groupby("family", sort=False)[cols].median().reset_index()
    by_family.insert(1, "n_atoms", per.groupby("family", sort=False).size().to_numpy())
    return per, by_family


# ------------------------------------------------------------------------------------- DeltaNet vs k
def k_sweep(f, ks=(16, 32, 64, 128), n_feat=512, cell=None) -> pd.DataFrame:
    """Register cosine against the TopK ``k`` at one cell of family ``f`` (default its first analysed cell):
    per k, an SAE with ``n_feat`` rank-1 atoms on the same states, its alive atoms, registers, dBIC and register
    median cosine (NaN where registers are not a class). Empty without a family."""
    if f is None:
        return pd.DataFrame(columns=["family", "cell", "k", "n_alive", "n_register", "register_cos"])
    cell = tuple(cell or f.cells[0])
    ks = [int(k) for k in ks if int(k) <= n_feat]

    def compute():
        rows = []
        for k in ks:
            sae = f.sae(cell, k=k, n_feat=n_feat)
            atoms = _partition.atom_table(_firings.collect(f.host, sae, cell, f.eval_ids))
            try:
                classes, sm = _partition.partition(atoms, min_firings=f.min_firings, seed=f.seed)
                reg = classes.loc[classes["class"] == "register", "cos"]
            except ValueError:
                sm = dict(n_alive=int((atoms["n_firings"] >= f.min_firings).sum()), n_register=0, dbic=np.nan, k=np.nan)
                reg = pd.Series([], dtype=float)
            rows.append(dict(family=f.name, cell=f"L{cell[0]}H{cell[1]}", k=k, n_feat=n_feat, n_alive=sm["n_alive"],
                             n_register=sm["n_register"], register_cos=float(reg.median()) if len(reg) else np.nan,
                             dbic=sm["dbic"], best_k=sm["k"], fvu=sae.info.get("metrics", {}).get("fvu", np.nan)))
        return pd.DataFrame(rows)

    out = cache.cached_table("zoo_k_sweep", dict(f.spec, cell=list(cell), ks=ks, sweep_n_feat=n_feat,
                                                 min_firings=f.min_firings), compute)
    if not len(out):
        return out
    two = out["dbic"].map(_partition.has_classes)  # a register cosine only where registers are a class
    return out.assign(register_cos=out["register_cos"].where(two))


# ------------------------------------------------------------------- the numbers the chapter's verdicts read
def _get(table, fam, col):
    try:
        return float(table.loc[fam, col])
    except (KeyError, TypeError, ValueError):
        return np.nan


# the paper's orderings of the register median cosine, tested pair by pair (writesae.verdicts, claims 11a / 11b)
REGISTER_PAIRS = (("gdn", "rwkv7"), ("rwkv7", "mamba2"))


def glue_values(*, reg_cos=None, atoms=None, summary=None, flat_summary=None, flat=None, cf_by_family=None,
                cf_atoms=None, sweep=None) -> dict:
    """The numbers the chapter's text and its verdicts (``writesae.verdicts``) quote, keyed by glue name, from
    whichever results are given (so each section glues its own), for all five families: NaN where a family is
    not in the run, so the prose renders whatever subset of families ran.

    atoms: :func:`partitions`' per-atom table (the register cosine's differences between families, with
    bootstrap intervals); flat: :func:`flat_comparison` (the matched decoder's win rate minus FlatSAE's, paired
    over the firings both cover); cf_atoms: :func:`closed_forms`' per-atom table (each median R^2's interval)."""
    out = {}
    if reg_cos is not None:
        out.update({f"reg_cos_{lab}": float(reg_cos.get(NAMES[lab], np.nan)) for lab in FAMILIES})
    if atoms is not None:
        reg = registers(atoms)
        for a, b in REGISTER_PAIRS:
            d = median_difference(*(reg.loc[reg["family"] == NAMES[x], "cos"] if len(reg) else [] for x in (a, b)))
            out.update(zip((f"reg_cos_diff_{a}_{b}", f"reg_cos_diff_{a}_{b}_lo", f"reg_cos_diff_{a}_{b}_hi"), d))
    if flat is not None:
        for lab in FAMILIES:
            part = flat[(flat["family"] == NAMES[lab]) & (flat["atom"] == RANK1.name)] if len(flat) else flat
            g = _sub.decoder_gap(part, read=READ, direction=DIRECTION)
            out.update({f"flat_gap_{lab}": g["gap"], f"flat_gap_{lab}_lo": g["lo"], f"flat_gap_{lab}_hi": g["hi"]})
    if cf_atoms is not None:
        for lab in FAMILIES:
            part = cf_atoms[cf_atoms["family"] == NAMES[lab]] if len(cf_atoms) else cf_atoms
            for pred in ("pred_direct", "pred_paper_fit", "pred_paper"):
                col = f"r2_{pred}"
                _, lo, hi = median_ci(part[col]) if col in part else (np.nan, np.nan, np.nan)
                out.update({f"{col}_{lab}_lo": lo, f"{col}_{lab}_hi": hi})
    if summary is not None:
        h = headline(summary) if len(summary) else pd.DataFrame()
        hn = headline(summary, scaling="norm") if len(summary) else pd.DataFrame()
        for lab in FAMILIES:
            for col in ("n", "win_rate", "wilson_lo", "wilson_hi", "median_kl_atom", "median_kl_delete",
                        "median_kl_random", "ratio_delete", "ratio_random", "chain_rate", "median_cos"):
                out[f"sub_{col}_{lab}"] = _get(h, NAMES[lab], col)
            out[f"sub_norm_win_rate_{lab}"] = _get(hn, NAMES[lab], "win_rate")
    if flat_summary is not None:
        for lab in FAMILIES:
            out[f"flat_matched_{lab}"] = out[f"flat_svd_{lab}"] = out[f"flat_n_{lab}"] = np.nan
            if len(flat_summary):
                s = flat_summary[(flat_summary["family"] == NAMES[lab]) & (flat_summary["atom"] == RANK1.name)
                                 & (flat_summary["read"] == READ) & (flat_summary["direction"] == DIRECTION)]
                for dec, g in s.groupby("decoder"):
                    out[f"flat_{'matched' if dec == 'WriteSAE' else 'svd'}_{lab}"] = float(g["win_rate"].iloc[0])
                    out[f"flat_n_{lab}"] = float(g["n"].iloc[0])
    if cf_by_family is not None:
        cf = cf_by_family.set_index("family") if len(cf_by_family) else pd.DataFrame()
        for lab in FAMILIES:
            for pred in ("pred_direct", "pred_paper_fit", "pred_paper"):
                out[f"r2_{pred}_{lab}"] = _get(cf, NAMES[lab], f"r2_{pred}")
    if sweep is not None:
        sw = sweep.set_index(sweep["k"].astype(int)) if len(sweep) else pd.DataFrame()
        for k in (16, 32, 64, 128):
            out[f"k_reg_cos_{k}"] = _get(sw, k, "register_cos")
            out[f"k_n_register_{k}"] = _get(sw, k, "n_register")
            out[f"k_dbic_{k}"] = _get(sw, k, "dbic")
    return out


def win_rate_rows(summary, flat_summary):
    """(rows, paper) for :func:`writesae.plots.zoo.win_rates`: per family the rank-1 WriteSAE at coefficient
    scaling (all pool firings), and the WriteSAE and FlatSAE + top-1 SVD at the native write's norm (on the
    firings both cover); ``paper`` = {(family, label): the paper's win rate}."""
    cols = ["win_rate", "wilson_lo", "wilson_hi", "n"]
    parts = []
    if len(summary):
        parts.append(headline(summary)[cols].assign(decoder="WriteSAE, coef").reset_index())
    if len(flat_summary):
        for dec in flat_summary["decoder"].unique():
            if dec == "WriteSAE" or dec.startswith("FlatSAE + top-1"):
                parts.append(headline(flat_summary, decoder=dec, scaling="norm")[cols].assign(
                    decoder=f"{dec}, norm").reset_index())
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["family", "decoder"] + cols)
    paper = {(NAMES[f], "WriteSAE, coef"): v for f, v in PAPER["win_rate"].items()}
    paper.update({(NAMES[f], "WriteSAE, norm"): v for f, v in PAPER["matched"].items()})
    paper.update({(NAMES[f], "FlatSAE + top-1 SVD, norm"): v for f, v in PAPER["flat_svd"].items()})
    return rows, paper
