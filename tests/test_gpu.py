"""On CUDA with flash-linear-attention installed: fla's real classes and kernels against ours and the hosts.

Skipped without CUDA or without fla (``pip install -e .[gpu]`` on a GPU machine). For each fla family:
our pure-torch class loads fla's weights strictly and gives fla's logits; the host on fla's own model (its
chunked kernels for unedited stretches) gives the library's forward, and edited runs agree with the naive
(from position 0) path; for Gated DeltaNet, transformers bound to fla's kernels gives the host's logits."""
import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs flash-linear-attention")]

FAMILIES = ("delta_net", "gla", "rwkv7")


def _fla_model(model_type, ours):
    """fla's own class for ``ours``'s config, with ``ours``'s weights (strict)."""
    import fla  # noqa: F401  (registers fla's classes)
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in ours.config.to_dict().items()
                                              if k not in ("model_type", "architectures", "transformers_version")})
    theirs = AutoModelForCausalLM.from_config(cfg)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs.cuda().float().eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_fla_class_and_ours_agree_on_cuda(family):
    from writesae.hosts import load_host

    ours = load_host(f"tiny:{family}", device="cuda").model
    theirs = _fla_model(family, ours)
    ids = torch.randint(0, 101, (2, 200), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-3 * b.abs().max().clamp_min(1)


@pytest.mark.parametrize("family", FAMILIES + ("qwen3_5", "mamba2"))
def test_host_on_the_librarys_cuda_model(family):
    from writesae.hosts import Edit, load_host

    if family in FAMILIES:
        from writesae.hosts import host_class

        ours = load_host(f"tiny:{family}", device="cuda").model
        host = host_class(family)(_fla_model(family, ours))
    else:
        host = load_host(f"tiny:{family}", device="cuda")
    ids = torch.randint(0, 101, (3, 200), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    ref = host.logits(ids)
    assert (host.trace(ids).logits - ref).abs().max() < 2e-3 * ref.abs().max().clamp_min(1)
    l0 = host.recurrent_layers[-1]
    rows = [Edit(0, l0, 0, 70, "delete"), Edit(1, l0, 1, 150, "add", torch.randn(host.d_k, host.d_v))]
    fast, naive = host.run_edits(ids, rows), host.run_edits(ids, rows, reuse_prefix=False)
    assert (fast.logits - naive.logits).abs().max() < 2e-3 * ref.abs().max().clamp_min(1)
