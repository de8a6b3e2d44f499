"""Mamba-2 host (``Mamba2ForCausalLM``): the SSD state seen in the write layout of the other hosts.

Per head, transformers keeps ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T`` of shape
``(head_dim, d_state)`` and reads ``y_t = h_t C_t + D x_t``. With ``S = h^T`` (``d_k = d_state``,
``d_v = head_dim``) this is the shared rule of :mod:`writesae.ops.recurrence` with a scalar
``g = dt A``, no erase, ``k = B``, ``v = x``, ``b = dt`` and read ``q = C``: the write
``dt B x^T`` is exactly rank-1 and equals the update. (The paper's "diagonal" atom ``a_i v_i`` is the
same object seen per state row.) The head output ``S^T C`` gets the skip ``D x``, then the gated RMSNorm
(over groups of heads, so heads of a group interact) and ``out_proj``. The only module that knows
Mamba-2 internals.

Unedited stretches run transformers' own chunked (SSD) form, ``mamba2_chunk_scan`` (on CUDA, mamba_ssm's
``mamba_chunk_scan_combined`` kernel where it is installed; its torch reference otherwise), from the carried
state; the edited and recorded steps run step by step (:func:`writesae.ops.recurrence.run`). Both give the
same states and outputs to float32 round-off (``tests/test_mamba2_chunked.py``).

Layer state: windows ``(conv inputs xBC (B, t, C),)`` and ``S`` ``(B, H, d_state, head_dim)``.
"""
from __future__ import annotations

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


class Mamba2Host(RecurrentHost):
    """A Mamba-2 model as cells (every layer, every head) of ``d_state x head_dim`` states."""

    family = "mamba2"
    kind = "Mamba-2"

    def __init__(self, model, tokenizer=None, name=None):
        super().__init__(model, tokenizer, name)
        self.backbone, self.lm_head = model.backbone, model.lm_head
        self.config = c = model.config
        self.layers = list(self.backbone.layers)
        self.layer_types = ["mamba2"] * len(self.layers)
        self.recurrent_layers = list(range(len(self.layers)))
        self.n_heads, self.d_k, self.d_v = c.num_heads, c.state_size, c.head_dim
        if self.device.type != "cuda":
            use_torch_path(model)
        self._scan = modeling_mamba2.mamba2_chunk_scan  # bound once: tests patch the library's for its own forward
        self.chunked = True  # False: every step in Python (the reference the chunked form is checked against)

    def _chunk_kernel(self, m):
        """Unedited stretches of mixer ``m``: the SSD chunked scan on the rule's tensors (``x = v``, ``dt = b``,
        the head's ``A``; B and C already one per head; ``S`` transposed to the library's ``(head_dim, d_state)``)."""
        A = -torch.exp(m.A_log.float())
        size = m.chunk_size if self.device.type == "cuda" else min(m.chunk_size, CPU_CHUNK)

        def chunk(r, S0):
            o, S = self._scan(r.v, r.b, A, r.k, r.q, chunk_size=size, initial_states=S0.transpose(-1, -2),
                              return_final_states=True)
            return o.float(), S.transpose(-1, -2).float()

        return chunk

    def _embed(self, input_ids):
        return self.backbone.embeddings(input_ids.to(self.device))

    def unembed(self, residual):
        return self.lm_head(self.backbone.norm_f(residual))

    def _block(self, i, hidden, ctx, state, edits, record):
        blk = self.layers[i]
        residual = hidden.float() if blk.residual_in_fp32 else hidden
        x = blk.norm(hidden.to(blk.norm.weight.dtype))
        y, new_state, rule, kept, read = self._mixer(i, x, state, edits, record)
        return LayerOut((residual + y).to(hidden.dtype), new_state, rule, kept, read)

    def _mixer(self, i, x, state, edits, record):
        m = self.layers[i].mixer
        Bt, T, _ = x.shape
        H, P, N, G = m.num_heads, m.head_dim, m.ssm_state_size, m.n_groups
        gate, xBC, dt = m.in_proj(x).split([m.intermediate_size, m.conv_dim, H], dim=-1)
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
        o = (o + skip).reshape(Bt, T, -1)
        out = m.out_proj(m.norm(o.to(x.dtype), gate).to(x.dtype))
        return out, LayerState((grow(state, 0, xBC),), S), rule, kept, (o, gate, skip)

    # ------------------------------------------------------------- the read-out
    @staticmethod
    def _read_context(read, head):
        o_all, gate, skip = read
        return o_all, gate, skip[:, :, head]

    def head_out(self, cell, o, o_all, gate, skip):
        """The mixer output with head ``cell.head``'s ``S^T C`` set to ``o`` (the other heads of its norm
        group held at the run's values): ``out_proj(norm(y, gate))`` with ``y_h = o + D x_h``."""
        m = self.layers[cell[0]].mixer
        h, P = cell[1], self.d_v
        y = torch.cat([o_all[..., :h * P], o + skip, o_all[..., (h + 1) * P:]], -1)
        return m.out_proj(m.norm(y, gate))

    def head_unembed(self, cell):
        m = self.layers[cell[0]].mixer
        W_O = m.out_proj.weight[:, cell[1] * self.d_v:(cell[1] + 1) * self.d_v]
        return self.lm_head.weight.float() @ W_O.float()
