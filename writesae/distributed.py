"""SAE training over several processes or GPUs with ``torch.distributed``, launched by ``torchrun``.

Two kinds of parallelism, both reading a parameter file (the notebooks' / the sweep's names, see
:func:`writesae.sweep.settings`):

``cells``: the cells are dealt over the ranks (rank r trains ``cells[r::world]``; sparsify's
``--distribute_modules``). Each SAE is trained by :func:`writesae.pipeline.sae` into the parameter-keyed
cache, exactly as a single process would train it (same seed, same data: the same weights), so the
notebooks and the sweep find them there. Rank 0 extracts the state dataset of every cell first (one pass
of the model); the others wait at a barrier. Rank 0 prints one line per cell::

    torchrun --nproc_per_node 2 -m writesae.distributed cells --params params/tiny.yaml --cells L1H0,L1H1,L1H2,L1H3

``ddp``: one SAE, data-parallel (:func:`writesae.train.fit` with ``distributed=True``): every rank reads
the same global batch and trains on its share, DDP averages the gradients, the fired atoms are all-reduced
so the dead-atom counters, AuxK and resampling agree on every rank; rank 0 writes ``--out``::

    torchrun --nproc_per_node 4 -m writesae.distributed ddp --params params/qwen35_0p8b_gpu.yaml --cell L9H4 --out sae_l9h4

Backend: NCCL when CUDA is available (rank r on ``cuda:LOCAL_RANK``), gloo on CPUs. Without torchrun
(``python -m writesae.distributed ...``) both run as a single process: the reference the tests compare
against. Multi-node: ``torchrun --nnodes N --node_rank i --rdzv_endpoint HOST:PORT ...`` with the cache
root (``$WRITESAE_CACHE``) on a shared file system.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

__all__ = ["init", "train_cells", "train_ddp", "main"]


def init(backend=None) -> tuple[int, int, str]:
    """Join the process group torchrun describes (``$RANK``, ``$WORLD_SIZE``, ``$MASTER_ADDR``...): (rank, world
    size, device). Without torchrun: (0, 1, "cuda" or "cpu") and no process group."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, "cuda" if cuda else "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), f"cuda:{local}" if cuda else "cpu"


def _barrier(world):
    if world > 1:
        torch.distributed.barrier()


def _setup(params, cells, root, **overrides):
    from . import pipeline, sweep

    s = sweep.settings(params, **overrides)
    h = pipeline.host(s["model"], s["device"])
    cells = sweep.parse_cells(h, cells)
    return s, h, cells, sweep.data_for(h, s, cells)


def _states(h, data, root, rank, world):
    """The state dataset's folder: rank 0 extracts it (once), the others wait for it."""
    from . import pipeline

    d = dict(data)
    spec = d.pop("cells")
    if rank == 0:
        pipeline.states(h, spec, root=root, progress=False, **d)
    _barrier(world)
    return pipeline.states(h, spec, root=root, progress=False, **d)


def train_cells(params, cells="all", *, root=None, threads=1, **overrides) -> dict:
    """Train the SAE of every cell in ``cells`` ("all", "L1H2,L4H3" or a list), this rank's share only when a
    process group is up (:func:`init`); returns ``{"L1H2": metrics}`` of every cell (gathered from all ranks).
    ``overrides``: parameter names of :data:`writesae.sweep.DEFAULTS`."""
    import torch.distributed as dist

    from . import pipeline
    from .sweep import cell_label

    if threads:
        torch.set_num_threads(threads)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    s, h, cells, data = _setup(params, cells, root, **overrides)
    _states(h, data, root, rank, world)
    mine = {}
    for c in cells[rank::world]:
        sae = pipeline.sae(h, c, n_feat=s["n_feat"], k=s["k"], epochs=s["epochs"], seed=s["seed"], data=data,
                           root=root, progress=False)
        mine[cell_label(c)] = dict(sae.info.get("metrics", {}), path=str(sae.path.parent))
    if world == 1:
        return mine
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    return dict(sorted((k, v) for part in everyone for k, v in part.items()))


def train_ddp(params, cell, out_dir, *, root=None, device=None, threads=1, epochs=None, batch_size=256, lr=3e-4,
              **fit_kw):
    """Train the SAE of ``cell`` data-parallel over the process group's ranks (one process without one) into
    ``out_dir`` (rank 0 writes it); returns the :class:`writesae.train.TrainResult` (on every rank).
    ``fit_kw``: other :func:`writesae.train.train_sae` arguments (``resample_every``, ``dead_after``...)."""
    import torch.distributed as dist

    from .sae import SAEConfig
    from .train import train_sae

    if threads:
        torch.set_num_threads(threads)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    s, h, cells, data = _setup(params, [cell], root)
    d_states = _states(h, data, root, rank, world)
    cfg = SAEConfig(variant="bilinear", d_k=h.d_k, d_v=h.d_v, n_feat=s["n_feat"], k=s["k"])
    return train_sae(d_states, cells[0], cfg, out_dir, epochs=epochs or s["epochs"], batch_size=batch_size, lr=lr,
                     seed=s["seed"], device=device or "cpu", progress=rank == 0, distributed=world > 1, **fit_kw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m writesae.distributed", description=__doc__.split("\n\n")[0],
                                epilog="run under torchrun for more than one process; see the module docstring")
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cells", help="deal the cells' SAEs over the ranks")
    c.add_argument("--params", required=True, help="parameter file (params/*.yaml)")
    c.add_argument("--cells", default="all", help='"all" or e.g. "L1H2,L4H3"')
    d = sub.add_parser("ddp", help="train one SAE data-parallel over the ranks")
    d.add_argument("--params", required=True, help="parameter file (params/*.yaml)")
    d.add_argument("--cell", required=True, help="e.g. L1H2")
    d.add_argument("--out", required=True, help="output folder (best/, last/, metrics.json)")
    d.add_argument("--epochs", type=int, default=None, help="default: the params file's epochs")
    d.add_argument("--batch-size", type=int, default=256, help="global batch (split over the ranks)")
    d.add_argument("--lr", type=float, default=3e-4)
    d.add_argument("--resample-every", type=int, default=250)
    d.add_argument("--dead-after", type=int, default=100)
    a = p.parse_args(argv)
    try:
        rank, world, device = init()
        if a.mode == "cells":
            out = train_cells(a.params, a.cells)
            if rank == 0:
                for name, m in out.items():
                    print(f"{name}: fvu {m.get('fvu', float('nan')):.4f}, alive {m.get('alive')}, {m['path']}")
        else:
            res = train_ddp(a.params, a.cell, Path(a.out), device=device, epochs=a.epochs, batch_size=a.batch_size,
                            lr=a.lr, resample_every=a.resample_every, dead_after=a.dead_after)
            if rank == 0:
                print(f"{world} rank(s): best SAE in {a.out}/best after {res.step} steps: fvu {res.metrics['fvu']:.4f}")
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"writesae.distributed {a.mode}: {err}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
