"""SAE training over processes with torch.distributed: one torchrun launch of 2 processes over gloo
(tests/dist_job.py) against single-process runs in this process.

- cells dealt over the 2 ranks (``python -m writesae.distributed cells``): every SAE equals, bit for bit, the one
  a single process trains, and rank 0 prints the same lines;
- DDP training of one SAE (``fit(distributed=True)``) matches single-process training after 48 steps, with dead
  atoms, AuxK and resampling on the way (resample every 8 steps, dead after 4): weights within 1e-4 (the float
  rounding of the gradient all-reduce), the same steps and dead atoms; both ranks hold identical weights.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_job
from writesae import distributed as D
from writesae.train import train_on_tensors

ROOT = Path(__file__).resolve().parent.parent
CELLS = "L1H0,L1H1,L1H2,L1H3"
TOL = 1e-4


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Run the 2-process job once; returns its output folder, cache root and stdout."""
    out = tmp_path_factory.mktemp("torchrun")
    env = dict(os.environ, WRITESAE_CACHE=str(out / "cache"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with socket.socket() as s:  # a free port for the rendezvous (torchrun's --master_port 0 hangs)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "tests" / "dist_job.py"), str(out), "params/tiny.yaml", CELLS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, out / "cache", proc.stdout


def test_ddp_matches_single_process(launched):
    out = launched[0]
    single = dist_job.ddp(False)
    assert single["step"] == 48 and single["dead"] > 0.05  # dead atoms, hence AuxK and resampling, were in play
    ranks = [torch.load(out / f"ddp_rank{r}.pt") for r in range(2)]
    for got in ranks:
        assert (got["step"], got["dead_train"], got["dead"]) == (single["step"], single["dead_train"], single["dead"])
        for name, want in single["state"].items():
            diff = float((got["state"][name] - want).abs().max())
            assert diff < TOL, f"{name}: max |DDP - single| = {diff}"
    for name, t in ranks[0]["state"].items():  # the ranks agree with each other exactly
        assert torch.equal(t, ranks[1]["state"][name]), name


def test_ddp_needs_a_process_group():
    with pytest.raises(ValueError, match="torchrun"):
        train_on_tensors(dist_job.states(), dist_job.cfg(), seed=0, distributed=True, **dist_job.DDP)


def test_cells_over_ranks_equal_single_process(launched, tmp_path):
    _, two, stdout = launched
    one = D.train_cells(str(ROOT / "params" / "tiny.yaml"), CELLS, root=tmp_path)
    assert list(one) == CELLS.split(",")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("L")]
    assert [ln.split(",")[0] for ln in lines] == [f"{c}: fvu {m['fvu']:.4f}" for c, m in one.items()]
    for name, m in one.items():
        d = Path(m["path"])
        a = load_file(d / "best" / "sae.safetensors")
        b = load_file(two / "sae" / d.name / "best" / "sae.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
