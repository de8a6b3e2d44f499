"""The Mamba-2 host runs unedited stretches in transformers' chunked (SSD) form and edited or recorded steps
one by one; both forms give the same outputs and states to float32 round-off."""
import torch

from writesae.hosts import Edit, load_host
from writesae.ops import recurrence


def _rule(T, H=4, P=16, N=8, seed=0):
    """A random Mamba-2 rule whose decays range from almost none to exp(-8) per step (a random init's
    span, and underflow within a chunk)."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.rand(1, T, H, generator=g) * 0.5
    A = -torch.logspace(-2, 1.2, H)
    return recurrence.Rule(q=torch.randn(1, T, H, N, generator=g), k=torch.randn(1, T, H, N, generator=g),
                           v=torch.randn(1, T, H, P, generator=g), g=dt * A, b=dt), A


def test_the_chunked_scan_equals_the_stepwise_recurrence_from_a_carried_state():
    host = load_host("tiny:mamba2")
    m = host.layers[0].mixer
    rule, A = _rule(150, m.num_heads, m.head_dim, m.ssm_state_size)
    with torch.no_grad():
        m.A_log.copy_(A.neg().log())
    S0 = torch.randn(1, m.num_heads, m.ssm_state_size, m.head_dim, generator=torch.Generator().manual_seed(1))
    o1, S1 = host._chunk_kernel(m)(rule, S0)  # 150 steps: 9 chunks of 16 and a padded tail
    o2, S2, _ = recurrence.run(S0, rule)
    assert (o1 - o2).abs().max() < 1e-5 * o2.abs().max() and (S1 - S2).abs().max() < 1e-5 * S2.abs().max()


def test_unedited_stretches_run_chunked_and_equal_the_stepwise_host():
    host = load_host("tiny:mamba2")
    calls = []
    scan = host._scan

    def counted(*args, **kw):
        calls.append(args[0].shape[1])
        return scan(*args, **kw)

    host._scan = counted
    ids = torch.randint(0, 101, (2, 150), generator=torch.Generator().manual_seed(2))
    layer = host.recurrent_layers[1]
    edit = Edit(1, layer, 2, 60, "add", torch.randn(host.d_k, host.d_v, generator=torch.Generator().manual_seed(3)))
    fast = host.trace(ids, cells=[(layer, 2)], positions=[40, 100], edits=[edit])
    assert sorted(calls) == sorted([150] * 2 + [40, 19, 39, 49])  # layers 0, 2 whole; layer 1 between 40, 60, 100
    host.chunked = False
    slow = host.trace(ids, cells=[(layer, 2)], positions=[40, 100], edits=[edit])
    assert len(calls) == 6  # no chunked call step by step
    assert (fast.logits - slow.logits).abs().max() < 1e-4
    assert (fast.logits - host.logits(ids)).abs().max() > 1e-3  # the edit shows
    for name in ("state", "prev_state", "out"):
        a, b = getattr(fast[(layer, 2)], name), getattr(slow[(layer, 2)], name)
        assert (a - b).abs().max() < 1e-5 * b.abs().max(), name
