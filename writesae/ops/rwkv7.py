"""RWKV-7's state recurrence, in plain torch (no Triton): a diagonal-plus-low-rank (DPLR) delta rule.

Per head, with the state ``S`` of shape ``(d_k, d_v)`` -- fla's layout, ``[B, H, K, V]`` -- ::

    S_t = diag(exp(w_t)) S_{t-1} - (kk_t * a_t) (kk_t^T S_{t-1}) + k_t v_t^T        o_t = S_t^T r_t

``w_t <= 0`` is the per-channel *log*-decay (RWKV-7 keeps it in ``[-exp(-1/2), 0)``), ``kk_t`` the
unit-norm "removal" key, ``a_t`` in (0, 1) the per-channel in-context learning rate, ``k_t`` the
(already ``a``-rescaled) write key. The erase term reads the *undecayed* ``S_{t-1}``. In the RWKV-7
paper's layout ``P = S^T`` of shape ``(d_v, d_k)`` the same rule reads
``P_t = P_{t-1} (diag(exp(w_t)) - kk_t^T (kk_t * a_t)) + v_t^T k_t`` (row vectors), ``o_t = P_t r_t``.

It is fla's generalized delta rule ``S_t = diag(exp(gk_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T``
(``fla.ops.generalized_delta_rule.dplr``) with ``q = r, gk = w, a = -kk, b = kk * a`` and scale 1,
which is how ``fla.layers.rwkv7`` calls it (``chunk_rwkv7``; ``fused_mul_recurrent_rwkv7`` takes
``kk, a`` as here). No read scale: ``o_t = S_t^T r_t``.

Two exact evaluations of the same rule: :func:`recurrent` (one :func:`step` per token) and
:func:`chunked` (WY form over chunks of ``chunk_size`` tokens, then one ``d_k x d_k`` state
transition per chunk). Inputs are ``[B, T, H, K]`` (``v``: ``[B, T, H, V]``); both compute in fp32
and return ``(o [B, T, H, V] in r's dtype, S_T [B, H, K, V] fp32)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Forward+backward at T=512, batch 16, hidden 256, one CPU thread: chunked 0.5-0.9 s vs recurrent 6-13 s;
# 32 is the fastest chunk of 16/32/64 at d_k = 32 and ties 64 at d_k = 64.
CHUNK = 32
MAX_LOG_SPAN = 60.0  # chunked() factors exp(g_t - g_j) = exp(g_t) exp(-g_j); |g| stays below this


def step(S, r, w, k, v, kk, a):
    """One step. S: (B,H,K,V); r, w, k, kk, a: (B,H,K); v: (B,H,V). Returns (S_t, o_t (B,H,V))."""
    erase = (kk * a)[..., None] * torch.einsum("bhk,bhkv->bhv", kk, S)[..., None, :]
    S = w.exp()[..., None] * S - erase + k[..., None] * v[..., None, :]
    return S, torch.einsum("bhkv,bhk->bhv", S, r)


def _init(initial_state, r, v):
    B, _, H, K = r.shape
    if initial_state is None:
        return r.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32)
    return initial_state.float()


def recurrent(r, w, k, v, kk, a, initial_state=None):
    """The rule token by token (the reference). See the module docstring for shapes."""
    S, dtype = _init(initial_state, r, v), r.dtype
    r, w, k, v, kk, a = (x.float() for x in (r, w, k, v, kk, a))
    outs = []
    for t in range(r.shape[1]):
        S, o = step(S, r[:, t], w[:, t], k[:, t], v[:, t], kk[:, t], a[:, t])
        outs.append(o)
    return torch.stack(outs, 1).to(dtype), S


def chunked(r, w, k, v, kk, a, initial_state=None, chunk_size=CHUNK):
    """RWKV-7's rule chunk by chunk: :func:`chunked_dplr` with the erase pair ``e = -(kk * a)``, ``f = kk``."""
    return chunked_dplr(r, w, k, v, -(kk * a), kk, initial_state, chunk_size)


def chunked_dplr(r, w, k, v, e, f, initial_state=None, chunk_size=CHUNK):
    """``S_t = diag(exp(w_t)) S_{t-1} + e_t (f_t^T S_{t-1}) + k_t v_t^T``, ``o_t = S_t^T r_t`` chunk by chunk, exact
    (same result as :func:`recurrent` up to fp32 rounding). Below, in RWKV-7's names: ``kk = f``, ``kk * a = -e``.

    Within a chunk, with ``g_t`` the inclusive cumulative log-decay from the chunk start and
    ``u_t = -kk_t^T S_{t-1}`` the erase read-out, unrolling gives (``<`` / ``<=`` lower-triangular)::

        S_t = e^{g_t} S_0 + sum_{j<=t} e^{g_t - g_j} (k_j v_j^T + b_j u_j),   b = kk * a
        U   = A_ak V + A_ab U + (-kk e^{g_{t-1}}) S_0     ->  U = Uv + Wh S_0  (triangular solve)
        o_t = sum_{j<=t} (A_rk)_{tj} v_j + (A_rb)_{tj} u_j + (r_t e^{g_t})^T S_0

    so each chunk is ``o = O0 + Q S_0`` and ``S_C = M S_0 + X`` with chunk-local ``O0, Q, M, X``;
    only the ``S_C = M S_0 + X`` loop over chunks is sequential. T need not be a multiple of
    ``chunk_size`` (padded with w = k = v = kk = 0 steps, which leave the state unchanged).
    Requires ``chunk_size * max(-w) <= MAX_LOG_SPAN`` (else exp(-g) could overflow).
    """
    B, T, H, K = r.shape
    V, C = v.shape[-1], chunk_size
    w_min = float(w.detach().min())
    if -w_min * C > MAX_LOG_SPAN:
        raise ValueError(f"chunked(): chunk_size {C} x max(-w) {-w_min:.3g} exceeds {MAX_LOG_SPAN}; "
                         "use a smaller chunk_size or recurrent()")
    N, dtype, S = -(-T // C), r.dtype, _init(initial_state, r, v)

    def chunks(x):  # [B, T, H, D] -> [B, H, N, C, D], fp32, zero-padded to N*C steps
        x = F.pad(x.float(), (0, 0, 0, 0, 0, N * C - T))
        return x.view(B, N, C, H, -1).permute(0, 3, 1, 2, 4)

    r, w, k, v, kk, b = (chunks(x) for x in (r, w, k, v, f, -e))  # RWKV-7: kk, kk * a
    g = w.cumsum(-2)                                  # g_t, inclusive
    q_g, a_g = r * g.exp(), -kk * (g - w).exp()       # r_t e^{g_t}, -kk_t e^{g_{t-1}}
    k_g, b_g = k * (-g).exp(), b * (-g).exp()         # k_j e^{-g_j}, b_j e^{-g_j}
    A_rk, A_rb = (q_g @ k_g.mT).tril(), (q_g @ b_g.mT).tril()
    A_ak, A_ab = (a_g @ k_g.mT).tril(-1), (a_g @ b_g.mT).tril(-1)
    L = torch.eye(C, dtype=A_ab.dtype, device=A_ab.device) - A_ab  # unit lower-triangular
    Uv = torch.linalg.solve_triangular(L, A_ak @ v, upper=False, unitriangular=True)
    Wh = torch.linalg.solve_triangular(L, a_g, upper=False, unitriangular=True)
    O0, Q = A_rk @ v + A_rb @ Uv, q_g + A_rb @ Wh     # o = O0 + Q S_0
    g_end = g[..., -1:, :]
    k_d, b_d = k * (g_end - g).exp(), b * (g_end - g).exp()   # decayed to the chunk end
    M = torch.diag_embed(g_end.exp().squeeze(-2)) + b_d.mT @ Wh  # S_C = M S_0 + X
    X = k_d.mT @ v + b_d.mT @ Uv

    starts = []
    for n in range(N):
        starts.append(S)
        S = M[:, :, n] @ S + X[:, :, n]
    o = O0 + Q @ torch.stack(starts, 2)               # [B, H, N, C, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
    return o.to(dtype), S
