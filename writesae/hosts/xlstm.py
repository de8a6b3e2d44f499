"""xLSTM host (``xLSTMForCausalLM``, the xLSTM-7B architecture): every block an mLSTM layer, whose matrix
memory is a cell per head.

transformers' mLSTM (``mlstm_recurrent_step_native``; the chunkwise form on a prompt computes the same), per
head, with the gate pre-activations ``i`` (input, exponential) and ``f`` (forget) soft-capped, ``q~ = q d_k^-1/2``::

    m_t = max(logsigmoid(f_t) + m_{t-1}, i_t)                                   the stabiliser ("max state")
    C_t = exp(logsigmoid(f_t) + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T     the matrix memory
    n_t = exp(logsigmoid(f_t) + m_{t-1} - m_t) n_{t-1} + exp(i_t - m_t) k_t           the normaliser
    h_t = C_t^T q~_t / (max(|n_t . q~_t|, exp(-m_t)) + eps)

**What the cell is.** The state is ``C`` (``d_qk x d_v``), exactly as the library's cache holds it: in the
stabilised scale ``exp(-m_t)`` (``C_t = exp(-m_t) C*_t`` with ``C*`` the unstabilised memory). ``m`` and ``n``
depend on the gates and keys only, never on ``C``, so they are inputs of the recurrence like the gates: an edit
of ``C`` leaves them as they are, and the contract's edits stay exact.

**The write** is the matrix-memory update ``b_t k_t v_t^T`` with the write gate ``b_t = exp(i_t - m_t)`` (the
exponential input gate in the stabilised scale); the decay ``D_t = exp(logsigmoid(f_t) + m_{t-1} - m_t)``
(<= 1) is a scalar per head; no erase. The write equals the update. Deleting a write removes it from ``C``
only: the normaliser keeps ``k_t`` (it counts how much was written, not what). In this scale the decay is
often exactly 1: wherever the forget gate sets the stabiliser (``m_t = logsigmoid(f_t) + m_{t-1}``) the state
is not shrunk, and the forgetting shows instead in smaller write gates for later tokens (what the read-out
sees is the same, as ``h`` is invariant to the scale: ``C* q / max(|n* . q|, 1)`` unstabilised).

**The read-out.** The head output of the contract is ``o_t = C_t^T q~_t``; the layer divides it by the
denominator ``max(|n_t . q~_t|, exp(-m_t)) + eps`` (a scalar per head and position, held at the run's value,
which no edit of C changes), normalises it per head (``multihead_norm``, a LayerNorm per head), multiplies by
the output gate ``sigmoid(W_o x)`` and projects with ``out_proj``: ``head_out`` is exact per head. The logits
are soft-capped (``output_logit_soft_cap``).

Layer state: windows ``(normaliser n_t (B, t, H, d_qk), stabiliser m_t (B, t, H))`` (one row per position, so a
run restarts anywhere from the rows before it) and ``S = C`` ``(B, H, d_qk, d_v)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import recurrence
from .base import LayerOut, LayerState
from .recurrent import RecurrentHost, grow

def soft_cap(x, cap):
    return x if cap is None else cap * torch.tanh(x / cap)


def stabiliser(logf, i, m0, block):
    """``m_t = max(logf_t + m_{t-1}, i_t)`` for every t (``(B, T, H)``) from ``m0`` ``(B, H)``: within a block,
    ``m_t = max(L_t + m, max_{s<=t} (L_t - L_s) + i_s)`` with ``L`` the cumulative log forget gate since the
    block's start and m the value before it: the library's chunkwise arithmetic (its chunk as the block), term
    for term."""
    out, m = [], m0
    for t0 in range(0, logf.shape[1], block):
        L = logf[:, t0:t0 + block].cumsum(1)  # (B, C, H)
        pair = (L[:, :, None] - L[:, None, :]) + i[:, None, t0:t0 + block]  # [t, s]: L_t - L_s + i_s
        causal = torch.ones(L.shape[1], L.shape[1], dtype=torch.bool, device=L.device).tril()[:, :, None]
        mb = torch.maximum(L + m[:, None], pair.masked_fill(~causal, -torch.inf).amax(2))
        out.append(mb)
        m = mb[:, -1]
    return torch.cat(out, 1)


class XLSTMHost(RecurrentHost):
    """An xLSTM model as cells (every block, every head) of ``d_qk x d_v`` matrix memories."""

    family = "xlstm"
    kind = "mLSTM"

    def __init__(self, model, tokenizer=None, name=None):
        super().__init__(model, tokenizer, name)
        self.backbone, self.lm_head = model.backbone, model.lm_head
        self.config = c = model.config
        self.layers = list(self.backbone.blocks)
        self.layer_types = ["mlstm"] * len(self.layers)
        self.recurrent_layers = list(range(len(self.layers)))
        self.n_heads, self.d_k, self.d_v = c.num_heads, c.qk_head_dim, c.v_head_dim

    _chunk = staticmethod(recurrence.chunked)  # unedited stretches: the chunked torch form

    def _embed(self, input_ids):
        return self.backbone.embeddings(input_ids.to(self.device))

    def unembed(self, residual):
        logits = self.lm_head(self.backbone.out_norm(residual).to(self.lm_head.weight.dtype))
        return soft_cap(logits.float(), self.config.output_logit_soft_cap)

    def _project(self, at, x):
        """(q, k, v, output-gate pre-activation, i, f) of the mLSTM layer ``at`` on x, gates soft-capped."""
        c = self.config
        if c.weight_mode == "single":
            q, k, v, o = at.q(x), at.k(x), at.v(x), at.ogate_preact(x)
            i, f = at.igate_preact(x), at.fgate_preact(x)
        else:
            q, k, v, o = torch.tensor_split(at.qkv_opreact(x), (at.qk_dim, 2 * at.qk_dim, 2 * at.qk_dim + at.v_dim), -1)
            i, f = torch.tensor_split(at.ifgate_preact(x), (c.num_heads,), -1)
        return q, k, v, o, soft_cap(i, c.gate_soft_cap), soft_cap(f, c.gate_soft_cap)

    def _block(self, i, hidden, ctx, state, edits, record):
        blk = self.layers[i]
        at = blk.mlstm_layer
        x = blk.norm_mlstm(hidden)
        B, T, _ = x.shape
        H, dk, dv = self.n_heads, self.d_k, self.d_v
        q, k, v, o_pre, i_pre, f_pre = self._project(at, x)
        q, k, v = (t.reshape(B, T, H, -1).float() for t in (q, k, v))
        logf = F.logsigmoid(f_pre.float())
        before = state is not None and state.windows[1].shape[1] > 0  # a restart at position 0 has no rows before
        m0 = state.windows[1][:, -1].float() if before else x.new_zeros(B, H, dtype=torch.float32)
        n0 = state.windows[0][:, -1].float() if before else x.new_zeros(B, H, dk, dtype=torch.float32)
        m = stabiliser(logf, i_pre.float(), m0, self.config.chunk_size)
        # log-decay: <= 0 by the max (as the library's step computes it), whatever the cumulative sums' rounding
        g = (logf + torch.cat([m0[:, None], m[:, :-1]], 1) - m).clamp_max(0.0)
        b = torch.exp(i_pre.float() - m)  # write gate, <= 1
        q = q * dk ** -0.5
        rule = recurrence.Rule(q, k, v, g, b)
        S0 = state.S if state is not None and state.S is not None else q.new_zeros(B, H, dk, dv)
        o, S, kept = recurrence.run(S0.float(), rule, edits=edits, record=record, chunk=self._chunk,
                                    min_chunk=16 if self.device.type == "cpu" else 8)
        # the normaliser n_t at every position: the same recurrence with k as the value and a 1 x 1 key and read
        ones = q.new_ones(B, T, H, 1)
        n, _ = self._chunk(recurrence.Rule(ones, ones, k, g, b), n0[:, :, None, :])  # (B, T, H, d_qk)
        den = torch.maximum((n * q).sum(-1).abs(), torch.exp(-m)) + self.config.eps
        h = at.multihead_norm((o / den[..., None]).to(x.dtype))
        y = at.out_proj(at.ogate_act_fn(o_pre) * h)
        hidden = hidden + y
        hidden = hidden + blk.ffn(blk.norm_ffn(hidden))
        new = LayerState((grow(state, 0, n), grow(state, 1, m)), S)
        return LayerOut(hidden, new, rule, kept, (den, o_pre.view(B, T, H, dv)), o)

    # ------------------------------------------------------------- the read-out
    def _out_weight(self, cell):
        return self.layers[cell[0]].mlstm_layer.out_proj.weight[:, cell[1] * self.d_v:(cell[1] + 1) * self.d_v]

    def head_out(self, cell, o, den, o_pre):
        """``W_O[head] (sigmoid(o_pre) * LN_head(o / den))``: the norm acts per head, the denominator is the
        run's."""
        ln, h, dv = self.layers[cell[0]].mlstm_layer.multihead_norm, cell[1], self.d_v
        x = (o / den[..., None]).float()
        y = ((x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + ln.eps)).to(o.dtype)
        if ln.weight is not None:
            y = y * ln.weight[h * dv:(h + 1) * dv]
        if ln.bias is not None:
            y = y + ln.bias[h * dv:(h + 1) * dv]
        return F.linear(torch.sigmoid(o_pre) * y, self._out_weight(cell))

    def head_unembed(self, cell):
        return self.lm_head.weight.float() @ self._out_weight(cell).float()
