"""Command line: ``writesae cells | extract | train-sae | book | explore | sweep | plan``."""
from __future__ import annotations

import argparse
import os
import sys

from .runtime import keep_freed_memory


def _cells(spec, host):
    """"L1H4,L9H4" | "all" -> [(1, 4), (9, 4)]."""
    from .data import cell_tuple

    if spec == "all":
        return [(c.layer, c.head) for c in host.cells]
    return [cell_tuple(part) for part in spec.split(",")]


def _device(name):
    """``--device``, refused at once if it names an accelerator this machine lacks."""
    import torch

    if name and name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; leave --device out (CPU)")
    return name


def _threads(n):
    """``--threads``: torch's CPU threads (and OMP/MKL's, for child processes). Default: 1 on a machine with
    at most 4 cores (extraction ran at ~1,700 states/s with one thread vs 62-71/s with the default on a busy
    2-core machine), torch's own default otherwise."""
    import os

    if n is None and (os.cpu_count() or 1) > 4:
        return
    n = 1 if n is None else n
    if n < 1:
        raise ValueError(f"--threads {n}: give a positive number of threads (1 is fastest on a small shared CPU)")
    import torch

    torch.set_num_threads(n)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def cmd_cells(a):
    from . import pipeline

    host = pipeline.host(a.model, _device(a.device))
    print(f"{host.name}: recurrent layers {host.recurrent_layers}, {host.n_heads} value heads of "
          f"d_k={host.d_k} x d_v={host.d_v}; attention layers "
          f"{[i for i in range(len(host.layers)) if i not in host.recurrent_layers]}")
    if a.no_memory:
        return
    from .experiments.zoo import memory

    table = memory(host, window=a.window, n_windows=a.n_windows, seed=a.seed, influence=False)
    print(table[["cell", "decay", "write_share"]].to_string(index=False))
    print(f"decay: median forget/decay gate (1: keeps everything); write_share: median ||W_t||_F / ||S_t||_F, the "
          f"share of the state's norm that is the current write (near 1: no memory). Source: {table['source'].iloc[0]}")


def cmd_extract(a):
    import torch

    from . import pipeline
    from .extract import extract

    host = pipeline.host(a.model, _device(a.device), a.model_dtype)
    ids = pipeline.windows(host, a.text, a.window, a.n_windows, a.seed, a.corpus)
    out = extract(host, ids, _cells(a.cells, host), a.out, positions_per_seq=a.positions_per_seq,
                  batch_size=a.batch_size, seed=a.seed, dtype=getattr(torch, a.dtype),
                  source=a.text if a.corpus == "embedded" else f"{a.text} of {a.corpus}")
    print(f"states written to {out}")


def cmd_train_sae(a):
    from .data import StateDataset
    from .sae import SAEConfig
    from .train import train_sae

    data = StateDataset(a.data, a.cell, "all")  # checks the directory, the cell and every shard first
    cfg = SAEConfig(variant=a.variant, d_k=data.d_k, d_v=data.d_v, n_feat=a.n_feat, k=a.k,
                    activation=a.activation, rank=a.rank)
    res = train_sae(a.data, data.cell, cfg, a.out, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                    device=_device(a.device) or "cpu", log_every=a.log_every, wandb=a.wandb)
    print(f"best SAE in {a.out}/best: {res.metrics}")


def cmd_book(a):
    from .book import build, print_profile

    if not a.profile:
        build(params_file=a.params, only=a.only, tiny=a.tiny, force=a.force, jobs=a.jobs)
    print_profile(top=a.top)


def cmd_explore(a):
    from .explore import serve

    return serve(params_file=a.params, cell=a.cell, port=a.port, browser=not a.no_browser, threads=a.threads)


def cmd_sweep(a):
    import pandas as pd

    from .sweep import sweep

    try:
        table = sweep(a.params, a.cells, address=a.address, workers=a.workers, serial=a.serial,
                      threads=a.threads or 1)
    except ImportError as err:  # no Ray: one line naming the fix
        raise RuntimeError(str(err)) from None
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(table)


def cmd_plan(a):
    from .plan import plan

    return 2 if plan(a.params, rates=a.rates) else 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="writesae", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("cells", help="list a model's recurrent heads (layer, head) with their memory statistics")
    c.add_argument("--model", default="embedded")
    c.add_argument("--device", default=None)
    c.add_argument("--window", type=int, default=128, help="tokens per held-out window for measured statistics")
    c.add_argument("--n-windows", type=int, default=2, help="held-out windows for measured statistics")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-memory", action="store_true", help="list the layout only (no memory statistics)")
    c.set_defaults(fn=cmd_cells)

    e = sub.add_parser("extract", help="write a state dataset (resumable)")
    e.add_argument("--model", default="embedded", help='"embedded", a local dir or hub name, or "tiny"')
    e.add_argument("--cells", default="L1H1", help='e.g. "L1H1,L5H2" or "all"')
    e.add_argument("--corpus", default="embedded", help='"embedded" (the shipped text), a .txt/.jsonl/.parquet file '
                   'or folder, a datasets save_to_disk directory or a hub dataset name (see writesae.corpus)')
    e.add_argument("--text", default="train", help='the corpus\'s "train" or "heldout" passages (or one .txt file, cut whole)')
    e.add_argument("--window", type=int, default=128)
    e.add_argument("--n-windows", type=int, default=256)
    e.add_argument("--positions-per-seq", type=int, default=32)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="stored states")
    e.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's weights (bfloat16 on a GPU; the recurrence runs in float32 either way)")
    e.add_argument("--device", default=None)
    e.add_argument("--out", required=True)
    e.set_defaults(fn=cmd_extract)

    t = sub.add_parser("train-sae", help="train an SAE on one head of a state dataset (resumable)")
    t.add_argument("--data", required=True)
    t.add_argument("--cell", required=True, help="e.g. L1H1")
    t.add_argument("--variant", default="bilinear",
                   choices=["bilinear", "tied", "flat", "matrix", "bilinear_flat", "rank"])
    t.add_argument("--activation", default="topk", choices=["topk", "batchtopk", "jumprelu"])
    t.add_argument("--n-feat", type=int, default=2048)
    t.add_argument("--k", type=int, default=32)
    t.add_argument("--rank", type=int, default=1)
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None)
    t.add_argument("--out", required=True)
    t.add_argument("--log-every", type=int, default=10, help="steps between rows of OUT/train_log.jsonl")
    t.add_argument("--wandb", action="store_true", help="also log the curves to Weights & Biases (wandb installed)")
    t.set_defaults(fn=cmd_train_sae)

    b = sub.add_parser("book", help="execute the notebooks (papermill) and build the book (jupyter-book)")
    b.add_argument("--params", default=None, help="parameter file in params/ (default: embedded CPU)")
    b.add_argument("--only", nargs="*", default=None, help="notebook names to (re)execute")
    b.add_argument("--tiny", action="store_true", help="tiny parameters (CI smoke build)")
    b.add_argument("--force", action="store_true", help="re-execute notebooks even when unchanged")
    b.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="notebooks executed side by side, one kernel (one thread) each; they share the artifact "
                        "cache, computing each artifact once; started in the params file's build_order, then longest "
                        "first by the last build's times (default: 2, or 1 on a 1-core machine)")
    b.add_argument("--profile", action="store_true", help="only print where the last build's seconds went")
    b.add_argument("--top", type=int, default=3, help="slowest code cells shown per notebook (default 3)")
    b.set_defaults(fn=cmd_book)

    x = sub.add_parser("explore", help="serve the explorer's live widgets (Voila) on http://127.0.0.1:PORT")
    x.add_argument("--params", default=None, help="parameter file in params/ (default: params/embedded_cpu.yaml, "
                   "the book's, so its cached SAEs are reused)")
    x.add_argument("--cell", default=None, help="the head the widgets start on, e.g. L6H0")
    x.add_argument("--port", type=int, default=8866)
    x.add_argument("--no-browser", action="store_true", help="do not open a browser")
    x.set_defaults(fn=cmd_explore)

    w = sub.add_parser("sweep", help="the per-head pipeline for many heads as Ray tasks: one table, a row per head")
    w.add_argument("--params", required=True, help="parameter file (params/*.yaml)")
    w.add_argument("--cells", default="all", help='"all" or e.g. "L1H2,L4H3"')
    w.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    w.add_argument("--workers", type=int, default=None, help="local Ray: CPUs (default: one per core)")
    w.add_argument("--serial", action="store_true", help="no Ray: the heads one after another in this process")
    w.set_defaults(fn=cmd_sweep)

    pl = sub.add_parser("plan", help="what a parameter file's run needs (models, corpus, disk, memory, GPU-hours), "
                        "checked without loading weights; exit 2 when something is missing")
    pl.add_argument("--params", required=True, help="parameter file (params/*_gpu.yaml)")
    pl.add_argument("--rates", default=None, help="rates measured on the GPU: python benchmarks/bench_scale.py "
                    "--rates-out FILE")
    pl.set_defaults(fn=cmd_plan)

    for sp in sub.choices.values():
        sp.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on a machine "
                        "with at most 4 cores, where more threads are slower; else torch's default)")
    a = p.parse_args(argv)
    try:
        _threads(a.threads)
        keep_freed_memory()
        rc = a.fn(a)
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # ValueError includes writesae's CorruptFileError
        print(f"writesae {a.cmd}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"writesae {a.cmd}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
