"""Gated linear attention (GLA) recurrence in pure torch: a chunked form for training and a stepwise reference.

Per head, with the state ``S`` of shape ``(d_k, d_v)`` and a per-key-dimension log decay ``gk_t <= 0``::

    S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T        o_t = S_t^T (q_t * scale)

``scale`` defaults to ``d_k ** -0.5``. Layout (fla's): q, k, gk ``(B, T, H, d_k)``, v ``(B, T, H, d_v)``,
o ``(B, T, H, d_v)``; states ``(B, H, d_k, d_v)``, or ``(B, H, d_v, d_k)`` with ``state_v_first=True``
(fla's GLA layer passes ``state_v_first=True``, so *its cache* holds V-first states; fla's ops default to
K-first, as do these). Both compute in fp32 (fp64 for fp64 inputs) and return o in v's dtype and the
final state in fp32, like ``fla.ops.gla.chunk_gla`` / ``fused_recurrent_gla`` (argument order mirrored).

The chunked form works in log space: within a chunk, with ``b_t = gk_c0 + ... + gk_t`` (``c0`` its first
step: the cumulative log decay, ``<= 0``, per key dimension),

* intra-chunk: ``A_ij = sum_k q_ik k_jk exp(b_ik - b_jk)`` (``j <= i``), computed as the matmul
  ``(q exp(b)) (k exp(-b))^T`` -- exact as long as ``-b <= max_log_ratio`` (30: no factor above ``e^30``);
  chunks that decay further (in fla's GLA: gate logits below about -15 throughout a 32-step chunk) get
  the exponents ``b_i - b_j <= 0`` formed pairwise instead (fp64 sums, no overflow, no cancellation);
* from the carried state: ``o_i += (q_i exp(b_i)) S_c``;
* state hand-over: ``S_{c+1} = exp(b_last) S_c + sum_j (k_j exp(b_last - b_j)) v_j^T`` (exponent summed
  directly as ``gk_{j+1} + ... + gk_last``);

the last two only exponentiate non-positive numbers. The result equals the stepwise loop to fp32
round-off (relative error at most ~``1e-7 * max_log_ratio``), whatever the decays.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _prep(q, k, v, gk, scale, initial_state, state_v_first):
    B, T, H, K = q.shape
    if k.shape != q.shape or gk.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} gk{tuple(gk.shape)} "
                         "must be (B,T,H,d_k) x3 and (B,T,H,d_v)")
    scale = K ** -0.5 if scale is None else scale
    ct = torch.promote_types(v.dtype, torch.float32)    # fp32, or fp64 for fp64 inputs
    q, k, v, gk = (x.transpose(1, 2).to(ct) for x in (q, k, v, gk))   # (B, H, T, d)
    if initial_state is None:
        S = q.new_zeros(B, H, K, v.shape[-1])
    else:
        S = initial_state.to(ct)
        S = S.transpose(-1, -2) if state_v_first else S
    return q * scale, k, v, gk, S


def _out(o, S, dtype, output_final_state, state_v_first):
    o = o.transpose(1, 2).to(dtype)
    if not output_final_state:
        return o, None
    return o, (S.transpose(-1, -2).contiguous() if state_v_first else S)


def recurrent_gla(q, k, v, gk, scale=None, initial_state=None, output_final_state=False, state_v_first=False):
    """Step-by-step reference: the module docstring's recurrence, one token at a time. Returns (o, S_T|None)."""
    dtype = v.dtype
    q, k, v, gk, S = _prep(q, k, v, gk, scale, initial_state, state_v_first)
    outs = []
    for t in range(q.shape[2]):
        S = S * gk[:, :, t].exp()[..., None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, :, t]))
    o = torch.stack(outs, 2) if outs else v.new_zeros(v.shape)
    return _out(o, S, dtype, output_final_state, state_v_first)


def chunk_gla(q, k, v, gk, scale=None, initial_state=None, output_final_state=False, state_v_first=False,
              chunk_size=32, max_log_ratio=30.0):
    """Chunked GLA (same result as ``recurrent_gla``), differentiable by autograd. Returns (o, S_T|None).

    Intra-chunk scores use the factorisation ``exp(b_i - b_j) = exp(b_i) exp(-b_j)`` (one matmul) in every
    chunk whose total log decay stays above ``-max_log_ratio`` (so no factor exceeds ``exp(30)``); the rare
    chunks that decay further get exact pairwise exponents instead (see the module docstring). T need not
    be a multiple of ``chunk_size`` (the tail is zero-padded: q = k = v = 0, gk = 0 leave the state and the
    kept outputs unchanged)."""
    dtype = v.dtype
    q, k, v, gk, S = _prep(q, k, v, gk, scale, initial_state, state_v_first)
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    if pad:
        q, k, v, gk = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, gk))
    N = (T + pad) // C
    q, k, gk = (x.reshape(B, H, N, C, K) for x in (q, k, gk))
    v = v.reshape(B, H, N, C, V)

    b = gk.cumsum(-2)                                   # (B,H,N,C,K) log decay from the chunk start, <= 0
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    q_in = q * b.exp()                                  # reads of the state carried into the chunk
    # A_ij = (q_i exp(b_i)) . (k_j exp(-b_j)), one matmul per chunk; exact while -b <= max_log_ratio
    A = q_in @ (k * (-b).clamp_max(max_log_ratio).exp()).transpose(-1, -2)
    bad = b[..., -1, :].amin(-1) < -max_log_ratio       # (B,H,N) chunks that decay further than that
    if bad.any():  # there: exponents b_i - b_j formed pairwise (<= 0), summed in fp64 against cancellation
        b64 = gk[bad].double().cumsum(-2)               # (n_bad, C, K)
        diff = (b64[:, :, None] - b64[:, None]).to(q.dtype).masked_fill(~causal[..., None], -torch.inf)
        A = A.index_put(tuple(bad.nonzero().T), torch.einsum("nik,njk,nijk->nij", q[bad], k[bad], diff.exp()))
    A = A.masked_fill(~causal, 0.)
    # writes decayed to the chunk end: exp(b_last - b_j) with the exponent summed directly (no cancellation)
    k_out = k * F.pad(gk[..., 1:, :].flip(-2).cumsum(-2).flip(-2), (0, 0, 0, 1)).exp()
    o = A @ v                                           # intra-chunk part (B,H,N,C,V)

    decay = b[..., -1, :].exp().unbind(2)               # (B,H,K) per chunk
    inter = []
    for q_n, k_n, v_n, d_n in zip(q_in.unbind(2), k_out.unbind(2), v.unbind(2), decay):
        inter.append(q_n @ S)
        S = d_n[..., None] * S + k_n.transpose(-1, -2) @ v_n
    o = (o + torch.stack(inter, 2)).reshape(B, H, N * C, V)[:, :, :T]
    return _out(o, S, dtype, output_final_state, state_v_first)
