"""How much each cell remembers: gates and the write's share of the state, per (layer, head)."""
from __future__ import annotations

import math

import pandas as pd
import torch


@torch.no_grad()
def cell_memory(host, ids, min_pos=8, max_bytes=2 ** 30) -> pd.DataFrame:
    """One row per cell over the windows ``ids`` (positions >= min_pos): median forget gate a_t, write
    gate b_t, ||W_t||_F / ||S_t||_F (1 means the state is just the current write) and the forget gate's
    half-life in tokens (ln 0.5 / ln a, at the median a).

    The cells are traced walking up the model once per piece (``host.trace_layers``), holding one layer's
    heads' states and writes (float32) at a time: at most ``max_bytes`` of them, the windows and each layer's
    heads split into pieces where all of them would be more (one layer of Qwen3.5-0.8B, 16 heads of 128 x 128
    over 8 windows of 1,024 tokens: ~17 GB); the medians are those of all of them either way."""
    ids = torch.as_tensor(ids)
    positions = list(range(min_pos, ids.shape[1]))
    cells = list(host.cells)
    one = host.trace_bytes([(c.layer, c.head) for c in cells], len(positions))  # one cell over one window
    per_layer = max(sum(1 for c in cells if c.layer == l) for l in {c.layer for c in cells})
    seqs = max(1, min(len(ids), max_bytes // one))
    group = max(1, min(per_layer, max_bytes // (one * seqs)))  # heads of each layer per walk
    heads = sorted({c.head for c in cells})
    parts = {(c.layer, c.head): ([], [], []) for c in cells}
    for i in range(0, len(ids), seqs):
        for j in range(0, len(heads), group):
            keys = [(c.layer, c.head) for c in cells if c.head in heads[j:j + group]]
            for _, tr in host.trace_layers(ids[i:i + seqs], cells=keys, positions=positions):
                for key, t in tr.items():
                    share = t.write.flatten(2).norm(dim=-1) / t.state.flatten(2).norm(dim=-1).clamp_min(1e-30)
                    for acc, x in zip(parts[key], (t.a, t.b, share)):
                        acc.append(x.flatten())
    rows = []
    for c in cells:
        a, b, share = (torch.cat(x).median() for x in parts[(c.layer, c.head)])
        a = float(a)
        rows.append(dict(layer=c.layer, head=c.head, a=a, b=float(b), write_share=float(share),
                         half_life=math.log(0.5) / math.log(a) if 0 < a < 1 else math.inf))
    return pd.DataFrame(rows)


@torch.no_grad()
def trace_stats(ct, seq=0) -> dict:
    """What one traced passage (a cell trace over all positions) says about the cache: the participation ratio
    (effective rank) of the last state, the median ||W_t||_F / ||S_t||_F, and the mean forget and write gates."""
    sv = torch.linalg.svdvals(ct.state[seq, -1].float())
    share = ct.write[seq].flatten(1).norm(dim=1) / ct.state[seq].flatten(1).norm(dim=1).clamp_min(1e-30)
    return dict(eff_rank=float(sv.sum() ** 2 / (sv ** 2).sum()), write_share=float(share.median()),
                mean_a=float(ct.a[seq].mean()), mean_b=float(ct.b[seq].mean()))


@torch.no_grad()
def best_aligned(sae, ct, seq=0) -> dict:
    """The top-1 atom of the state at every traced position and its Frobenius cosine with that position's
    write; returns the position ``t`` where they align best, its feature, coefficient, atom and write, the
    cosine there and the median cosine over the passage (the paper's Fig. 1, computed)."""
    enc = sae.encode(ct.state[seq])
    feats, coefs = enc.top_indices[:, 0], enc.top_acts[:, 0]
    atoms = sae.atoms(feats)
    cos = torch.nn.functional.cosine_similarity(atoms.flatten(1), ct.write[seq].flatten(1), dim=1)
    t = int(cos.argmax())
    return dict(t=t, feature=int(feats[t]), coef=float(coefs[t]), atom=atoms[t], write=ct.write[seq, t],
                cos=float(cos[t]), median_cos=float(cos.median()))
