"""Kimi Linear host (``KimiLinearForCausalLM``): Kimi Delta Attention, the gated delta rule with a decay per
key row, between latent (MLA, NoPE) attention layers.

transformers' ``KimiLinearDeltaAttention`` (``chunk_kimi_delta_attention`` / ``recurrent_kimi_delta_attention``:
decay first, then the delta update, q and k L2-normed in the kernel), per head::

    S_t = (I - b_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + b_t k_t v_t^T,   o_t = S_t^T (d^-1/2 q_t)

with ``q, k, v`` from ``q_proj / k_proj / v_proj`` through one short conv (the config's activation),
``g = -exp(A_log) softplus(f_b(f_a x) + dt_bias)`` a vector per key row (``forget_gate``), ``b =
sigmoid(b_proj x)``, the output gate ``g_b(g_a x)`` into the sigmoid-gated RMSNorm ``o_norm`` and ``o_proj``.
In the shared form (the same as :mod:`writesae.hosts.gated_deltanet`'s, with a per-row g): ``e = -b k``,
``f = exp(g) * k`` (``k^T (D * S) = (D * k)^T S``), write ``b k v^T`` (rank 1). d_k = d_v = head_dim, heads
ungrouped. The head output passes the gated RMSNorm per head, so ``head_out`` is exact.

Layer state: Kimi Delta Attention -> windows ``(conv inputs (B, t, 3 H d),)`` and ``S`` ``(B, H, d, d)``;
latent attention -> windows ``(normed kv latents (B, t, kv_lora_rank), shared rope keys (B, t, rope_dim))``
(what transformers caches), expanded to keys and values at each call.
"""
from __future__ import annotations

import torch

from .attention import causal_sdpa
from .base import LayerOut, LayerState
from .gated_deltanet import GatedDeltaNetHost
from .recurrent import RecurrentHost, grow


class KimiLinearHost(GatedDeltaNetHost):
    """A Kimi Linear model as cells (Kimi Delta Attention layers, heads) of ``head_dim x head_dim`` states."""

    family = "kimi_linear"
    kind = "Kimi Delta Attention"
    _chunk_fn = "chunk_kimi_delta_attention"
    _fla_chunk = ("kda", "chunk_kda")

    def __init__(self, model, tokenizer=None, name=None, kernels=None):
        RecurrentHost.__init__(self, model, tokenizer, name)
        self.decoder, self.lm_head = model.model, model.lm_head
        self.config = c = model.config
        self.layers = list(self.decoder.layers)
        self.layer_types = list(c.layer_types)
        self.recurrent_layers = [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]
        if not self.recurrent_layers:
            raise ValueError(f"{self.name} has no Kimi Delta Attention (linear_attention) layer")
        self.n_heads = self.n_k_heads = c.linear_num_heads
        self.d_k = self.d_v = c.linear_head_dim
        self._chunk, self.kernels = None, kernels  # the kernel lane: fla's chunk_kda or transformers' torch chunk

    def _mixer(self, i):
        return self.layers[i].self_attn

    def _norm_out(self, attn):
        return attn.o_norm, attn.o_proj

    def _project(self, attn, x):
        B, T, _ = x.shape
        mixed = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
        z = attn.g_b_proj(attn.g_a_proj(x)).view(B, T, -1, self.d_v)
        return mixed, z, attn.b_proj(x).float().sigmoid(), attn.forget_gate(x).float()

    def _context(self, hidden, start):
        return start  # NoPE: the latent attention has no positional term

    def _attention(self, i, x, state, start):
        """Multi-head latent attention over the cached (normed) latents, expanded per call."""
        at = self.layers[i].self_attn
        B, T, _ = x.shape
        q = at.q_proj(x) if at.q_lora_rank is None else at.q_b_proj(at.q_a_layernorm(at.q_a_proj(x)))
        q = q.view(B, T, -1, at.qk_head_dim).transpose(1, 2)
        kv, k_rot = torch.split(at.kv_a_proj_with_mqa(x), [at.kv_lora_rank, at.qk_rope_head_dim], -1)
        latents, rot = grow(state, 0, at.kv_a_layernorm(kv)), grow(state, 1, k_rot)  # (B, t, ...)
        k, v = at.expand_kv(latents[:, None], rot[:, None])  # (B, H, t, d)
        return at.o_proj(causal_sdpa(q, k, v, start, at.scaling)), LayerState((latents, rot))

    def _block(self, i, hidden, ctx, state, edits, record):
        layer = self.layers[i]
        x = layer.input_layernorm(hidden)
        rule, kept, read, o = None, {}, (), None
        if i in self.recurrent_layers:
            x, new_state, rule, kept, z, o = self._gdn(i, x, state, edits, record)
            read = (z,)
        else:
            x, new_state = self._attention(i, x, state, ctx)
        hidden = hidden + x
        return LayerOut(hidden + layer.mlp(layer.post_attention_layernorm(hidden)), new_state, rule, kept, read, o)
