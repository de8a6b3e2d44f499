"""What a chapter runs on: one host, its cells, the shared sizes, the state dataset, the held-out passages, and
the SAEs and cached tables built on them (firings, partition, substitution sites and runs, the FlatSAE + top-r
SVD comparison), so a notebook's code is a few short calls.

``writesae.notebook.setup(globals())`` builds a :class:`Section` from a chapter notebook's parameters; the
zoo chapter (``writesae.experiments.zoo.setup``) builds one per family and the recall chapter one per model.
Every table is cached (``writesae.cache``) under the section's :attr:`Section.spec` plus what the table adds,
so two notebooks with the same parameters share one firings table, one partition and one substitution run.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import pandas as pd
import torch

from .. import cache, pipeline
from ..data import cell_key
from . import ce_recovered as _ce
from . import firings as _firings
from . import partition as _partition
from . import substitution as _sub

__all__ = ["Section", "TruncatedAtoms", "VARIANTS", "headline_rows"]

# SAE keywords (and the partition's cosine column) that are not these defaults join the cache key of tables built
# on that SAE
_SAE_DEFAULTS = dict(variant="bilinear", activation="topk", rank=1, cos="cos")
# the SAE training of writesae.pipeline.sae; a section's keys name batch_size, lr and warmup only when they differ
_TRAIN_DEFAULTS = dict(batch_size=256, lr=3e-4, warmup=50)
_POOL_NAMES = {"registers": "registers", "top1": "top-1"}  # how a table names each pool

# The ablation variants of ``writesae.sae`` in the paper's words (PAPER.md §2): name, encoder, decoder atom
VARIANTS = {
    "bilinear": ("WriteSAE", "bilinear", "rank 1"),
    "tied": ("tied bilinear", "bilinear, tied to the decoder", "rank 1, shared factors"),
    "matrix": ("MatrixSAE", "dense", "rank 1"),
    "bilinear_flat": ("bilinear-flat", "bilinear", "dense"),
    "flat": ("FlatSAE", "dense", "dense"),
    "rank": ("rank-r", "bilinear", "rank r (sum of r outer products)"),
}


@dataclass
class Section:
    """The host, headline cell, cells and sizes of one chapter run (see the module docstring)."""

    host: object
    cell: tuple
    cells: list
    heads_layer: int | None = None
    window: int = 128
    n_windows: int = 512
    positions_per_seq: int = 32
    eval_windows: int = 64
    n_feat: int = 1024
    k: int = 16
    epochs: int = 20
    batch_size: int = 256     # SAE training (writesae.pipeline.sae)
    lr: float = 3e-4
    warmup: int = 50
    seed: int = 0
    min_firings: int = 5
    max_firings: int | None = None
    max_firings_by_cell: dict | None = None  # {"L9H4": 1851, ...}: a cell's own cap (the paper's 1,500 / 1,851 / 1,500)
    pool: str = "registers"   # the substitution pool (writesae.experiments.firings.select)
    corpus: str = "embedded"  # the passages (``writesae.corpus``): state datasets and held-out measurements
    data: dict | None = None  # the state-dataset spec; default: ``cells`` (+ ``cell``) and ``heads_layer``'s heads
    root: object = None       # the artifact cache (default ``writesae.cache.cache_root()``)
    progress: bool = False    # progress bars of extraction and training (off: a book page shows results only)
    name: str = ""            # what a page calls it (default the host's name; the zoo: its family, e.g. "GDN")
    memory: pd.DataFrame | None = None  # the zoo: the memory table of the host's cells (writesae.experiments.zoo.memory)
    _partitions: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.name = self.name or self.host.name
        self.cell = tuple(int(x) for x in self.cell)
        self.cells = [tuple(int(x) for x in c) for c in self.cells]
        # the headline cell's states are extracted with the others even when ``cells`` leaves it out
        stored = self.cells if self.cell in self.cells else [*self.cells, self.cell]
        if self.data is None:
            self.data = pipeline.data_spec(self.host, stored, heads_layer=self.heads_layer, window=self.window,
                                           n_windows=self.n_windows, positions_per_seq=self.positions_per_seq,
                                           seed=self.seed, corpus=self.corpus)

    # ------------------------------------------------------------------ keys, data, SAEs
    @property
    def spec(self) -> dict:
        """The parameters every cached table of the section is keyed by (batch_size, lr and warmup when they are
        not pipeline.sae's defaults)."""
        train = {k: getattr(self, k) for k, v in _TRAIN_DEFAULTS.items() if getattr(self, k) != v}
        return dict(model=self.host.name, n_feat=self.n_feat, k=self.k, epochs=self.epochs, data=self.data,
                    eval_windows=self.eval_windows, seed=self.seed, **train)

    def key(self, cell=None, **extra) -> dict:
        """:attr:`spec` with the cell and ``extra`` (SAE keywords and ``cos`` equal to the defaults are left out)."""
        extra = {k: v for k, v in extra.items() if _SAE_DEFAULTS.get(k, object()) != v}
        return dict(self.spec, cell=list(cell or self.cell), **extra)

    @functools.cached_property
    def eval_ids(self):
        """The held-out passages every measurement runs on (eval_windows x window)."""
        return pipeline.windows(self.host, "heldout", self.window, self.eval_windows, self.seed, self.corpus)

    def sae(self, cell=None, **kw):
        """The section's SAE on ``cell`` (default: the headline cell); ``kw``: variant, activation, rank, ..."""
        return pipeline.sae(self.host, tuple(cell or self.cell), **self._sae_kw(kw))

    def saes(self, cells=None, **kw) -> dict:
        """{(layer, head): SAE} for ``cells`` (default: the section's cells and the headline cell); one that another
        notebook is training now is taken last (:func:`writesae.pipeline.saes`)."""
        return pipeline.saes(self.host, cells or list(dict.fromkeys([*self.cells, self.cell])), **self._sae_kw(kw))

    def sae_table(self, specs, ce_passages=16) -> pd.DataFrame:
        """:meth:`sae_row` of each spec (a dict of SAE keywords, ``cell`` optional), one row each in their order. The
        SAEs are trained first, one that another notebook is training now last, and held one at a time
        (:func:`writesae.pipeline.sae_iter`)."""
        specs = [dict(s, cell=tuple(s.get("cell") or self.cell)) for s in specs]
        saes = pipeline.sae_iter(self.host, [self._sae_kw(s) for s in specs])
        return pd.DataFrame([self._sae_row(s["cell"], sae, ce_passages) for s, sae in zip(specs, saes)])

    def _sae_kw(self, kw: dict) -> dict:
        """The section's SAE keywords (n_feat, k, training, seed, its dataset, cache root, progress), ``kw`` over them."""
        return {**dict(n_feat=self.n_feat, k=self.k, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                       warmup=self.warmup, seed=self.seed, data=self.data, root=self.root, progress=self.progress), **kw}

    def describe(self) -> str:
        return (f"{self.host.name}, head L{self.cell[0]}H{self.cell[1]}\n{self.eval_windows} held-out passages of "
                f"{self.window} tokens\nSAEs: n_feat = {self.n_feat}, k = {self.k}, {self.epochs} epochs")

    # ------------------------------------------------------------------ firings and partition
    def cap(self, cell=None) -> int | None:
        """The most firings a substitution run on ``cell`` takes: its entry of ``max_firings_by_cell`` ("L9H4"),
        else ``max_firings``."""
        layer, head = cell or self.cell
        return (self.max_firings_by_cell or {}).get(cell_key(layer, head), self.max_firings)

    def firings(self, cell=None, **sae_kw) -> pd.DataFrame:
        """Every firing of the SAE (``sae_kw``) on ``cell`` over the held-out passages (cached)."""
        cell = tuple(cell or self.cell)
        return cache.cached_table("firings", self.key(cell, **sae_kw), lambda: _firings.collect(
            self.host, self.sae(cell, **sae_kw), cell, self.eval_ids), self.root)

    def partition(self, cell=None, cos="cos", **sae_kw):
        """(classes, summary) of the register / bundle partition (``writesae.experiments.partition``) of the SAE's
        atoms by their cosine to the write (``cos="cos_update"``: to the full update), fitted once. Raises
        ``ValueError`` when too few atoms are alive for it (:meth:`n_alive`)."""
        cell = tuple(cell or self.cell)
        memo = (cell, cos, tuple(sorted(sae_kw.items())))
        if memo not in self._partitions:
            atoms = _partition.atom_table(self.firings(cell, **sae_kw))
            self._partitions[memo] = _partition.partition(atoms.assign(cos=atoms[cos]), min_firings=self.min_firings,
                                                          seed=self.seed)
        return self._partitions[memo]

    def n_alive(self, cell=None, **sae_kw) -> int:
        """The SAE's atoms with at least ``min_firings`` firings on the held-out passages."""
        return int((_partition.atom_table(self.firings(cell, **sae_kw))["n_firings"] >= self.min_firings).sum())

    def partition_row(self, cell=None, max_l0_factor=4, ce_passages=16, **sae_kw) -> dict:
        """One row of a partition table: cell, SAE (the ``sae_kw`` given), its held-out L0, its CE loss recovered
        (as in :meth:`sae_row`), n_alive, n_register,
        n_bundle, the classes' mean cosines, dBIC and the number of components with the lowest BIC (NaN, with
        n_alive, when too few atoms are alive for the mixture). An SAE whose L0 exceeds ``max_l0_factor * k``
        is not a sparse code: its row gets a ``note`` instead of a partition (and no firings table is built)."""
        cell = tuple(cell or self.cell)
        s = self.sae(cell, **sae_kw)
        row = dict(cell=cell_key(*cell[:2]), **sae_kw, l0=s.info["metrics"]["l0"], **self._ce_columns(s, ce_passages))
        if row["l0"] > max_l0_factor * self.k:  # not a sparse code (e.g. JumpReLU at a too weak L0 penalty)
            return dict(row, note=f"L0 {row['l0']:.0f} > {max_l0_factor} k: not sparse, no partition")
        try:
            _, sm = self.partition(cell, **sae_kw)
        except ValueError:  # too few alive atoms for a 3-component mixture
            return dict(row, n_alive=self.n_alive(cell, **sae_kw))
        return dict(row, n_alive=sm["n_alive"], n_register=sm["n_register"], n_bundle=sm["n_bundle"],
                    cos_register=sm["mean_cos"]["register"], cos_bundle=sm["mean_cos"]["bundle"], dbic=sm["dbic"],
                    best_k=sm["k"])

    def sae_row(self, cell=None, ce_passages=16, **sae_kw) -> dict:
        """One row of an ablation table: the SAE's name, encoder and decoder (:data:`VARIANTS`), parameter
        count and held-out metrics (validation MSE, FVU, L0, alive, dead fraction), and the downstream metric
        (:func:`writesae.experiments.ce_recovered.record` on the first ``ce_passages`` held-out passages,
        stored in the SAE's cfg.json): CE loss recovered against zero and mean ablation of the state, the
        perplexity change, and what zeroing the state costs (nats; when that is tiny the ratio is noise)."""
        cell = tuple(cell or self.cell)
        return self._sae_row(cell, self.sae(cell, **sae_kw), ce_passages)

    def _sae_row(self, cell, s, ce_passages) -> dict:
        m = s.info["metrics"]
        name, enc, dec = VARIANTS.get(s.cfg.variant, (s.cfg.variant, "", ""))
        if s.cfg.variant == "rank":
            name, dec = f"rank-{s.cfg.rank}", f"rank {s.cfg.rank} (sum of {s.cfg.rank} outer products)"
        return dict(cell=cell_key(*cell[:2]), variant=s.cfg.variant, name=name, encoder=enc, decoder=dec,
                    params=sum(p.numel() for p in s.parameters()), mse=m["mse"], fvu=m["fvu"], l0=m["l0"],
                    alive=m["alive"], dead_fraction=m["dead"] / s.cfg.n_feat, **self._ce_columns(s, ce_passages))

    def layer_ce(self, layer=None, ce_passages=16, **sae_kw) -> dict:
        """CE loss recovered with the states of *every* head of ``layer`` (default ``heads_layer``) replaced by
        their SAEs' (``sae_kw``) reconstructions together (the paper's Table 14 protocol), cached:
        :func:`writesae.experiments.ce_recovered.ce_losses` on the first ``ce_passages`` held-out passages."""
        layer = self.heads_layer if layer is None else int(layer)
        heads = [(layer, h) for h in range(self.host.n_heads)]
        key = dict(self.key(heads[0], **sae_kw), cell=None, layer=layer, ce_passages=ce_passages)
        return cache.cached_json("ce_layer", key, lambda: _ce.ce_losses(
            self.host, self.saes(heads, **sae_kw), self.eval_ids[:ce_passages], progress=False),
            self.root)

    def _ce_columns(self, sae, n) -> dict:
        if not n:
            return {}
        ce = _ce.record(self.host, sae, self.eval_ids[:n], progress=False)
        return dict(ce_recovered=ce["ce_recovered"], ce_recovered_mean=ce["ce_recovered_mean"],
                    ppl_change=ce["ppl_change"], zero_cost=ce["loss_zero"] - ce["loss_clean"])

    # ------------------------------------------------------------------ substitution
    def sites(self, cell=None, pool=None, *, classes=None, max_per_atom=None, min_per_atom=1, all_firings=False,
              sae=None, cos="cos") -> pd.DataFrame:
        """The firings of ``cell`` a substitution run uses: ``pool`` (default :attr:`pool`: ``"registers"``,
        ``"top1"`` or a list of atoms) of the SAE with keywords ``sae`` (default the section's), the registers
        from ``classes`` (default :meth:`partition`, by ``cos``), at most :meth:`cap` unless ``all_firings``."""
        cell, pool, sae = tuple(cell or self.cell), pool or self.pool, sae or {}
        if classes is None and isinstance(pool, str) and pool == "registers":
            classes, _ = self.partition(cell, cos, **sae)
        return _firings.select(self.firings(cell, **sae), pool, classes=classes, seed=self.seed,
                               max_per_atom=max_per_atom, max_firings=None if all_firings else self.cap(cell),
                               min_per_atom=min_per_atom)

    def substitution(self, cell=None, pool=None, *, classes=None, max_per_atom=None, min_per_atom=1,
                     all_firings=False, sae=None, cos="cos", **kw):
        """(table, classes): the substitution test (``writesae.experiments.substitution.substitute``) of the SAE
        with keywords ``sae`` on :meth:`sites`, cached and resumable; ``classes`` is the partition the register
        pool is drawn from (None for another pool, unless given). ``kw`` go to ``substitute`` (scaling, write,
        ...) and into the cache key."""
        cell, pool, sae = tuple(cell or self.cell), pool or self.pool, sae or {}
        if classes is None and isinstance(pool, str) and pool == "registers":
            classes, _ = self.partition(cell, cos, **sae)
        sites = self.sites(cell, pool, classes=classes, max_per_atom=max_per_atom, min_per_atom=min_per_atom,
                           all_firings=all_firings, sae=sae)
        if not len(sites) and isinstance(pool, str) and pool == "registers":
            n_reg = int((classes["class"] == "register").sum()) if classes is not None else 0
            raise ValueError(f"{cell_key(*cell[:2])} has no register firing to substitute: its partition holds {n_reg} "
                             "register atoms, none of them top-1 on the held-out windows. Test a head with registers, "
                             "on more held-out windows (eval_windows), or at a k where registers appear (the paper "
                             "finds DeltaNet's at k = 128, none at k = 32), or run chapter 03 on every top-1 "
                             "firing (pool = \"top1\")")
        key = self.key(cell, **sae, cos=cos, pool=pool if isinstance(pool, str) else sorted(map(int, pool)),
                       max_firings=self.cap(cell), max_per_atom=max_per_atom, min_firings=self.min_firings, **kw)
        df = cache.cached_table("substitution", key, lambda: _sub.substitute(
            self.host, self.sae(cell, **sae), self.eval_ids, sites, direction=_sub.DIRECTIONS, seed=self.seed,
            resume=cache.parts_dir("substitution", key, self.root), **kw), self.root)
        return df, classes

    def pool_variants(self, cell=None, pool=None, *, classes=None) -> tuple[pd.DataFrame, dict]:
        """(table, gap): chapter 03's other choices at ``cell``. The table holds the headline rows
        (:func:`headline_rows`) of the substitution on ``pool`` (coefficient scaling, the additive write), on the
        other pool, and on ``pool`` with matched-norm scaling and with the full update replaced; column ``variant``
        names each, e.g. "registers, norm, additive". ``gap`` is the top-1 pool minus the register pool
        (:func:`writesae.experiments.substitution.compare_pools`: diff, lo, hi, text). When ``pool`` is "top1" and
        no register atom is ever top-1 (``classes``, default :meth:`partition`), the register row is left out and
        the gap's text says so."""
        cell, pool = tuple(cell or self.cell), pool or self.pool
        if not isinstance(pool, str) or pool not in _firings.POOLS:
            raise ValueError(f"pool {pool!r}: chapter 03 compares the string pools "
                             f"{' and '.join(map(repr, _firings.POOLS))}")
        if classes is None:
            classes, _ = self.partition(cell)
        other = "top1" if pool == "registers" else "registers"
        runs = {(pool, "coef", "additive"): {}, (other, "coef", "additive"): {},
                (pool, "norm", "additive"): dict(scaling="norm"), (pool, "coef", "update"): dict(write="update")}
        rows = {}
        for (p, scaling, write), kw in runs.items():
            if p == other == "registers" and not len(self.sites(cell, p, classes=classes)):
                continue
            df, _ = self.substitution(cell, p, classes=classes, **kw)
            rows[p, scaling, write] = headline_rows(_sub.summarize(df)).assign(
                variant=f"{_POOL_NAMES[p]}, {scaling}, {write}")
        table = pd.concat(rows.values(), ignore_index=True)
        if ("registers", "coef", "additive") not in rows:
            n_reg = int((classes["class"] == "register").sum())
            return table, dict(diff=float("nan"), lo=float("nan"), hi=float("nan"),
                               text=f"no register firing to compare ({n_reg} register atoms, none top-1 on the "
                                    "held-out windows)")
        gap = _sub.compare_pools(*(rows[p, "coef", "additive"].iloc[0] for p in ("top1", "registers")))
        return table, gap

    def flat_svd_substitution(self, cell=None, pool=None, rank=1, *, sae=None, cos="cos", **kw):
        """App. F.4 on ``cell``: at the firings of ``pool`` (as in :meth:`substitution`), the atom of the SAE with
        keywords ``sae`` (default the section's WriteSAE) against the FlatSAE's top-1 atom at the same position
        truncated to its top-``rank`` SVD (:class:`TruncatedAtoms`), both rescaled to the native write's norm;
        ``kw`` (e.g. ``write``) go to both runs. One long table (``substitute`` rows, column ``decoder``)
        restricted to the firings where the FlatSAE has an active atom; None when there is none."""
        cell, pool, sae = tuple(cell or self.cell), pool or self.pool, sae or {}
        mine, classes = self.substitution(cell, pool, sae=sae, cos=cos, scaling="norm", **kw)
        flat_sites = _firings.top1_at(self.firings(cell, variant="flat"), self.sites(cell, pool, classes=classes,
                                                                                     sae=sae))
        if not len(flat_sites):
            return None
        key = self.key(cell, **sae, cos=cos, pool=pool, max_firings=self.cap(cell), min_firings=self.min_firings,
                       scaling="norm", decoder=f"flat+svd{rank}", **kw)
        theirs = cache.cached_table("flat_substitution", key, lambda: _sub.substitute(
            self.host, TruncatedAtoms(self.sae(cell, variant="flat"), rank=rank), self.eval_ids, flat_sites,
            scaling="norm", direction=_sub.DIRECTIONS, seed=self.seed,
            resume=cache.parts_dir("flat_substitution", key, self.root), **kw), self.root)
        both = set(zip(theirs["seq"], theirs["pos"]))
        mine = mine[[(s, p) in both for s, p in zip(mine["seq"], mine["pos"])]]
        return pd.concat([mine.assign(decoder="WriteSAE"), theirs.assign(decoder=f"FlatSAE + top-{rank} SVD")],
                         ignore_index=True)


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


def headline_rows(summary, read="mean", direction="patched||base") -> pd.DataFrame:
    """The rows of a ``substitution.summarize`` table at the headline read-out and KL direction."""
    return summary[(summary["read"] == read) & (summary["direction"] == direction)].reset_index(drop=True)

