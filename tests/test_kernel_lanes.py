"""The hosts' kernel lane (fla's kernels or the torch forms), on this CPU without fla.

fla's real kernels run in ``tests/fla_lane`` (its own virtualenv, Triton's interpreter). Here a stand-in for
fla's ``chunk_delta_rule`` asserts what fla 0.6.0 asserts (``fla/ops/delta_rule/chunk.py``: q, k, v of one
dtype, never float32) and computes the chunked torch form, so that what the DeltaNet host hands fla is
checked in the main test run.
"""
import copy

import pytest
import torch

import writesae.hosts.delta_net as host_delta_net
import writesae.hosts.fla as host_fla
from writesae.hosts import Edit, load_host
from writesae.hosts.delta_net import DeltaNetHost
from writesae.hosts.fla import kernel_lane
from writesae.ops.delta_net import delta_rule_chunked

def test_the_default_lane_follows_the_device():
    assert kernel_lane(None, torch.device("cpu")) == "torch"
    assert kernel_lane("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="kernels='cuda'.*'fla'.*'torch'"):
        kernel_lane("cuda", torch.device("cpu"))


def test_the_fla_lane_without_fla_names_the_install(monkeypatch):
    monkeypatch.setattr(host_fla, "fla_installed", lambda: False)
    with pytest.raises(ModuleNotFoundError, match=r"pip install -e \.\[gpu\]"):
        kernel_lane("fla", torch.device("cpu"))
    host = load_host("tiny:gla", device="cpu")
    assert host.kernels == "torch"
    with pytest.raises(ModuleNotFoundError, match="kernels='torch'"):
        host.kernels = "fla"
    with pytest.raises(ModuleNotFoundError, match="kernels='torch'"):
        load_host("tiny:gla", device="cpu", kernels="fla")


def test_load_host_passes_the_lane():
    assert load_host("tiny:deltanet", device="cpu", kernels="torch").kernels == "torch"
    assert load_host("tiny", device="cpu", kernels="torch").kernels == "torch"
    with pytest.raises(ValueError, match="Mamba2Host has no fla kernel lane.*leave kernels unset"):
        load_host("tiny:mamba2", device="cpu", kernels="torch")


@pytest.fixture
def fake_fla(monkeypatch):
    """fla 'installed', its chunk_delta_rule a stand-in that asserts like fla's and records the dtypes."""
    calls = []

    def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, **kw):
        assert q.dtype == k.dtype == v.dtype
        assert q.dtype != torch.float32, "ChunkDeltaRuleFunction does not support float32. Please use bfloat16."
        calls.append(q.dtype)
        o, S = delta_rule_chunked(q.float(), k.float(), v.float(), beta.float(), scale=scale,
                                  initial_state=initial_state)
        return o.to(q.dtype), S

    monkeypatch.setattr(host_fla, "fla_installed", lambda: True)
    monkeypatch.setattr(host_delta_net, "fla_kernel", lambda module, name: chunk_delta_rule)
    return calls


def _runs(host, ids):
    """Logits of a trace recording one position and of two edit rows: unedited stretches on either side of
    them run the lane's chunked kernel."""
    add = torch.randn(host.d_k, host.d_v, generator=torch.Generator().manual_seed(2))
    rows = [Edit(0, 1, 0, 40, "delete"), Edit(1, 2, 1, 55, "add", add)]
    return host.trace(ids, positions=[60]).logits, host.run_edits(ids, rows).logits


def test_deltanet_hands_fla_its_compute_dtype(fake_fla):
    """bf16 model: fla's kernel gets bf16 q, k, v (fla asserts on float32) and is as accurate as the torch
    lane in bf16, both measured against the float32 model with the same weights (a bf16 forward of this tiny
    random model is itself ~5% off it); a float32 model keeps the torch form (fla has no float32 delta rule)."""
    ids = torch.randint(0, 101, (2, 90), generator=torch.Generator().manual_seed(0))
    host = load_host("tiny:deltanet", device="cpu", dtype=torch.bfloat16)
    assert host.kernels == "torch"
    on_torch = _runs(host, ids)
    host.kernels = "fla"
    on_fla = _runs(host, ids)
    assert fake_fla and set(fake_fla) == {torch.bfloat16}
    truth = _runs(DeltaNetHost(copy.deepcopy(host.model).float()), ids)
    for f, t, ref in zip(on_fla, on_torch, truth):
        assert (f - ref).abs().max() <= 2 * (t - ref).abs().max()
    n = len(fake_fla)
    host32 = load_host("tiny:deltanet", device="cpu")
    ref32 = _runs(host32, ids)
    host32.kernels = "fla"
    for a, b in zip(_runs(host32, ids), ref32):  # the same torch form, split at other stretch lengths
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert len(fake_fla) == n
