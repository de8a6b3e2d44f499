"""The gated delta rule, written once, with cache edits.

Per value head, with ``S`` of shape ``(d_k, d_v)``::

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T        o_t = S_t^T q_t

``a_t = exp(g_t)`` is the forget gate, ``b_t`` the write gate, ``W_t = b_t k_t v_t^T`` the native
(additive) write and ``U_t = S_t - a_t S_{t-1} = b_t k_t (v_t - a_t S_{t-1}^T k_t)^T`` the full
delta-rule update. DeltaNet is the special case ``g = 0``; the gated *linear* rule of Mamba-2 and GLA,
``S_t = a_t S_{t-1} + b_t k_t v_t^T`` (no erase term, so ``U_t = W_t``), is ``erase=False``.

An edit at step t adds ``delta_t`` to the freshly written state; every edit kind is such a delta:

=================  =====================================
kind               delta added to ``S_t``
=================  =====================================
``replace``        ``M - W_t``  (or ``M - U_t`` for ``write="update"``)
``delete``         ``-W_t``     (or ``-U_t``)
``add``            ``M``
=================  =====================================

so the erase term ``-a_t b_t k_t k_t^T S_{t-1}`` is untouched by ``replace``/``delete`` of the
additive write. Tensors are batched over ``(B, H)``; q and k are already L2-normalised and q scaled.
"""
from __future__ import annotations

import torch

KINDS = ("replace", "delete", "add")
WRITES = ("additive", "update")


def step(S, q, k, v, g, b, erase=True):
    """One native step. S: (B,H,dk,dv); q,k: (B,H,dk); v: (B,H,dv); g,b: (B,H).

    Returns (S_new, S_decayed) where S_decayed = a_t S_{t-1}."""
    Sd = S * g.exp()[..., None, None]
    delta = (v - torch.einsum("bhkv,bhk->bhv", Sd, k) if erase else v) * b[..., None]
    return Sd + k[..., :, None] * delta[..., None, :], Sd


def read(S, q):
    """Head output o = S^T q: (B,H,dv)."""
    return torch.einsum("bhkv,bhk->bhv", S, q)


def native_write(k, v, b):
    """W_t = b_t k_t v_t^T: (..., dk, dv)."""
    return b[..., None, None] * k[..., :, None] * v[..., None, :]


def edit_delta(kind, matrix, write, W, U):
    """The matrix added to S_t for one edit (see module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"edit kind {kind!r} is not one of {KINDS}")
    if write not in WRITES:
        raise ValueError(f"edit write {write!r} is not one of {WRITES}")
    if kind == "add":
        return matrix
    native = W if write == "additive" else U
    return -native if kind == "delete" else matrix - native


def apply_edits(S, Sd, k, v, b, edits):
    """Add each edit's delta to the native state S_t (B,H,dk,dv); Sd = a_t S_{t-1}.

    edits: list of (row, head, kind, matrix, write, scale) with scale None, "write" (times ||W_t||_F)
    or "kv" (times ||k_t v_t^T||_F)."""
    out = S.clone()
    for row, head, kind, matrix, write, scale in edits:
        W = native_write(k[row, head], v[row, head], b[row, head])
        U = S[row, head] - Sd[row, head]
        if matrix is not None:
            matrix = matrix.to(S)
            if scale == "write":
                matrix = matrix * W.norm()
            elif scale == "kv":
                matrix = matrix * (k[row, head].norm() * v[row, head].norm())
            elif scale is not None:
                raise ValueError(f"edit scale {scale!r} is not one of None, 'write', 'kv'")
        out[row, head] += edit_delta(kind, matrix, write, W, U)
    return out


def run(S, q, k, v, g, b, edits=None, record=(), chunk=None, min_chunk=8, erase=True):
    """The recurrence over T steps, with edits and recorded states at chosen steps.

    q, k: (B,T,H,dk) (q scaled); v: (B,T,H,dv); g, b: (B,T,H); S: (B,H,dk,dv) state before step 0.
    edits: dict step -> list of edits (see apply_edits); record: steps whose (S_{t-1}, S_t) to keep.
    chunk: optional fast kernel ``chunk(q, k, v, g, b, S0) -> (o, S_T)`` for stretches with neither
    edits nor records (the host passes transformers' chunked torch path on CPU, fla's kernel on GPU);
    stretches shorter than ``min_chunk`` and everything when ``chunk`` is None run step by step.
    erase=False runs the gated linear rule (Mamba-2, GLA).
    Returns (o (B,T,H,dv), S_T, {t: (S_{t-1}, S_t)})."""
    T = q.shape[1]
    edits = edits or {}
    special = sorted(set(edits) | set(record))
    kept, outs, t = {}, [], 0
    for stop in special + [T]:
        if stop > t:  # a plain stretch [t, stop)
            if chunk is not None and stop - t >= min_chunk:
                o, S = chunk(q[:, t:stop], k[:, t:stop], v[:, t:stop], g[:, t:stop], b[:, t:stop], S)
                outs.append(o)
            else:
                for s in range(t, stop):
                    S, _ = step(S, q[:, s], k[:, s], v[:, s], g[:, s], b[:, s], erase)
                    outs.append(read(S, q[:, s])[:, None])
        if stop == T:
            break
        S_prev = S
        S, Sd = step(S, q[:, stop], k[:, stop], v[:, stop], g[:, stop], b[:, stop], erase)
        if stop in edits:
            S = apply_edits(S, Sd, k[:, stop], v[:, stop], b[:, stop], edits[stop])
        if stop in record:
            kept[stop] = (S_prev, S)
        outs.append(read(S, q[:, stop])[:, None])
        t = stop + 1
    return torch.cat(outs, 1), S, kept
