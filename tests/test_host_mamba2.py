"""The Mamba-2 host against transformers' Mamba2ForCausalLM forward (tiny random config, n_groups = heads)."""
import sys

import pytest
import torch

from writesae.hosts import Edit, load_host

TOL = 1e-4


@pytest.fixture(scope="module")
def host():
    return load_host("tiny:mamba2")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(2))


def test_forward_state_and_generation_match_transformers(host, ids):
    assert (host.trace(ids).logits - host.logits(ids)).abs().max() < TOL
    run = host.run_edits(ids, [Edit(0, 1, 2, 9, "add", torch.zeros(host.d_k, host.d_v))])
    assert (run.logits[0] - host.logits(ids)[0]).abs().max() < TOL
    cache = host.model(input_ids=ids, use_cache=True).cache_params
    tr = host.trace(ids, positions=[39])
    for c in host.cells:  # transformers keeps h = S^T (head_dim x d_state)
        h = cache.get_recurrent_state(c.layer, state_idx=0)[:, c.head]
        assert (tr[(c.layer, c.head)].state[:, -1] - h.transpose(-1, -2)).abs().max() < 1e-5
    host.model.generation_config.eos_token_id = None
    prompt = ids[:, :10]  # explicit mask: generate would otherwise mask prompt tokens equal to pad_token_id
    ref = host.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert torch.equal(host.generate(ids[:, :10], 8), ref)


def test_delete_equals_transformers_with_B_zeroed(host, ids):
    """The write dt x B^T vanishes when B_t of the head's group is 0 (groups = heads here)."""
    layer, head, t = 1, 2, 17
    mod = sys.modules[type(host.layers[0].mixer).__module__]
    orig, calls = mod.mamba2_chunk_scan, []

    def patched(hidden_states, dt, A, B, C, *a, **kw):
        calls.append(1)
        if len(calls) == layer + 1:
            B = B.clone()
            B[:, t, head] = 0
        return orig(hidden_states, dt, A, B, C, *a, **kw)

    mod.mamba2_chunk_scan = patched
    try:
        ref = host.logits(ids)
    finally:
        mod.mamba2_chunk_scan = orig
    run = host.run_edits(ids, [Edit(s, layer, head, t, "delete") for s in range(3)])
    assert (run.logits - ref).abs().max() < TOL
    assert (run.logits[:, t:] - run.base[:, t:]).abs().max() > 1e-4


def test_add_propagates_by_decay_only(host, ids):
    layer, head, t0 = 2, 1, 10
    D = torch.randn(host.d_k, host.d_v)
    pos = list(range(t0, 30))
    base = host.trace(ids, cells=[(layer, head)], positions=pos)[(layer, head)]
    edit = host.trace(ids, cells=[(layer, head)], positions=pos, edits=[Edit(1, layer, head, t0, "add", D)])[(layer, head)]
    dS = D.clone()
    for j, s in enumerate(pos):
        if s > t0:
            dS = base.a[1, j] * dS
        assert (edit.state[1, j] - base.state[1, j] - dS).abs().max() < 1e-5


def test_batched_equals_naive(host, ids):
    rows = [Edit(0, 0, 0, 12, "replace", torch.randn(host.d_k, host.d_v)), Edit(0, 0, 0, 12, "delete"),
            [Edit(2, 1, 3, 20, "delete"), Edit(2, 2, 0, 25, "add", torch.randn(host.d_k, host.d_v))]]
    fast, naive = host.run_edits(ids, rows), host.run_edits(ids, rows, reuse_prefix=False)
    assert (fast.logits - naive.logits).abs().max() < TOL


def test_cells_errors(host):
    with pytest.raises(ValueError, match="value heads 0..3"):
        host.cell(0, 4)
    with pytest.raises(ValueError, match=r"recurrent \(Mamba-2\) layers are \[0, 1, 2\]"):
        host.cell(5, 0)
