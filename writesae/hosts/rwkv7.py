"""RWKV-7 host: flash-linear-attention's ``RWKV7ForCausalLM`` (the pure-torch mirror in
:mod:`writesae.models.rwkv7`, which ``load_host`` builds on every device, or fla's own class passed in; both
have the same module tree, which is all this host reads).

fla's time mixing (``fla/layers/rwkv7.py``), per head, on the normed input x with token shift
``x~ = x + (x_{t-1} - x_t) * mu``::

    r = W_r x~_r    w = -e^{-1/2} sigmoid(lora_w(x~_w))   k = W_k x~_k   v = W_v x~_v (lerp to v_first, layers > 0)
    a = sigmoid(lora_a(x~_a))   kk = l2norm(k * k_k)   k <- k (1 + (a - 1) k_a)   g = lora_g(x~_g)
    S_t = diag(exp(w_t)) S_{t-1} - (kk_t * a_t) (kk_t^T S_{t-1}) + k_t v_t^T          o_t = S_t^T r_t

(fla keeps S as ``[K, V]`` too). In the shared form: per-row log-decay ``g = w``, erase ``e = -(kk * a)``,
``f = kk``, write key ``k`` (not kk), ``b = 1``, read ``q = r`` at scale 1. **The write** is the additive
``k_t v_t^T`` (rank 1); **the update** ``S_t - D_t S_{t-1} = k v^T - (kk a)(kk^T S_{t-1})`` is rank 2 (the
paper's "rank-2"). The head output goes through the per-head GroupNorm ``g_norm``, gets the bonus
``(r . (k * r_k)) v``, is multiplied by the gate g and projected by ``o_proj``; then the channel-mixing FFN.

The stream between layers carries ``v_first`` (layer 0's values, mixed into every later layer's v) next to
the residual: ``stream = [residual (hidden), v_first (value_dim)]``; before layer 0 the second part is 0.
Layer state: windows ``(attention token-shift input, FFN token-shift input)``, each ``(B, t, hidden)``, and S.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import recurrence
from ..ops import rwkv7 as ops_rwkv7
from .base import LayerOut, LayerState
from .fla import FlaHost, fla_kernel
from .recurrent import grow, tail

LOG_DECAY_BOUND = 0.6065306597126334  # e^{-1/2}: w = -e^{-1/2} sigmoid(.)


def token_shift(state, i, x):
    """``x_{t-1} - x_t`` continuing window ``i`` of ``state`` (zeros before position 0), and the new window."""
    prev = tail(state.windows[i], 1).to(x) if state else x.new_zeros(x.shape[0], 1, x.shape[-1])
    return torch.cat([prev, x[:, :-1]], 1) - x, grow(state, i, x)


class RWKV7Host(FlaHost):
    """An RWKV-7 model as cells (every layer, every head) of ``head_dim x head_dim`` states."""

    family = "rwkv7"
    kind = "RWKV-7"

    def __init__(self, model, tokenizer=None, name=None, kernels=None):
        super().__init__(model, tokenizer, name, kernels)
        at = self.layers[0].attn
        self.n_heads, self.d_k = at.num_heads, at.head_dim
        self.d_v = at.value_dim // at.num_heads
        self.hidden = self.config.hidden_size

    def _make_chunk(self):
        """Unedited stretches: fla's DPLR kernel on the fla lane, the chunked torch form otherwise."""
        fla = fla_kernel("generalized_delta_rule", "chunk_dplr_delta_rule") if self.kernels == "fla" else None

        def chunk(r, S0):
            if fla is not None:  # S_t = diag(exp(gk)) S + b (a^T S) + k v^T with a = f, b = e
                o, S = fla(q=r.q, k=r.k, v=r.v, a=r.f, b=r.e, gk=r.g, scale=1.0, initial_state=S0,
                           output_final_state=True)
            else:
                o, S = ops_rwkv7.chunked_dplr(r.q, r.g, r.k, r.v, r.e, r.f, initial_state=S0)
            return o.float(), S.float()

        return chunk

    def _embed(self, input_ids):
        x = super()._embed(input_ids)
        return torch.cat([x, x.new_zeros(*x.shape[:2], self.n_heads * self.d_v)], -1)

    def _residual(self, stream):
        return stream[..., :self.hidden]

    def _block(self, i, stream, ctx, state, edits, record):
        blk = self.layers[i]
        at = blk.attn
        x, v_first = stream[..., :self.hidden], stream[..., self.hidden:]
        residual = blk.pre_norm(x) if hasattr(blk, "pre_norm") else x
        h = blk.attn_norm(residual)
        B, T, _ = h.shape
        delta, w_attn = token_shift(state, 0, h)
        xr, xw, xk, xv, xa, xg = (h.addcmul(delta, mu) for mu in (at.x_r, at.x_w, at.x_k, at.x_v, at.x_a, at.x_g))
        r = at.r_proj(xr)
        w = -LOG_DECAY_BOUND * at.w_lora(xw).sigmoid()
        k = at.k_proj(xk)
        v = at.v_proj(xv)
        if i == 0:
            v_first = v
        else:
            v = torch.lerp(v, v_first, at.v_lora(xv).sigmoid())
        a = at.a_lora(xa).sigmoid()
        g = at.g_lora(xg)
        H = self.n_heads
        heads = lambda t: t.view(B, T, H, -1).float()  # noqa: E731
        kk = heads(k * at.k_k)  # fla's l2norm: Triton's (eps 1e-6 inside the root) when fuse_norm, else torch's
        kk = kk * torch.rsqrt(kk.square().sum(-1, keepdim=True) + 1e-6) if at.fuse_norm else F.normalize(kk, dim=-1)
        k = k.addcmul(k * (a - 1), at.k_a)
        r, w, k, a, v = map(heads, (r, w, k, a, v))
        rule = recurrence.Rule(q=r, k=k, v=v, g=w, b=torch.ones_like(w[..., 0]), e=-(kk * a), f=kk)
        S0 = state.S if state is not None and state.S is not None else h.new_zeros(B, H, self.d_k, self.d_v)
        o, S, kept = recurrence.run(S0.float(), rule, edits=edits, record=record, chunk=self._chunk_kernel(),
                                    min_chunk=self._min_chunk(16))
        bonus = (r * k * at.r_k.float()).sum(-1, keepdim=True) * v
        gate = g.view(B, T, H, -1)
        y = at.o_proj(((self._group_norm(at, o.to(h.dtype)) + bonus) * gate).reshape(B, T, -1).to(h.dtype))
        residual = residual + y
        f = blk.ffn_norm(residual)
        dff, w_ffn = token_shift(state, 1, f)
        ffn = blk.ffn
        residual = residual + ffn.value(F.relu(ffn.key(f.addcmul(dff, ffn.x_k))).square())
        return LayerOut(torch.cat([residual, v_first.to(residual)], -1), LayerState((w_attn, w_ffn), S), rule,
                        kept, (bonus, gate), o)

    @staticmethod
    def _group_norm(at, o):
        """fla's ``g_norm`` (GroupNorm, one group per head) on head outputs o (..., H, d_v)."""
        shape = o.shape
        return at.g_norm(o.reshape(-1, shape[-2] * shape[-1])).view(shape)

    # ------------------------------------------------------------- the read-out
    def head_out(self, cell, o, bonus, gate):
        """``W_O[head] ((groupnorm(o) + bonus) * gate)``: the group norm acts per head, so the rest of the
        layer drops out."""
        at = self.layers[cell[0]].attn
        gn, h = at.g_norm, cell[1]
        normed = F.group_norm(o.reshape(-1, 1, self.d_v), 1, eps=gn.eps).view(o.shape) * gn.weight.view(self.n_heads, -1)[h]
        if gn.bias is not None:
            normed = normed + gn.bias.view(self.n_heads, -1)[h]
        return F.linear((normed + bonus) * gate, self._out_weight(cell))
