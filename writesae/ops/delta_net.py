"""The DeltaNet (ungated delta rule) recurrence in pure torch: a chunked form for training, a step reference.

Per head, with the state ``S`` of shape ``(d_k, d_v)`` and ``S_0 = 0`` (or ``initial_state``)::

    S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T  =  S_{t-1} + b_t k_t (v_t - S_{t-1}^T k_t)^T
    o_t = S_t^T (scale * q_t)                           scale = d_k ** -0.5 unless given

This is fla's ``delta_rule`` (``chunk_delta_rule`` / ``fused_recurrent_delta_rule`` with
``use_qk_l2norm_in_kernel=False``; the caller normalises q and k, see :func:`l2norm`).

Layout (fla's): q, k ``(B, T, H, d_k)``; v ``(B, T, H, d_v)``; beta ``(B, T, H)``; outputs ``(B, T, H, d_v)``
in q's dtype; states ``(B, H, d_k, d_v)`` in float32 (fla's ``[N, H, K, V]``). All math runs in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def l2norm(x, eps=1e-6):
    """fla's in-kernel q/k norm: ``x / sqrt(sum(x^2) + eps)`` over the last dim (eps inside the root)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _prep(q, k, v, beta, scale, initial_state):
    """float32, heads first: (B, H, T, D); beta (B, H, T); q scaled; S0 (B, H, d_k, d_v)."""
    B, T, H, dk = k.shape
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))
    beta = beta.transpose(1, 2).float()
    q = q * (dk ** -0.5 if scale is None else scale)
    S = q.new_zeros(B, H, dk, v.shape[-1]) if initial_state is None else initial_state.float()
    return q, k, v, beta, S


def delta_rule_recurrent(q, k, v, beta, scale=None, initial_state=None):
    """Step-by-step reference, one token at a time. Returns ``(o (B,T,H,d_v), S_T (B,H,d_k,d_v))``."""
    dtype = q.dtype
    q, k, v, beta, S = _prep(q, k, v, beta, scale, initial_state)
    outs = []
    for t in range(q.shape[2]):
        k_t = k[:, :, t]
        u = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhkv,bhk->bhv", S, k_t))
        S = S + k_t[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, :, t]))
    o = torch.stack(outs, 2) if outs else v.new_zeros(v.shape)
    return o.transpose(1, 2).to(dtype), S


def delta_rule_chunked(q, k, v, beta, scale=None, initial_state=None, chunk_size=64):
    """Chunked (WY / UT-transform) form, exact up to float rounding. Same arguments and returns as the reference.

    In a chunk of C tokens with incoming state ``S``: ``A = I + strict_tril(diag(b) K K^T)``,
    ``W = A^{-1} diag(b) K``, ``U = A^{-1} diag(b) V``; then ``V' = U - W S`` (the per-token corrections
    ``b_t (v_t - S_{t-1}^T k_t)``), ``O = Q S + tril(Q K^T) V'`` and ``S <- S + K^T V'``.
    T is zero-padded to a multiple of C (k = 0, b = 0 leaves the state unchanged)."""
    dtype = q.dtype
    q, k, v, beta, S = _prep(q, k, v, beta, scale, initial_state)
    B, H, T, dk = k.shape
    C = chunk_size
    pad = (-T) % C
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta = F.pad(beta, (0, pad))
    n = (T + pad) // C
    q, k, v = (x.reshape(B, H, n, C, x.shape[-1]) for x in (q, k, v))
    beta = beta.reshape(B, H, n, C, 1)

    kb = k * beta
    A = torch.tril(kb @ k.transpose(-1, -2), -1) + torch.eye(C, dtype=k.dtype, device=k.device)
    WU = torch.linalg.solve_triangular(A, torch.cat([kb, v * beta], -1), upper=False, unitriangular=True)
    W, U = WU[..., :dk], WU[..., dk:]
    QK = torch.tril(q @ k.transpose(-1, -2))

    outs = []
    for q_i, k_i, W_i, U_i, QK_i in zip(*(x.unbind(2) for x in (q, k, W, U, QK))):  # unbind: cheap backward
        v_new = U_i - W_i @ S
        outs.append(q_i @ S + QK_i @ v_new)
        S = S + k_i.transpose(-1, -2) @ v_new
    o = torch.stack(outs, 2).reshape(B, H, n * C, -1)[:, :, :T]
    return o.transpose(1, 2).to(dtype), S
