"""Softmax attention over explicit past keys and values: the attention layers of the hybrid hosts
(OLMo-Hybrid, Kimi Linear, MiniMax, Jamba), written once. A host keeps each layer's keys and values (or
what they are expanded from) as windows of its :class:`writesae.hosts.base.LayerState`, so a run can
restart at any position."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_sdpa(q, k, v, start, scale, window=None):
    """Attention of the T new queries at positions ``start..start+T-1`` over every key so far.

    q: ``(B, H, T, d)``; k, v: ``(B, H_kv, t, d)`` with ``t = start + T`` (row j: absolute position j;
    ``H_kv`` divides ``H``: grouped-query attention); window: a sliding window (a query sees the last
    ``window`` keys, itself included), None for all. Returns ``(B, T, H * d_v)``."""
    T, t = q.shape[2], k.shape[2]
    rows = torch.arange(T, device=q.device)[:, None] + start
    cols = torch.arange(t, device=q.device)[None, :]
    mask = (cols <= rows) if window is None else (cols <= rows) & (cols > rows - window)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2).reshape(q.shape[0], T, -1)
