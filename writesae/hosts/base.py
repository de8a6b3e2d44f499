"""Host-independent types: cells, cache edits, traces."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Cell(NamedTuple):
    """One (layer, value head) of a recurrent layer and the shape of its matrix state."""

    layer: int
    head: int
    d_k: int
    d_v: int

    @property
    def key(self) -> str:
        return f"L{self.layer}H{self.head}"


class Edit(NamedTuple):
    """One cache edit applied while the model runs.

    seq:    row of the ``input_ids`` batch the edit applies to.
    layer, head: the cell.
    pos:    absolute token position whose write is edited.
    kind:   ``"replace"`` the write by ``matrix``; ``"delete"`` the write; ``"add"`` ``matrix`` to the state.
    matrix: ``(d_k, d_v)`` (ignored for ``delete``).
    write:  which write ``replace``/``delete`` act on: ``"additive"`` ``b_t k_t v_t^T`` (the paper's) or
            ``"update"``, the full delta-rule update ``S_t - a_t S_{t-1}``.
    scale:  ``None`` (use ``matrix`` as given), ``"write"`` (multiply ``matrix`` by ``||W_t||_F`` of the
            edited position) or ``"kv"`` (multiply by ``||k_t v_t^T||_F``); the norm is read while running,
            so it works during generation too.
    """

    seq: int
    layer: int
    head: int
    pos: int
    kind: str
    matrix: torch.Tensor | None = None
    write: str = "additive"
    scale: str | None = None


class CellTrace(NamedTuple):
    """What the recurrence used at one cell, at the traced positions (B = sequences, P = positions), in the
    layout of :mod:`writesae.ops.recurrence` (``S`` is ``d_k x d_v``, the head reads ``o_t = S_t^T q_t``).

    q, k: ``(B, P, d_k)`` read vector (scaled) and write key; v: ``(B, P, d_v)``.
    a: the decay ``D_t = exp(g_t)``: ``(B, P)`` for a scalar per head, ``(B, P, d_k)`` for a vector per key row,
    ``(B, P, d_k, d_v)`` for one per state entry (Mamba-1).
    b: write gate ``(B, P)``; e, f: the erase pair ``(B, P, d_k)`` (``None`` for families without one).
    write: the native write ``b_t k_t v_t^T``; update: ``S_t - D_t * S_{t-1}`` (= write without erase);
    state: ``S_t`` after the step; prev_state: ``S_{t-1}``; all ``(B, P, d_k, d_v)``.
    out: head output ``S_t^T q_t`` ``(B, P, d_v)`` (before any norm, gate or skip term of the layer).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    write: torch.Tensor
    state: torch.Tensor
    prev_state: torch.Tensor
    out: torch.Tensor
    update: torch.Tensor
    e: torch.Tensor | None = None
    f: torch.Tensor | None = None


class Trace(NamedTuple):
    """Result of :meth:`host.trace`: per-cell traces, the traced positions and the logits ``(B, T, V)`` (None
    from ``trace(..., logits=False)``)."""

    cells: dict
    positions: torch.Tensor
    logits: torch.Tensor

    def __getitem__(self, cell):  # trace[(layer, head)] -> CellTrace
        if isinstance(cell, (tuple, Cell)) and not isinstance(cell, Trace):
            return self.cells[(int(cell[0]), int(cell[1]))]
        return tuple.__getitem__(self, cell)


class EditRun(NamedTuple):
    """Result of :meth:`host.run_edits`.

    logits: ``(R, len(positions), V)`` one row per edit row; positions before a row's first edit hold the
    unedited logits (they cannot change). start: ``(R,)`` first edited position of each row.
    positions: the absolute positions the logits are for. base: ``(N, len(positions), V)`` unedited logits of
    each input sequence; seq: ``(R,)`` the input row of each edit row.
    """

    logits: torch.Tensor
    start: torch.Tensor
    positions: torch.Tensor
    base: torch.Tensor
    seq: torch.Tensor


class LayerState(NamedTuple):
    """A layer's cache, in one shape for every family.

    windows: the per-position streams the layer looks back on (causal-conv inputs, token-shift inputs,
    attention keys and values), each ``(B, t, ...)`` with time on dim 1 and row ``j`` the input at absolute
    position ``j``: a block uses the tail it needs, and a run can restart at any position ``p`` from
    ``window[:, :p]``. S: the matrix state ``(B, H, d_k, d_v)`` of a recurrent layer (``None`` for other
    layers, and for a recurrent layer before position 0)."""

    windows: tuple = ()
    S: torch.Tensor | None = None


class LayerOut(NamedTuple):
    """What a family's block returns (see :class:`writesae.hosts.recurrent.RecurrentHost`).

    hidden: the stream after the layer; state: its :class:`LayerState` after the last position.
    rule: the recurrence's inputs (:class:`writesae.ops.recurrence.Rule`, ``None`` for non-recurrent layers);
    kept: ``{step: (S_{t-1}, S_t)}`` at the recorded steps (of the recorded heads only, where ``record`` was a
    :class:`writesae.ops.recurrence.Record` of some); read: per-head inputs of
    ``host.head_out`` besides the head output itself, each ``(B, T, H, ...)`` (e.g. the output gate);
    o: the head outputs ``S_t^T q_t`` of the recurrence at every position, ``(B, T, H, d_v)`` float32 (``None``
    for other layers): what a later head reads, computed by the chunked forms too (no state kept)."""

    hidden: torch.Tensor
    state: LayerState
    rule: object = None
    kept: dict = {}
    read: tuple = ()
    o: torch.Tensor | None = None


class Readout(NamedTuple):
    """Result of :meth:`host.readout`: what carries one cell's head output to the logits.

    trace: the cell's :class:`CellTrace` at every position; context: the per-position inputs of
    ``host.head_out(cell, o, *context[b, t])`` besides ``o`` (each ``(B, T, ...)``); residual: the final
    residual stream ``(B, T, hidden)`` (the input of ``host.unembed``); logits ``(B, T, V)``."""

    trace: CellTrace
    context: tuple
    residual: torch.Tensor
    logits: torch.Tensor
