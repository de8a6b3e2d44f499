"""One suite for every host family, on tiny random configs of the real classes (grouped heads and
d_k != d_v where the family allows them; 96-token inputs cross every chunk boundary), checked against the
library's own forward: transformers' for Gated DeltaNet and Mamba-2, the model classes' own (chunked)
forward for DeltaNet, GLA and RWKV-7 (fla's classes on CUDA: ``test_gpu.py``).

A family's entry says where its library runs a layer's recurrence (``kernel``: the module and name of
the function its forward calls), which argument carries the value whose zeroing deletes the write at one
(position, head), and how to read the library's own final state."""
import importlib
import sys

import pytest
import torch

from writesae.hosts import Edit, load_host, recurrent, tiny_config

TOL = 1e-4
T = 96


def _gdn_state(host, ids):
    cache = host.model(input_ids=ids, use_cache=True).past_key_values
    return {l: cache.get_recurrent_state(l, state_idx=0) for l in host.recurrent_layers}


def _mamba2_state(host, ids):
    cache = host.model(input_ids=ids, use_cache=True).cache_params
    return {l: cache.get_recurrent_state(l, state_idx=0).transpose(-1, -2) for l in host.recurrent_layers}


def _gdn_zero(args, kw, t, head):
    kw = dict(kw)
    args = list(args)
    v = args[2].clone()
    v[:, t, head] = 0
    args[2] = v
    return args, kw


def _mamba2_zero(args, kw, t, group):  # B of the head's group: every head of that group loses its write
    args = list(args)
    B = args[3].clone()
    B[:, t, group] = 0
    args[3] = B
    return args, kw


def _minimax_state(host, ids):
    cache = host.model(input_ids=ids, use_cache=True).past_key_values
    return {l: cache.get_linear_cache(l) for l in host.recurrent_layers}


def _minimax_zero(args, kw, t, head):  # v of (t, head) in act(W_qkv x), zeroed where the layer masks padding
    qkv = args[0].clone().unflatten(-1, (4, 3, -1))  # tiny:minimax's 4 heads x (q, k, v) x head_dim
    qkv[:, t, head, 2] = 0
    return [qkv.flatten(2)] + list(args[1:]), kw


def _mamba1_state(host, ids):  # transformers' (B, d_inner, d_state) as the host's heads of d_state x head_dim
    cache = host.model(input_ids=ids, use_cache=True).cache
    return {l: cache.get_recurrent_state(l, state_idx=0).unflatten(1, (host.n_heads, host.d_v)).transpose(-1, -2)
            for l in host.recurrent_layers}


def _mamba1_zero(args, kw, t, head, P=64):
    """x of the head's 64 channels at t zeroed in the selective scan, which deletes the write dt B x; the skip D x
    (not a write) is added back to the scan's output there."""
    x, ch = args[0], slice(head * P, (head + 1) * P)
    x0 = x.clone()
    x0[:, ch, t] = 0

    def skip_back(out):  # (scan output, last state) when the model keeps a cache
        y = (out[0] if isinstance(out, tuple) else out).clone()
        y[:, ch, t] += x[:, ch, t] * kw["D"][ch] * torch.nn.functional.silu(kw["z"][:, ch, t])
        return (y, *out[1:]) if isinstance(out, tuple) else y
    return [x0] + list(args[1:]), kw, skip_back


def _xlstm_state(host, ids):  # the matrix memories C (the cache also holds the normaliser n and stabiliser m)
    cache = host.model(input_ids=ids, use_cache=True).cache
    return {l: cache.rnn_state[l][0] for l in host.recurrent_layers}


def _xlstm_zero(args, kw, t, head):  # the mLSTM backend takes keyword arguments, value (B, H, T, d_v)
    value = kw["value"].clone()
    value[:, head, t] = 0
    return args, dict(kw, value=value)


def _v_zero(index):
    def zero(args, kw, t, head):
        args = list(args)
        v = args[index].clone()
        v[:, t, head] = 0
        args[index] = v
        return args, kw
    return zero


# family -> how to build it and how its library runs the recurrence
FAMILIES = {
    "gdn_grouped": dict(source=lambda: tiny_config("qwen3_5", 2, 4), state=_gdn_state, zero=_gdn_zero,
                        kernel=("transformers.models.qwen3_5.modeling_qwen3_5", "torch_chunk_gated_delta_rule")),
    "gdn_equal": dict(source=lambda: tiny_config("qwen3_5", 4, 4), state=_gdn_state, zero=_gdn_zero,
                      kernel=("transformers.models.qwen3_5.modeling_qwen3_5", "torch_chunk_gated_delta_rule")),
    "qwen3_next": dict(source=lambda: tiny_config("qwen3_next"), state=_gdn_state, zero=_gdn_zero,
                       kernel=("transformers.models.qwen3_next.modeling_qwen3_next", "torch_chunk_gated_delta_rule")),
    "mamba2": dict(source=lambda: "tiny:mamba2", state=_mamba2_state, zero=_mamba2_zero, groups=2,
                   kernel=("transformers.models.mamba2.modeling_mamba2", "mamba2_chunk_scan")),
    **{t: dict(source=lambda t=t: f"tiny:{t}", state=_mamba2_state, zero=_mamba2_zero, groups=2,  # Mamba-2 hybrids
               kernel=(f"transformers.models.{t}.modeling_{t}", "mamba2_chunk_scan"))
       for t in ("nemotron_h", "granitemoehybrid", "bamba", "falcon_h1", "zamba2")},
    "delta_net": dict(source=lambda: "tiny:delta_net", zero=_v_zero(2),
                      kernel=("writesae.models.delta_net", "delta_rule_chunked")),
    "gla": dict(source=lambda: "tiny:gla", zero=_v_zero(2), final_state={"output_final_state": True},
                kernel=("writesae.models.gla", "chunk_gla")),
    "rwkv7": dict(source=lambda: "tiny:rwkv7", zero=_v_zero(3), kernel=("writesae.ops.rwkv7", "chunked")),
    "olmo_hybrid": dict(source=lambda: "tiny:olmo_hybrid", state=_gdn_state, zero=_gdn_zero,
                        kernel=("transformers.models.olmo_hybrid.modeling_olmo_hybrid", "torch_chunk_gated_delta_rule")),
    "kimi_linear": dict(source=lambda: "tiny:kimi_linear", state=_gdn_state, zero=_gdn_zero,
                        kernel=("transformers.models.kimi_linear.modeling_kimi_linear", "chunk_kimi_delta_attention")),
    # lightning attention runs inline in the layer's forward: the delete recomputation zeroes v where the layer
    # passes act(W_qkv x) through its padding mask (once per lightning layer)
    "minimax": dict(source=lambda: "tiny:minimax", state=_minimax_state, zero=_minimax_zero,
                    kernel=("transformers.models.minimax.modeling_minimax", "apply_mask_to_padding_states")),
    **{t: dict(source=lambda t=t: f"tiny:{t}", state=_mamba1_state, zero=_mamba1_zero,  # Mamba-1: elementwise decay
               kernel=(f"transformers.models.{t}.modeling_{t}", "mamba_selective_scan"))
       for t in ("mamba", "falcon_mamba", "jamba")},
    # the mLSTM kernels are bound into the backend at init: the delete recomputation wraps the backend's forward
    "xlstm": dict(source=lambda: "tiny:xlstm", state=_xlstm_state, zero=_xlstm_zero,
                  kernel=("transformers.models.xlstm.modeling_xlstm:xLSTMBackend", "forward")),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def fam(request):
    spec = FAMILIES[request.param]
    torch.manual_seed(0)
    return request.param, spec, load_host(spec["source"]())


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 101, (3, T), generator=torch.Generator().manual_seed(1))


class _Patched:
    """Wrap the library's recurrence function: record each call's final state, optionally change the
    arguments of the n-th call (n = the layer's rank among recurrent layers)."""

    def __init__(self, kernel, change=None, call=None, extra=None):
        module, _, owner = kernel[0].partition(":")  # "module:Class": a method of a class of the module
        self.mod = importlib.import_module(module)
        self.mod = getattr(self.mod, owner) if owner else self.mod
        self.name, self.change, self.call, self.extra = kernel[1], change, call, extra or {}
        self.orig, self.states = getattr(self.mod, self.name), []

    def __enter__(self):
        orig = getattr(self.orig, "__wrapped__", self.orig)

        def patched(*args, **kw):
            if self.change is not None and len(self.states) == self.call:
                args, kw, *after = self.change(args, kw)  # optionally a function of the output too
            out = orig(*args, **kw, **self.extra)
            if self.change is not None and len(self.states) == self.call and after:
                out = after[0](out)
            self.states.append(out[1] if isinstance(out, tuple) else None)
            return out

        setattr(self.mod, self.name, patched)
        return self

    def __exit__(self, *exc):
        setattr(self.mod, self.name, self.orig)


def test_no_edit_run_equals_the_library_forward(fam, ids):
    _, _, host = fam
    ref = host.logits(ids)
    layer = host.recurrent_layers[-1]
    run = host.run_edits(ids, [Edit(s, layer, 0, 20, "add", torch.zeros(host.d_k, host.d_v)) for s in range(3)])
    assert (run.logits - ref).abs().max() < TOL
    assert (run.base - ref).abs().max() < TOL
    assert (host.trace(ids).logits - ref).abs().max() < TOL
    assert ref.abs().max() > 1e-2  # a real forward, not zeros


def test_traced_last_state_is_the_librarys_state(fam, ids):
    name, spec, host = fam
    tr = host.trace(ids, positions=[-1, 7])
    if "state" in spec:
        states = spec["state"](host, ids)
    else:  # the model's own forward: the final state its recurrence function returns
        with _Patched(spec["kernel"], extra=spec.get("final_state")) as p, torch.no_grad():
            host.model(input_ids=ids)
        states = dict(zip(host.recurrent_layers, p.states))
    for c in host.cells:
        ours = tr[(c.layer, c.head)].state[:, -1]
        assert (ours - states[c.layer][:, c.head].float()).abs().max() < 1e-5
    t = tr[host.cells[1]]
    assert torch.allclose(t.write, t.b[..., None, None] * t.k[..., :, None] * t.v[..., None, :])
    a = {2: t.a[..., None, None], 3: t.a[..., None], 4: t.a}[t.a.ndim]  # a scalar, per key row, per entry
    assert torch.allclose(t.update, t.state - a * t.prev_state, atol=1e-6)
    assert torch.allclose(t.out, torch.einsum("bpkv,bpk->bpv", t.state, t.q))
    assert tr.positions.tolist() == [7, T - 1]


def test_a_traced_head_keeps_only_its_states_and_skips_the_logits_on_request(fam, ids):
    _, _, host = fam
    layer = host.recurrent_layers[-1]
    # every head of the layer (its states kept as views) against one head (a copy of it only); recording the
    # same steps of the same layer, the runs are the same to the bit
    full = host.trace(ids, cells=[(layer, h) for h in range(host.n_heads)], positions=[3, 20])
    few = host.trace(ids, cells=[(layer, 1)], positions=[3, 20], logits=False)
    assert few.logits is None and full.logits.shape == (3, T, host.vocab_size)
    for name in few[(layer, 1)]._fields:
        a, b = getattr(few[(layer, 1)], name), getattr(full[(layer, 1)], name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert set(few.cells) == {(layer, 1)}


def test_a_trace_without_logits_runs_no_layer_above_its_last_head(fam, ids, monkeypatch):
    _, _, host = fam
    layer = host.recurrent_layers[0]
    full = host.trace(ids, cells=[(layer, 1)], positions=[3, 20])
    ran = []
    block = host._block
    monkeypatch.setattr(host, "_block", lambda i, *a, **kw: ran.append(i) or block(i, *a, **kw))
    few = host.trace(ids, cells=[(layer, 1)], positions=[3, 20], logits=False)
    assert ran == list(range(layer + 1)) and len(host.layers) > layer + 1  # the layers above never ran
    for name in few[(layer, 1)]._fields:  # and the trace is the full forward's, to the bit
        a, b = getattr(few[(layer, 1)], name), getattr(full[(layer, 1)], name)
        assert (a is None and b is None) or torch.equal(a, b), name
    # walking up the model layer by layer (trace_layers) gives the same traces of every head of two layers
    two = [(l, h) for l in host.recurrent_layers[:2] for h in range(host.n_heads)]
    ref = host.trace(ids, cells=two, positions=[3, 20])
    walked = {k: t for _, tr in host.trace_layers(ids, cells=two, positions=[3, 20]) for k, t in tr.items()}
    assert sorted(walked) == sorted(two)
    for key in two:
        for name in ref[key]._fields:
            a, b = getattr(walked[key], name), getattr(ref[key], name)
            assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-5, atol=1e-6), (key, name)


def test_head_outputs_are_the_traced_outputs(fam, ids):
    """head_outputs (the LayerOut's o, chunked forms, no state kept) gives what a trace's ``out`` holds, edits
    included, for every head of two layers."""
    _, _, host = fam
    two = [(l, h) for l in host.recurrent_layers[:2] for h in range(host.n_heads)]
    c = host.cell(*two[0])
    edit = [Edit(1, c.layer, c.head, 5, "add", torch.randn(c.d_k, c.d_v, generator=torch.Generator().manual_seed(3)))]
    pos = list(range(4, T))
    ref = host.trace(ids, cells=two, positions=pos, edits=edit, logits=False)
    got = {k: o for _, outs in host.head_outputs(ids, cells=two, positions=pos, edits=edit) for k, o in outs.items()}
    assert sorted(got) == sorted(two)
    for key in two:
        assert got[key].dtype == torch.float32 and got[key].shape == ref[key].out.shape
        assert (got[key] - ref[key].out).abs().max() <= 1e-4 * ref[key].out.abs().max() + 1e-6, key
    # the edit reached the later layer's heads
    plain = {k: o for _, outs in host.head_outputs(ids, cells=two, positions=pos) for k, o in outs.items()}
    assert (got[two[-1]] - plain[two[-1]])[1].abs().max() > 1e-6


def test_replace_by_itself_is_a_noop(fam, ids):
    _, _, host = fam
    layer = host.recurrent_layers[1]
    tr = host.trace(ids, cells=[(layer, 1)], positions=[30])
    W = tr[(layer, 1)].write[2, 0]
    run = host.run_edits(ids, [Edit(2, layer, 1, 30, "replace", W)])
    assert (run.logits[0] - run.base[2]).abs().max() < TOL


def test_delete_equals_an_independent_recomputation(fam, ids):
    """Deleting the write at (layer, head, t) equals the library's own forward with that write's value
    zeroed inside its recurrence function (Mamba-2: B_t of the head's group, so every head of the group)."""
    name, spec, host = fam
    rank, t, head = 1, 25, 1
    layer = host.recurrent_layers[rank]
    heads = [head]
    if "groups" in spec:
        per = host.n_heads // spec["groups"]
        heads = list(range(head * per, (head + 1) * per))
    with _Patched(spec["kernel"], lambda a, k: spec["zero"](a, k, t, head), call=rank), torch.no_grad():
        ref = host.model(input_ids=ids).logits.float()
    run = host.run_edits(ids, [[Edit(s, layer, h, t, "delete") for h in heads] for s in range(3)])
    assert (run.logits - ref).abs().max() < TOL
    assert (run.logits[:, t:] - run.base[:, t:]).abs().max() > 1e-4  # the deletion did something


def test_add_to_state_is_the_exact_transport(fam, ids):
    from writesae.ops import recurrence

    _, _, host = fam
    layer, head, t0 = host.recurrent_layers[-1], 1, 20
    D = torch.randn(host.d_k, host.d_v, generator=torch.Generator().manual_seed(3)) * 0.5
    pos = list(range(t0, 40))
    base = host.trace(ids, cells=[(layer, head)], positions=pos)[(layer, head)]
    edit = host.trace(ids, cells=[(layer, head)], positions=pos, edits=[Edit(0, layer, head, t0, "add", D)])[(layer, head)]
    dS = D.clone()
    for j, s in enumerate(pos):
        if s > t0:
            e, f = (None, None) if base.e is None else (base.e[0, j], base.f[0, j])
            dS = recurrence.transport(dS, base.a[0, j].log(), e, f)
        assert (edit.state[0, j] - base.state[0, j] - dS).abs().max() < 1e-5
        assert (edit.out[0, j] - base.out[0, j] - dS.T @ base.q[0, j]).abs().max() < 1e-5
    assert (edit.state[1:] - base.state[1:]).abs().max() == 0  # other sequences untouched


def test_batch_equals_single_runs_and_naive(fam, ids):
    _, _, host = fam
    l0, l1, l2 = host.recurrent_layers[0], host.recurrent_layers[1], host.recurrent_layers[-1]
    atom = torch.randn(host.d_k, host.d_v, generator=torch.Generator().manual_seed(4))
    rows = [Edit(0, l0, 0, 12, "replace", atom), Edit(0, l0, 0, 12, "delete"), Edit(1, l2, 3, 33, "delete"),
            [Edit(2, l0, 1, 5, "add", atom), Edit(2, l1, 1, 9, "replace", atom, scale="write")],
            Edit(1, l1, 2, 0, "delete"), Edit(2, l2, 0, -1, "delete", write="update")]
    batch = host.run_edits(ids, rows)
    for j, r in enumerate(rows):
        assert (batch.logits[j] - host.run_edits(ids, [r]).logits[0]).abs().max() < TOL
    naive = host.run_edits(ids, rows, reuse_prefix=False)
    assert (batch.logits - naive.logits).abs().max() < TOL
    assert batch.start.tolist() == [12, 12, 33, 5, 0, T - 1]
    # a prefix that keeps states only from the late layer on serves edits there, and refuses earlier ones
    late = [rows[2], rows[5]]
    pre = host.prefix(ids, [33, T - 1], from_layer=l2)
    assert (host.run_edits(ids, late, prefix=pre).logits - naive.logits[[2, 5]]).abs().max() < TOL
    with pytest.raises(ValueError, match=f"from_layer={l0}"):
        host.run_edits(ids, [rows[0]], prefix=host.prefix(ids, [12], from_layer=l2))
    # logits beyond the prefix's budget (a large vocabulary): unembedded at the read positions only, same numbers
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recurrent, "PREFIX_LOGITS_BYTES", 0)
        lazy = host.prefix(ids, [33, T - 1], cells=[(l2, 3)], from_layer=l2)
        assert lazy.trace.logits is None and lazy.out.shape[:2] == (3, T) and lazy.out.shape[2] != host.vocab_size
        got = host.run_edits(ids, late, positions=[30, 40, T - 1], prefix=lazy)
        want = host.run_edits(ids, late, positions=[30, 40, T - 1], prefix=pre)
        assert (got.logits - want.logits).abs().max() < TOL and (got.base - want.base).abs().max() < TOL
        assert got.base.shape == (3, 3, host.vocab_size)


def test_every_row_at_position_zero_and_negative_positions(fam, ids):
    _, _, host = fam
    l0 = host.recurrent_layers[0]
    big = torch.randn(host.d_k, host.d_v, generator=torch.Generator().manual_seed(7)) * 10
    rows = [Edit(0, l0, 0, 0, "replace", big), Edit(1, l0, 1, 0, "delete")]
    run = host.run_edits(ids, rows, positions=[-1, 5])
    naive = host.run_edits(ids, rows, positions=[T - 1, 5], reuse_prefix=False)
    assert run.positions.tolist() == [5, T - 1]
    assert (run.logits - naive.logits).abs().max() < TOL
    assert (run.logits[0] - run.base[0]).abs().max() > 1e-4  # the edit at position 0 shows
    with pytest.raises(ValueError, match=r"positions \[96\] outside an input of 96 tokens: use 0..95"):
        host.run_edits(ids, [Edit(0, l0, 0, 3, "delete")], positions=[T])
    with pytest.raises(ValueError, match="pos=200 outside an input of 96 tokens"):
        host.run_edits(ids, [Edit(0, l0, 0, 200, "delete")])


def test_generation_equals_the_librarys_generate(fam, ids):
    _, _, host = fam
    prompt = ids[:2, :12]
    ours = host.generate(prompt, max_new_tokens=8)
    host.model.generation_config.eos_token_id = None  # ours never stops early
    ref = host.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, ref)
    # an edit at a generated position: each next token is the argmax of an edited run over the text so far
    big = torch.randn(host.d_k, host.d_v, generator=torch.Generator().manual_seed(5)) * 50
    edit = Edit(0, host.recurrent_layers[0], 0, 14, "add", big)
    edited = host.generate(prompt, max_new_tokens=8, edits=[edit])
    assert torch.equal(edited[:, :15], ours[:, :15])
    run = host.run_edits(edited[:1, :-1], [edit])
    assert torch.equal(run.logits[0, 14:].argmax(-1), edited[0, 15:])


def test_readout_head_out_reproduces_the_layer(fam, ids):
    """host.head_out at the run's own head output gives back the layer's contribution, and unembed of the
    final residual gives the logits: the read-out the closed form and the interventions use."""
    _, _, host = fam
    cell = host.cells[-1]
    ro = host.readout(cell, ids[:1])
    assert (host.unembed(ro.residual).float() - ro.logits).abs().max() < TOL
    o = ro.trace.out[0, 40]
    ctx = tuple(c[0, 40] for c in ro.context)
    y0 = host.head_out(cell, o, *ctx)
    assert y0.shape[-1] == ro.residual.shape[-1]
    # a change of the head output moves the layer output exactly as an edit of the state does
    D = torch.randn(host.d_k, host.d_v, generator=torch.Generator().manual_seed(6))
    ed = host.readout(cell, ids[:1], [Edit(0, cell.layer, cell.head, 40, "add", D)])
    y1 = host.head_out(cell, o + D.T @ ro.trace.q[0, 40], *ctx)
    assert (ed.trace.out[0, 40] - o - D.T @ ro.trace.q[0, 40]).abs().max() < 1e-5
    assert (y1 - y0).abs().max() > 1e-6
    assert host.head_unembed(cell).shape == (host.vocab_size, host.d_v)


def test_errors_name_the_fix(fam):
    _, _, host = fam
    last = len(host.layers) - 1
    with pytest.raises(ValueError, match=f"value heads 0..{host.n_heads - 1}"):
        host.cell(host.recurrent_layers[0], host.n_heads)
    with pytest.raises(ValueError, match=f"layers 0..{last}"):
        host.cell(last + 5, 0)
    x = torch.zeros(1, 10, dtype=torch.long)
    l0 = host.recurrent_layers[0]
    with pytest.raises(ValueError, match="not one of"):
        host.run_edits(x, [Edit(0, l0, 0, 3, "erase")])
    with pytest.raises(ValueError, match=rf"holds a \(d_k, d_v\) = \({host.d_k}, {host.d_v}\) state"):
        host.run_edits(x, [Edit(0, l0, 0, 3, "replace", torch.zeros(host.d_v + 1, host.d_k))])
    with pytest.raises(ValueError, match="needs a matrix"):
        host.run_edits(x, [Edit(0, l0, 0, 3, "add")])


def test_every_family_is_registered_and_loads_as_tiny():
    from writesae.hosts import FAMILIES as NAMES, HOSTS, host_class

    for mt in ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_next", "mamba2", "delta_net", "gla", "rwkv7"):
        assert mt in HOSTS
    assert host_class("rwkv7").kind == "RWKV-7"
    with pytest.raises(ValueError, match="no host adapter for model_type 'llama'"):
        host_class("llama")
    with pytest.raises(ValueError, match="unknown family 'rwkv'"):
        tiny_config("rwkv")
    assert {"gdn", "mamba2", "deltanet", "gla", "rwkv7"} <= set(NAMES)


def test_qwen3_5_moe_loads():
    host = load_host("tiny:qwen3_5_moe")
    x = torch.randint(0, 101, (1, 20))
    assert (host.trace(x).logits - host.logits(x)).abs().max() < TOL


def test_conv_activation_comes_from_the_config():
    """The Gated DeltaNet conv applies the config's hidden_act, as transformers does."""
    cfg = tiny_config("qwen3_5")
    cfg.hidden_act = "gelu"
    host = load_host(cfg)
    assert host.layers[0].linear_attn.activation == "gelu"
    x = torch.randint(0, 101, (1, 20))
    assert (host.trace(x).logits - host.logits(x)).abs().max() < TOL


def test_model_without_recurrent_layer_is_refused():
    cfg = tiny_config("qwen3_5")
    cfg.layer_types = ["full_attention"] * 4
    with pytest.raises(ValueError, match="no Gated DeltaNet"):
        load_host(cfg)


def test_qwen35_hub_layout_loads_from_a_directory(tmp_path):
    """Qwen3.5 hub checkpoints are saved as the multimodal Qwen3_5ForConditionalGeneration: the loader
    takes such a directory (offline) and runs its language model with the same weights."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    cfg = Qwen3_5Config(text_config=tiny_config().to_dict(),
                        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2,
                                           out_hidden_size=64))
    torch.manual_seed(0)
    full = Qwen3_5ForConditionalGeneration(cfg).eval()
    full.save_pretrained(tmp_path)
    host = load_host(str(tmp_path), tokenizer=False)
    ids = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        ref = full(input_ids=ids).logits
    assert (host.trace(ids).logits - ref).abs().max() < TOL


@pytest.mark.parametrize("family", ["delta_net", "gla", "rwkv7"])
def test_fla_checkpoint_directory_loads_strictly(tmp_path, family):
    """A checkpoint saved by the family's class (fla's layout: same model_type and parameter names) loads
    from a directory into a host, with its weights."""
    src = load_host(f"tiny:{family}")
    src.model.save_pretrained(tmp_path)
    host = load_host(str(tmp_path), tokenizer=False)
    x = torch.randint(0, 101, (1, 30))
    assert (host.logits(x) - src.logits(x)).abs().max() == 0
    assert host.family == src.family


def test_chunked_and_stepwise_recurrence_agree():
    """The recurrence driver's fast path (a chunked kernel for unedited stretches) and the token-by-token
    path give the same outputs and final state."""
    from writesae.ops import recurrence

    g = torch.Generator().manual_seed(0)
    B, n, H, dk, dv = 2, 80, 2, 16, 8
    q = torch.nn.functional.normalize(torch.randn(B, n, H, dk, generator=g), dim=-1) / dk ** 0.5
    k = torch.nn.functional.normalize(torch.randn(B, n, H, dk, generator=g), dim=-1)
    v, S0 = torch.randn(B, n, H, dv, generator=g), torch.randn(B, H, dk, dv, generator=g)
    gl, b = -torch.rand(B, n, H, generator=g), torch.rand(B, n, H, generator=g)
    rule = recurrence.Rule(q, k, v, gl, b, e=-b[..., None] * k, f=gl.exp()[..., None] * k)
    host = load_host(tiny_config("qwen3_5"))
    calls = []
    kernel = host._chunk_kernel()

    def chunk(r, S):
        calls.append(r.q.shape[1])
        return kernel(r, S)

    o1, S1, _ = recurrence.run(S0, rule, record=[5], chunk=chunk, min_chunk=64)
    o2, S2, kept = recurrence.run(S0, rule, record=[5])
    assert calls == [74]  # positions 6..79 in one chunked call; 0..5 step by step
    assert (o1 - o2).abs().max() < 1e-5 and (S1 - S2).abs().max() < 1e-5
    _, _, one = recurrence.run(S0, rule, record=recurrence.Record((5,), (1,)))  # head 1 only
    assert one[5][1].shape == (B, 1, dk, dv) and torch.equal(one[5][1][:, 0], kept[5][1][:, 1])
    assert torch.equal(one[5][0][:, 0], kept[5][0][:, 1])


def test_scaled_edits_use_the_write_norm():
    from writesae.ops import recurrence

    S = torch.zeros(1, 1, 4, 3)
    k, v, b = torch.randn(1, 1, 4), torch.randn(1, 1, 3), torch.tensor([[0.5]])
    r = recurrence.Rule(torch.zeros(1, 1, 4), k, v, torch.zeros(1, 1), b)
    S1, Sd = recurrence.step(S, r)
    unit = torch.ones(4, 3) / 12 ** 0.5
    out = recurrence.apply_edits(S1, Sd, r, [(0, 0, "replace", unit, "additive", "write")])
    W = recurrence.native_write(k[0, 0], v[0, 0], b[0, 0])
    assert torch.allclose(out[0, 0], unit * W.norm(), atol=1e-6)


def test_no_module_outside_the_hosts_names_a_model_attribute():
    """Experiments, widgets, plots, notebooks and benchmarks reach a model only through the host API
    (the hosts and the model classes themselves, and the trainer that builds models, are exempt)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    internal = re.compile(r"\.(linear_attn|lm_head|decoder|backbone|mixer|out_proj|o_proj|embed_tokens|embeddings)\b"
                          r"|\.layers\[|\bhost\.model\b")
    exempt = ("writesae/hosts/", "writesae/models/", "writesae/embedded_train.py")
    files = [p for d in ("writesae", "notebooks", "benchmarks") for p in (root / d).rglob("*")
             if p.suffix in (".py", ".ipynb") and not str(p.relative_to(root)).startswith(exempt)]
    assert len(files) > 20
    hits = [f"{p.relative_to(root)}: {m.group(0)}" for p in files for m in internal.finditer(p.read_text())]
    assert hits == []
