"""What every recurrent host shares: cells, traces, batched edited runs from a cached prefix, generation.

A family module subclasses :class:`RecurrentHost` and supplies the model-specific pieces: how to embed,
how one block runs (``_block``), the positional context (``_context``), the output head (``_head``), and
how to cut a non-recurrent layer's state at a position (``_slice_state``). A recurrent block returns,
besides its output and new state, ``used = (q, k, v, g, b, conv_inputs)`` (what the recurrence used, in
the layout of :mod:`writesae.ops.delta_rule`) and the states it recorded; its state is
``(conv, S)`` with ``conv`` the last ``K-1`` conv inputs ``(B, C, K-1)`` and ``S`` ``(B, H, d_k, d_v)``.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..ops import delta_rule
from .base import Cell, CellTrace, Edit, EditRun, Trace


class RecurrentHost:
    """Base class of the host adapters (see the module docstring for what a subclass supplies)."""

    kind = "recurrent"  # a word for the recurrent layers in error messages

    def __init__(self, model, tokenizer=None, name=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__

    def _run(self, hidden, start, first_layer, states, edits=None, record=None, keep_inputs=False):
        """Run layers first_layer.. on hidden (B,T,hidden) = input of layer first_layer at positions
        start..start+T-1, from per-layer states. edits/record: {layer: {step: [...]}} / {layer: steps}.

        Returns (logits, new_states, layer_inputs {layer: hidden}, recorded {layer: (used, kept)})."""
        ctx = self._context(hidden, start)
        new_states, inputs, recorded = dict(states), {}, {}
        for i in range(first_layer, len(self.layers)):
            if keep_inputs:
                inputs[i] = hidden
            rec = (record or {}).get(i, ())
            hidden, new_states[i], out = self._block(i, hidden, ctx, states.get(i), (edits or {}).get(i), rec)
            if rec:
                recorded[i] = out
        return self._head(hidden).float(), new_states, inputs, recorded

    # ------------------------------------------------------------------ cells
    @property
    def device(self):
        return next(self.model.parameters()).device

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

    def _embed(self, input_ids):
        return self.decoder.embed_tokens(input_ids.to(self.device))

    @staticmethod
    def _edits_by_layer(rows, offset=0):
        """[(row, Edit)] -> {layer: {step: [(row, head, kind, matrix, write, scale)]}} (steps = pos - offset)."""
        out = defaultdict(lambda: defaultdict(list))
        for r, e in rows:
            out[e.layer][e.pos - offset].append((r, e.head, e.kind, e.matrix, e.write, e.scale))
        return out

    # ------------------------------------------------------------- public API
    @torch.no_grad()
    def logits(self, input_ids):
        """Unmodified transformers forward (fast kernels where available): (B, T, V) float32."""
        return self.model(input_ids=input_ids.to(self.device)).logits.float()

    @torch.no_grad()
    def trace(self, input_ids, cells=None, positions=None, edits=()) -> Trace:
        """One batched forward returning, for each cell, what the recurrence used at ``positions``
        (default: all) plus the logits. ``cells``: list of (layer, head); default all cells.
        ``edits``: Edits (``seq`` = batch row) applied during the run, so edited states can be read."""
        input_ids = torch.as_tensor(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        T = input_ids.shape[1]
        cells = [self.cell(l, h) for l, h in (cells if cells is not None else [(c.layer, c.head) for c in self.cells])]
        positions = list(range(T)) if positions is None else sorted({int(p) for p in positions})
        if positions and not 0 <= positions[0] <= positions[-1] < T:
            raise ValueError(f"positions must lie in 0..{T - 1}")
        layers = sorted({c.layer for c in cells})
        logits, _, _, rec = self._run(self._embed(input_ids), 0, 0, {}, record={l: positions for l in layers},
                                      edits=self._edits_by_layer([(e.seq, e) for e in edits]))
        P = torch.tensor(positions, dtype=torch.long)
        out = {}
        for c in cells:
            (q, k, v, g, b, _), kept = rec[c.layer]
            h = c.head
            S = torch.stack([kept[p][1][:, h] for p in positions], 1)
            Sp = torch.stack([kept[p][0][:, h] for p in positions], 1)
            qh, kh, vh, bh = q[:, P, h], k[:, P, h], v[:, P, h], b[:, P, h]
            out[(c.layer, c.head)] = CellTrace(
                q=qh, k=kh, v=vh, a=g[:, P, h].exp(), b=bh, write=delta_rule.native_write(kh, vh, bh),
                state=S, prev_state=Sp, out=torch.einsum("bpkv,bpk->bpv", S, qh))
        return Trace(out, P, logits)

    @torch.no_grad()
    def prefix(self, input_ids, positions):
        """Run each sequence once, unedited, and keep what an edited run from any of ``positions`` needs:
        every layer's input, attention keys/values, conv inputs, and the matrix state before each position."""
        input_ids = torch.as_tensor(input_ids).to(self.device)
        positions = sorted({int(p) for p in positions})
        record = {l: [p - 1 for p in positions if p > 0] for l in self.recurrent_layers}
        logits, states, inputs, rec = self._run(self._embed(input_ids), 0, 0, {}, record=record, keep_inputs=True)
        mixed = {l: rec[l][0][5] if l in rec else None for l in self.recurrent_layers}
        kept = {l: rec[l][1] if l in rec else {} for l in self.recurrent_layers}
        return _Prefix(self, input_ids, logits, inputs, states, mixed, kept)

    @torch.no_grad()
    def run_edits(self, input_ids, edits, positions=None, reuse_prefix=True, progress=False) -> EditRun:
        """Run B edit rows as batched forwards; returns one output distribution per row.

        input_ids: (N, T). edits: a list whose items are an :class:`Edit` (a row of its own) or a list of
        Edits on the same sequence (one row, all applied). Rows sharing (sequence, first edited position)
        run as one batch that starts at that position and at the first edited layer, from the cached
        unedited prefix (``reuse_prefix=False`` recomputes everything from position 0, row by row: the
        naive reference). positions: which absolute positions' logits to return (default all)."""
        input_ids = torch.as_tensor(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        N, T = input_ids.shape
        rows = [[e] if isinstance(e, Edit) else list(e) for e in edits]
        for r in rows:
            if not r:
                raise ValueError("an edit row is empty")
            if len({e.seq for e in r}) != 1:
                raise ValueError("all edits of one row must share its sequence")
            for e in r:
                self.cell(e.layer, e.head)
                if not 0 <= e.seq < N or not 0 <= e.pos < T:
                    raise ValueError(f"edit {e.seq=}, {e.pos=} outside input of shape {(N, T)}")
        positions = torch.arange(T) if positions is None else torch.as_tensor(positions, dtype=torch.long)
        starts = torch.tensor([min(e.pos for e in r) for r in rows], dtype=torch.long)
        seqs = torch.tensor([r[0].seq for r in rows], dtype=torch.long)
        if not reuse_prefix:
            base = self._run(self._embed(input_ids), 0, 0, {})[0][:, positions].cpu()
            outs = []
            for r in tqdm(rows, disable=not progress, desc="naive edited runs"):
                lg = self._run(self._embed(input_ids[r[0].seq:r[0].seq + 1]), 0, 0, {},
                               edits=self._edits_by_layer([(0, e) for e in r]))[0]
                outs.append(lg[0, positions].cpu())
            return EditRun(torch.stack(outs) if outs else base[:0], starts, positions, base, seqs)
        pre = self.prefix(input_ids, starts.tolist())
        base = pre.logits[:, positions].cpu()
        out = base[seqs].clone()
        groups = defaultdict(list)
        for j, r in enumerate(rows):
            groups[(r[0].seq, int(starts[j]))].append(j)
        for (s, p), idx in tqdm(groups.items(), disable=not progress, desc="edited runs"):
            l0 = min(e.layer for j in idx for e in rows[j])
            hidden, states = pre.start(s, p, l0, len(idx))
            ed = self._edits_by_layer([(n, e) for n, j in enumerate(idx) for e in rows[j]], offset=p)
            lg = self._run(hidden, p, l0, states, edits=ed)[0]
            sel = positions >= p
            out[torch.tensor(idx)[:, None], sel.nonzero()[:, 0][None]] = lg[:, positions[sel] - p].cpu()
        return EditRun(out, starts, positions, base, seqs)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=20, edits=()):
        """Greedy decoding with cache edits at chosen absolute positions (prompt or generated).

        input_ids: (B, T) prompts of equal length; edits: Edits whose ``seq`` is the batch row.
        Always decodes ``max_new_tokens`` (no stop at end-of-text). Returns (B, T + max_new_tokens) ids."""
        ids = torch.as_tensor(input_ids).to(self.device)
        if ids.ndim == 1:
            ids = ids[None]
        rows = [(e.seq, e) for e in edits]
        T = ids.shape[1]
        logits, states, _, _ = self._run(self._embed(ids), 0, 0, {},
                                         edits=self._edits_by_layer([x for x in rows if x[1].pos < T]))
        for n in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            if n == max_new_tokens - 1:
                break
            p = ids.shape[1] - 1
            ed = self._edits_by_layer([x for x in rows if x[1].pos == p], offset=p)
            logits, states, _, _ = self._run(self._embed(nxt), p, 0, states, edits=ed)
        return ids


class _Prefix:
    """Cached unedited run of a batch of sequences; builds batched start states for edited runs."""

    def __init__(self, host, input_ids, logits, inputs, states, mixed, kept):
        self.host, self.input_ids, self.logits = host, input_ids, logits
        self.inputs, self.final, self.mixed, self.kept = inputs, states, mixed, kept

    def start(self, seq, pos, first_layer, n):
        """(hidden (n, T-pos, hidden), states) to run layers first_layer.. from position pos, n copies."""
        h = self.host
        hidden = self.inputs[first_layer][seq:seq + 1, pos:].expand(n, -1, -1)
        states = {}
        for i in range(first_layer, len(h.layers)):
            if i in h.recurrent_layers:
                K = h.conv_kernel
                m = self.mixed[i][seq:seq + 1, :, max(0, pos - K + 1):pos]
                conv = F.pad(m, (K - 1 - m.shape[-1], 0))
                S = self.kept[i][pos - 1][1][seq:seq + 1] if pos > 0 else torch.zeros_like(self.final[i][1][:1])
                states[i] = (conv.expand(n, -1, -1), S.expand(n, -1, -1, -1))
            else:
                states[i] = h._slice_state(i, self.final[i], seq, pos, n)
        return hidden, states
