"""Gated DeltaNet host: Qwen3.5 hybrid models (``Qwen3_5ForCausalLM``) and Qwen3-Next.

The only module that knows these models' internals. It runs the decoder layer by layer with its own
state containers so that a run can start at any (position, layer), apply cache edits inside the
recurrence (:mod:`writesae.ops.recurrence`) and record what the recurrence used. Equivalence to the
transformers forward is checked in ``tests/test_hosts.py``.

The rule (transformers' ``torch_recurrent_gated_delta_rule``: decay first, then the delta update)::

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,   o_t = S_t^T q_t

q, k: conv -> activation -> L2-norm (q scaled by 1/sqrt(d_k)), shared by ``num_v_heads / num_k_heads``
consecutive value heads; ``g = -exp(A_log) softplus(a + dt_bias)``, ``a_t = exp(g_t)``, ``b = sigmoid(b)``.
In the shared form: scalar g, erase ``e = -b k``, ``f = exp(g) k``. The write is ``b k v^T`` (rank 1); the
update ``U_t = b k (v - a S^T k)^T`` is rank 1 too. The head output passes the gated RMSNorm
``norm(o, z)`` (per head) and ``out_proj``.

Layer state: Gated DeltaNet -> windows ``(conv inputs (B, t, C),)`` and ``S`` ``(B, H_v, d_k, d_v)``;
full attention -> windows ``(keys, values)``, each ``(B, t, H_kv, hd)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from transformers.activations import ACT2FN

from ..ops import recurrence
from .base import LayerOut, LayerState
from .fla import KernelLane, fla_kernel
from .recurrent import RecurrentHost, grow, tail


def _parts(model):
    """(decoder, lm_head) for a causal LM or a multimodal Qwen3.5 wrapper."""
    inner = model.model
    inner = getattr(inner, "language_model", inner)
    return inner, model.lm_head


def torch_function(fn):
    """transformers' pure-torch function behind its kernel hooks. transformers wraps it (``functools.wraps``,
    so ``__wrapped__``) to call an installed kernel package (fla, causal_conv1d, mamba_ssm) on the devices
    that package supports; the ``kernels`` package (a dependency of transformers 5.x) wraps that in turn in
    a function module whose ``forward`` calls it (``func``). A plain function is returned as it is."""
    import inspect

    if isinstance(fn, torch.nn.Module):
        fn = inspect.getclosurevars(type(fn).forward).nonlocals.get("func", fn)
    return inspect.unwrap(fn)


def use_torch_path(model):
    """Rebind transformers' kernel hooks of the model's module to the pure-torch functions, for every model
    of that module (:func:`torch_function`)."""
    import sys

    mod = sys.modules[type(model).__module__]
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule",
                 "causal_conv1d_fn", "causal_conv1d_update"):
        fn = getattr(mod, name, None)
        if fn is not None:
            setattr(mod, name, torch_function(fn))


class GatedDeltaNetHost(KernelLane, RecurrentHost):
    """A Qwen3.5 / Qwen3-Next model seen as a set of matrix-state cells.

    The kernel lane (``kernels=`` or ``host.kernels``, as for fla's families: :mod:`writesae.hosts.fla`)
    picks the kernel of the host's own unedited stretches: fla's ``chunk_gated_delta_rule`` or transformers'
    torch chunk. The model's own forward (``logits``) runs whatever kernels transformers binds.

    >>> host = load_host("embedded")
    >>> host.cells[:2]                      # Cell(layer, head, d_k, d_v)
    >>> tr = host.trace(ids, cells=[(0, 1)], positions=[5, 9])
    >>> run = host.run_edits(ids, [Edit(0, 0, 1, 9, "delete")])
    """

    family = "gated_deltanet"
    kind = "Gated DeltaNet"

    def __init__(self, model, tokenizer=None, name=None, kernels=None):
        super().__init__(model, tokenizer, name)
        self.decoder, self.lm_head = _parts(model)
        self.config = self.decoder.config
        self.layers = list(self.decoder.layers)
        self.layer_types = list(self.config.layer_types)
        self.recurrent_layers = [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]
        if not self.recurrent_layers:
            raise ValueError(f"{self.name} has no Gated DeltaNet (linear_attention) layer: layer types are "
                             f"{sorted(set(self.layer_types))}")
        c = self.config
        self.n_heads, self.d_k, self.d_v = c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
        self.n_k_heads = c.linear_num_key_heads
        self.conv_kernel = c.linear_conv_kernel_dim
        self.kernels = kernels

    # ----------------------------------------------------------- the layers
    # what a host of the same rule under other names (``olmo_hybrid``, ``kimi_linear``) overrides
    _chunk_fn = "torch_chunk_gated_delta_rule"  # the library's chunked kernel, in the mixer's module
    _fla_chunk = ("gated_delta_rule", "chunk_gated_delta_rule")  # fla's kernel of the rule: fla.ops.<module>.<name>

    def _mixer(self, i):
        """Layer i's Gated DeltaNet module."""
        return self.layers[i].linear_attn

    def _norm_out(self, attn):
        """The mixer's gated per-head RMSNorm and its output projection."""
        return attn.norm, attn.out_proj

    def _project(self, attn, x):
        """(conv input mixed_qkv (B,T,C), output gate z (B,T,H,dv), write gate b (B,T,H) and log-decay g
        (B,T,H), both float32) for either family."""
        B, T, _ = x.shape
        if hasattr(attn, "in_proj_qkvz"):  # Qwen3-Next: grouped interleaved projections
            q, k, v, z, b, a = attn.fix_query_key_value_ordering(attn.in_proj_qkvz(x), attn.in_proj_ba(x))
            mixed = torch.cat([t.reshape(B, T, -1) for t in (q, k, v)], -1)
        else:
            mixed, z = attn.in_proj_qkv(x), attn.in_proj_z(x).reshape(B, T, -1, attn.head_v_dim)
            b, a = attn.in_proj_b(x), attn.in_proj_a(x)
        return mixed, z, b.float().sigmoid(), -attn.A_log.float().exp() * F.softplus(a.float() + attn.dt_bias.float())

    def _make_chunk(self):
        """Fast recurrence for unedited stretches: fla's chunked kernel on the fla lane (q already scaled),
        transformers' torch chunk on the torch lane (which scales q by d_k^-1/2 itself)."""
        import sys

        if self.kernels == "fla":
            fla = fla_kernel(*self._fla_chunk)

            def chunk(r, S0):
                q, k, v, g, b = (t.contiguous() for t in (r.q, r.k, r.v, r.g, r.b))
                o, S = fla(q, k, v, g=g, beta=b, scale=1.0, initial_state=S0.contiguous(), output_final_state=True)
                return o.float(), S.float()

            return chunk
        mod = sys.modules[type(self._mixer(self.recurrent_layers[0])).__module__]
        fn = torch_function(getattr(mod, self._chunk_fn))
        sqrt_dk = math.sqrt(self.d_k)

        def chunk(r, S0):
            q, k, v, g, b = (t.contiguous() for t in (r.q * sqrt_dk, r.k, r.v, r.g, r.b))
            o, S = fn(q, k, v, g=g, beta=b, initial_state=S0.contiguous(), output_final_state=True,
                      use_qk_l2norm_in_kernel=False)
            return o.float(), S.float()

        return chunk

    def _gdn(self, i, x, state, edits, record):
        """Gated DeltaNet token mixer of layer i on normed input x (B,T,hidden): (output, state, rule, kept, z, o)."""
        attn = self._mixer(i)
        B, T, _ = x.shape
        mixed, z, b, g = self._project(attn, x)
        K = attn.conv_kernel_size
        xc = torch.cat([tail(state.windows[0], K - 1).to(mixed) if state else mixed.new_zeros(B, K - 1, mixed.shape[-1]),
                        mixed], 1).transpose(1, 2)
        y = F.conv1d(xc, attn.conv1d.weight, attn.conv1d.bias, groups=xc.shape[1])
        y = ACT2FN[attn.activation](y).transpose(1, 2)  # the config's hidden_act, as transformers does
        kd, vd = self.n_k_heads * self.d_k, self.n_heads * self.d_v
        q, k, v = y[..., :kd], y[..., kd:2 * kd], y[..., 2 * kd:2 * kd + vd]
        rep = self.n_heads // self.n_k_heads
        q = q.reshape(B, T, -1, self.d_k).float()
        k = k.reshape(B, T, -1, self.d_k).float()
        q = (q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)).repeat_interleave(rep, 2) / math.sqrt(self.d_k)
        k = (k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)).repeat_interleave(rep, 2)
        v = v.reshape(B, T, -1, self.d_v).float()
        # g a scalar per head, or a vector per key row (Kimi): f = exp(g) k either way
        rule = recurrence.Rule(q, k, v, g, b, e=-b[..., None] * k, f=(g.exp()[..., None] if g.ndim == 3 else g.exp()) * k)
        S0 = state.S if state is not None and state.S is not None else q.new_zeros(B, self.n_heads, self.d_k, self.d_v)
        # transformers' torch chunk kernel pads every call to 64 tokens: shorter stretches are cheaper
        # step by step on CPU; fla's kernel is cheap for short stretches
        o, S, kept = recurrence.run(S0.float(), rule, edits=edits, record=record, chunk=self._chunk_kernel(),
                                    min_chunk=self._min_chunk(64))
        norm, out = self._norm_out(attn)
        y = norm(o.to(x.dtype).reshape(-1, self.d_v), z.reshape(-1, self.d_v)).reshape(B, T, -1)
        return out(y), LayerState((grow(state, 0, mixed),), S), rule, kept, z, o

    def _attention(self, i, x, pos_emb, state, start):
        """Full-attention token mixer (gated, GQA) with explicit past keys/values."""
        from transformers.models.qwen3_5.modeling_qwen3_5 import apply_rotary_pos_emb

        at = self.layers[i].self_attn
        B, T, _ = x.shape
        hd = at.head_dim
        q, gate = torch.chunk(at.q_proj(x).view(B, T, -1, hd * 2), 2, dim=-1)
        q = at.q_norm(q).transpose(1, 2)
        k = at.k_norm(at.k_proj(x).view(B, T, -1, hd)).transpose(1, 2)
        v = at.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *pos_emb)
        keys, values = grow(state, 0, k.transpose(1, 2)), grow(state, 1, v.transpose(1, 2))  # (B, t, H_kv, hd)
        k, v = keys.transpose(1, 2), values.transpose(1, 2)
        rows = torch.arange(T, device=x.device)[:, None] + start
        mask = torch.arange(k.shape[2], device=x.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=at.scaling,
                                             enable_gqa=k.shape[1] != q.shape[1])
        out = out.transpose(1, 2).reshape(B, T, -1) * torch.sigmoid(gate.reshape(B, T, -1))
        return at.o_proj(out), LayerState((keys, values))

    def _context(self, hidden, start):
        B, T, _ = hidden.shape
        pos = torch.arange(start, start + T, device=hidden.device)[None].expand(B, -1)
        return start, self.decoder.rotary_emb(hidden, pos)

    def _block(self, i, hidden, ctx, state, edits, record):
        layer = self.layers[i]
        x = layer.input_layernorm(hidden)
        rule, kept, read, o = None, {}, (), None
        if i in self.recurrent_layers:
            x, new_state, rule, kept, z, o = self._gdn(i, x, state, edits, record)
            read = (z,)
        else:
            x, new_state = self._attention(i, x, ctx[1], state, ctx[0])
        hidden = hidden + x
        mlp = layer.mlp(layer.post_attention_layernorm(hidden))
        return LayerOut(hidden + (mlp[0] if isinstance(mlp, tuple) else mlp), new_state, rule, kept, read, o)

    def _embed(self, input_ids):
        return self.decoder.embed_tokens(input_ids.to(self.device))

    # ------------------------------------------------------------- the read-out
    def unembed(self, residual):
        return self.lm_head(self.decoder.norm(residual))

    def _out_weight(self, cell):
        layer, head = cell[:2]
        return self._norm_out(self._mixer(layer))[1].weight[:, head * self.d_v:(head + 1) * self.d_v]

    def head_out(self, cell, o, z):
        """``W_O[head] norm(o, z)``: the gated RMSNorm acts per head, so the rest of the layer drops out."""
        return F.linear(self._norm_out(self._mixer(cell[0]))[0](o, z), self._out_weight(cell))

    def head_unembed(self, cell):
        return self.lm_head.weight.float() @ self._out_weight(cell).float()
