"""MiniMax host (``MiniMaxForCausalLM``): lightning attention, linear attention with a fixed decay per head,
between softmax attention layers, every layer with a mixture-of-experts MLP and post-norm residuals.

transformers' ``MiniMaxLightningAttention`` (block form for a prompt, one step per token with a cache), per
head on the normed input x::

    q, k, v = act(W_qkv x)  (split per head)      S_t = exp(-s) S_{t-1} + k_t v_t^T      o_t = S_t^T q_t

with the slope ``s`` a constant per (layer, head) (ALiBi-like: ``base^(h+1)``, scaled down with depth). In the
shared form: scalar ``g = -s``, no erase, ``b = 1``, read ``q`` at scale 1; the write ``k v^T`` equals the
update. The layer output is ``out_proj(sigmoid(W_gate x) * RMSNorm(o))``, the RMSNorm over *all* heads
together (so one head's output reaches the layer through the others' too, held at the run's values), then
the decoder layer's post-norm residuals: ``n = norm(a x + b y)``, output ``a' n + b' moe(n)``.

**The direct path** (``head_out``) is therefore the whole decoder layer as a function of one head's output:
with the post-norm residual stream, the layer output is what the next layer (or the final norm) reads.

Layer state: lightning attention -> no windows, ``S`` ``(B, H, d, d)``; softmax attention -> windows
``(keys, values)`` after RoPE, each ``(B, t, H_kv, d)``.
"""
from __future__ import annotations

import torch

from ..ops import recurrence
from .attention import causal_sdpa
from .base import LayerOut, LayerState
from .recurrent import RecurrentHost, grow


class MiniMaxHost(RecurrentHost):
    """A MiniMax model as cells (lightning-attention layers, heads) of ``head_dim x head_dim`` states."""

    family = "minimax"
    kind = "lightning attention"

    def __init__(self, model, tokenizer=None, name=None):
        super().__init__(model, tokenizer, name)
        self.decoder, self.lm_head = model.model, model.lm_head
        self.config = c = model.config
        self.layers = list(self.decoder.layers)
        self.layer_types = list(c.layer_types)
        self.recurrent_layers = [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]
        if not self.recurrent_layers:
            raise ValueError(f"{self.name} has no lightning (linear_attention) layer")
        at = self.layers[self.recurrent_layers[0]].self_attn
        self.n_heads, self.d_k = at.num_attention_heads, at.head_dim
        self.d_v = self.d_k

    _chunk = staticmethod(recurrence.chunked)  # unedited stretches: the chunked torch form

    def _embed(self, input_ids):
        return self.decoder.embed_tokens(input_ids.to(self.device))

    def _context(self, hidden, start):
        B, T, _ = hidden.shape
        pos = torch.arange(start, start + T, device=hidden.device)[None].expand(B, -1)
        return start, self.decoder.rotary_emb(hidden, pos)

    def _lightning(self, i, x, state, edits, record):
        at = self.layers[i].self_attn
        B, T, _ = x.shape
        qkv = at.act_fn(at.qkv_proj(x)).reshape(B, T, self.n_heads, 3 * self.d_k).float()
        q, k, v = qkv.split(self.d_k, -1)
        g = -at.slope_rate.float().view(1, 1, -1).expand(B, T, -1)
        rule = recurrence.Rule(q, k, v, g, torch.ones_like(g))
        S0 = state.S if state is not None and state.S is not None else q.new_zeros(B, self.n_heads, self.d_k, self.d_v)
        o, S, kept = recurrence.run(S0.float(), rule, edits=edits, record=record, chunk=self._chunk,
                                    min_chunk=16 if self.device.type == "cpu" else 8)
        y = o.to(x.dtype).reshape(B, T, -1)
        gate = at.output_gate(x)
        return at.out_proj(torch.sigmoid(gate) * at.norm(y)), LayerState((), S), rule, kept, (y, gate), o

    def _attention(self, i, x, pos_emb, state, start):
        from transformers.models.minimax.modeling_minimax import apply_rotary_pos_emb

        at = self.layers[i].self_attn
        B, T, _ = x.shape
        hd = at.head_dim
        q, k, v = (p(x).view(B, T, -1, hd).transpose(1, 2) for p in (at.q_proj, at.k_proj, at.v_proj))
        q, k = apply_rotary_pos_emb(q, k, *pos_emb)
        keys, values = grow(state, 0, k.transpose(1, 2)), grow(state, 1, v.transpose(1, 2))  # (B, t, H_kv, hd)
        out = causal_sdpa(q, keys.transpose(1, 2), values.transpose(1, 2), start, at.scaling,
                          window=self.config.sliding_window)
        return at.o_proj(out), LayerState((keys, values))

    @staticmethod
    def _rest(layer, x, y, eager=False):
        """The decoder layer after its token mixer: post-norm residuals around the MoE (x: the normed input,
        y: the mixer's output; any leading shape). ``eager``: the experts' reference loop, which (unlike the
        default grouped GEMM) has a forward-mode derivative (the closed form's jvp)."""
        n = layer.post_attention_layernorm(x * layer.attn_alpha_factor + y * layer.attn_beta_factor)
        cfg = layer.mlp.experts.config
        impl = cfg._experts_implementation_internal
        cfg._experts_implementation_internal = "eager" if eager else impl
        try:
            moe = layer.mlp(n.reshape(1, -1, n.shape[-1])).reshape(n.shape)
        finally:
            cfg._experts_implementation_internal = impl
        return n * layer.mlp_alpha_factor + moe * layer.mlp_beta_factor

    def _block(self, i, hidden, ctx, state, edits, record):
        layer = self.layers[i]
        x = layer.input_layernorm(hidden)
        rule, kept, read, o = None, {}, (), None
        if i in self.recurrent_layers:
            y, new_state, rule, kept, (flat, gate), o = self._lightning(i, x, state, edits, record)
            read = (flat, gate, x)
        else:
            y, new_state = self._attention(i, x, ctx[1], state, ctx[0])
        return LayerOut(self._rest(layer, x, y), new_state, rule, kept, read, o)

    # ------------------------------------------------------------- the read-out
    def unembed(self, residual):
        return self.lm_head(self.decoder.norm(residual))

    @staticmethod
    def _read_context(read, head):
        return read  # every head's output, the output gate, the layer's normed input: (B, T, ...)

    def head_out(self, cell, o, o_all, gate, x):
        """The decoder layer's output with head ``cell.head``'s ``S^T q`` set to ``o`` (the other heads,
        the gate and the layer input at the run's values): ``rest(x, out_proj(sigmoid(gate) * norm(o_all)))``."""
        layer = self.layers[cell[0]]
        at, h, d = layer.self_attn, cell[1], self.d_v
        y = torch.cat([o_all[..., :h * d], o.to(o_all.dtype), o_all[..., (h + 1) * d:]], -1)
        return self._rest(layer, x, at.out_proj(torch.sigmoid(gate) * at.norm(y)), eager=True)

    def head_unembed(self, cell):
        W_O = self.layers[cell[0]].self_attn.out_proj.weight[:, cell[1] * self.d_v:(cell[1] + 1) * self.d_v]
        return self.lm_head.weight.float() @ W_O.float()
