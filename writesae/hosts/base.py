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
    """What the recurrence used at one cell, at the traced positions (B = sequences, P = positions).

    q, k: ``(B, P, d_k)`` after conv, activation, L2-norm (q also scaled by ``1/sqrt(d_k)``).
    v: ``(B, P, d_v)``; a: forget gate ``exp(g_t)``, b: write gate, both ``(B, P)``.
    write: the native write ``b_t k_t v_t^T``, state: ``S_t`` after the step, both ``(B, P, d_k, d_v)``.
    prev_state: ``S_{t-1}`` ``(B, P, d_k, d_v)``; out: head output ``S_t^T q_t`` ``(B, P, d_v)``.
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


class Trace(NamedTuple):
    """Result of :meth:`host.trace`: per-cell traces, the traced positions and the logits ``(B, T, V)``."""

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
