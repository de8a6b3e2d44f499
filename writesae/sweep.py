"""The all-cells sweep: the per-cell pipeline of the book as Ray tasks, one table with a row per cell.

For a parameter file (``params/*.yaml``, the notebooks' names) and a list of cells (or ``"all"``)::

    writesae sweep --params params/tiny.yaml --cells L1H0,L1H1,L1H2,L1H3 --workers 2
    from writesae.sweep import sweep; table = sweep("params/tiny.yaml", cells="all")

Per cell, one Ray task runs what the chapters run, through the same functions and the same
parameter-keyed cache keys as notebooks 02-04 (so a notebook with the same parameters loads what the
sweep built, and the other way round): the SAE (:func:`writesae.pipeline.sae`), its firings on the
held-out passages, the register / bundle partition, the substitution test on the register firings (or every
top-1 firing: ``pool``, as in notebook 03), and the closed form on the top register atoms. Its row
(:data:`COLUMNS`) is stored as ``sweep_cell/<key>``; the table of all rows as ``sweep/<key>``. Before the cell
tasks, one task extracts the state dataset of every cell at once (one pass of the model); the cell tasks wait
for it (a Ray dependency).

Scheduling is Ray's: a local Ray instance with one worker per core by default (``workers``), the cluster
at ``address`` / ``$RAY_ADDRESS`` when given (every node needs ``writesae`` installed and the cache root on
a shared file system), one GPU per task requested as a Ray resource when the cluster has GPUs. Every task
writes into the cache with atomic writes, so:

- a rerun skips finished cells (their row is on disk; when every row is, Ray is not even started);
- a task whose worker died (killed, out of memory) is run again by Ray (``max_retries``) and resumes
  from the cache; a task that raised is reported by cell and the sweep raises after every other cell
  has finished; run it again to compute only the missing cells;
- nothing is duplicated: each artifact's folder is named by its parameters, a retried task writes the
  same files again, and a half-written file never gets its final name.

Ray worker processes run torch with one thread (``threads``). Testing hook: ``$WRITESAE_SWEEP_FAULT``
(read on the driver), e.g. ``L1H2:raise,L1H3:exit``, makes those cells' tasks raise, or kill their worker
process once (a marker file under ``<root>/sweep_faults`` lets the retry through).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd

from . import cache

__all__ = ["DEFAULTS", "COLUMNS", "settings", "data_for", "run_cell", "sweep", "cell_label", "parse_cells"]

# The notebooks' defaults (02_feature_classes, 03_substitution, 04_closed_form; a test keeps them equal),
# used for the names a parameter file leaves out.
DEFAULTS = dict(model="embedded", device=None, dtype="float32", corpus="embedded", trust_remote_code=False, seed=0,
                cells=[[1, 2], [4, 3], [6, 0]], heads_layer=6, window=128, n_windows=512, positions_per_seq=32, eval_windows=64, n_feat=1024, k=16, epochs=20, min_firings=5,
                max_firings=400, pool="registers", n_atoms=8, sites_per_atom=8, eps=[0.1, 0.3, 1.0, 3.0], lags=[0, 2])

# Bump when a row's definition changes (part of every row's and table's cache key).
ROW_VERSION = 1

COLUMNS = ["cell", "layer", "head", "fvu", "l0", "alive_sae", "n_alive", "n_register", "n_bundle", "dbic",
           "cos_register", "cos_bundle", "n_sub", "win_rate", "wilson_lo", "wilson_hi", "median_kl_atom",
           "median_kl_delete", "median_kl_random", "chain_rate", "geom_agree", "cf_atoms", "r2_direct",
           "r2_paper_fit", "seconds"]
"""One row per cell: cell (``L1H2``), layer, head; the SAE's validation fvu, l0 and alive atoms
(``alive_sae``); the partition of the atoms with >= min_firings firings (n_alive, n_register, n_bundle,
dbic = BIC(2) - BIC(1), mean cosine to the write per class); the substitution test on the firings of
``pool`` (default the register firings), mean read, KL(patched||base) (n_sub firings, win_rate with Wilson CI,
median KLs, chain_rate, geom_agree); the closed form on the top ``n_atoms`` registers at lag 0 (cf_atoms,
median R^2 of the parameter-free direct prediction and of the paper's formula with its one fitted scalar);
seconds the task took. Measurements that need registers are NaN for a cell without any."""


def cell_label(cell) -> str:
    return f"L{int(cell[0])}H{int(cell[1])}"


def settings(params=None, **overrides) -> dict:
    """The sweep's parameters: :data:`DEFAULTS`, then ``params`` (a YAML file path or a dict; its top-level
    names, ``notebooks:`` ignored), then ``overrides``. Unknown names are ignored (a shared params file holds
    every notebook's names)."""
    from .book import load_params
    from .experiments.firings import POOLS

    given = load_params(params) if isinstance(params, (str, os.PathLike)) else dict(params or {})
    out = dict(DEFAULTS)
    out.update({k: v for k, v in given.items() if k in DEFAULTS})
    out.update({k: v for k, v in overrides.items() if k in DEFAULTS})
    bad = sorted(set(overrides) - set(DEFAULTS))
    if bad:
        raise ValueError(f"sweep: unknown parameter{'s' if len(bad) > 1 else ''} {', '.join(bad)}; valid names: "
                         f"{', '.join(DEFAULTS)}")
    if out["pool"] not in POOLS:
        raise ValueError(f"sweep: pool must be one of {', '.join(map(repr, POOLS))}, got {out['pool']!r}")
    return out


def _spec(s, host_name, data) -> dict:
    """The key fields the notebooks share (their ``spec``)."""
    return dict(model=host_name, n_feat=s["n_feat"], k=s["k"], epochs=s["epochs"], data=data,
                eval_windows=s["eval_windows"], seed=s["seed"])


def _pool_key(s) -> dict:
    """The pool in a cache key only where it is not the register pool (the keys of rows built before it)."""
    return {} if s["pool"] == "registers" else {"pool": s["pool"]}


def _host(s, device=None):
    """The host of settings ``s`` on ``device`` (a task's; default the settings'), in the settings' dtype."""
    from . import pipeline

    return pipeline.host(s["model"], device or s["device"], s["dtype"], s["trust_remote_code"])


def _fault(spec: str | None, cell, root) -> None:
    """The testing hook (see the module docstring)."""
    for part in (spec or "").split(","):
        name, _, what = part.strip().partition(":")
        if name.upper() != cell_label(cell):
            continue
        if what == "raise":
            raise RuntimeError(f"injected fault in {name} ($WRITESAE_SWEEP_FAULT)")
        if what == "exit":
            marker = cache.cache_root(root) / "sweep_faults" / f"{name.upper()}.exit"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text("the worker of this cell's task was killed once\n")
                os._exit(1)


def run_cell(s: dict, data: dict, cell, root=None, *, threads=1, device=None, fault=None) -> dict:
    """The row of one cell (see :data:`COLUMNS`), computed through the cache (``root``) or loaded from it.

    ``s``: :func:`settings`; ``data``: the state-dataset spec (:func:`writesae.pipeline.data_spec`)."""
    import numpy as np
    import torch

    from .experiments import closed_form as CF
    from .experiments import firings as F
    from .experiments import partition as P
    from .experiments import substitution as Sub
    from .experiments.section import Section, headline_rows

    if threads:
        torch.set_num_threads(threads)
    h = _host(s, device)
    c = tuple(int(x) for x in h.cell(*cell)[:2])
    spec = _spec(s, h.name, data)
    key = dict(spec, cell=list(c), row=ROW_VERSION, min_firings=s["min_firings"], max_firings=s["max_firings"],
               n_atoms=s["n_atoms"], sites_per_atom=s["sites_per_atom"], eps=list(s["eps"]), lags=list(s["lags"]),
               **_pool_key(s))

    def compute():
        _fault(fault, c, root)
        t0 = time.perf_counter()
        seed = s["seed"]
        torch.manual_seed(seed)
        # the notebooks' own section: the same SAE, firings, partition and substitution artifacts (cache keys)
        sec = Section(h, c, [c], window=s["window"], n_windows=s["n_windows"], positions_per_seq=s["positions_per_seq"],
                      eval_windows=s["eval_windows"], n_feat=s["n_feat"], k=s["k"], epochs=s["epochs"], seed=seed,
                      min_firings=s["min_firings"], max_firings=s["max_firings"], corpus=s["corpus"], data=data, root=root,
                      progress=False)
        sae, eval_ids, fir = sec.sae(), sec.eval_ids, sec.firings()
        m = sae.info.get("metrics", {})
        row = dict(cell=cell_label(c), layer=c[0], head=c[1], fvu=m.get("fvu", np.nan), l0=m.get("l0", np.nan),
                   alive_sae=m.get("alive", np.nan), **{k: np.nan for k in COLUMNS[6:-1]})
        try:
            classes, summ = sec.partition()
        except ValueError:  # too few alive atoms for the mixture: the row says how many
            row["n_alive"] = int((P.atom_table(fir)["n_firings"] >= s["min_firings"]).sum())
            return dict(row, seconds=time.perf_counter() - t0)
        row.update(n_alive=summ["n_alive"], n_register=summ["n_register"], n_bundle=summ["n_bundle"],
                   dbic=summ["dbic"], cos_register=summ["mean_cos"]["register"], cos_bundle=summ["mean_cos"]["bundle"])
        # substitution on the pool's firings: notebook 03's sec.substitution(cell, pool)
        if len(sec.sites(c, s["pool"], classes=classes)):
            sub, _ = sec.substitution(c, s["pool"], classes=classes)
            r = headline_rows(Sub.summarize(sub)).iloc[0]
            row.update(n_sub=int(r["n"]), **{k: float(r[k]) for k in (
                "win_rate", "wilson_lo", "wilson_hi", "median_kl_atom", "median_kl_delete", "median_kl_random",
                "chain_rate", "geom_agree")})
        # closed form on the top register atoms: notebook 04
        top = (classes[classes["class"] == "register"].sort_values("n_firings", ascending=False)["feature"]
               .head(s["n_atoms"]).tolist())
        cf_sites = F.select(fir, top, min_per_atom=4, max_per_atom=s["sites_per_atom"], seed=seed)
        if len(cf_sites):
            cf_key = dict(sec.spec, cell=list(c), n_atoms=s["n_atoms"], sites_per_atom=s["sites_per_atom"],
                          min_firings=s["min_firings"], eps=list(s["eps"]), lags=list(s["lags"]))
            cf = cache.cached_table("closed_form", cf_key, lambda: CF.closed_form(
                h, sae, eval_ids, cf_sites, eps=tuple(s["eps"]), lags=tuple(s["lags"]), relative_to="write",
                seed=seed), root)
            r2 = CF.r2(cf, by=("feature", "lag"))
            r2 = r2[r2["lag"] == 0]
            row.update(cf_atoms=len(r2), r2_direct=float(r2["r2_pred_direct"].median()),
                       r2_paper_fit=float(r2["r2_pred_paper_fit"].median()))
        return dict(row, seconds=time.perf_counter() - t0)

    return cache.cached_json("sweep_cell", key, compute, root)


def _states(s, data, root, device=None, threads=1) -> str:
    """Extract (or find) the state dataset every cell task trains on; returns its folder name."""
    import torch

    from . import pipeline

    if threads:
        torch.set_num_threads(threads)
    h = _host(s, device)
    d = dict(data)
    return pipeline.states(h, d.pop("cells"), root=root, progress=False, **d).name


def parse_cells(h, cells):
    """"all" | "L1H2,L4H3" | [(1, 2), "L4H3", ...] -> sorted unique [(layer, head)] checked against the host."""
    from .data import cell_tuple

    if isinstance(cells, str):
        cells = [(c.layer, c.head) for c in h.cells] if cells == "all" else cells.split(",")
    out = []
    for c in cells:
        layer, head = cell_tuple(c) if isinstance(c, str) else c
        out.append(tuple(int(x) for x in h.cell(int(layer), int(head))[:2]))
    if not out:
        raise ValueError("sweep: no cells given; pass cells='all' or a list like 'L1H2,L4H3'")
    return sorted(set(out))


def data_for(h, s, cells) -> dict:
    """The state-dataset spec for ``cells`` under settings ``s``: the params file's ``cells`` and every head of
    its ``heads_layer`` (the notebooks' dataset) plus ``cells``, extracted once into one dataset."""
    from . import pipeline

    return pipeline.data_spec(h, [*map(tuple, s["cells"]), *cells], heads_layer=s["heads_layer"], window=s["window"],
                              n_windows=s["n_windows"], positions_per_seq=s["positions_per_seq"], seed=s["seed"],
                              corpus=s["corpus"])


def _ray_init(ray, address, workers):
    """Connect to ``address`` / $RAY_ADDRESS, or start a local Ray with ``workers`` CPUs (default: the cores)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    for attempt in range(3):  # Ray waits a fixed 30 s for its node to come up: a busy machine can miss it
        try:
            ray.init(address="local", num_cpus=workers or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     configure_logging=False, object_store_memory=200 * 1024 ** 2)
            return
        except Exception as err:  # noqa: BLE001 -- Ray raises a bare Exception for this timeout
            if "timed out during startup" not in str(err) or attempt == 2:
                raise
            ray.shutdown()


def sweep(params=None, cells="all", *, address=None, workers=None, root=None, serial=False, threads=1,
          gpus_per_task=None, max_retries=3, progress=True, **overrides) -> pd.DataFrame:
    """The table of :data:`COLUMNS`, a row per cell, for the parameter file (or dict) ``params`` and
    ``cells`` (``"all"`` the host's recurrent cells, or ``"L1H2,L4H3"``, or a list of cells).

    Ray: ``address`` (or ``$RAY_ADDRESS``) joins a cluster; otherwise a local instance with ``workers`` CPUs
    (default: one per core) is started and shut down (an already initialised Ray is used as it is; then
    ``workers`` caps the tasks in flight). ``gpus_per_task``: GPUs each task requests (default 1 when the
    cluster has GPUs, else 0). ``serial=True`` runs the cells in this process, one after another, without Ray
    (the reference a Ray sweep must equal). ``overrides``: parameter names of :data:`DEFAULTS`.
    The state dataset holds the params file's ``cells`` and ``heads_layer`` heads plus the swept cells, so
    sweeping ``heads_layer``'s heads shares every artifact with notebooks 02-04."""
    from tqdm.auto import tqdm

    s = settings(params, **overrides)
    root = cache.cache_root(root).resolve()
    h = _host(s)
    todo_cells = parse_cells(h, cells)
    data = data_for(h, s, todo_cells)
    table_key = dict(_spec(s, h.name, data), row=ROW_VERSION, cells=[list(c) for c in todo_cells],
                     **{k: s[k] for k in ("min_firings", "max_firings", "n_atoms", "sites_per_atom", "eps", "lags")},
                     **_pool_key(s))
    fault = os.environ.get("WRITESAE_SWEEP_FAULT")
    rows = {}

    def assemble():
        return pd.DataFrame([rows[c] for c in todo_cells], columns=COLUMNS)

    table = cache.artifact_dir("sweep", table_key, root) / "table.csv"
    if table.exists():
        return cache.cached_table("sweep", table_key, assemble, root)
    if serial:
        bar = tqdm(todo_cells, desc="sweep", unit="cell", disable=not progress)
        for c in bar:
            bar.set_postfix_str(cell_label(c))
            rows[c] = run_cell(s, data, c, root, threads=threads, fault=fault)
        return cache.cached_table("sweep", table_key, assemble, root)

    try:
        import ray
    except ImportError:
        raise ImportError("the sweep runs on Ray: pip install 'writesae[scale]' (or pip install ray), or pass "
                          "serial=True to run the cells in this process") from None
    started = not ray.is_initialized()
    if started:
        _ray_init(ray, address, workers)
    try:
        gpus = gpus_per_task if gpus_per_task is not None else (1 if ray.cluster_resources().get("GPU", 0) else 0)
        device = "cuda" if gpus else None
        opts = dict(num_cpus=1, num_gpus=gpus, max_retries=max_retries, retry_exceptions=False)
        states = ray.remote(_states).options(**opts).remote(s, data, str(root), device, threads)
        remote_cell = ray.remote(_cell_after_states).options(**opts)
        cap = workers if workers and not started else len(todo_cells)
        pending, queue, errors = {}, list(todo_cells), {}
        bar = tqdm(total=len(todo_cells), desc="sweep", unit="cell", disable=not progress)
        while queue or pending:
            while queue and len(pending) < cap:
                c = queue.pop(0)
                pending[remote_cell.remote(states, s, data, c, str(root), threads, device, fault)] = c
            done, _ = ray.wait(list(pending), num_returns=1)
            c = pending.pop(done[0])
            try:
                rows[c] = ray.get(done[0])
                bar.set_postfix_str(f"{cell_label(c)} {rows[c]['seconds']:.0f} s")
            except Exception as err:  # a task that raised (or died more than max_retries times)
                errors[c] = err
                bar.set_postfix_str(f"{cell_label(c)} failed")
            bar.update(1)
        bar.close()
    finally:
        if started:
            ray.shutdown()
    if errors:
        lines = "\n".join(f"  {cell_label(c)}: {type(e).__name__}: {str(e).strip().splitlines()[-1]}"
                          for c, e in errors.items())
        raise RuntimeError(f"sweep: {len(errors)} of {len(todo_cells)} cells failed (the others are stored):\n{lines}\n"
                           "run the same sweep again to compute only the missing cells")
    return cache.cached_table("sweep", table_key, assemble, root)


def _cell_after_states(_states_name, s, data, cell, root, threads, device, fault):
    """A cell task; its first argument is the states task's result, so Ray runs it after extraction."""
    return run_cell(s, data, cell, root, threads=threads, device=device, fault=fault)
