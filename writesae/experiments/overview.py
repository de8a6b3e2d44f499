"""How much each cell remembers: gates and the write's share of the state, per (layer, head)."""
from __future__ import annotations

import math

import pandas as pd
import torch


@torch.no_grad()
def cell_memory(host, ids, min_pos=8) -> pd.DataFrame:
    """One row per cell over the windows ``ids`` (positions >= min_pos): median forget gate a_t, write
    gate b_t, ||W_t||_F / ||S_t||_F (1 means the state is just the current write) and the forget gate's
    half-life in tokens (ln 0.5 / ln a, at the median a)."""
    ids = torch.as_tensor(ids)
    tr = host.trace(ids, positions=range(min_pos, ids.shape[1]))
    rows = []
    for c in host.cells:
        t = tr[(c.layer, c.head)]
        a = float(t.a.median())
        share = (t.write.flatten(2).norm(dim=-1) / t.state.flatten(2).norm(dim=-1).clamp_min(1e-30)).median()
        rows.append(dict(layer=c.layer, head=c.head, a=a, b=float(t.b.median()), write_share=float(share),
                         half_life=math.log(0.5) / math.log(a) if 0 < a < 1 else math.inf))
    return pd.DataFrame(rows)
