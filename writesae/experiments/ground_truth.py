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


def planted_run(states, atoms, variant="bilinear", *, k=4, epochs=20, seed=0):
    """Train an SAE of ``variant`` (``2 * n_atoms`` atoms, TopK ``k``) on planted ``states`` and score it: a dict
    of variant, held-out fvu, the median best cosine of the planted atoms (:func:`recovery`) and the share of
    planted atoms recovered above cosine 0.9."""
    from ..sae import SAEConfig
    from ..train import train_on_tensors

    d = states.shape[-1]
    cfg = SAEConfig(variant, d, d, n_feat=2 * len(atoms), k=k, k_aux=32)
    res = train_on_tensors(states, cfg, epochs=max(epochs, 20), batch_size=256, lr=3e-3, warmup=20, progress=False,
                           seed=seed)
    rec = recovery(res.sae, atoms)
    return dict(variant=variant, fvu=res.metrics["fvu"], median_best_cos=float(rec.median()),
                recovered_0_9=float((rec > 0.9).float().mean()))
