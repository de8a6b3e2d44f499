"""Mamba-1 hosts: ``MambaForCausalLM`` and ``FalconMambaForCausalLM`` (every layer a Mamba block) and
``JambaForCausalLM`` (Mamba layers between attention layers, MoE feed-forwards): the selective scan seen in the
write layout of the other hosts.

transformers' mixer (``mamba_selective_scan``, one step per token on a CPU), per channel c of the
``d_inner`` channels and state entry n of ``d_state``, on the conv output ``x`` (conv + activation)::

    dt, B, C = softplus(dt_proj(.)), ., .   from x_proj(x)   (Falcon-Mamba, Jamba: RMS-normed dt, B, C first)
    h_t[c, n] = exp(dt_t[c] A[c, n]) h_{t-1}[c, n] + dt_t[c] B_t[n] x_t[c]        y_t[c] = h_t[c] . C_t + D[c] x_t[c]

then ``out_proj(y * silu(z))``. Every channel shares ``B`` and ``C``, so the ``d_state x d_inner`` matrix
``S = h^T`` is written by a rank-1 ``B (dt * x)^T`` every token and read by ``S^T C``. Channels never mix in the
recurrence, so any block of channels is a state of its own: this host cuts ``d_inner`` into *heads* of
``head_dim`` = 64 channels (the head width of Mamba-2; fewer, ``gcd(d_inner, 64)``, when ``d_inner`` is not a
multiple of 64), each a cell with a ``d_state x 64`` state. In the shared form (:mod:`writesae.ops.recurrence`):
**an elementwise decay** ``g[n, c] = dt[c] A[c, n]`` (``A`` differs per entry of the state), no erase, write key
``k = B``, value ``v = dt * x`` (the step size is per channel, so it goes with the value), ``b = 1``, read
``q = C``. The write equals the update. The head output ``S^T C`` gets the skip ``D x``, the gate ``silu(z)``
and its ``head_dim`` columns of ``out_proj``: no norm across heads, so ``head_out`` is exact per head.

Unedited stretches run as :func:`writesae.ops.recurrence.scan` (the library's own CPU form: a sequential scan
with everything but the time loop vectorised; a chunked form would cost ``C^2`` per entry and chunk).

Layer state: Mamba -> windows ``(conv inputs x (B, t, d_inner),)`` and ``S`` ``(B, H, d_state, head_dim)``;
Jamba attention -> windows ``(keys, values)`` (no positional encoding).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops import recurrence
from .attention import causal_sdpa
from .base import LayerOut, LayerState
from .recurrent import RecurrentHost, grow, tail

HEAD_DIM = 64  # channels per cell


class MambaHost(RecurrentHost):
    """A Mamba / Falcon-Mamba model as cells (every layer, every block of ``head_dim`` channels) of
    ``d_state x head_dim`` states."""

    family = "mamba"
    kind = "Mamba-1"

    def __init__(self, model, tokenizer=None, name=None):
        super().__init__(model, tokenizer, name)
        self.config = model.config
        self._layout(model)
        m = self._mixer(self.recurrent_layers[0])
        self.d_inner, self.d_k = m.intermediate_size, m.ssm_state_size
        self.d_v = math.gcd(self.d_inner, HEAD_DIM)
        self.n_heads = self.d_inner // self.d_v

    def _layout(self, model):
        self.backbone, self.lm_head = model.backbone, model.lm_head
        self.layers = list(self.backbone.layers)
        self.layer_types = ["mamba"] * len(self.layers)
        self.recurrent_layers = list(range(len(self.layers)))

    def _mixer(self, i):
        return self.layers[i].mixer

    def _embed(self, input_ids):
        return self.backbone.embeddings(input_ids.to(self.device))

    def unembed(self, residual):
        return self.lm_head(self.backbone.norm_f(residual))

    def _block(self, i, hidden, ctx, state, edits, record):
        blk = self.layers[i]
        residual = hidden.float() if blk.residual_in_fp32 else hidden
        y, *rest = self._mamba(i, blk.norm(hidden.to(blk.norm.weight.dtype)), state, edits, record)
        return LayerOut((residual + y).to(hidden.dtype), *rest)

    def _mamba(self, i, x, state, edits, record):
        """The Mamba-1 mixer of layer i on its normed input x (B, T, hidden): (output, state, rule, kept, read, o)."""
        m = self._mixer(i)
        Bt, T, _ = x.shape
        H, P, N = self.n_heads, self.d_v, self.d_k
        xs, gate = m.in_proj(x).chunk(2, -1)
        K = m.conv_kernel_size
        xc = torch.cat([tail(state.windows[0], K - 1).to(xs) if state else xs.new_zeros(Bt, K - 1, xs.shape[-1]), xs], 1)
        xc = m.act(F.conv1d(xc.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, groups=self.d_inner)).transpose(1, 2)
        ts, Bs, Cs = m.x_proj(xc).split([m.time_step_rank, N, N], -1)
        if hasattr(m, "b_layernorm"):  # Falcon-Mamba, Jamba
            ts, Bs, Cs = m.dt_layernorm(ts), m.b_layernorm(Bs), m.c_layernorm(Cs)
        dt = F.softplus((ts @ m.dt_proj.weight.T).float() + m.dt_proj.bias.float())  # (B, T, d_inner)
        A = -torch.exp(m.A_log.float()).view(H, P, N).transpose(1, 2)  # (H, N, P)
        xf = xc.float()
        g = dt.view(Bt, T, H, 1, P) * A  # log-decay per state entry (B, T, H, N, P)
        q, k = (c.float()[:, :, None].expand(Bt, T, H, N) for c in (Cs, Bs))
        v = (dt * xf).view(Bt, T, H, P)
        rule = recurrence.Rule(q, k, v, g, torch.ones_like(g[..., 0, 0]))
        S0 = state.S if state is not None and state.S is not None else xf.new_zeros(Bt, H, N, P)
        o, S, kept = recurrence.run(S0.float(), rule, edits=edits, record=record, chunk=recurrence.scan, min_chunk=2)
        skip = (xf * m.D.float()).view(Bt, T, H, P)
        gate = gate.view(Bt, T, H, P)
        y = ((o + skip) * F.silu(gate.float())).reshape(Bt, T, -1)
        return m.out_proj(y.to(x.dtype)), LayerState((grow(state, 0, xs),), S), rule, kept, (gate, skip), o

    # ------------------------------------------------------------- the read-out
    def _out_weight(self, cell):
        return self._mixer(cell[0]).out_proj.weight[:, cell[1] * self.d_v:(cell[1] + 1) * self.d_v]

    def head_out(self, cell, o, gate, skip):
        """``W_O[head] ((o + D x) * silu(z))``: channels never mix before ``out_proj``."""
        y = (o + skip) * F.silu(gate.to(o.dtype))
        return F.linear(y.to(self._out_weight(cell).dtype), self._out_weight(cell))

    def head_unembed(self, cell):
        return self.lm_head.weight.float() @ self._out_weight(cell).float()


class JambaHost(MambaHost):
    """A Jamba model: cells on its Mamba layers; attention layers (no positional encoding, GQA) in between,
    each layer followed by an MLP or a mixture of experts."""

    family = "jamba"

    def _layout(self, model):
        self.decoder, self.lm_head = model.model, model.lm_head
        self.layers = list(self.decoder.layers)
        self.layer_types = list(self.config.layers_block_type)
        self.recurrent_layers = [i for i, t in enumerate(self.layer_types) if t == "mamba"]
        if not self.recurrent_layers:
            raise ValueError(f"{self.name} has no Mamba layer: layer types are {sorted(set(self.layer_types))}")

    def _mixer(self, i):
        return self.layers[i].mamba

    def _embed(self, input_ids):
        return self.decoder.embed_tokens(input_ids.to(self.device))

    def unembed(self, residual):
        return self.lm_head(self.decoder.final_layernorm(residual))

    def _context(self, hidden, start):
        return start

    def _attention(self, i, x, state, start):
        at = self.layers[i].self_attn
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, at.head_dim).transpose(1, 2) for p in (at.q_proj, at.k_proj, at.v_proj))
        keys, values = grow(state, 0, k.transpose(1, 2)), grow(state, 1, v.transpose(1, 2))  # (B, t, H_kv, hd)
        out = causal_sdpa(q, keys.transpose(1, 2), values.transpose(1, 2), start, at.scaling)
        return at.o_proj(out), LayerState((keys, values))

    def _block(self, i, hidden, ctx, state, edits, record):
        layer = self.layers[i]
        x = layer.input_layernorm(hidden)
        rest = ()
        if i in self.recurrent_layers:
            y, new_state, *rest = self._mamba(i, x, state, edits, record)
        else:
            y, new_state = self._attention(i, x, state, ctx)
        hidden = hidden + y
        return LayerOut(hidden + layer.feed_forward(layer.pre_ff_layernorm(hidden)), new_state, *rest)
