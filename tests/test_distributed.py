"""SAE training over processes with torch.distributed (gloo on this CPU, 2 processes).

- cells dealt over 2 ranks by ``torchrun -m writesae.distributed cells``: every SAE equals, bit for bit, the one
  a single process trains (``python -m writesae.distributed cells``, no torchrun);
- DDP training of one SAE (``fit(distributed=True)``, 2 processes spawned with torch.multiprocessing) matches
  single-process training after 48 steps, with dead atoms, AuxK and resampling on the way (resample every 8 steps,
  dead after 4): weights within 1e-4 (float rounding of the gradient all-reduce), the same steps, the same
  resampled atoms.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from writesae.sae import SAEConfig
from writesae.train import train_on_tensors

ROOT = Path(__file__).resolve().parent.parent
CELLS = "L1H0,L1H1,L1H2,L1H3"
DDP = dict(epochs=4, batch_size=32, lr=3e-3, warmup=2, resample_every=8, dead_after=4, renorm_every=5,
           progress=False, val_frac=0.2)
TOL = 1e-4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _states():
    g = torch.Generator().manual_seed(0)
    return torch.randn(480, 6, 5, generator=g) * torch.linspace(0.2, 2.0, 5)


def _cfg():
    return SAEConfig("bilinear", 6, 5, n_feat=48, k=3, k_aux=8)


def _ddp_rank(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = train_on_tensors(_states(), _cfg(), seed=0, distributed=True, **DDP)
        torch.save({"state": res.sae.state_dict(), "step": res.step, "dead_train": res.metrics["dead_train"]},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process(tmp_path):
    single = train_on_tensors(_states(), _cfg(), seed=0, **DDP)
    assert single.step == 48
    mp.spawn(_ddp_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for got in ranks:
        assert got["step"] == single.step
        assert got["dead_train"] == single.metrics["dead_train"]
        for name, want in single.sae.state_dict().items():
            diff = float((got["state"][name] - want).abs().max())
            assert diff < TOL, f"{name}: max |DDP - single| = {diff}"
    for name, t in ranks[0]["state"].items():  # the ranks agree with each other exactly
        assert torch.equal(t, ranks[1]["state"][name]), name


def test_ddp_needs_a_process_group_and_a_divisible_batch():
    with pytest.raises(ValueError, match="torchrun"):
        train_on_tensors(_states(), _cfg(), seed=0, distributed=True, **DDP)


def _run(cmd, cache):
    env = dict(os.environ, WRITESAE_CACHE=str(cache), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_cells_over_ranks_equal_single_process(tmp_path):
    args = ["-m", "writesae.distributed", "cells", "--params", "params/tiny.yaml", "--cells", CELLS]
    one = _run([sys.executable, *args], tmp_path / "one")
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args], tmp_path / "two")
    assert one.splitlines() == [line.replace("/two/", "/one/") for line in two.splitlines()]
    saes = sorted((tmp_path / "one" / "sae").iterdir())
    assert len(saes) == 4
    for d in saes:
        a = load_file(d / "best" / "sae.safetensors")
        b = load_file(tmp_path / "two" / "sae" / d.name / "best" / "sae.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), d.name
