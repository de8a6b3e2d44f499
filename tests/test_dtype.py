"""A model in bfloat16 (issue 24, item 5): every family's host traces and edits with the recurrence in float32
(the state read back through ``S_t^T q_t`` to float32 rounding, not bf16's), close to the float32 model within
bf16 rounding; ``dtype`` is checked by name and joins the cache keys only when it is not float32."""
import pytest
import torch

from writesae import pipeline
from writesae.hosts import Edit
from writesae.ops import recurrence

FAMILIES = ("gdn", "mamba2", "deltanet", "gla", "rwkv7")
BF16_EPS = 2.0 ** -8   # bf16's unit roundoff
FP32_EPS = 2.0 ** -24


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_model_keeps_state_math_in_fp32(family):
    h32 = pipeline.host(f"tiny:{family}", "cpu")
    h16 = pipeline.host(f"tiny:{family}", "cpu", "bfloat16")
    assert pipeline.weights_dtype(h16) == "bfloat16" and pipeline.weights_dtype(h32) == "float32"
    ids = torch.randint(0, h32.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    c = h32.cells[len(h32.cells) // 2]
    cell = (c.layer, c.head)
    t16, t32 = h16.trace(ids, cells=[cell]), h32.trace(ids, cells=[cell])
    ct = t16[cell]
    assert all(x.dtype == torch.float32 for x in (ct.state, ct.write, ct.q, ct.k, ct.v, ct.out)), "traces are fp32"
    assert t16.logits.dtype == torch.float32
    # every step is the recurrence S_t = D_t * S_{t-1} + e_t (f_t^T S_{t-1}) + b_t k_t v_t^T to float32 rounding,
    # recomputed here from the traced fp32 inputs (a recurrence run in bf16 would be off by ~2^-8 of the state)
    rhs = recurrence.decay(ct.prev_state, None, D=ct.a) + ct.write
    if ct.e is not None:
        rhs = rhs + ct.e[..., :, None] * torch.einsum("bpk,bpkv->bpv", ct.f, ct.prev_state)[..., None, :]
    err = (ct.state - rhs).flatten(2).norm(dim=-1)
    assert (err <= 64 * FP32_EPS * (ct.prev_state.flatten(2).norm(dim=-1) + ct.write.flatten(2).norm(dim=-1)) + 1e-30).all()
    # the bf16 model is the fp32 one within bf16 rounding (accumulated over a few layers)
    rel = ((ct.state - t32[cell].state).norm() / t32[cell].state.norm()).item()
    assert rel < 16 * BF16_EPS, rel
    # edits run in fp32 on the state and reach the logits
    run = h16.run_edits(ids[:1], [Edit(0, *cell, 10, "delete")], positions=range(10, 24))
    assert run.logits.dtype == torch.float32 and torch.isfinite(run.logits).all()
    assert (run.logits - run.base).abs().max() > 0


def test_dtype_is_checked_and_keyed(tmp_path):
    with pytest.raises(ValueError, match=r"dtype 'bf16': use one of float32, bfloat16, float16"):
        pipeline.host("tiny", "cpu", "bf16")
    h16, h32 = pipeline.host("tiny", "cpu", "bfloat16"), pipeline.host("tiny", "cpu")
    spec16 = pipeline.data_spec(h16, [(1, 1)], window=16, n_windows=2, positions_per_seq=2)
    spec32 = pipeline.data_spec(h32, [(1, 1)], window=16, n_windows=2, positions_per_seq=2)
    assert spec16 == dict(spec32, model_dtype="bfloat16") and "model_dtype" not in spec32
    cells = spec16.pop("cells")
    d16 = pipeline.states(h16, cells, root=tmp_path, progress=False, **spec16)
    d32 = pipeline.states(h32, cells, root=tmp_path, progress=False, **{k: v for k, v in spec32.items() if k != "cells"})
    assert d16 != d32
    with pytest.raises(ValueError, match="this state-dataset spec is for a bfloat16 model, tiny is float32"):
        pipeline.states(h32, cells, root=tmp_path, progress=False, **spec16)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_direct_path(family):
    """The direct path (closed form, sign prediction, erasure, install) runs on a bf16 model: inputs in the
    weights' dtype, float32 out (it once multiplied fp32 head outputs by bf16 weights and crashed)."""
    from writesae.experiments import closed_form as CF

    h = pipeline.host(f"tiny:{family}", "cpu", "bfloat16")
    ids = torch.randint(0, h.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    cell = (h.cells[0].layer, h.cells[0].head)
    ct, ctx, o, r, logits = CF.readout(h, cell, ids)
    out = CF._logits(h, r + CF._layer_out(h, cell, o, ctx) - CF._layer_out(h, cell, o, ctx))
    assert out.dtype == torch.float32
    assert (out - logits).abs().max() <= 16 * BF16_EPS * logits.abs().max()
