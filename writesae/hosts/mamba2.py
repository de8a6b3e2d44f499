"""Mamba-2 host: ``Mamba2ForCausalLM`` and the hybrids whose recurrent layers are the same Mamba-2 mixer under
other names (NemotronH, Granite-4.0-H, Bamba, Falcon-H1, Zamba2), seen in the write layout of the other hosts.

Per head, transformers keeps ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T`` of shape
``(head_dim, d_state)`` and reads ``y_t = h_t C_t + D x_t``. With ``S = h^T`` (``d_k = d_state``,
``d_v = head_dim``) this is the shared rule of :mod:`writesae.ops.recurrence` with a scalar
``g = dt A``, no erase, ``k = B``, ``v = x``, ``b = dt`` and read ``q = C``: the write
``dt B x^T`` is exactly rank-1 and equals the update. (The paper's "diagonal" atom ``a_i v_i`` is the
same object seen per state row.) B and C are shared by the heads of a group. The head output ``S^T C`` gets
the skip ``D x``, then the gated RMSNorm (over groups of heads, so heads of a group interact) and ``out_proj``.
Every model type's mixer is this rule: the same module attributes, and the same functions in each modeling
file. The only module that knows these models' internals.

Unedited stretches run transformers' own chunked (SSD) form, ``mamba2_chunk_scan`` (on CUDA, mamba_ssm's
``mamba_chunk_scan_combined`` kernel where it is installed; its torch reference otherwise), from the carried
state; the edited and recorded steps run step by step (:func:`writesae.ops.recurrence.run`). Both give the
same states and outputs to float32 round-off (``tests/test_mamba2_hosts.py``).

``dt`` is clamped to the config's ``time_step_limit`` at every step, as transformers' chunked forward does; its
cached one-token decode (``mamba2_selective_state_update``) skips that clamp, so where the clamp binds (Zamba2's
lower limit ``time_step_min``; any config with an upper limit) the library's ``generate`` departs from its own
forward and from this host. The default ``(0, inf)`` never binds.

What differs between the types is around the mixer (one small subclass each: the layer layout and scalings):

================  =====================================================================================
model_type        layers (``x`` = the layer's normed input, ``h`` the residual stream)
================  =====================================================================================
mamba2            every layer ``h + mixer(norm(h))``
nemotron_h        ``h + mixer(norm(h))``, the mixer by ``layers_block_type``: Mamba-2, attention (no
                  rotary), MoE or MLP
bamba             Mamba-2 or attention, then ``h + feed_forward(pre_ff_layernorm(h))``
granitemoehybrid  as Bamba, every branch times ``residual_multiplier``; MoE + shared MLP; embeddings times
                  ``embedding_multiplier``, logits divided by ``logits_scaling``
falcon_h1         Mamba-2 and attention in parallel in every layer, ``ssm_out_multiplier`` and
                  ``attention_in/out_multiplier``; the mixer's input times ``ssm_in_multiplier``, its
                  projection times the muP vector; optional gated norm; logits times ``lm_head_multiplier``
zamba2            every layer Mamba-2 on ``norm(h + t)``, ``t`` = a shared attention block (weights tied
                  across layers, per-layer adapters) on ``[h, embeddings]`` in the hybrid layers
================  =====================================================================================

Layers without a Mamba-2 mixer run the library's own layer module; its attention reads and extends this
host's windows through a one-call cache (:class:`_KV`) under an explicit causal mask, so that a run can start
at any position. The library's attention implementation must take such a mask (``eager`` or ``sdpa``).

Layer state: a Mamba-2 layer: windows ``(conv inputs xBC (B, t, C),)`` (and its attention's keys and values,
each ``(B, t, H_kv, hd)``, in Falcon-H1 and Zamba2's hybrid layers) and ``S`` ``(B, H, d_state, head_dim)``;
an attention layer: windows ``(keys, values)``; an MLP or MoE layer: nothing.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from transformers.models.mamba2 import modeling_mamba2

from ..ops import recurrence
from .base import LayerOut, LayerState
from .gated_deltanet import use_torch_path
from .recurrent import RecurrentHost, grow, tail

# SSD chunk length on CPU: at the 370M sizes (32 heads, 64 x 128 states) 64 and 128 take 0.31 s per 1,024
# tokens and layer, the library's 256 0.56 s; stepwise 1.95 s (already slower for a stretch of 8 tokens)
CPU_CHUNK = 64


class _KV:
    """The cache a library attention module sees for one call: the layer's keys and values so far (windows
    ``j``, ``j + 1`` of its :class:`LayerState`) followed by the new ones, kept as the new windows."""

    def __init__(self, state, j=0):
        self.state, self.j, self.windows = state, j, ()

    def update(self, k, v, *args, **kwargs):  # (B, H_kv, T, hd), post-rotary, as transformers' caches get them
        k, v = grow(self.state, self.j, k.transpose(1, 2)), grow(self.state, self.j + 1, v.transpose(1, 2))
        self.windows = (k, v)
        return k.transpose(1, 2), v.transpose(1, 2)


class Context(NamedTuple):
    """Per call: the first position, the rotary tables (or None) and the additive causal mask (1, 1, T, start + T)."""

    start: int
    rope: tuple | None
    mask: torch.Tensor


class Mamba2Host(RecurrentHost):
    """A Mamba-2 model (or hybrid) as cells (every Mamba-2 layer, every head) of ``d_state x head_dim`` states."""

    family = "mamba2"
    kind = "Mamba-2"
    final_norm = "norm_f"  # the decoder's final norm
    embed_scale = out_scale = 1.0  # embeddings' multiplier; the mixer output's, into the residual stream
    attends = False  # whether some layer has attention (and needs the causal mask)

    def __init__(self, model, tokenizer=None, name=None):
        super().__init__(model, tokenizer, name)
        self.decoder, self.lm_head = getattr(model, model.base_model_prefix), model.lm_head
        self.config = model.config
        self.layers = list(self.decoder.layers)
        self.layer_types = list(self.config.layer_types)
        self.recurrent_layers = [i for i in range(len(self.layers)) if self.mixer(i) is not None]
        if not self.recurrent_layers:
            raise ValueError(f"{self.name} has no Mamba-2 layer: layer types are {sorted(set(self.layer_types))}")
        impl = self.config._attn_implementation
        if self.attends and impl not in ("eager", "sdpa"):
            raise ValueError(f"attention implementation {impl!r} takes no explicit mask: load the model with "
                             "attn_implementation='sdpa' (or 'eager')")
        m = self.mixer(self.recurrent_layers[0])
        self.n_heads, self.d_k, self.d_v = m.num_heads, m.ssm_state_size, m.head_dim
        if self.device.type != "cuda":
            use_torch_path(model)
        self._scan = modeling_mamba2.mamba2_chunk_scan  # bound once: tests patch the library's for its own forward
        self.chunked = True  # False: every step in Python (the reference the chunked form is checked against)

    # ------------------------------------------------------------- what a model type supplies
    def mixer(self, i):
        """Layer i's Mamba-2 mixer, or None."""
        return self.layers[i].mixer

    def _block(self, i, h, ctx, state, edits, record):
        blk = self.layers[i]
        residual = h.float() if blk.residual_in_fp32 else h
        y, *rest = self._mamba(i, blk.norm(h.to(blk.norm.weight.dtype)), state, edits, record)
        return LayerOut((residual + y).to(h.dtype), *rest)

    def _logit_scale(self, logits):
        return logits

    # ------------------------------------------------------------- shared by every type
    def _embed(self, input_ids):
        return self.decoder.get_input_embeddings()(input_ids.to(self.device)) * self.embed_scale

    def unembed(self, residual):
        return self._logit_scale(self.lm_head(getattr(self.decoder, self.final_norm)(residual)))

    def _context(self, stream, start):
        B, T, _ = stream.shape
        rot = getattr(self.decoder, "rotary_emb", None)
        pos = torch.arange(start, start + T, device=stream.device)
        rope = rot(stream, pos[None].expand(B, -1)) if rot is not None else None
        if not self.attends:
            return Context(start, rope, None)
        blocked = torch.arange(start + T, device=stream.device)[None] > pos[:, None]
        mask = torch.zeros(T, start + T, dtype=stream.dtype, device=stream.device)
        return Context(start, rope, mask.masked_fill(blocked, torch.finfo(stream.dtype).min)[None, None])

    def _library_layer(self, i, h, ctx, state):
        """A layer without a Mamba-2 mixer: the library's own module (attention through :class:`_KV`)."""
        kv = _KV(state)
        out = self.layers[i](h, attention_mask=ctx.mask, cache=kv, position_embeddings=ctx.rope)
        return LayerOut(out[0] if isinstance(out, tuple) else out, LayerState(kv.windows))

    def _attention(self, at, x, ctx, state, j):
        """A library attention module on x: (output, its new (keys, values) windows ``j``, ``j + 1``)."""
        kv = _KV(state, j)
        out = at(hidden_states=x, attention_mask=ctx.mask, cache=kv, position_embeddings=ctx.rope)[0]
        return out, kv.windows

    def _chunk_kernel(self, m):
        """Unedited stretches of mixer ``m``: the SSD chunked scan on the rule's tensors (``x = v``, ``dt = b``,
        the head's ``A``; B and C already one per head; ``S`` transposed to the library's ``(head_dim, d_state)``)."""
        A = -torch.exp(m.A_log.float())
        size = m.chunk_size if self.device.type == "cuda" else min(m.chunk_size, CPU_CHUNK)

        def chunk(r, S0):
            o, S = self._scan(r.v, r.b, A, r.k, r.q, chunk_size=size, initial_states=S0.transpose(-1, -2).contiguous(),
                              return_final_states=True)
            return o.float(), S.transpose(-1, -2).float()

        return chunk

    @staticmethod
    def _gated_norm(m, y, gate):
        """The mixer's gated RMSNorm over the last dim (Falcon-H1 without ``mamba_rms_norm``: the gate alone); any
        leading dims (Falcon-H1's norm takes 2 or 3)."""
        if not getattr(m, "mamba_rms_norm", True):
            return y * F.silu(gate)
        return m.norm(y.reshape(-1, y.shape[-1]), gate.reshape(-1, gate.shape[-1])).reshape(y.shape)

    def _mamba(self, i, x, state, edits, record):
        """Layer i's Mamba-2 mixer on its input x: (output times ``out_scale``, state, rule, kept, read, o)."""
        m = self.mixer(i)
        Bt, T, _ = x.shape
        H, P, N, G = m.num_heads, m.head_dim, m.ssm_state_size, m.n_groups
        if hasattr(m, "mup_vector"):  # Falcon-H1: multipliers on the input and on each part of the projection
            zxbcdt = m.in_proj(x * m.ssm_in_multiplier) * m.mup_vector
        else:
            zxbcdt = m.in_proj(x)
        gate, xBC, dt = zxbcdt.split([m.intermediate_size, m.conv_dim, H], dim=-1)
        K = m.conv_kernel_size
        xc = torch.cat([tail(state.windows[0], K - 1).to(xBC) if state else xBC.new_zeros(Bt, K - 1, xBC.shape[-1]),
                        xBC], 1).transpose(1, 2)
        y = m.act(F.conv1d(xc, m.conv1d.weight, m.conv1d.bias, groups=xc.shape[1])).transpose(1, 2)
        xs, B, C = torch.split(y, [m.intermediate_size, G * N, G * N], dim=-1)
        xs = xs.reshape(Bt, T, H, P).float()
        B = B.reshape(Bt, T, G, N).float().repeat_interleave(H // G, 2)
        C = C.reshape(Bt, T, G, N).float().repeat_interleave(H // G, 2)
        dt = F.softplus(dt.float() + m.dt_bias.float()).clamp(*m.time_step_limit)
        rule = recurrence.Rule(q=C, k=B, v=xs, g=dt * -torch.exp(m.A_log.float()), b=dt)
        S0 = state.S if state is not None and state.S is not None else xs.new_zeros(Bt, H, N, P)
        o, S, kept = recurrence.run(S0.float(), rule, edits=edits, record=record,
                                    chunk=self._chunk_kernel(m) if self.chunked else None)
        skip = xs * m.D.float()[:, None]
        y = (o + skip).reshape(Bt, T, -1)
        out = m.out_proj(self._gated_norm(m, y.to(x.dtype), gate).to(x.dtype)) * self.out_scale
        return out, LayerState((grow(state, 0, xBC),), S), rule, kept, (y, gate, skip), o

    # ------------------------------------------------------------- the read-out
    @staticmethod
    def _read_context(read, head):
        o_all, gate, skip = read
        return o_all, gate, skip[:, :, head]

    def _out_weight(self, cell):
        return self.mixer(cell[0]).out_proj.weight[:, cell[1] * self.d_v:(cell[1] + 1) * self.d_v]

    def head_out(self, cell, o, o_all, gate, skip):
        """The mixer output with head ``cell.head``'s ``S^T C`` set to ``o`` (the other heads of its norm
        group held at the run's values): ``out_scale * out_proj(norm(y, gate))`` with ``y_h = o + D x_h``."""
        m = self.mixer(cell[0])
        h, P = cell[1], self.d_v
        y = torch.cat([o_all[..., :h * P], o + skip, o_all[..., (h + 1) * P:]], -1)
        return m.out_proj(self._gated_norm(m, y, gate)) * self.out_scale

    def head_unembed(self, cell):
        """``W_U W_O[head]`` with the type's scalars (the mixer output's and the logits')."""
        return self._logit_scale(self.lm_head.weight.float() @ self._out_weight(cell).float() * self.out_scale)


class NemotronHHost(Mamba2Host):
    """NemotronH (``nemotron_h``): one mixer per block, chosen by ``layers_block_type``."""

    attends = True

    def mixer(self, i):
        return self.layers[i].mixer if self.layers[i].block_type == "linear_attention" else None

    def _block(self, i, h, ctx, state, edits, record):
        if i not in self.recurrent_layers:
            return self._library_layer(i, h, ctx, state)
        blk = self.layers[i]
        y, *rest = self._mamba(i, blk.norm(h.to(blk.norm.weight.dtype)), state, edits, record)
        return LayerOut(h + y, *rest)


class BambaHost(Mamba2Host):
    """Bamba (``bamba``): Mamba-2 or attention, then the feed-forward."""

    attends, final_norm = True, "final_layernorm"

    def mixer(self, i):
        return getattr(self.layers[i], "mamba", None)

    def _block(self, i, h, ctx, state, edits, record):
        if i not in self.recurrent_layers:
            return self._library_layer(i, h, ctx, state)
        blk = self.layers[i]
        y, *rest = self._mamba(i, blk.input_layernorm(h), state, edits, record)
        h = h + y
        return LayerOut(h + self._feed_forward(blk, h), *rest)

    def _feed_forward(self, blk, h):
        """A Mamba layer's feed-forward branch (added to the stream after the mixer)."""
        return blk.feed_forward(blk.pre_ff_layernorm(h))


class GraniteMoeHybridHost(BambaHost):
    """Granite-4.0-H (``granitemoehybrid``): Bamba's layout with Granite's multipliers and a MoE beside the
    shared MLP."""

    final_norm = "norm"

    def __init__(self, model, tokenizer=None, name=None):
        c = model.config
        self.embed_scale, self.out_scale = c.embedding_multiplier, c.residual_multiplier
        super().__init__(model, tokenizer, name)

    def _feed_forward(self, blk, h):
        z = blk.post_attention_layernorm(h)
        f = blk.block_sparse_moe(z) + blk.shared_mlp(z) if blk.has_experts else blk.shared_mlp(z)
        return f * blk.residual_multiplier

    def _logit_scale(self, logits):
        return logits / self.config.logits_scaling


class FalconH1Host(Mamba2Host):
    """Falcon-H1 (``falcon_h1``): Mamba-2 and attention side by side in every layer, muP multipliers."""

    attends, final_norm = True, "final_layernorm"

    def __init__(self, model, tokenizer=None, name=None):
        c = model.config
        self.embed_scale, self.out_scale = c.embedding_multiplier, c.ssm_out_multiplier
        super().__init__(model, tokenizer, name)

    def mixer(self, i):
        return self.layers[i].mamba

    def _block(self, i, h, ctx, state, edits, record):
        blk = self.layers[i]
        x = blk.input_layernorm(h)
        y, st, *rest = self._mamba(i, x, state, edits, record)
        a, kv = self._attention(blk.self_attn, x * blk.attention_in_multiplier, ctx, state, 1)
        h = h + (y + a * blk.attn_out_multiplier)
        h = h + blk.feed_forward(blk.pre_ff_layernorm(h))
        return LayerOut(h, LayerState(st.windows + kv, st.S), *rest)

    def _logit_scale(self, logits):
        return logits * self.decoder.lm_head_multiplier


class Zamba2Host(Mamba2Host):
    """Zamba2 (``zamba2``): Mamba-2 in every layer; in the hybrid ones a shared attention block (tied weights,
    per-layer adapters) reads ``[h, embeddings]`` and adds into the Mamba-2 input. The stream between layers
    carries the embeddings beside the residual: ``stream = [h, embeddings]``."""

    attends, final_norm = True, "final_layernorm"

    def mixer(self, i):
        layer = self.layers[i]
        return getattr(layer, "mamba_decoder", layer).mamba

    def _embed(self, input_ids):
        x = super()._embed(input_ids)
        return torch.cat([x, x], -1)

    def _residual(self, stream):
        return stream[..., :self.config.hidden_size]

    def _block(self, i, stream, ctx, state, edits, record):
        layer, D = self.layers[i], self.config.hidden_size
        h, emb = stream[..., :D], stream[..., D:]
        x, kv = h, ()
        if hasattr(layer, "shared_transformer"):
            kv_cache = _KV(state, 1)
            t = layer.shared_transformer(h, original_hidden_states=emb, layer_idx=i, attention_mask=ctx.mask,
                                         cache=kv_cache, position_embeddings=ctx.rope)
            x, kv = h + layer.linear(t), kv_cache.windows
            layer = layer.mamba_decoder
        y, st, *rest = self._mamba(i, layer.input_layernorm(x), state, edits, record)
        return LayerOut(torch.cat([h + y, emb], -1), LayerState(st.windows + kv, st.S), *rest)
