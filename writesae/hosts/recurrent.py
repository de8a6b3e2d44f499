"""The host contract, and everything every recurrent host shares.

A host sees a model as a set of matrix-state *cells* (layer, value head) and can trace what the recurrence
used, run batched forwards with cache edits from a reused unedited prefix, generate with edits, and read
one head's output through to the logits. :class:`RecurrentHost` implements all of that once; a family
module (``gated_deltanet``, ``mamba2``, ``delta_net``, ``gla``, ``rwkv7``) subclasses it and supplies:

attributes
    ``family`` (registry name), ``kind`` (a word for error messages), ``layers``, ``layer_types``,
    ``recurrent_layers``, ``n_heads``, ``d_k``, ``d_v``.
``_embed(input_ids) -> stream (B, T, D)``
    The input of layer 0. The stream passed between layers is one tensor; a family whose layers share
    more than the residual (RWKV-7's ``v_first``) carries it alongside (see ``_residual``).
``_context(stream, start) -> ctx``
    Per-call context of the positions ``start..start+T-1`` (rotary tables, ...), passed to every block.
``_block(i, stream, ctx, state, edits, record) -> LayerOut``
    Layer i over T positions from ``state`` (a :class:`LayerState`, or ``None`` at position 0). A recurrent
    block builds its :class:`writesae.ops.recurrence.Rule` and runs :func:`writesae.ops.recurrence.run`
    with ``edits`` (``{step: [...]}``) and ``record`` (steps whose states to keep, as they come: a list, or a
    :class:`writesae.ops.recurrence.Record` naming the heads too), and returns the head outputs ``o`` that run
    gives in its :class:`LayerOut` (what :meth:`head_outputs` reads). Its state's windows
    hold every input position seen so far (time on dim 1), so a run can restart anywhere.
``_residual(stream) -> (B, T, hidden)``
    The residual part of the stream (default: all of it).
``unembed(residual) -> logits``
    Final norm and output head.
``head_out(cell, o, *context) -> (..., hidden)``
    The layer's output as a function of one head's output ``o`` (``(..., d_v)``, the ``S^T q`` of the
    recurrence), every other input held at the run's values (``context`` = the block's ``read`` at the same
    positions): gated norms, skip terms, the output projection. With ``unembed`` this is the *direct path*
    from a cell to the logits used by the closed form, sign prediction, erasure and generation install.
``head_unembed(cell) -> (V, d_v)``
    The paper's token read-out of a head output: ``W_U W_O[head]`` (no norms).

Dtypes (``load_host(..., dtype=)``; the paper's GPU runs: bfloat16 weights). The weights, the residual stream,
projections, norms, MLPs and attention layers run in the model's dtype. Every recurrent block casts what
enters the recurrence to float32: q, k, v, the gates (decay, write gate, erase pair), the initial state; so
the recurrence, the states ``S_t``, the writes, every edit (replace / delete / add, the scales read from the
write) and the head output ``o_t = S_t^T q_t`` are float32, and ``o_t`` is cast back to the model's dtype before
the layer's output norm and projection. Traces (:class:`CellTrace`) and prefixes keep float32 states; logits
are returned as float32 (the read-out runs in the model's dtype). The direct path (``head_out``, ``unembed``,
``head_unembed``) runs in the model's dtype: the experiments hand it inputs in that dtype and read its outputs
as float32 (``closed_form._layer_out`` / ``_logits``), so on a bf16 model the closed form's predicted logit shifts
carry bf16 rounding. SAEs are float32; state datasets store bfloat16 by default (``extract(..., dtype=)``).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..ops import recurrence
from .base import Cell, CellTrace, Edit, EditRun, LayerState, Readout, Trace

# The largest unedited logits (bytes, float32) a prefix keeps whole; beyond it (a 248k vocabulary: one
# 1,024-token window is 1 GB) each edited run unembeds only the positions it reads.
PREFIX_LOGITS_BYTES = 2 ** 30


def tail(window, n):
    """The last ``n`` rows (dim 1) of a window, left-padded with zeros when it is shorter."""
    w = window[:, max(0, window.shape[1] - n):]
    return F.pad(w, (0, 0) * (w.ndim - 2) + (n - w.shape[1], 0)) if w.shape[1] < n else w


def as_slice(idx):
    """Sorted unique indices (a list or a 1-D tensor) as a slice when they are a contiguous run, else as a
    tensor: indexing with a slice is a view (a plain copy on assignment), with a tensor a gather (an index_put)."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    return slice(int(idx[0]), int(idx[-1]) + 1) if len(idx) and int(idx[-1] - idx[0]) == len(idx) - 1 else idx


def grow(state, i, new):
    """Window ``i`` of ``state`` (or nothing) followed by ``new`` ``(B, T, ...)``: the window after the call."""
    return new if state is None else torch.cat([state.windows[i].to(new), new], 1)


class RecurrentHost:
    """Base class of the host adapters (see the module docstring for the contract a family fills in)."""

    kind = "recurrent"
    family = None

    def __init__(self, model, tokenizer=None, name=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__

    # ---------------------------------------------------------------- what a family supplies
    def _embed(self, input_ids):
        raise NotImplementedError

    def _context(self, stream, start):
        return None

    def _block(self, i, stream, ctx, state, edits, record):
        raise NotImplementedError

    def _residual(self, stream):
        return stream

    def unembed(self, residual):
        raise NotImplementedError

    def head_out(self, cell, o, *context):
        raise NotImplementedError

    def head_unembed(self, cell):
        raise NotImplementedError

    # ------------------------------------------------------------------------- the engine
    def _run(self, stream, start, first_layer, states, edits=None, record=None, keep_inputs=False, read=None,
             last_layer=None):
        """Run layers first_layer.. on ``stream`` (the input of layer first_layer at positions
        start..start+T-1) from per-layer states. edits / record: ``{layer: {step: [...]}}`` / ``{layer: steps}``.
        read: the steps (an index tensor or a slice of 0..T-1) whose logits to compute (default all): the
        read-out costs about as much as a few layers per position, so a caller reading a few positions says so.
        last_layer: stop after this layer (a trace that reads no logits needs no layer above its last cell);
        logits are then None and the last slot is the stream after that layer, not the final residual.

        Returns (logits at ``read``, new_states, layer_inputs {layer: stream}, {layer: LayerOut} of recorded
        layers, final residual (every position))."""
        ctx = self._context(stream, start)
        new_states, inputs, recorded = dict(states), {}, {}
        stop = len(self.layers) if last_layer is None else last_layer + 1
        for i in range(first_layer, stop):
            if keep_inputs:
                inputs[i] = stream
            rec = (record or {}).get(i, ())
            out = self._block(i, stream, ctx, states.get(i), (edits or {}).get(i), rec)
            stream, new_states[i] = out.hidden, out.state
            if rec:
                recorded[i] = out
        if stop < len(self.layers):  # no read-out: the last slot holds the stream after last_layer
            return None, new_states, inputs, recorded, stream
        residual = self._residual(stream)
        logits = self.unembed(residual if read is None else residual[:, read]).float()
        return logits, new_states, inputs, recorded, residual

    def _positions(self, positions, T, what="positions"):
        """Sorted unique positions in 0..T-1; negative ones count from the end, as in Python."""
        if positions is None:
            return list(range(T))
        out = sorted({int(p) for p in torch.as_tensor(positions).reshape(-1).tolist()})
        bad = [p for p in out if not -T <= p < T]
        if bad:
            raise ValueError(f"{what} {bad} outside an input of {T} tokens: use 0..{T - 1} (or -{T}..-1 from the end)")
        return sorted({p % T for p in out})

    @staticmethod
    def _ids(input_ids):
        ids = torch.as_tensor(input_ids)
        return ids[None] if ids.ndim == 1 else ids

    @staticmethod
    def _edits_by_layer(rows, offset=0):
        """[(row, Edit)] -> {layer: {step: [(row, head, kind, matrix, write, scale)]}} (steps = pos - offset)."""
        out = defaultdict(lambda: defaultdict(list))
        for r, e in rows:
            out[e.layer][e.pos - offset].append((r, e.head, e.kind, e.matrix, e.write, e.scale))
        return out

    # ------------------------------------------------------------------------------ cells
    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        """The dtype of the model's weights (what its projections, norms and read-out compute in)."""
        return next(self.model.parameters()).dtype

    @property
    def cells(self) -> list[Cell]:
        return [Cell(l, h, self.d_k, self.d_v) for l in self.recurrent_layers for h in range(self.n_heads)]

    def cell(self, layer, head) -> Cell:
        """Validate and return the cell (layer, head); errors list what exists."""
        n = len(self.layers)
        if not 0 <= layer < n:
            raise ValueError(f"layer {layer} does not exist: {self.name} has layers 0..{n - 1}; "
                             f"recurrent ({self.kind}) layers are {self.recurrent_layers}")
        if layer not in self.recurrent_layers:
            raise ValueError(f"layer {layer} is a {self.layer_types[layer]} layer, which has no matrix state; "
                             f"recurrent ({self.kind}) layers are {self.recurrent_layers}")
        if not 0 <= head < self.n_heads:
            raise ValueError(f"head {head} out of range: layer {layer} has value heads 0..{self.n_heads - 1}")
        return Cell(layer, head, self.d_k, self.d_v)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def work_per_token(self) -> tuple[list[int], int]:
        """Multiply-adds per token: (per layer, the read-out). A layer's are its weight matrices' sizes
        (attention's length-dependent part left out); the read-out is the output embedding (d_model x vocab).
        Benchmarks use it to state the analytic limit of an edited run with and without the read-out."""
        per_layer = [sum(p.numel() for p in layer.parameters() if p.ndim == 2) for layer in self.layers]
        return per_layer, int(self.model.get_output_embeddings().weight.numel())

    # -------------------------------------------------------------------------- public API
    @torch.no_grad()
    def logits(self, input_ids):
        """The library's own forward (fast kernels where available): (B, T, V) float32."""
        return self.model(input_ids=self._ids(input_ids).to(self.device)).logits.float()

    @staticmethod
    def _cell_trace(out, head, positions, slot=None):
        """The :class:`CellTrace` of one head from a recorded :class:`LayerOut`; ``slot``: the head's place in
        the kept states where the layer recorded a few heads (a :class:`writesae.ops.recurrence.Record`)."""
        P = torch.tensor(positions, dtype=torch.long)
        r = out.rule
        pick = lambda x: None if x is None else x[:, P, head]  # noqa: E731
        q, k, v, g, b, e, f = (pick(x) for x in r)
        slot = head if slot is None else slot
        S = torch.stack([out.kept[p][1][:, slot] for p in positions], 1)
        Sp = torch.stack([out.kept[p][0][:, slot] for p in positions], 1)
        update = S - recurrence.decay(Sp, g)
        return CellTrace(q=q, k=k, v=v, a=g.exp(), b=b, write=recurrence.native_write(k, v, b), state=S,
                         prev_state=Sp, out=torch.einsum("bpkv,bpk->bpv", S, q), update=update, e=e, f=f)

    def _trace_plan(self, input_ids, cells, positions, edits):
        """What a trace needs, checked: (ids, cells, positions, {layer: its traced heads, None for every head
        (kept as views)}, the edits by layer)."""
        ids = self._ids(input_ids).to(self.device)
        T = ids.shape[1]
        cells = self.cells if cells is None else [self.cell(int(c[0]), int(c[1])) for c in cells]
        positions = self._positions(positions, T)
        for e in edits:
            self._check_edit(e, ids.shape)
        heads = {l: sorted({c.head for c in cells if c.layer == l}) for l in sorted({c.layer for c in cells})}
        heads = {l: h if len(h) < self.n_heads else None for l, h in heads.items()}
        return ids, cells, positions, heads, self._edits_by_layer([(e.seq, e) for e in self._norm_edits(edits, T)])

    @staticmethod
    def _slot(heads, head):
        """A head's place in the states a layer kept (``heads``: those it recorded; None: every head)."""
        return None if heads is None else heads.index(head)

    def _traced(self, input_ids, cells, positions, edits, logits=True):
        """(cells, positions, ``_run``'s outputs, {cell: CellTrace}); each layer keeps the states of its traced
        heads only, and ``logits=False`` computes none (at a 248k vocabulary they are 1 GB per 1,024-token window)
        and runs no layer above the last traced one (tracing a model's heads a few layers at a time then costs
        about half the forwards)."""
        ids, cells, positions, heads, edits = self._trace_plan(input_ids, cells, positions, edits)
        record = {l: recurrence.Record(positions, h) for l, h in heads.items()}
        run = self._run(self._embed(ids), 0, 0, {}, record=record, read=None if logits else slice(0, 0),
                        edits=edits, last_layer=None if logits else max(heads))
        traced = {c: self._cell_trace(run[3][c.layer], c.head, positions, self._slot(heads[c.layer], c.head))
                  for c in cells}
        return cells, positions, run, traced

    def trace_bytes(self, cells, tokens) -> int:
        """The memory one of ``cells`` (the largest) takes in a :meth:`trace` over ``tokens`` (rows x positions):
        its state and write at each, float32. Callers that trace many cells split them by it."""
        return tokens * 2 * 4 * max(self.cell(c[0], c[1]).d_k * self.cell(c[0], c[1]).d_v for c in cells)

    @torch.no_grad()
    def trace(self, input_ids, cells=None, positions=None, edits=(), logits=True) -> Trace:
        """One batched forward returning, for each cell, what the recurrence used at ``positions``
        (default: all; negative ones count from the end) plus the logits (``logits=False``: None, and no
        read-out computed). ``cells``: list of (layer, head); default all cells. ``edits``: Edits (``seq`` =
        batch row) applied during the run."""
        cells, positions, run, traced = self._traced(input_ids, cells, positions, edits, logits)
        out = {(c.layer, c.head): traced[c] for c in cells}
        return Trace(out, torch.tensor(positions, dtype=torch.long), run[0] if logits else None)

    @torch.no_grad()
    def trace_layers(self, input_ids, cells=None, positions=None, edits=()):
        """What :meth:`trace` (``logits=False``) gives for ``cells`` (default all), walking up the model once and
        yielding ``(layer, {(layer, head): CellTrace})`` for each layer holding some of them, in order: only one
        layer's traces are held at a time, no layer above the last traced one runs, and no logits are computed.
        For measurements over many heads (``overview.cell_memory``, ``partition.reader_heads``), where tracing a
        few heads per forward would rerun the lower layers for each few. ``edits``: as :meth:`trace`'s."""
        for layer, cs, hs, positions, out in self._walk(input_ids, cells, positions, edits, states=True):
            yield layer, {(c.layer, c.head): self._cell_trace(out, c.head, positions, self._slot(hs, c.head))
                          for c in cs}

    @torch.no_grad()
    def head_outputs(self, input_ids, cells=None, positions=None, edits=()):
        """The head outputs ``o_t = S_t^T q_t`` (what a trace's ``out`` holds) of ``cells`` (default all) at
        ``positions``, walking up the model once like :meth:`trace_layers`: yields ``(layer, {(layer, head):
        (B, P, d_v) float32})``. No state is kept, so the unedited stretches run in the chunked forms (a trace's
        recorded positions run step by step): for measurements that read what later heads output
        (``partition.reader_heads``). ``edits``: as :meth:`trace`'s."""
        for layer, cs, _, positions, out in self._walk(input_ids, cells, positions, edits, states=False):
            o = out.o[:, torch.tensor(positions, dtype=torch.long)]
            yield layer, {(c.layer, c.head): o[:, :, c.head] for c in cs}

    def _walk(self, input_ids, cells, positions, edits, states):
        """Up the model once, yielding ``(layer, its cells, its traced heads, positions, LayerOut)`` for each layer
        holding some of ``cells``; ``states``: keep those heads' states at ``positions`` (else none: the
        LayerOut's ``o`` only)."""
        ids, cells, positions, heads, edits = self._trace_plan(input_ids, cells, positions, edits)
        stream, first = self._embed(ids), 0
        for layer, hs in heads.items():
            record = {layer: recurrence.Record(positions if states else (), hs)}
            _, _, _, rec, stream = self._run(stream, 0, first, {}, edits=edits, record=record, read=slice(0, 0),
                                             last_layer=layer)
            first = layer + 1
            yield layer, [c for c in cells if c.layer == layer], hs, positions, rec[layer]

    @torch.no_grad()
    def readout(self, cell, input_ids, edits=()) -> Readout:
        """Trace ``cell`` at every position and keep what carries its head output to the logits: the
        per-position ``context`` of :meth:`head_out` and the final residual stream (see :class:`Readout`)."""
        (c,), positions, (logits, _, _, rec, residual), traced = self._traced(input_ids, [cell], None, edits)
        context = self._read_context(rec[c.layer].read, c.head)
        return Readout(traced[c], context, residual.float(), logits)

    @staticmethod
    def _read_context(read, head):
        """The ``head_out`` context of one head from a block's ``read`` tensors (default: each (B, T, H, ...))."""
        return tuple(x[:, :, head] for x in read)

    def _check_edit(self, e, shape):
        N, T = shape
        if not isinstance(e, Edit):
            raise TypeError(f"an edit must be a writesae.Edit, got {type(e).__name__}: build it as "
                            "Edit(seq, layer, head, pos, kind, matrix)")
        c = self.cell(e.layer, e.head)
        if not 0 <= e.seq < N:
            raise ValueError(f"edit seq={e.seq} outside the input's {N} sequences (0..{N - 1})")
        if not -T <= e.pos < T:
            raise ValueError(f"edit pos={e.pos} outside an input of {T} tokens: use 0..{T - 1} (or -{T}..-1)")
        if e.kind not in recurrence.KINDS:
            raise ValueError(f"edit kind {e.kind!r} is not one of {recurrence.KINDS}")
        if e.write not in recurrence.WRITES:
            raise ValueError(f"edit write {e.write!r} is not one of {recurrence.WRITES}")
        if e.scale not in recurrence.SCALES:
            raise ValueError(f"edit scale {e.scale!r} is not one of {recurrence.SCALES}")
        if e.kind != "delete":
            if e.matrix is None:
                raise ValueError(f"a {e.kind!r} edit needs a matrix of shape ({c.d_k}, {c.d_v}) for cell {c.key}")
            if tuple(torch.as_tensor(e.matrix).shape) != (c.d_k, c.d_v):
                raise ValueError(f"edit matrix has shape {tuple(torch.as_tensor(e.matrix).shape)}, but cell {c.key} "
                                 f"of {self.name} holds a (d_k, d_v) = ({c.d_k}, {c.d_v}) state: pass a matrix of "
                                 f"that shape (S is d_k x d_v; transpose it if it is d_v x d_k)")

    @staticmethod
    def _norm_edits(edits, T):
        """Edits with negative positions counted from the end."""
        return [e._replace(pos=e.pos % T) if e.pos < 0 else e for e in edits]

    @torch.no_grad()
    def prefix(self, input_ids, positions, cells=(), from_layer=0):
        """Run each sequence once, unedited, and keep what an edited run from any of ``positions`` needs:
        every layer's input and windows, and the matrix state before each position. Pass the result to
        :meth:`run_edits` (``prefix=``) to reuse it across calls. ``cells``: also trace these cells at
        ``positions`` (``prefix.trace``, a :class:`Trace`), from the same pass. ``from_layer``: keep states
        only for the layers from this one on (edits below it are then refused); keeping a state at a position
        makes the recurrence step there, so a late edit's prefix is cheaper with it.

        The unedited logits are kept whole where they fit in ``PREFIX_LOGITS_BYTES`` (float32), else each run
        unembeds the final residual at the positions it reads (``prefix.trace.logits`` is then None)."""
        input_ids = self._ids(input_ids).to(self.device)
        N, T = input_ids.shape
        positions = self._positions(positions, T)
        cells = [self.cell(int(c[0]), int(c[1])) for c in cells]
        record = {l: [p - 1 for p in positions if p > 0] if l >= from_layer else [] for l in self.recurrent_layers}
        for c in cells:
            record[c.layer] = sorted(set(record[c.layer]) | set(positions))
        whole = 4 * N * T * self.vocab_size <= PREFIX_LOGITS_BYTES
        logits, states, inputs, rec, residual = self._run(self._embed(input_ids), 0, 0, {}, record=record,
                                                          keep_inputs=True, read=None if whole else slice(0, 0))
        kept = {l: rec[l].kept if l in rec else {} for l in self.recurrent_layers}
        trace = Trace({(c.layer, c.head): self._cell_trace(rec[c.layer], c.head, positions) for c in cells},
                      torch.tensor(positions, dtype=torch.long), logits if whole else None)
        return _Prefix(self, input_ids, logits if whole else residual, inputs, states, kept, positions, trace,
                       from_layer, whole)

    @torch.no_grad()
    def run_edits(self, input_ids, edits, positions=None, reuse_prefix=True, prefix=None, progress=False) -> EditRun:
        """Run R edit rows as batched forwards; returns one output distribution per row.

        input_ids: (N, T). edits: a list whose items are an :class:`Edit` (a row of its own) or a list of
        Edits on the same sequence (one row, all applied). Rows sharing (sequence, first edited position)
        run as one batch that starts at that position and at the first edited layer, from the cached
        unedited prefix (``reuse_prefix=False`` recomputes everything from position 0, row by row: the
        naive reference). positions: which absolute positions' logits to return (default all; negative
        ones count from the end). prefix: a :meth:`prefix` of the same ``input_ids`` holding every row's first
        edited position, computed once and shared by several calls."""
        input_ids = self._ids(input_ids)
        N, T = input_ids.shape
        rows = [[e] if isinstance(e, Edit) else list(e) for e in edits]
        for r in rows:
            if not r:
                raise ValueError("an edit row is empty: give each row at least one Edit")
            for e in r:
                self._check_edit(e, (N, T))
            if len({e.seq for e in r}) != 1:
                raise ValueError(f"all edits of one row must share its sequence, got seq {sorted({e.seq for e in r})}")
        rows = [self._norm_edits(r, T) for r in rows]
        positions = torch.tensor(self._positions(positions, T), dtype=torch.long)
        starts = torch.tensor([min(e.pos for e in r) for r in rows], dtype=torch.long)
        seqs = torch.tensor([r[0].seq for r in rows], dtype=torch.long)
        if not reuse_prefix:
            # the release's method: a full forward (every position read out) per row
            base = self._run(self._embed(input_ids), 0, 0, {})[0][:, positions].cpu()
            outs = []
            for r in tqdm(rows, disable=not progress, desc="naive edited runs"):
                lg = self._run(self._embed(input_ids[r[0].seq:r[0].seq + 1]), 0, 0, {},
                               edits=self._edits_by_layer([(0, e) for e in r]))[0]
                outs.append(lg[0, positions].cpu())
            return EditRun(torch.stack(outs) if outs else base[:0], starts, positions, base, seqs)
        pre = self.prefix(input_ids, starts.tolist()) if prefix is None else prefix
        if prefix is not None:
            missing = sorted(set(starts.tolist()) - set(pre.positions))
            if pre.input_ids.shape != input_ids.shape or not torch.equal(pre.input_ids.cpu(), input_ids.cpu()):
                raise ValueError("prefix= was computed for other input_ids: build it with host.prefix(input_ids, ...)")
            if missing:
                raise ValueError(f"prefix= holds no state before positions {missing}: include them in host.prefix(...)")
            low = min(e.layer for r in rows for e in r)
            if low < pre.from_layer:
                raise ValueError(f"prefix= keeps states from layer {pre.from_layer} on, but an edit is on layer {low}: "
                                 f"build it with host.prefix(..., from_layer={low})")
        base = pre.base(as_slice(positions)).cpu()  # a contiguous run of positions: a view, not a copy
        out = torch.empty(len(rows), *base.shape[1:], dtype=base.dtype)
        groups = defaultdict(list)
        for j, r in enumerate(rows):
            groups[(r[0].seq, int(starts[j]))].append(j)
        for (s, p), idx in tqdm(groups.items(), disable=not progress, desc="edited runs"):
            l0 = min(e.layer for j in idx for e in rows[j])
            stream, states = pre.start(s, p, l0, len(idx))
            ed = self._edits_by_layer([(n, e) for n, j in enumerate(idx) for e in rows[j]], offset=p)
            k0 = int(torch.searchsorted(positions, p))  # positions are sorted: those before p are unedited
            lg = self._run(stream, p, l0, states, edits=ed, read=as_slice(positions[k0:] - p))[0]  # only these
            # consecutive rows (the substitution's) are written through a slice: an index_put into the large
            # output costs as much as a few layers
            rows_ = as_slice(idx)
            out[rows_, :k0] = base[s, :k0]
            out[rows_, k0:] = lg.cpu()
        return EditRun(out, starts, positions, base, seqs)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=20, edits=(), steer=None):
        """Greedy decoding with cache edits at chosen absolute positions (prompt or generated).

        input_ids: (B, T) prompts of equal length; edits: Edits whose ``seq`` is the batch row.
        steer: optional ``((layer, head), fn)`` for edits that depend on the run itself (feature steering): at
        every position p that predicts a token (the last prompt position and each generated one), ``fn(p, S)``
        gets the cell's state ``S`` ``(B, d_k, d_v)`` after position p, as the edited run has it, and returns
        Edits at p (possibly none), which apply before p's logits are read. Each position is one incremental
        step (two when ``fn`` edits), never a rerun of the sequence.
        Always decodes ``max_new_tokens`` (no stop at end-of-text). Returns (B, T + max_new_tokens) ids."""
        ids = self._ids(input_ids).to(self.device)
        B, T = ids.shape
        for e in edits:
            self._check_edit(e, (B, T + max_new_tokens))
        rows = [(e.seq, e) for e in edits]
        if steer is not None:
            (layer, head), fn = steer
            self.cell(layer, head)
        start = T if steer is None else T - 1  # with steer the last prompt position is a step like the others
        states, logits = {}, None
        if start:
            logits, states, _, _, _ = self._run(self._embed(ids[:, :start]), 0, 0, {}, read=slice(-1, None),
                                                edits=self._edits_by_layer([x for x in rows if x[1].pos < start]))
        for p in range(start, T + max_new_tokens - 1):
            if p >= T:
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
            stream = self._embed(ids[:, p:p + 1])
            ed = [x for x in rows if x[1].pos == p]
            logits, new, inputs, _, _ = self._run(stream, p, 0, states, edits=self._edits_by_layer(ed, offset=p),
                                                  keep_inputs=steer is not None)
            if steer is not None:
                extra = list(fn(p, new[layer].S[:, head]) or ())
                for e in extra:
                    self._check_edit(e, (B, p + 1))
                    if e.pos != p:
                        raise ValueError(f"steer returned an edit at position {e.pos} while at position {p}: "
                                         "it can only edit the position it is shown")
                if extra:  # rerun p from the steered layer with the new edits
                    before = {**{i: st for i, st in states.items() if i >= layer},
                              **{i: st for i, st in new.items() if i < layer}}
                    ed = ed + [(e.seq, e) for e in extra]
                    logits, new, _, _, _ = self._run(inputs[layer], p, layer, before,
                                                     edits=self._edits_by_layer(ed, offset=p))
            states = new
        return torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1) if max_new_tokens else ids


class _Prefix:
    """Cached unedited run of a batch of sequences; builds batched start states for edited runs."""

    def __init__(self, host, input_ids, out, inputs, states, kept, positions, trace, from_layer=0, whole=True):
        self.host, self.input_ids, self.out, self.whole = host, input_ids, out, whole  # logits, or the residual
        self.inputs, self.final, self.kept = inputs, states, kept
        self.positions, self.trace, self.from_layer = positions, trace, from_layer

    def base(self, read):
        """Unedited logits ``(N, len(read), V)`` at the steps ``read`` (an index tensor or a slice)."""
        return self.out[:, read] if self.whole else self.host.unembed(self.out[:, read]).float()

    def start(self, seq, pos, first_layer, n):
        """(stream (n, T-pos, D), states) to run layers first_layer.. from position pos, n copies."""
        one = lambda x: x[seq:seq + 1].expand(n, *x.shape[1:])  # noqa: E731
        stream = one(self.inputs[first_layer][:, pos:])
        states = {}
        for i in range(first_layer, len(self.host.layers)):
            st = self.final[i]
            S = one(self.kept[i][pos - 1][1]) if i in self.kept and pos > 0 else None
            states[i] = LayerState(tuple(one(w[:, :pos]) for w in st.windows), S)
        return stream, states
