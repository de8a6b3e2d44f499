"""Gated DeltaNet host: Qwen3.5 hybrid models (``Qwen3_5ForCausalLM``) and Qwen3-Next.

The only module that knows these models' internals. It runs the decoder layer by layer with its own
state containers so that a run can start at any (position, layer), apply cache edits inside the
recurrence (``writesae.ops.delta_rule``) and record what the recurrence used. Equivalence to the
transformers forward is checked in ``tests/test_host_gdn.py``.

State per layer: Gated DeltaNet -> ``(conv, S)`` with ``conv`` the last ``K-1`` conv inputs
``(B, C, K-1)`` and ``S`` ``(B, H_v, d_k, d_v)``; full attention -> ``(keys, values)`` ``(B, H_kv, t, hd)``.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..ops import delta_rule
from .base import Cell, CellTrace, Edit, EditRun, Trace


def _parts(model):
    """(decoder, lm_head) for a causal LM or a multimodal Qwen3.5 wrapper."""
    inner = model.model
    inner = getattr(inner, "language_model", inner)
    return inner, model.lm_head


def use_torch_path(model):
    """Rebind transformers' kernel hooks of the model's module to the pure-torch functions.

    transformers binds flash-linear-attention's Triton kernels at import time whenever ``fla`` imports;
    they crash without CUDA. The original torch function is kept as ``__wrapped__``."""
    import sys

    mod = sys.modules[type(model).__module__]
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule",
                 "causal_conv1d_fn", "causal_conv1d_update"):
        fn = getattr(mod, name, None)
        if fn is not None and hasattr(fn, "__wrapped__"):
            setattr(mod, name, fn.__wrapped__)


class GatedDeltaNetHost:
    """A Qwen3.5 / Qwen3-Next model seen as a set of matrix-state cells.

    >>> host = load_host("embedded")
    >>> host.cells[:2]                      # Cell(layer, head, d_k, d_v)
    >>> tr = host.trace(ids, cells=[(0, 1)], positions=[5, 9])
    >>> run = host.run_edits(ids, [Edit(0, 0, 1, 9, "delete")])
    """

    family = "gated_deltanet"

    def __init__(self, model, tokenizer=None, name=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.decoder, self.lm_head = _parts(model)
        self.config = self.decoder.config
        self.layers = list(self.decoder.layers)
        self.layer_types = list(self.config.layer_types)
        self.recurrent_layers = [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]
        if not self.recurrent_layers:
            raise ValueError(f"{self.name} has no Gated DeltaNet (linear_attention) layer: layer types are "
                             f"{sorted(set(self.layer_types))}")
        c = self.config
        self.n_heads, self.d_k, self.d_v = c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
        self.n_k_heads = c.linear_num_key_heads
        self._chunk = None
        if self.device.type != "cuda":
            use_torch_path(model)

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
                             f"recurrent (Gated DeltaNet) layers are {self.recurrent_layers}")
        if self.layer_types[layer] != "linear_attention":
            raise ValueError(f"layer {layer} is a {self.layer_types[layer]} layer, which has no matrix state; "
                             f"recurrent (Gated DeltaNet) layers are {self.recurrent_layers}")
        if not 0 <= head < self.n_heads:
            raise ValueError(f"head {head} out of range: layer {layer} has value heads 0..{self.n_heads - 1}")
        return Cell(layer, head, self.d_k, self.d_v)

    # ----------------------------------------------------------- the layers
    def _project(self, attn, x):
        """(mixed_qkv (B,T,C), z (B,T,H,dv), b_raw (B,T,H), a_raw (B,T,H)) for either family."""
        B, T, _ = x.shape
        if hasattr(attn, "in_proj_qkvz"):  # Qwen3-Next: grouped interleaved projections
            q, k, v, z, b, a = attn.fix_query_key_value_ordering(attn.in_proj_qkvz(x), attn.in_proj_ba(x))
            mixed = torch.cat([t.reshape(B, T, -1) for t in (q, k, v)], -1)
            return mixed, z, b, a
        z = attn.in_proj_z(x).reshape(B, T, -1, attn.head_v_dim)
        return attn.in_proj_qkv(x), z, attn.in_proj_b(x), attn.in_proj_a(x)

    def _chunk_kernel(self):
        """Fast recurrence for unedited stretches: fla's kernel on CUDA, transformers' torch chunk otherwise."""
        import sys

        if self._chunk is not None:
            return self._chunk
        mod = sys.modules[type(self.layers[self.recurrent_layers[0]].linear_attn).__module__]
        fn = mod.torch_chunk_gated_delta_rule
        if self.device.type != "cuda":
            fn = getattr(fn, "__wrapped__", fn)
        sqrt_dk = math.sqrt(self.d_k)

        def chunk(q, k, v, g, b, S0):
            q, k, v, g, b = (t.contiguous() for t in (q * sqrt_dk, k, v, g, b))
            o, S = fn(q, k, v, g=g, beta=b, initial_state=S0.contiguous(), output_final_state=True,
                      use_qk_l2norm_in_kernel=False)
            return o.float(), S.float()

        self._chunk = chunk
        return chunk

    def _gdn(self, i, x, state, edits, record):
        """Gated DeltaNet token mixer of layer i on normed input x (B,T,hidden).

        Returns (output, new_state, inputs used by the recurrence, recorded states)."""
        attn = self.layers[i].linear_attn
        B, T, _ = x.shape
        mixed, z, b_raw, a_raw = self._project(attn, x)
        mixed = mixed.transpose(1, 2)  # (B, C, T)
        K = attn.conv_kernel_size
        conv0 = state[0] if state is not None else mixed.new_zeros(B, mixed.shape[1], K - 1)
        xc = torch.cat([conv0.to(mixed), mixed], -1)
        y = F.conv1d(xc, attn.conv1d.weight, attn.conv1d.bias, groups=xc.shape[1])
        y = F.silu(y).transpose(1, 2)  # transformers' activation for these layers (hidden_act="silu")
        kd, vd = attn.key_dim, attn.value_dim
        q, k, v = y[..., :kd], y[..., kd:2 * kd], y[..., 2 * kd:2 * kd + vd]
        rep = self.n_heads // self.n_k_heads
        q = q.reshape(B, T, -1, self.d_k).float()
        k = k.reshape(B, T, -1, self.d_k).float()
        q = (q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)).repeat_interleave(rep, 2) / math.sqrt(self.d_k)
        k = (k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)).repeat_interleave(rep, 2)
        v = v.reshape(B, T, -1, self.d_v).float()
        b = b_raw.float().sigmoid()
        g = -attn.A_log.float().exp() * F.softplus(a_raw.float() + attn.dt_bias.float())
        S0 = state[1] if state is not None else q.new_zeros(B, self.n_heads, self.d_k, self.d_v)
        o, S, kept = delta_rule.run(S0.float(), q, k, v, g, b, edits=edits, record=record,
                                    chunk=self._chunk_kernel())
        o = attn.norm(o.to(x.dtype).reshape(-1, self.d_v), z.reshape(-1, self.d_v)).reshape(B, T, -1)
        new_state = (xc[..., xc.shape[-1] - (K - 1):], S)
        return attn.out_proj(o), new_state, (q, k, v, g, b, mixed), kept

    def _attention(self, i, x, pos_emb, state, start):
        """Full-attention token mixer (gated, GQA) with explicit past keys/values."""
        from transformers.models.qwen3_5.modeling_qwen3_5 import apply_rotary_pos_emb

        at = self.layers[i].self_attn
        B, T, _ = x.shape
        hd = at.head_dim
        q, gate = torch.chunk(at.q_proj(x).view(B, T, -1, hd * 2), 2, dim=-1)
        q = at.q_norm(q).transpose(1, 2)
        k = at.k_norm(at.k_proj(x).view(B, T, -1, hd)).transpose(1, 2)
        v = at.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *pos_emb)
        if state is not None:
            k, v = torch.cat([state[0], k], 2), torch.cat([state[1], v], 2)
        rows = torch.arange(T, device=x.device)[:, None] + start
        mask = torch.arange(k.shape[2], device=x.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=at.scaling,
                                             enable_gqa=k.shape[1] != q.shape[1])
        out = out.transpose(1, 2).reshape(B, T, -1) * torch.sigmoid(gate.reshape(B, T, -1))
        return at.o_proj(out), (k, v)

    def _run(self, hidden, start, first_layer, states, edits=None, record=None, keep_inputs=False):
        """Run layers first_layer.. on hidden (B,T,hidden) = input of layer first_layer at positions
        start..start+T-1, from per-layer states. edits/record: {layer: {step: [...]}} / {layer: steps}.

        Returns (logits, new_states, layer_inputs {layer: hidden}, recorded {layer: (inputs, kept)})."""
        B, T, _ = hidden.shape
        pos = torch.arange(start, start + T, device=hidden.device)[None].expand(B, -1)
        pos_emb = self.decoder.rotary_emb(hidden, pos)
        new_states, inputs, recorded = dict(states), {}, {}
        for i in range(first_layer, len(self.layers)):
            layer = self.layers[i]
            if keep_inputs:
                inputs[i] = hidden
            x = layer.input_layernorm(hidden)
            if self.layer_types[i] == "linear_attention":
                rec = (record or {}).get(i, ())
                x, new_states[i], used, kept = self._gdn(i, x, states.get(i), (edits or {}).get(i), rec)
                if rec:
                    recorded[i] = (used, kept)
            else:
                x, new_states[i] = self._attention(i, x, pos_emb, states.get(i), start)
            hidden = hidden + x
            mlp = layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = hidden + (mlp[0] if isinstance(mlp, tuple) else mlp)
        logits = self.lm_head(self.decoder.norm(hidden)).float()
        return logits, new_states, inputs, recorded

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
    def generate(self, input_ids, max_new_tokens=20, edits=(), eos_token_id=None):
        """Greedy decoding with cache edits at chosen absolute positions (prompt or generated).

        input_ids: (B, T) prompts of equal length; edits: Edits whose ``seq`` is the batch row.
        Returns (B, T + max_new_tokens) token ids."""
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
            if h.layer_types[i] == "linear_attention":
                K = h.layers[i].linear_attn.conv_kernel_size
                m = self.mixed[i][seq:seq + 1, :, max(0, pos - K + 1):pos]
                conv = F.pad(m, (K - 1 - m.shape[-1], 0))
                S = self.kept[i][pos - 1][1][seq:seq + 1] if pos > 0 else torch.zeros_like(self.final[i][1][:1])
                states[i] = (conv.expand(n, -1, -1), S.expand(n, -1, -1, -1))
            else:
                k, v = self.final[i]
                states[i] = (k[seq:seq + 1, :, :pos].expand(n, -1, -1, -1), v[seq:seq + 1, :, :pos].expand(n, -1, -1, -1))
        return hidden, states
