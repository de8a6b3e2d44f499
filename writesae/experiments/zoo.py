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
   rank) and rescaled to the native write's norm, against the WriteSAE atom at the same scaling.
5. **The closed form** (:func:`closed_forms`): ``writesae.experiments.closed_form`` per family. Its
   ``pred_direct`` is already host-specific: the exact transport of the family (scalar decay for Mamba-2 and
   GDN, per-row decay for GLA / RWKV-7, erase pair for the delta rules) and the host's own read-out Jacobian,
   with no fitted parameter, scored on held-out prompts; ``pred_paper`` is the paper's GDN formula.
6. **DeltaNet register cosine against k** (:func:`k_sweep`).
7. **The numbers the verdicts read** (:func:`glue_values`): the paper's cross-architecture statements are rows
   of the book's verdict table (``writesae.verdicts``), tested on these numbers with their intervals.

Every table is cached under the chapter's parameters (``writesae.cache``), as in the other chapters.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
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

__all__ = ["FAMILIES", "NAMES", "PAPER", "Atom", "RANK1", "RANK2_UPDATE", "atoms_for", "Settings", "Family",
           "memory_table", "influence_table", "measure_influence", "metrics_path", "memory", "choose_cells", "setup", "memory_tables", "partitions",
           "family_register_cos", "substitutions", "summarize", "headline", "TruncatedAtoms", "flat_comparison",
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
    def key(self) -> dict:
        return dict(variant=self.variant, rank=self.rank, write=self.write)


RANK1 = Atom("rank-1 write", "bilinear", 1, "additive", "cos")
RANK2_UPDATE = Atom("rank-2 update", "rank", 2, "update", "cos_update")
UPDATE_RANK = {"rwkv7": 2}  # families whose update is not rank 1 (README's family table)


def atoms_for(label) -> tuple:
    """The host-matched atoms of a family: rank 1 against the write; for a family whose update has rank 2
    (RWKV-7), also rank 2 against the update."""
    return (RANK1, RANK2_UPDATE) if UPDATE_RANK.get(label, 1) == 2 else (RANK1,)


@dataclass(frozen=True)
class Settings:
    """The chapter's sizes, shared by every step (so every cached artifact is keyed the same way)."""

    window: int = 128
    n_windows: int = 32
    positions_per_seq: int = 32
    eval_windows: int = 8
    n_feat: int = 128
    k: int = 8
    epochs: int = 20
    batch_size: int = 32      # small batches and a high rate: enough optimizer steps on a small state dataset
    lr: float = 1e-3
    min_firings: int = 3
    pool: str = "top1"
    max_firings: int = 24
    cf_atoms: int = 3
    cf_sites: int = 4
    eps: tuple = (0.1, 1.0)
    memory_window: int = 128  # a measured memory table (no metrics.json): windows of min(window, this) tokens
    memory_windows: int = 2
    seed: int = 0
    warmup: int = 50          # SAE learning-rate warm-up steps (the paper's Mamba-2 SAEs: 100)
    corpus: str = "embedded"  # the passages (``writesae.corpus``)


@dataclass
class Family:
    """One family of the comparison: its host, memory table, chosen cells and the shared data."""

    label: str
    host: object
    memory: pd.DataFrame
    cells: list
    data: dict
    eval_ids: torch.Tensor
    s: Settings
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return NAMES.get(self.label, self.label)

    def spec(self, **kw) -> dict:
        s = self.s
        return dict(model=self.host.name, n_feat=s.n_feat, k=s.k, epochs=s.epochs, batch_size=s.batch_size,
                    lr=s.lr, data=self.data, eval_windows=s.eval_windows, seed=s.seed,
                    **({} if s.warmup == 50 else {"warmup": s.warmup}), **kw)

    def sae(self, cell, atom=RANK1, *, variant=None, k=None, n_feat=None):
        """The SAE of ``cell`` with ``atom``'s decoder (``variant="flat"``: the FlatSAE), trained once."""
        return pipeline.sae(self.host, cell, variant=variant or atom.variant, rank=1 if variant else atom.rank,
                            n_feat=n_feat or self.s.n_feat, k=k or self.s.k, epochs=self.s.epochs,
                            batch_size=self.s.batch_size, lr=self.s.lr, warmup=self.s.warmup, seed=self.s.seed,
                            data=self.data, progress=False)

    def firings(self, cell, atom=RANK1, *, variant=None):
        """Every firing of that SAE on the held-out windows (cached)."""
        v = variant or atom.variant
        key = self.spec(cell=list(cell), variant=v, rank=1 if variant else atom.rank)
        sae = self.sae(cell, atom, variant=variant)
        return cache.cached_table("zoo_firings", key, lambda: _firings.collect(self.host, sae, cell, self.eval_ids))

    def partition(self, cell, atom=RANK1):
        """(classes, summary) of the register / bundle partition of ``atom``'s SAE on ``cell``, the per-atom
        cosine read from ``atom.cos``; (None, summary with NaNs) when too few atoms are alive to fit it."""
        memo = ("partition", tuple(cell), atom.name)
        if memo not in self._memo:
            atoms = _partition.atom_table(self.firings(cell, atom))
            atoms["cos"] = atoms[atom.cos]
            try:
                self._memo[memo] = _partition.partition(atoms, min_firings=self.s.min_firings, seed=self.s.seed)
            except ValueError:  # fewer than 6 alive atoms
                alive = int((atoms["n_firings"] >= self.s.min_firings).sum())
                self._memo[memo] = (None, dict(n_alive=alive, n_register=0, n_bundle=alive, dbic=np.nan, k=np.nan,
                                               mean_cos={"register": np.nan, "bundle": np.nan}))
        return self._memo[memo]

    def sites(self, cell, atom=RANK1):
        """The substitution pool (``Settings.pool``) at ``cell``: empty when it has no firings (e.g. no registers)."""
        classes, _ = self.partition(cell, atom)
        fir = self.firings(cell, atom)
        if self.s.pool == "registers" and classes is None:
            return fir.iloc[:0].assign(pool=self.s.pool)
        return _firings.select(fir, self.s.pool, classes=classes, max_firings=self.s.max_firings, seed=self.s.seed)


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


def setup(models, settings=None, *, zoo_cells=None, n_cells=1, max_write_share=0.3, device=None, dtype="float32",
          trust_remote_code=False, **kw) -> dict:
    """{label: :class:`Family`} for ``models`` = {label: source}: hosts loaded, memory tables read or measured,
    cells chosen (:func:`choose_cells`; ``zoo_cells`` = {label: [[layer, head], ...]} fixes them per family), the
    state-dataset spec shared by every SAE of a family, and the held-out windows; each model in ``dtype`` on
    ``device`` (``trust_remote_code``: see :func:`writesae.hosts.load_host`). ``kw`` overrides fields of
    ``settings``. A family whose model is not found here (a zoo member not trained yet) is left out, saying so."""
    s = replace(settings or Settings(), **kw)
    out = {}
    for label, source in models.items():
        try:
            host = pipeline.host(source, device, dtype, trust_remote_code)
        except FileNotFoundError as e:  # a zoo member not trained yet: the chapter runs on the others
            print(f"{label}: left out: {e}")
            continue
        mem = memory(host, window=min(s.window, s.memory_window), n_windows=s.memory_windows, seed=s.seed,
                     corpus=s.corpus)
        cells = choose_cells(mem, n_cells, (zoo_cells or {}).get(label), max_write_share)
        mem["chosen"] = [(int(l), int(h)) in cells for l, h in zip(mem["layer"], mem["head"])]
        data = pipeline.data_spec(host, cells, window=s.window, n_windows=s.n_windows,
                                  positions_per_seq=s.positions_per_seq, seed=s.seed, corpus=s.corpus)
        out[label] = Family(label, host, mem, cells, data,
                            pipeline.windows(host, "heldout", s.window, s.eval_windows, s.seed, s.corpus), s)
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
    for f in fams.values():
        mem = f.memory.set_index("cell")
        for cell in f.cells:
            key = f"L{cell[0]}H{cell[1]}"
            for atom in atoms_for(f.label):
                sae = f.sae(cell, atom)
                classes, sm = f.partition(cell, atom)
                m = sae.info.get("metrics", {})
                reg = classes.loc[classes["class"] == "register", "cos"] if classes is not None else pd.Series([], dtype=float)
                rows.append(dict(family=f.name, cell=key, layer=cell[0], head=cell[1], atom=atom.name,
                                 write_share=float(mem.loc[key, "write_share"]), decay=float(mem.loc[key, "decay"]),
                                 fvu=m.get("fvu", np.nan), dead_fraction=m.get("dead", np.nan) / f.s.n_feat,
                                 n_alive=sm["n_alive"], n_register=sm["n_register"], n_bundle=sm["n_bundle"],
                                 register_cos=float(reg.median()) if len(reg) else np.nan,
                                 register_cos_mean=sm["mean_cos"]["register"], bundle_cos=sm["mean_cos"]["bundle"],
                                 dbic=sm["dbic"], best_k=sm["k"]))
                if classes is not None:
                    per_atom.append(classes[["feature", "n_firings", "cos", "class"]].assign(
                        family=f.name, cell=key, atom=atom.name))
    cols = ["family", "cell", "atom", "feature", "n_firings", "cos", "class"]
    atoms = pd.concat(per_atom, ignore_index=True)[cols] if per_atom else pd.DataFrame(columns=cols)
    return pd.DataFrame(rows), atoms


def family_register_cos(atoms, atom=RANK1.name) -> dict:
    """{family name: median cosine over the register atoms of every analysed cell of that family} (NaN: none)."""
    reg = atoms[(atoms["atom"] == atom) & (atoms["class"] == "register")]
    return {fam: float(g["cos"].median()) for fam, g in reg.groupby("family")}


# ------------------------------------------------------------------------------------- substitution
def _substitution(f, cell, atom, scaling):
    sites = f.sites(cell, atom)
    if not len(sites):
        return None
    key = f.spec(cell=list(cell), **atom.key, pool=f.s.pool, max_firings=f.s.max_firings,
                 min_firings=f.s.min_firings, scaling=scaling)
    sae = f.sae(cell, atom)
    return cache.cached_table("zoo_substitution", key, lambda: _sub.substitute(
        f.host, sae, f.eval_ids, sites, scaling=scaling, write=atom.write, direction=_sub.DIRECTIONS, seed=f.s.seed,
        resume=cache.parts_dir("zoo_substitution", key)))


def substitutions(fams, scalings=_sub.SCALINGS) -> pd.DataFrame:
    """The substitution test at every analysed cell of every family, for each host-matched atom and each
    scaling: one long table (``writesae.experiments.substitution.substitute``'s rows, both KL directions, every
    read-out) with family, atom and pool. Cells whose pool is empty contribute no rows."""
    out = []
    for f in fams.values():
        for cell in f.cells:
            for atom in atoms_for(f.label):
                for scaling in scalings:
                    df = _substitution(f, cell, atom, scaling)
                    if df is not None:
                        out.append(df.assign(family=f.name, atom=atom.name, decoder="WriteSAE"))
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
class TruncatedAtoms:
    """A dense-atom SAE seen through the best rank-``rank`` approximation of each atom (its top singular
    triplets): ``atom(i)`` / ``atoms(indices)`` are what App. F.4 substitutes ("FlatSAE + top-1 SVD" for rank
    1); everything else (``cfg``, ``encode``, ``check_cell``, ...) is the wrapped SAE's."""

    def __init__(self, sae, rank=1):
        self.sae, self.rank = sae, int(rank)

    def __getattr__(self, name):
        return getattr(self.sae, name)

    @torch.no_grad()
    def atoms(self, indices=None):
        A = self.sae.atoms(indices).float()
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        r = self.rank
        return (U[..., :r] * S[..., None, :r]) @ Vh[..., :r, :]

    def atom(self, i):
        return self.atoms(torch.tensor([int(i)]))[0]


def _flat_sites(f, cell, atom, sites):
    """The same firings (seq, pos) as ``sites``, each with the FlatSAE's top-1 atom and coefficient there
    (positions where the FlatSAE has no active atom are dropped)."""
    return _firings.top1_at(f.firings(cell, atom, variant="flat"), sites)


def flat_comparison(fams) -> pd.DataFrame:
    """App. F.4 at every analysed cell: on the pool's firings, the WriteSAE atom against the FlatSAE's top-1
    atom truncated to the matched rank (top-1 SVD for rank-1 atoms, top-2 for RWKV-7's rank-2 update), both
    rescaled to the native write's norm (``scaling="norm"``). One long table (substitute's rows, column
    ``decoder``) restricted to the firings both decoders cover."""
    out = []
    for f in fams.values():
        for cell in f.cells:
            for atom in atoms_for(f.label):
                mine = _substitution(f, cell, atom, "norm")
                if mine is None:
                    continue
                sites = _flat_sites(f, cell, atom, f.sites(cell, atom))
                if not len(sites):
                    continue
                flat = TruncatedAtoms(f.sae(cell, atom, variant="flat"), rank=atom.rank)
                key = f.spec(cell=list(cell), **atom.key, pool=f.s.pool, max_firings=f.s.max_firings,
                             min_firings=f.s.min_firings, scaling="norm", decoder=f"flat+svd{atom.rank}")
                theirs = cache.cached_table("zoo_flat_substitution", key, lambda: _sub.substitute(
                    f.host, flat, f.eval_ids, sites, scaling="norm", write=atom.write, direction=_sub.DIRECTIONS,
                    seed=f.s.seed, resume=cache.parts_dir("zoo_flat_substitution", key)))
                both = set(zip(theirs["seq"], theirs["pos"]))
                mine = mine[[(s, p) in both for s, p in zip(mine["seq"], mine["pos"])]]
                name = f"FlatSAE + top-{atom.rank} SVD"
                out += [mine.assign(family=f.name, atom=atom.name, decoder="WriteSAE"),
                        theirs.assign(family=f.name, atom=atom.name, decoder=name)]
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


# ------------------------------------------------------------------------------------- closed form
def _cf_sites(f, cell):
    """Sites of the closed form: the ``cf_atoms`` most frequent register atoms (then the most frequent other
    alive atoms when there are fewer) that fire on at least two passages, at most ``cf_sites`` firings each,
    drawn (seeded) from as many passages as possible, so each atom has fit and held-out prompts."""
    classes, _ = f.partition(cell, RANK1)
    if classes is None:
        return None
    order = classes.sort_values(["n_firings", "feature"], ascending=[False, True])
    pick = (order[order["class"] == "register"]["feature"].tolist() + order[order["class"] != "register"]["feature"].tolist())
    fir = f.firings(cell, RANK1)
    seqs = fir.groupby("feature")["seq"].nunique()
    pick = [a for a in pick if seqs.get(a, 0) >= 2][:f.s.cf_atoms]
    if not pick:
        return None
    rng = np.random.default_rng(f.s.seed)
    parts = []
    for a in pick:
        g = fir[fir["feature"] == a]
        g = g.iloc[rng.permutation(len(g))]
        parts.append(g.assign(_turn=g.groupby("seq").cumcount().to_numpy()).sort_values("_turn", kind="stable")
                     .head(f.s.cf_sites))
    sites = pd.concat(parts).drop(columns="_turn").sort_values(["seq", "pos", "rank"]).reset_index(drop=True)
    return sites.assign(pool="atoms")


def closed_forms(fams):
    """(per_atom, by_family): the closed form (``closed_form.closed_form``, eps in units of the write's norm,
    lag 0) at every analysed cell with the rank-1 atoms; ``per_atom`` is ``closed_form.r2`` by atom on the
    held-out (eval) prompts, with family and cell; ``by_family`` the median per family of each predictor's R^2."""
    per = []
    for f in fams.values():
        for cell in f.cells:
            sites = _cf_sites(f, cell)
            if sites is None or not len(sites):
                continue
            sae = f.sae(cell, RANK1)
            key = f.spec(cell=list(cell), cf_atoms=f.s.cf_atoms, cf_sites=f.s.cf_sites, eps=list(f.s.eps),
                         min_firings=f.s.min_firings)
            cf = cache.cached_table("zoo_closed_form", key, lambda: _cf.closed_form(
                f.host, sae, f.eval_ids, sites, eps=tuple(f.s.eps), lags=(0,), relative_to="write", seed=f.s.seed))
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
    per k, an SAE with ``n_feat`` rank-1 atoms on the same states, its alive atoms, registers and register
    median cosine. Empty without a family."""
    if f is None:
        return pd.DataFrame(columns=["family", "cell", "k", "n_alive", "n_register", "register_cos"])
    cell = tuple(cell or f.cells[0])
    ks = [int(k) for k in ks if int(k) <= n_feat]

    def compute():
        rows = []
        for k in ks:
            sae = f.sae(cell, RANK1, k=k, n_feat=n_feat)
            atoms = _partition.atom_table(_firings.collect(f.host, sae, cell, f.eval_ids))
            try:
                classes, sm = _partition.partition(atoms, min_firings=f.s.min_firings, seed=f.s.seed)
                reg = classes.loc[classes["class"] == "register", "cos"]
            except ValueError:
                sm = dict(n_alive=int((atoms["n_firings"] >= f.s.min_firings).sum()), n_register=0, dbic=np.nan, k=np.nan)
                reg = pd.Series([], dtype=float)
            rows.append(dict(family=f.name, cell=f"L{cell[0]}H{cell[1]}", k=k, n_feat=n_feat, n_alive=sm["n_alive"],
                             n_register=sm["n_register"], register_cos=float(reg.median()) if len(reg) else np.nan,
                             dbic=sm["dbic"], best_k=sm["k"], fvu=sae.info.get("metrics", {}).get("fvu", np.nan)))
        return pd.DataFrame(rows)

    return cache.cached_table("zoo_k_sweep", f.spec(cell=list(cell), ks=ks, sweep_n_feat=n_feat,
                                                      min_firings=f.s.min_firings), compute)


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
        reg = atoms[(atoms["atom"] == RANK1.name) & (atoms["class"] == "register")] if len(atoms) else atoms
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
