"""One edited recurrence for every family, written once.

Per value head, with the matrix state ``S`` of shape ``(d_k, d_v)`` and read-out ``o_t = S_t^T q_t``::

    S_t = D_t * S_{t-1}  +  e_t (f_t^T S_{t-1})  +  b_t k_t v_t^T          D_t = exp(g_t)

``g_t`` is a log-decay in one of three forms: a scalar per head ``(B, T, H)``, a vector per key row
``(B, T, H, d_k)`` (``D_t * S`` scales row i of S by ``D_t[i]``) or a matrix, one decay per entry
``(B, T, H, d_k, d_v)`` (``D_t * S`` elementwise). The scalar and per-row forms are the fast special cases of
the elementwise one; :func:`decay`, the edits and the exact transport (:func:`transport`,
:func:`transport_back`) are written once for all three. The erase pair ``(e_t, f_t)`` is optional. How each
family fills these in (see its host module for the derivation from the library's own code):

==============  ====================  =========================  ==========================  =====
family          g                     e, f                       k, v                        b
==============  ====================  =========================  ==========================  =====
Gated DeltaNet  scalar                e = -b k, f = exp(g) k     k, v                        beta
DeltaNet        0                     e = -b k, f = k            k, v                        beta
GLA             vector per key row    none                       k, v                        1
Mamba-2         scalar dt A           none                       B, x                        dt
RWKV-7          vector per key row    e = kk * a, f = -kk        k~ (not kk), v              1
Mamba-1         elementwise dt A      none                       B, dt * x                   1
==============  ====================  =========================  ==========================  =====

The *native (additive) write* is ``W_t = b_t k_t v_t^T`` (rank 1); the *update* is
``U_t = S_t - D_t * S_{t-1} = e_t (f_t^T S_{t-1}) + W_t`` (rank 2 with an erase term, ``= W_t`` without).

An edit at step t adds a matrix to the freshly written state; every edit kind is such a delta:

=================  =====================================
kind               delta added to ``S_t``
=================  =====================================
``replace``        ``M - W_t``  (or ``M - U_t`` for ``write="update"``)
``delete``         ``-W_t``     (or ``-U_t``)
``add``            ``M``
=================  =====================================

so replacing or deleting the additive write leaves the decay and erase terms untouched. A perturbation
``dS`` of the state evolves exactly as ``dS_t = D_t * dS_{t-1} + e_t (f_t^T dS_{t-1})`` (the layer's own
inputs do not depend on its state): :func:`transport` and :func:`transport_back`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

KINDS = ("replace", "delete", "add")
WRITES = ("additive", "update")
SCALES = (None, "write", "kv")


class Rule(NamedTuple):
    """Per-token inputs of the recurrence for one layer, all heads: ``(B, T, H, ...)``.

    q: ``(B, T, H, d_k)`` the read vector, already scaled; k: ``(B, T, H, d_k)`` write key;
    v: ``(B, T, H, d_v)`` write value; g: log-decay ``(B, T, H)`` or ``(B, T, H, d_k)``;
    b: write gate ``(B, T, H)``; e, f: erase pair ``(B, T, H, d_k)`` or ``None``; g may also be
    ``(B, T, H, d_k, d_v)`` (one decay per state entry)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    b: torch.Tensor
    e: torch.Tensor | None = None
    f: torch.Tensor | None = None

    def at(self, t):
        """The inputs of step t: ``(B, H, ...)``."""
        return Rule(*(None if x is None else x[:, t] for x in self))

    def span(self, t0, t1):
        """The inputs of steps ``t0..t1-1``."""
        return Rule(*(None if x is None else x[:, t0:t1] for x in self))


def decay(S, g, D=None):
    """``D * S`` with ``D = exp(g)`` (pass ``D`` when it is already known): g ``(...)`` scalar per matrix,
    ``(..., d_k)`` per key row or ``(..., d_k, d_v)`` per entry; S ``(..., d_k, d_v)``."""
    D = g.exp() if D is None else D
    if D.ndim == S.ndim:  # elementwise
        return S * D
    return S * (D[..., None, None] if D.ndim == S.ndim - 2 else D[..., :, None])


def native_write(k, v, b):
    """``W = b k v^T``: ``(..., d_k, d_v)``."""
    return b[..., None, None] * k[..., :, None] * v[..., None, :]


def step(S, r, D=None):
    """One native step. S: ``(B, H, d_k, d_v)``; r: :class:`Rule` of one step (``(B, H, ...)``); D: its
    ``exp(g)`` if already computed.

    Returns ``(S_t, D_t * S_{t-1})``."""
    Sd = decay(S, r.g, D)
    Sn = Sd + native_write(r.k, r.v, r.b)
    if r.e is not None:
        Sn = Sn + r.e[..., :, None] * torch.einsum("bhkv,bhk->bhv", S, r.f)[..., None, :]
    return Sn, Sd


def read(S, q):
    """Head output ``o = S^T q``: ``(B, H, d_v)``."""
    return torch.einsum("bhkv,bhk->bhv", S, q)


def edit_delta(kind, matrix, write, W, U):
    """The matrix added to ``S_t`` for one edit (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"edit kind {kind!r} is not one of {KINDS}")
    if write not in WRITES:
        raise ValueError(f"edit write {write!r} is not one of {WRITES}")
    if kind == "add":
        return matrix
    native = W if write == "additive" else U
    return -native if kind == "delete" else matrix - native


def apply_edits(S, Sd, r, edits):
    """Add each edit's delta to the native state ``S_t`` ``(B, H, d_k, d_v)``; ``Sd = D_t * S_{t-1}``.

    edits: list of ``(row, head, kind, matrix, write, scale)``; scale ``None``, ``"write"`` (times
    ``||W_t||_F``) or ``"kv"`` (times ``||k_t v_t^T||_F``)."""
    out = S.clone()
    for row, head, kind, matrix, write, scale in edits:
        k, v = r.k[row, head], r.v[row, head]
        W = native_write(k, v, r.b[row, head])
        if matrix is not None:
            matrix = matrix.to(S)
            if scale == "write":
                matrix = matrix * W.norm()
            elif scale == "kv":
                matrix = matrix * (k.norm() * v.norm())
            elif scale is not None:
                raise ValueError(f"edit scale {scale!r} is not one of {SCALES}")
        out[row, head] += edit_delta(kind, matrix, write, W, S[row, head] - Sd[row, head])
    return out


class Record(NamedTuple):
    """Steps whose states :func:`run` keeps, and of which heads (None: all, views of the running state). A few
    heads are copies: at 128 x 128 states, keeping all 16 heads of 16 windows at every one of 1,024 steps holds
    17 GB, where a trace reads one head."""

    steps: tuple
    heads: tuple | None = None


def run(S, rule: Rule, edits=None, record=(), chunk: Callable | None = None, min_chunk=8):
    """The recurrence over T steps, with edits and recorded states at chosen steps.

    S: ``(B, H, d_k, d_v)`` state before step 0; rule: :class:`Rule` with T steps.
    edits: ``{step: [edit, ...]}`` (see :func:`apply_edits`); record: steps whose ``(S_{t-1}, S_t)`` to keep
    (every head), or a :class:`Record` (those of its heads only, in its order on dim 1).
    chunk: optional fast form ``chunk(rule, S0) -> (o, S_T)`` for stretches with neither edits nor records
    (a chunked torch form on CPU, flash-linear-attention's kernel on CUDA); stretches shorter than
    ``min_chunk``, and everything when ``chunk`` is None, run step by step.
    Returns ``(o (B, T, H, d_v), S_T, {t: (S_{t-1}, S_t)})``."""
    T = rule.q.shape[1]
    edits = edits or {}
    record, heads = (record.steps, record.heads) if isinstance(record, Record) else (record, None)
    record, heads = set(record), None if heads is None else list(heads)
    special = sorted(set(edits) | set(record))
    kept, outs, t = {}, [], 0
    D = rule.g.exp()  # once for every step
    for stop in special + [T]:
        if stop > t:  # a plain stretch [t, stop)
            if chunk is not None and stop - t >= min_chunk:
                o, S = chunk(rule.span(t, stop), S)
                outs.append(o)
            else:
                for s in range(t, stop):
                    r = rule.at(s)
                    S, _ = step(S, r, D[:, s])
                    outs.append(read(S, r.q)[:, None])
        if stop == T:
            break
        S_prev, r = S, rule.at(stop)
        S, Sd = step(S, r, D[:, stop])
        if stop in edits:
            S = apply_edits(S, Sd, r, edits[stop])
        if stop in record:
            kept[stop] = (S_prev, S) if heads is None else (S_prev[:, heads], S[:, heads])
        outs.append(read(S, r.q)[:, None])
        t = stop + 1
    return torch.cat(outs, 1), S, kept


def transport(dS, g, e=None, f=None):
    """One step of a state perturbation: ``D * dS + e (f^T dS)``. dS ``(..., d_k, d_v)``; g, e, f of one
    step (g ``(...)``, ``(..., d_k)`` or ``(..., d_k, d_v)``; e, f ``(..., d_k)`` or None)."""
    out = decay(dS, g)
    if e is not None:
        out = out + e[..., :, None] * torch.einsum("...kv,...k->...v", dS, f)[..., None, :]
    return out


def transport_back(y, g, e=None, f=None):
    """The transpose of :func:`transport`: ``D * y + f (e . y)`` on a key-side vector y ``(..., d_k)``.

    Carrying ``q_t`` back from t to t0 with it gives ``P^T q_t`` with ``P`` the transport from t0 to t, so a
    perturbation ``dS_{t0}`` changes the head output at t by exactly ``dS_{t0}^T P^T q_t``
    (:func:`read_through`). Under an elementwise decay (g ``(..., d_k, d_v)``) each output column is carried
    on its own: y becomes the matrix ``y 1^T`` ``(..., d_k, d_v)`` (column j what output j reads), carried as
    ``D * Y + f (e^T Y)``; pass that matrix on to the next step."""
    if g.ndim == y.ndim + 1:  # an elementwise decay meets a vector: y 1^T
        y = y[..., None].expand(*y.shape, g.shape[-1])
    D = g.exp()
    out = y * (D[..., None] if D.ndim == y.ndim - 1 else D)  # scalar; or per-row on a vector / elementwise on a matrix
    if e is not None:
        if e.ndim == y.ndim:  # a vector
            out = out + f * (e * y).sum(-1, keepdim=True)
        else:  # a matrix
            out = out + f[..., :, None] * torch.einsum("...kv,...k->...v", y, e)[..., None, :]
    return out


def read_through(dS, y):
    """The head-output change ``dS^T y`` (..., d_v) of a state perturbation dS ``(..., d_k, d_v)`` read with y
    from :func:`transport_back`: a vector ``(..., d_k)``, or a matrix (elementwise decay) whose column j
    reads column j of dS."""
    if y.ndim == dS.ndim:
        return (dS * y).sum(-2)
    return torch.einsum("...kv,...k->...v", dS, y)


def mean_decay(a, lead=2):
    """The decay as one number per step: ``a`` itself (a scalar per head) or its mean over the key rows or the
    entries; ``lead``: the number of leading dims to keep (a trace's (B, P): 2)."""
    return a if a.ndim == lead else a.flatten(lead).mean(-1)


def chunked(rule, S0, chunk_size=32):
    """The recurrence without erase under a scalar or per-row decay over a stretch, in the chunked torch form of
    gated linear attention (:func:`writesae.ops.gla.chunk_gla`, exact whatever the decays; b folded into k; q
    read as given). Returns ``(o (B, T, H, d_v), S_T)``, as a ``chunk`` of :func:`run`."""
    from .gla import chunk_gla

    if rule.e is not None or rule.g.ndim == rule.k.ndim + 1:
        raise ValueError("chunked() runs a recurrence without an erase pair and with a scalar or per-row decay")
    g = rule.g[..., None].expand_as(rule.k) if rule.g.ndim == rule.k.ndim - 1 else rule.g
    o, S = chunk_gla(rule.q, rule.k * rule.b[..., None], rule.v, g, scale=1.0, initial_state=S0,
                     output_final_state=True, chunk_size=chunk_size)
    return o.float(), S.float()


def scan(rule, S0):
    """The recurrence without erase over a stretch, ``S_t = D_t * S_{t-1} + b_t k_t v_t^T``, as a sequential
    scan with everything but the time loop vectorised: the fast form of the elementwise decay (Mamba-1's
    selective scan), whose chunked form would cost ``C^2 d_k d_v`` per chunk of C steps against the scan's
    ``d_k d_v`` per step. Returns ``(o (B, T, H, d_v), S_T)``, as a ``chunk`` of :func:`run`."""
    if rule.e is not None:
        raise ValueError("scan() runs a recurrence without an erase pair; give run() the family's chunked form")
    D, W = rule.g.exp(), native_write(rule.k, rule.v, rule.b)
    if D.ndim != W.ndim:
        D = D[..., None, None] if D.ndim == W.ndim - 2 else D[..., None]
    S, states = S0, []
    for t in range(W.shape[1]):
        S = torch.addcmul(W[:, t], D[:, t], S)
        states.append(S)
    return torch.einsum("bthkv,bthk->bthv", torch.stack(states, 1), rule.q), S
