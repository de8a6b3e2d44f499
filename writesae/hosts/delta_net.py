"""DeltaNet host: flash-linear-attention's ``DeltaNetForCausalLM`` (the pure-torch mirror in
:mod:`writesae.models.delta_net`, which ``load_host`` builds on every device, or fla's own class passed in;
both have the same module tree, which is all this host reads).

fla's layer (``fla/layers/delta_net.py``), per head, on the normed input x::

    q, k = l2norm(act(conv(W_q x))), l2norm(act(conv(W_k x)))     v = silu(conv(W_v x))     b = sigmoid(W_b x)
    S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T              o_t = S_t^T (d_k^-1/2 q_t)

(``act`` is the conv's own silu, or relu / elu+1 / identity after it; ``b = 1`` without ``use_beta``,
doubled with ``allow_neg_eigval``). In the shared form: ``g = 0``, erase ``e = -b k``, ``f = k``. The write is
``b k v^T`` (rank 1), the update ``b k (v - S^T k)^T`` (rank 1). The head output goes through the per-head
RMSNorm (``RMSNorm(o) * silu(W_g x)`` with ``use_gate``) and ``o_proj``; then the gated MLP.

Layer state: windows ``(q, k, v projections before their short convs)`` each ``(B, t, C)``, and ``S``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import delta_net as ops_delta_net
from ..ops import recurrence
from .base import LayerOut, LayerState
from .fla import FlaHost, fla_kernel, short_conv


class DeltaNetHost(FlaHost):
    """A DeltaNet model as cells (every layer, every head) of ``d_k x d_v`` states."""

    family = "delta_net"
    kind = "DeltaNet"

    def __init__(self, model, tokenizer=None, name=None, kernels=None):
        super().__init__(model, tokenizer, name, kernels)
        at = self.layers[0].attn
        self.n_heads, self.d_k, self.d_v = at.num_heads, at.head_k_dim, at.head_v_dim

    def _make_chunk(self):
        """Unedited stretches: fla's chunked kernel on the fla lane, the chunked torch form otherwise (q already
        scaled). fla's ``chunk_delta_rule`` takes q, k, v, b only in half precision (it asserts on float32):
        they go in the model's dtype, bf16 or fp16, the state stays float32; a float32 model keeps the torch
        form on either lane."""
        fla = fla_kernel("delta_rule", "chunk_delta_rule") if self.kernels == "fla" else None

        def chunk(r, S0):
            dtype = self.layers[0].attn.q_proj.weight.dtype
            if fla is not None and dtype in (torch.bfloat16, torch.float16):
                q, k, v, b = (t.to(dtype) for t in (r.q, r.k, r.v, r.b))
                o, S = fla(q, k, v, b, scale=1.0, initial_state=S0, output_final_state=True)
            else:
                o, S = ops_delta_net.delta_rule_chunked(r.q, r.k, r.v, r.b, scale=1.0, initial_state=S0)
            return o.float(), S.float()

        return chunk

    def _rule(self, at, x, state):
        B, T, _ = x.shape
        q, k, v = at.q_proj(x), at.k_proj(x), at.v_proj(x)
        if at.use_short_conv:
            (q, wq), (k, wk), (v, wv) = (short_conv(c, state, i, y) for i, (c, y) in
                                         enumerate(((at.q_conv1d, q), (at.k_conv1d, k), (at.v_conv1d, v))))
            windows = (wq, wk, wv)
        else:
            if at.qk_activation == "silu":
                q, k = F.silu(q), F.silu(k)
            v, windows = F.silu(v), ()
        H = self.n_heads
        q, k, v = q.view(B, T, H, -1).float(), k.view(B, T, H, -1).float(), v.view(B, T, H, -1).float()
        if at.qk_activation == "relu":
            q, k = q.relu(), k.relu()
        elif at.qk_activation == "elu":
            q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
        if at.qk_norm == "l2":
            q, k = ops_delta_net.l2norm(q), ops_delta_net.l2norm(k)
        else:
            q, k = F.normalize(q, p=1, dim=-1, eps=1e-6), F.normalize(k, p=1, dim=-1, eps=1e-6)
        b = at.b_proj(x).float().sigmoid() if at.use_beta else torch.ones_like(q[..., 0])
        if at.allow_neg_eigval:
            b = b * 2.0
        q = q * self.d_k ** -0.5
        rule = recurrence.Rule(q, k, v, g=torch.zeros_like(b), b=b, e=-b[..., None] * k, f=k)
        return rule, windows

    def _block(self, i, hidden, ctx, state, edits, record):
        blk = self.layers[i]
        at = blk.attn
        x = blk.attn_norm(hidden)
        B, T, _ = x.shape
        rule, windows = self._rule(at, x, state)
        S0 = state.S if state is not None and state.S is not None else x.new_zeros(B, self.n_heads, self.d_k, self.d_v)
        o, S, kept = recurrence.run(S0.float(), rule, edits=edits, record=record, chunk=self._chunk_kernel(),
                                    min_chunk=self._min_chunk(32))
        gate = at.g_proj(x).view(B, T, self.n_heads, self.d_v) if at.use_gate else None
        y = at.o_proj(self._norm(at, o.to(x.dtype), gate).flatten(2))
        hidden = hidden + y  # fla's fused norm adds the residual itself; torch's nn.RMSNorm (fuse_norm=False) not
        read = (gate,) if gate is not None else ()
        return LayerOut(hidden + blk.mlp(blk.mlp_norm(hidden)), LayerState(windows, S), rule, kept, read, o)

    @staticmethod
    def _norm(at, o, gate):
        return at.o_norm(o, gate) if gate is not None else at.o_norm(o)

    # ------------------------------------------------------------- the read-out
    def head_out(self, cell, o, *gate):
        """``W_O[head] norm(o)`` (gated by ``silu(W_g x)`` with ``use_gate``): the norm acts per head."""
        at = self.layers[cell[0]].attn
        return F.linear(self._norm(at, o, gate[0] if gate else None), self._out_weight(cell))
