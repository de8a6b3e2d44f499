"""Ground truth (PAPER.md §4): states built from a planted dictionary of rank-1 atoms, and how well an
SAE recovers the planted atoms."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def planted(n=4096, d=16, n_atoms=64, seed=0, noise=0.01, active=(3, 4)):
    """(states (n, d, d), atoms (n_atoms, d, d)): each state a sum of ``active`` (min, max) of ``n_atoms``
    random rank-1 unit atoms with coefficients in [0.5, 1.5], plus Gaussian noise of std ``noise``."""
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n_atoms, d, generator=g), dim=-1)
    v = F.normalize(torch.randn(n_atoms, d, generator=g), dim=-1)
    atoms = u[:, :, None] * v[:, None, :]
    n_act = torch.randint(active[0], active[1] + 1, (n,), generator=g)
    scores = torch.rand(n, n_atoms, generator=g)
    kth = scores.sort(-1, descending=True).values.gather(1, (n_act - 1)[:, None])
    coef = (0.5 + torch.rand(n, n_atoms, generator=g)) * (scores >= kth)
    return torch.einsum("na,akv->nkv", coef, atoms) + noise * torch.randn(n, d, d, generator=g), atoms


def recovery(sae, atoms):
    """Per planted atom: the best |Frobenius cosine| with any learned atom (n_atoms,)."""
    learned = F.normalize(sae.atoms().detach().flatten(1), dim=-1)
    return (F.normalize(atoms.flatten(1), dim=-1) @ learned.T).abs().max(1).values
