"""The 2-process job of tests/test_distributed.py, launched once by torchrun (one launch: two tests' worth).

1. DDP: one SAE trained data-parallel on seeded random states (``fit(distributed=True)``), written to
   ``OUT/ddp_rank<r>.pt``; 2. cells: ``python -m writesae.distributed cells`` dealt over the same 2 ranks.
"""
import sys

import torch

from writesae import distributed as D
from writesae.sae import SAEConfig
from writesae.train import train_on_tensors

DDP = dict(epochs=4, batch_size=32, lr=3e-3, warmup=2, resample_every=8, dead_after=4, renorm_every=5,
           progress=False, val_frac=0.2)


def states():
    g = torch.Generator().manual_seed(0)
    return torch.randn(480, 6, 5, generator=g) * torch.linspace(0.2, 2.0, 5)


def cfg():
    return SAEConfig("bilinear", 6, 5, n_feat=48, k=3, k_aux=8)


def ddp(distributed):
    res = train_on_tensors(states(), cfg(), seed=0, distributed=distributed, **DDP)
    dead = max(r["dead"] for r in res.log if r["split"] == "train")  # largest dead fraction seen while training
    return {"state": res.sae.state_dict(), "step": res.step, "dead_train": res.metrics["dead_train"], "dead": dead}


if __name__ == "__main__":
    out, params, cells = sys.argv[1:4]
    torch.set_num_threads(1)
    rank, world, _ = D.init()
    torch.save(ddp(True), f"{out}/ddp_rank{rank}.pt")
    sys.exit(D.main(["cells", "--params", params, "--cells", cells]))
