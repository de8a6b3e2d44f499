"""OLMo-Hybrid host (``OlmoHybridForCausalLM``): Gated DeltaNet layers under other names, between post-norm
attention layers.

transformers' ``OlmoHybridGatedDeltaNet`` runs the rule of :mod:`writesae.hosts.gated_deltanet` (the same
``torch_chunk_gated_delta_rule``: decay first, then the delta update, q and k L2-normed in the kernel)::

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,   o_t = S_t^T q_t

with separate ``q_proj / k_proj / v_proj`` into the short conv, ``b = sigmoid(b_proj x)`` doubled when
``linear_allow_neg_eigval`` (``b`` in (0, 2): the erase may flip a direction), ``g = -exp(A_log)
softplus(a_proj x + dt_bias)``, the output gate ``g_proj x`` into the gated RMSNorm ``o_norm`` and ``o_proj``.
In the shared form: scalar g, ``e = -b k``, ``f = exp(g) k``, write ``b k v^T``.

The layers differ from Qwen3.5's: a linear-attention layer is pre-norm (``input_layernorm``, then
``post_attention_layernorm`` before the MLP); an attention layer is post-norm (``h + norm(attn(h))``, then
``h + norm(mlp(h))``) with a q/k RMSNorm over all heads, no output gate, and RoPE only when the config has a
``rope_theta`` (the released checkpoints have none: NoPE).

Layer state: as in :mod:`writesae.hosts.gated_deltanet` (conv inputs and S; attention keys and values).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import causal_sdpa
from .base import LayerOut, LayerState
from .gated_deltanet import GatedDeltaNetHost
from .recurrent import grow


class OlmoHybridHost(GatedDeltaNetHost):
    """An OLMo-Hybrid model as cells (Gated DeltaNet layers, value heads) of ``d_k x d_v`` states."""

    family = "olmo_hybrid"
    kind = "Gated DeltaNet (OLMo-Hybrid)"

    def _norm_out(self, attn):
        return attn.o_norm, attn.o_proj

    def _project(self, attn, x):
        B, T, _ = x.shape
        mixed = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
        b = attn.b_proj(x).float().sigmoid() * (2.0 if attn.allow_neg_eigval else 1.0)
        g = -attn.A_log.float().exp() * F.softplus(attn.a_proj(x).float() + attn.dt_bias.float())
        return mixed, attn.g_proj(x).reshape(B, T, -1, self.d_v), b, g

    def _context(self, hidden, start):
        B, T, _ = hidden.shape
        rotary = self.decoder.rotary_emb
        pos = torch.arange(start, start + T, device=hidden.device)[None].expand(B, -1)
        return start, None if rotary is None else rotary(hidden, pos)

    def _attention(self, i, x, pos_emb, state, start):
        """Full attention (q/k RMSNorm over all heads, GQA, RoPE when the model has it) with explicit past
        keys/values."""
        from transformers.models.olmo_hybrid.modeling_olmo_hybrid import apply_rotary_pos_emb

        at = self.layers[i].self_attn
        B, T, _ = x.shape
        hd = at.head_dim
        q = at.q_norm(at.q_proj(x)).view(B, T, -1, hd).transpose(1, 2)
        k = at.k_norm(at.k_proj(x)).view(B, T, -1, hd).transpose(1, 2)
        v = at.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        if pos_emb is not None:
            q, k = apply_rotary_pos_emb(q, k, *pos_emb)
        keys, values = grow(state, 0, k.transpose(1, 2)), grow(state, 1, v.transpose(1, 2))  # (B, t, H_kv, hd)
        out = causal_sdpa(q, keys.transpose(1, 2), values.transpose(1, 2), start, at.scaling)
        return at.o_proj(out), LayerState((keys, values))

    def _block(self, i, hidden, ctx, state, edits, record):
        layer = self.layers[i]
        if i in self.recurrent_layers:  # pre-norm
            x, new_state, rule, kept, z, o = self._gdn(i, layer.input_layernorm(hidden), state, edits, record)
            hidden = hidden + x
            return LayerOut(hidden + layer.mlp(layer.post_attention_layernorm(hidden)), new_state, rule, kept, (z,), o)
        x, new_state = self._attention(i, hidden, ctx[1], state, ctx[0])  # post-norm
        hidden = hidden + layer.post_attention_layernorm(x)
        return LayerOut(hidden + layer.post_feedforward_layernorm(layer.mlp(hidden)), new_state)
