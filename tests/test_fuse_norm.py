"""``fuse_norm=False``: fla 0.6.0 builds torch's ``nn.RMSNorm`` for the block and final norms of DeltaNet and
GLA (``(RMSNorm if config.fuse_norm else nn.RMSNorm)`` in ``fla/models/*/modeling_*.py``), which takes no
residual and no ``prenorm``. The mirrors build the same, and the hosts run either tree."""
import pytest
import torch

from writesae.hosts import load_host, tiny_config


@pytest.mark.parametrize("family", ["deltanet", "gla"])
def test_fuse_norm_false_is_torch_rmsnorm_and_the_host_runs_it(family):
    fused = load_host(tiny_config(family), device="cpu")
    cfg = tiny_config(family)
    cfg.fuse_norm = False
    host = load_host(cfg, device="cpu")
    blk = host.layers[0]
    assert all(type(m) is torch.nn.RMSNorm for m in (blk.attn_norm, blk.mlp_norm, host.backbone.norm))
    # GLA's fused output norm and gate is g_norm_swish_gate; unfused, g_norm (fla's names)
    weights = {k.replace("g_norm_swish_gate", "g_norm"): v for k, v in fused.model.state_dict().items()}
    host.model.load_state_dict(weights, strict=True)
    ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = fused.logits(ids)
    for logits in (host.logits(ids), host.trace(ids).logits, host.trace(ids, positions=[30]).logits):
        assert (logits - ref).abs().max() <= 1e-5 * ref.abs().max()
