"""The Gated DeltaNet host against transformers' own forward, on tiny random configs of the real classes."""
import sys

import pytest
import torch

from writesae.hosts import Edit, load_host, tiny_config
from writesae.ops import recurrence as delta_rule

TOL = 1e-4


def qwen35(n_k=2, n_v=4, layers=4):
    return tiny_config("qwen3_5", n_k, n_v, layers)


def qwen3next():
    return tiny_config("qwen3_next")


@pytest.fixture(scope="module", params=["qwen3_5_grouped", "qwen3_5_equal", "qwen3_next", "embedded"])
def host(request):
    torch.manual_seed(0)
    if request.param == "embedded":  # the trained model shipped with the package
        return load_host("embedded")
    cfg = {"qwen3_5_grouped": lambda: qwen35(2, 4), "qwen3_5_equal": lambda: qwen35(4, 4),
           "qwen3_next": qwen3next}[request.param]()
    return load_host(cfg)


@pytest.fixture(scope="module")
def tiny():
    return load_host(qwen35(2, 4))


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 101, (3, 96))  # ids < 101 valid for every host; 96 tokens: 64-token chunks run too


def test_no_edit_equals_transformers_forward(host, ids):
    ref = host.logits(ids)
    # the edit path itself: an edit that adds zero goes through the stepwise recurrence at position 20
    run = host.run_edits(ids, [Edit(s, host.recurrent_layers[0], 0, 20, "add", torch.zeros(host.d_k, host.d_v)) for s in range(3)])
    assert (run.logits - ref).abs().max() < TOL
    assert (run.base - ref).abs().max() < TOL
    assert (host.trace(ids).logits - ref).abs().max() < TOL


def test_trace_last_state_is_the_models_cache(host, ids):
    out = host.model(input_ids=ids, use_cache=True)
    tr = host.trace(ids, positions=[ids.shape[1] - 1, 7])
    for c in host.cells:
        cached = out.past_key_values.get_recurrent_state(c.layer, state_idx=0)[:, c.head]
        assert (tr[(c.layer, c.head)].state[:, -1] - cached).abs().max() < 1e-5
    t = tr[(0, 1)]
    assert torch.allclose(t.write, t.b[..., None, None] * t.k[..., :, None] * t.v[..., None, :])
    assert torch.allclose(t.q.norm(dim=-1), torch.full_like(t.q[..., 0], host.d_k ** -0.5), atol=5e-3)  # eps 1e-6 inside the L2 norm


def test_replace_by_itself_is_a_noop(host, ids):
    tr = host.trace(ids, cells=[(1, 3)], positions=[30])
    W = tr[(1, 3)].write[2, 0]
    run = host.run_edits(ids, [Edit(2, 1, 3, 30, "replace", W)])
    # the edited run and the unedited prefix pass split the recurrence into different chunked / stepwise
    # stretches, which differ by rounding only: the float tolerance
    assert (run.logits[0] - run.base[2]).abs().max() < TOL


def test_delete_equals_independent_recomputation(host, ids):
    """Deleting b k v^T at (layer, head, t) equals transformers' own forward with v_t = 0 there."""
    layer, head, t = 1, 2, 25
    mod = sys.modules[type(host.layers[layer].linear_attn).__module__]
    orig = mod.torch_chunk_gated_delta_rule
    calls = []

    def patched(query, key, value, *a, **kw):
        calls.append(1)
        if len(calls) == layer + 1:  # the layer-th recurrent call of this forward
            value = value.clone()
            value[:, t, head] = 0
        return orig(query, key, value, *a, **kw)

    mod.torch_chunk_gated_delta_rule = patched
    try:
        ref = host.logits(ids)
    finally:
        mod.torch_chunk_gated_delta_rule = orig
    run = host.run_edits(ids, [Edit(s, layer, head, t, "delete") for s in range(3)])
    assert (run.logits - ref).abs().max() < TOL
    assert (run.logits[:, t:] - run.base[:, t:]).abs().max() > 1e-3  # the deletion did something


def test_add_to_state_propagates_exactly(host, ids):
    layer, head, t0 = 2, 1, 20
    D = torch.randn(host.d_k, host.d_v) * 0.5
    pos = list(range(t0, 40))
    base = host.trace(ids, cells=[(layer, head)], positions=pos)[(layer, head)]
    edit = host.trace(ids, cells=[(layer, head)], positions=pos, edits=[Edit(0, layer, head, t0, "add", D)])[(layer, head)]
    dS = D.clone()
    for j, s in enumerate(pos):
        if s > t0:
            k, a, b = base.k[0, j], base.a[0, j], base.b[0, j]
            dS = a * (dS - b * torch.outer(k, k @ dS))
        assert (edit.state[0, j] - base.state[0, j] - dS).abs().max() < 1e-5
        assert (edit.out[0, j] - base.out[0, j] - dS.T @ base.q[0, j]).abs().max() < 1e-5
    assert (edit.state[1:] - base.state[1:]).abs().max() == 0  # other sequences untouched


def test_batch_equals_single_runs_and_naive(host, ids):
    tr = host.trace(ids, cells=[(0, 0)], positions=[12])
    atom = torch.randn(host.d_k, host.d_v)
    rows = [Edit(0, 0, 0, 12, "replace", atom), Edit(0, 0, 0, 12, "delete"), Edit(1, 2, 3, 33, "delete"),
            [Edit(2, 0, 1, 5, "add", atom), Edit(2, 1, 1, 9, "replace", atom, scale="write")]]
    batch = host.run_edits(ids, rows)
    for j, r in enumerate(rows):
        single = host.run_edits(ids, [r])
        # other rows change where the shared prefix pass splits its recurrence: rounding only
        assert (batch.logits[j] - single.logits[0]).abs().max() < TOL
    naive = host.run_edits(ids, rows, reuse_prefix=False)
    assert (batch.logits - naive.logits).abs().max() < TOL
    assert batch.start.tolist() == [12, 12, 33, 5]


def test_generate_matches_transformers(host, ids):
    prompt = ids[:2, :12]
    ours = host.generate(prompt, max_new_tokens=10)
    host.model.generation_config.eos_token_id = None  # ours never stops early
    ref = host.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, ref)
    # an edit during generation changes the continuation's logits (edit at a generated position)
    big = torch.randn(host.d_k, host.d_v) * 50
    edited = host.generate(prompt, max_new_tokens=10, edits=[Edit(0, 0, 0, 14, "add", big)])
    assert torch.equal(edited[:, :15], ours[:, :15])


def test_scaled_edits_use_the_write_norm():
    S = torch.zeros(1, 1, 4, 3)
    k, v, b = torch.randn(1, 1, 4), torch.randn(1, 1, 3), torch.tensor([[0.5]])
    S1, Sd = delta_rule.step(S, torch.zeros(1, 1, 4), k, v, torch.zeros(1, 1), b)
    unit = torch.ones(4, 3) / 12 ** 0.5
    out = delta_rule.apply_edits(S1, Sd, k, v, b, [(0, 0, "replace", unit, "additive", "write")])
    W = delta_rule.native_write(k[0, 0], v[0, 0], b[0, 0])
    assert torch.allclose(out[0, 0], unit * W.norm(), atol=1e-6)


def test_errors_name_the_fix(tiny):
    with pytest.raises(ValueError, match=r"full_attention.*recurrent \(Gated DeltaNet\) layers are \[0, 1, 2\]"):
        tiny.cell(3, 0)
    with pytest.raises(ValueError, match="value heads 0..3"):
        tiny.cell(0, 9)
    with pytest.raises(ValueError, match="layers 0..3"):
        tiny.cell(12, 0)
    with pytest.raises(ValueError, match="not one of"):
        tiny.run_edits(torch.zeros(1, 10, dtype=torch.long), [Edit(0, 0, 0, 3, "erase")])


def test_model_without_recurrent_layer_is_refused():
    cfg = qwen35()
    cfg.layer_types = ["full_attention"] * 4
    with pytest.raises(ValueError, match="no Gated DeltaNet"):
        load_host(cfg)


def test_real_checkpoint_layout_loads_from_a_directory(tmp_path):
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


def test_chunked_and_stepwise_recurrence_agree():
    """The recurrence driver's fast path (transformers' chunked kernel for unedited stretches) and the
    token-by-token path give the same outputs and final state."""
    g = torch.Generator().manual_seed(0)
    B, T, H, dk, dv = 2, 80, 2, 16, 8
    q = torch.nn.functional.normalize(torch.randn(B, T, H, dk, generator=g), dim=-1) / dk ** 0.5
    k = torch.nn.functional.normalize(torch.randn(B, T, H, dk, generator=g), dim=-1)
    v, S0 = torch.randn(B, T, H, dv, generator=g), torch.randn(B, H, dk, dv, generator=g)
    gl, b = -torch.rand(B, T, H, generator=g), torch.rand(B, T, H, generator=g)
    host = load_host(qwen35())
    calls = []
    kernel = host._chunk_kernel()

    def chunk(*a):
        calls.append(a[0].shape[1])
        return kernel(*a)

    o1, S1, _ = delta_rule.run(S0, q, k, v, gl, b, record=[5], chunk=chunk, min_chunk=64)
    o2, S2, _ = delta_rule.run(S0, q, k, v, gl, b, record=[5])
    assert calls == [74]  # positions 6..79 in one chunked call; 0..5 step by step
    assert (o1 - o2).abs().max() < 1e-5 and (S1 - S2).abs().max() < 1e-5
