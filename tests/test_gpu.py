"""On CUDA with flash-linear-attention installed: fla's real classes and kernels against ours and the hosts.

Skipped without CUDA or without fla (``pip install -e .[gpu]`` on a GPU machine). For each fla family:
our pure-torch class loads fla's weights strictly and gives fla's logits; the host on fla's own model (its
chunked kernels for unedited stretches, the fla lane) gives the library's forward, and edited runs agree with
the naive (from position 0) path; for Gated DeltaNet, transformers bound to fla's kernels gives the host's
logits. The same checks run on every CI build on a CPU, under Triton's interpreter (``tests/fla_lane``); here
they meet what the interpreter cannot: compilation, the GPU's own arithmetic (TF32 in float32 dots) and its
resources.

DeltaNet runs in bf16: fla's chunked delta rule has no float32 form (it asserts). A bf16 run is held to our
float32 model with the same weights: as close to it as our own class in bf16, within a factor 2. Float32
runs agree to 1e-3 of the largest logit (fla's float32 dots run in TF32 on the GPU).
"""
import copy
import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs flash-linear-attention")]

DTYPES = {"delta_net": torch.bfloat16, "gla": torch.float32, "rwkv7": torch.float32}


def _fla_model(ours):
    """fla's own class for ``ours``'s config, with ``ours``'s weights (strict), on CUDA in the family's dtype.
    fla's classes by name: after load_host, the Auto classes serve ours."""
    import fla.models
    from writesae.models import CLASSES

    _, cfg_name, lm_name = CLASSES[ours.config.model_type]
    cfg = getattr(fla.models, cfg_name)(**{k: v for k, v in ours.config.to_dict().items()
                                           if k not in ("model_type", "architectures", "transformers_version")})
    theirs = getattr(fla.models, lm_name)(cfg)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs.cuda().to(DTYPES[ours.config.model_type]).eval()


def _agree(got, truth, ref):
    """``got`` against our float32 model's ``truth``: within TF32 round-off, or for a bf16 run as close as
    ``ref`` (our own class in bf16) is, within a factor 2."""
    if got.dtype == torch.float32 and ref is None:
        assert (got - truth).abs().max() < 1e-3 * truth.abs().max().clamp_min(1)
    else:
        assert (got - truth).abs().max() <= 2 * (ref - truth).abs().max()


@pytest.mark.parametrize("family", list(DTYPES))
def test_fla_class_and_ours_agree_on_cuda(family):
    from writesae.hosts import load_host

    ours = load_host(f"tiny:{family}", device="cuda").model
    theirs = _fla_model(ours)
    ids = torch.randint(0, 101, (2, 200), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        got, truth = theirs(input_ids=ids).logits.float(), ours(input_ids=ids).logits.float()
        ref = None if DTYPES[family] == torch.float32 else copy.deepcopy(ours).to(DTYPES[family])(input_ids=ids).logits
    _agree(got, truth, ref)


def _runs(host, ids, rows):
    """What a host computes: the model's forward, a trace's logits, edited runs (fast and naive)."""
    return (host.logits(ids), host.trace(ids, positions=[100]).logits, host.run_edits(ids, rows).logits,
            host.run_edits(ids, rows, reuse_prefix=False).logits)


@pytest.mark.parametrize("family", list(DTYPES) + ["qwen3_5", "mamba2"])
def test_host_on_the_librarys_cuda_model(family):
    from writesae.hosts import Edit, host_class, load_host

    ids = torch.randint(0, 101, (3, 200), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    if family not in DTYPES:
        host = load_host(f"tiny:{family}", device="cuda")
        l0 = host.recurrent_layers[-1]
        rows = [Edit(0, l0, 0, 70, "delete"), Edit(1, l0, 1, 150, "add", torch.randn(host.d_k, host.d_v))]
        ref = host.logits(ids)
        assert (host.trace(ids).logits - ref).abs().max() < 2e-3 * ref.abs().max().clamp_min(1)
        fast, naive = host.run_edits(ids, rows), host.run_edits(ids, rows, reuse_prefix=False)
        assert (fast.logits - naive.logits).abs().max() < 2e-3 * ref.abs().max().clamp_min(1)
        return
    ours = load_host(f"tiny:{family}", device="cuda").model
    host = host_class(family)(_fla_model(ours))
    assert host.kernels == "fla"
    l0 = host.recurrent_layers[-1]
    add = torch.randn(host.d_k, host.d_v, generator=torch.Generator().manual_seed(2))
    rows = [Edit(0, l0, 0, 70, "delete"), Edit(1, l0, 1, 150, "add", add)]
    truth = _runs(host_class(family)(ours, kernels="torch"), ids, rows)
    bf16 = DTYPES[family] != torch.float32
    refs = _runs(host_class(family)(copy.deepcopy(ours).to(DTYPES[family]), kernels="torch"), ids, rows) if bf16 \
        else (None,) * 4
    for got, t, r in zip(_runs(host, ids, rows), truth, refs):
        _agree(got, t, r)
