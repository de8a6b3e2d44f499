"""GLA host: flash-linear-attention's ``GLAForCausalLM`` (the pure-torch mirror in :mod:`writesae.models.gla`,
which ``load_host`` builds on every device, or fla's own class passed in; both have the same module tree,
which is all this host reads).

fla's gated linear attention (``fla/layers/gla.py``), per head, on the normed input x::

    q, k, v = W_q x, W_k x, W_v x (optional short conv + silu; optional feature map on q, k; kv heads grouped)
    gk = logsigmoid(W_gk2 W_gk1 x) / 16  (clamped at clamp_min)           -- a log-decay per key row
    S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T                              o_t = S_t^T (d_k^-1/2 q_t)

(fla's cache stores S transposed, ``state_v_first``; the kernels and this host use ``(d_k, d_v)``.) In the
shared form: per-row ``g = gk``, no erase, ``b = 1``. The write ``k v^T`` is rank 1 and equals the update.
The head output goes through the per-head RMSNorm times ``swish(W_g x)`` (the output gate) and ``o_proj``;
then the gated MLP.

Layer state: windows ``(q, k, v projections before their short convs)`` when the layer has short convs, and S.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import gla as ops_gla
from ..ops import recurrence
from .base import LayerOut, LayerState
from .fla import FlaHost, fla_kernel, short_conv


class GLAHost(FlaHost):
    """A GLA model as cells (every layer, every head) of ``d_k x d_v`` states."""

    family = "gla"
    kind = "GLA"

    def __init__(self, model, tokenizer=None, name=None, kernels=None):
        super().__init__(model, tokenizer, name, kernels)
        at = self.layers[0].attn
        self.n_heads, self.d_k, self.d_v = at.num_heads, at.head_k_dim, at.head_v_dim

    def _make_chunk(self):
        """Unedited stretches: fla's chunked kernel on the fla lane, the chunked torch form otherwise (q already
        scaled)."""
        fla = fla_kernel("gla", "chunk_gla") if self.kernels == "fla" else None

        def chunk(r, S0):
            if fla is not None:
                o, S = fla(r.q, r.k, r.v, g=r.g, scale=1.0, initial_state=S0, output_final_state=True)
            else:
                o, S = ops_gla.chunk_gla(r.q, r.k, r.v, r.g, scale=1.0, initial_state=S0, output_final_state=True)
            return o.float(), S.float()

        return chunk

    def _heads(self, at, x, d):
        """(B, T, n*d) -> (B, T, H, d), each kv head repeated for its group (fla's ``(h g) d``)."""
        x = x.unflatten(-1, (-1, d))
        return x.repeat_interleave(self.n_heads // x.shape[2], dim=2) if x.shape[2] != self.n_heads else x

    def _block(self, i, hidden, ctx, state, edits, record):
        blk = self.layers[i]
        at = blk.attn
        x = blk.attn_norm(hidden)
        B, T, _ = x.shape
        q, k, v = at.q_proj(x), at.k_proj(x), at.v_proj(x)
        windows = ()
        if at.use_short_conv:
            (q, wq), (k, wk), (v, wv) = (short_conv(c, state, j, y) for j, (c, y) in
                                         enumerate(((at.q_conv1d, q), (at.k_conv1d, k), (at.v_conv1d, v))))
            windows = (wq, wk, wv)
        gk = F.logsigmoid(self._heads(at, at.gk_proj(x), self.d_k).float()) / at.gate_logit_normalizer
        if at.clamp_min is not None:
            gk = gk.clamp_min(at.clamp_min)
        q, k = self._heads(at, q, self.d_k).float(), self._heads(at, k, self.d_k).float()
        v = self._heads(at, v, self.d_v).float()
        if at.feature_map_fn is not None:
            q, k = at.feature_map_fn(q), at.feature_map_fn(k)
        rule = recurrence.Rule(q * self.d_k ** -0.5, k, v, g=gk, b=torch.ones_like(gk[..., 0]))
        S0 = state.S if state is not None and state.S is not None else x.new_zeros(B, self.n_heads, self.d_k, self.d_v)
        o, S, kept = recurrence.run(S0.float(), rule, edits=edits, record=record, chunk=self._chunk_kernel(),
                                    min_chunk=self._min_chunk(16))
        gate = at.g_proj(x).unflatten(-1, (-1, self.d_v)) if at.use_output_gate else None
        y = at.o_proj(self._norm(at, o.to(x.dtype), gate).flatten(-2).to(x.dtype))
        hidden = hidden + y
        hidden = hidden + blk.mlp(blk.mlp_norm(hidden))
        return LayerOut(hidden, LayerState(windows, S), rule, kept, (gate,) if gate is not None else (), o)

    @staticmethod
    def _norm(at, o, gate):
        """fla's output norm: per-head RMSNorm, times swish(gate) when the layer has an output gate."""
        if gate is None:
            return at.g_norm(o)
        if hasattr(at, "g_norm_swish_gate"):
            return at.g_norm_swish_gate(o, gate)
        return at.g_norm(o) * F.silu(gate)

    # ------------------------------------------------------------- the read-out
    def head_out(self, cell, o, *gate):
        """``W_O[head] (norm(o) * swish(gate))``: the norm acts per head, so the rest of the layer drops out."""
        return F.linear(self._norm(self.layers[cell[0]].attn, o, gate[0] if gate else None), self._out_weight(cell))
