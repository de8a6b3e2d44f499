"""The Mamba-2 host beyond the shared suite: unedited stretches in transformers' chunked (SSD) form equal to the
step-by-step form; Falcon-H1's muP multipliers and gate-only norm; what it refuses; its benchmark."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from writesae.hosts import Edit, load_host, tiny_config
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


@pytest.mark.parametrize("model_type", ["mamba2", "zamba2"])
def test_unedited_stretches_run_chunked_and_equal_the_stepwise_host(model_type):
    host = load_host(f"tiny:{model_type}")
    calls = []
    scan = host._scan

    def counted(*args, **kw):
        calls.append(args[0].shape[1])
        return scan(*args, **kw)

    host._scan = counted
    ids = torch.randint(0, 101, (2, 150), generator=torch.Generator().manual_seed(2))
    layer, L = host.recurrent_layers[1], len(host.recurrent_layers)
    edit = Edit(1, layer, 2, 60, "add", torch.randn(host.d_k, host.d_v, generator=torch.Generator().manual_seed(3)))
    fast = host.trace(ids, cells=[(layer, 2)], positions=[40, 100], edits=[edit])
    # the other layers whole; the traced one between its recorded (40, 100) and edited (60) steps
    assert sorted(calls) == sorted([150] * (L - 1) + [40, 19, 39, 49])
    host.chunked = False
    slow = host.trace(ids, cells=[(layer, 2)], positions=[40, 100], edits=[edit])
    assert len(calls) == L + 3  # no chunked call step by step
    assert (fast.logits - slow.logits).abs().max() < 1e-4
    assert (fast.logits - host.logits(ids)).abs().max() > 1e-3  # the edit shows
    for name in ("state", "prev_state", "out"):
        a, b = getattr(fast[(layer, 2)], name), getattr(slow[(layer, 2)], name)
        assert (a - b).abs().max() < 1e-5 * b.abs().max(), name


@pytest.mark.parametrize("norm", [dict(mamba_rms_norm=True, mamba_norm_before_gate=False),
                                  dict(mamba_rms_norm=False)], ids=["norm-after-gate", "gate-only"])
def test_falcon_h1_multipliers_and_norms_equal_the_library(norm):
    """Falcon-H1's muP vector (one multiplier per part of the mixer's projection) and its two other output
    forms: the host's run, its read-out and a deleted write equal the library's own forward."""
    cfg = tiny_config("falcon_h1")
    cfg.ssm_multipliers = [0.9, 1.1, 0.8, 1.2, 1.3]
    for k, v in norm.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    host = load_host(cfg)
    ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = host.logits(ids)
    assert (host.trace(ids).logits - ref).abs().max() < 1e-4  # every step stepwise
    assert (host.trace(ids, cells=[]).logits - ref).abs().max() < 1e-4  # chunked
    cell = host.cells[-1]
    ro = host.readout(cell, ids[:1])
    full = host.head_out(cell, ro.trace.out[0, 20], *(c[0, 20] for c in ro.context))
    assert full.shape == (64,) and torch.isfinite(full).all()
    # deleting the writes of group 0 (heads 0, 1) at t = 12 in layer 1 = the library's scan with B_12 of group 0 zeroed
    mod = importlib.import_module("transformers.models.falcon_h1.modeling_falcon_h1")
    orig, n = mod.mamba2_chunk_scan, []

    def zeroed(*args, **kw):
        args = list(args)
        if len(n) == 1:
            args[3] = args[3].clone()
            args[3][:, 12, 0] = 0
        n.append(1)
        return orig(*args, **kw)

    mod.mamba2_chunk_scan = zeroed
    try:
        with torch.no_grad():
            want = host.model(input_ids=ids).logits.float()
    finally:
        mod.mamba2_chunk_scan = orig
    got = host.run_edits(ids, [[Edit(s, 1, h, 12, "delete") for h in (0, 1)] for s in range(2)])
    assert (got.logits - want).abs().max() < 1e-4 and (got.logits - got.base).abs().max() > 1e-4


def test_refusals_name_the_fix():
    cfg = tiny_config("nemotron_h")
    cfg.layers_block_type = ["full_attention", "mlp"]
    with pytest.raises(ValueError, match="has no Mamba-2 layer"):
        load_host(cfg)
    host = load_host("tiny:bamba")
    host.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="load the model with attn_implementation='sdpa'"):
        type(host)(host.model)


def test_bench_mamba2_prints_the_ratios_and_checks_the_runs_equal():
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mamba2.py"
    done = subprocess.run([sys.executable, str(bench), "--types", "mamba2,zamba2", "--window", "64", "--repeats", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]  # it raises when a run and the library's forward differ
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("mamba2 ", "zamba2 "))]
    assert len(rows) == 2 and all(r[4].endswith("x") and r[5].endswith("x") for r in rows)
