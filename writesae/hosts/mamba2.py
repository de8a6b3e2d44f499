"""Mamba-2 host (``Mamba2ForCausalLM``): the SSD state seen in the write layout of the other hosts.

Per head, transformers keeps ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T`` of shape
``(head_dim, d_state)`` and reads ``y_t = h_t C_t + D x_t``. With ``S = h^T`` (``d_k = d_state``,
``d_v = head_dim``) this is the gated linear rule ``S_t = a_t S_{t-1} + b_t k_t v_t^T`` with
``k = B``, ``v = x``, ``b = dt``, ``a = exp(dt A)`` and read ``o = S^T q`` with ``q = C``: the write is
exactly rank-1, so the same atoms, edits and tests apply. The only module that knows Mamba-2 internals.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import delta_rule
from .gated_deltanet import use_torch_path
from .recurrent import RecurrentHost


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
        self.conv_kernel = c.conv_kernel
        if self.device.type != "cuda":
            use_torch_path(model)

    def _embed(self, input_ids):
        return self.backbone.embeddings(input_ids.to(self.device))

    def _context(self, hidden, start):
        return None

    def _head(self, hidden):
        return self.lm_head(self.backbone.norm_f(hidden))

    def _block(self, i, hidden, ctx, state, edits, record):
        blk = self.layers[i]
        residual = hidden.float() if blk.residual_in_fp32 else hidden
        x = blk.norm(hidden.to(blk.norm.weight.dtype))
        y, new_state, used, kept = self._mixer(i, x, state, edits, record)
        return (residual + y).to(hidden.dtype), new_state, (used, kept)

    def _mixer(self, i, x, state, edits, record):
        m = self.layers[i].mixer
        Bt, T, _ = x.shape
        H, P, N, G = m.num_heads, m.head_dim, m.ssm_state_size, m.n_groups
        gate, xBC, dt = m.in_proj(x).split([m.intermediate_size, m.conv_dim, H], dim=-1)
        xBC = xBC.transpose(1, 2)
        K = self.conv_kernel
        conv0 = state[0] if state is not None else xBC.new_zeros(Bt, xBC.shape[1], K - 1)
        xc = torch.cat([conv0.to(xBC), xBC], -1)
        y = m.act(F.conv1d(xc, m.conv1d.weight, m.conv1d.bias, groups=xc.shape[1])).transpose(1, 2)
        xs, B, C = torch.split(y, [m.intermediate_size, G * N, G * N], dim=-1)
        xs = xs.reshape(Bt, T, H, P).float()
        B = B.reshape(Bt, T, G, N).float().repeat_interleave(H // G, 2)
        C = C.reshape(Bt, T, G, N).float().repeat_interleave(H // G, 2)
        dt = F.softplus(dt.float() + m.dt_bias.float()).clamp(*m.time_step_limit)
        g = dt * -torch.exp(m.A_log.float())
        S0 = state[1] if state is not None else xs.new_zeros(Bt, H, N, P)
        o, S, kept = delta_rule.run(S0.float(), C, B, xs, g, dt, edits=edits, record=record, erase=False)
        o = (o + xs * m.D.float()[:, None]).reshape(Bt, T, -1)
        out = m.out_proj(m.norm(o.to(x.dtype), gate).to(x.dtype))
        return out, (xc[..., xc.shape[-1] - (K - 1):], S), (C, B, xs, g, dt, xBC), kept
