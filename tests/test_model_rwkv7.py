"""The pure-torch RWKV-7 (writesae.models.rwkv7, writesae.ops.rwkv7) on tiny configs: chunked vs stepwise
recurrence, model forward vs the stepwise path, fla's naive reference (when an fla source tree is found,
loaded by path without importing fla), and the state_dict layout frozen from fla 0.6.0's own class."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from writesae.models.rwkv7 import LOG_DECAY_BOUND, RWKV7Config, RWKV7ForCausalLM
from writesae.ops import rwkv7 as rule

# Tiny configs; their state_dict keys/shapes below were printed by fla 0.6.0's RWKV7ForCausalLM.
CONFIG_A = dict(vocab_size=64, hidden_size=32, head_dim=8, num_hidden_layers=2, decay_low_rank_dim=8,
                gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=4)
CONFIG_B = dict(vocab_size=48, hidden_size=32, head_dim=None, num_heads=2, num_hidden_layers=3, decay_low_rank_dim=8,
                gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=4, norm_first=False, norm_bias=False,
                hidden_ratio=3.5, tie_word_embeddings=True, fuse_norm=False)
FLA_KEYS_A = """
    model.embeddings.weight 64 32
    model.layers.0.pre_norm.weight 32
    model.layers.0.pre_norm.bias 32
    model.layers.0.attn_norm.weight 32
    model.layers.0.attn_norm.bias 32
    model.layers.0.attn.x_r 1 1 32
    model.layers.0.attn.x_w 1 1 32
    model.layers.0.attn.x_k 1 1 32
    model.layers.0.attn.x_v 1 1 32
    model.layers.0.attn.x_a 1 1 32
    model.layers.0.attn.x_g 1 1 32
    model.layers.0.attn.k_k 32
    model.layers.0.attn.k_a 32
    model.layers.0.attn.r_k 4 8
    model.layers.0.attn.r_proj.weight 32 32
    model.layers.0.attn.k_proj.weight 32 32
    model.layers.0.attn.v_proj.weight 32 32
    model.layers.0.attn.o_proj.weight 32 32
    model.layers.0.attn.w_lora.lora.0.weight 8 32
    model.layers.0.attn.w_lora.lora.2.weight 32 8
    model.layers.0.attn.w_lora.lora.2.bias 32
    model.layers.0.attn.a_lora.lora.0.weight 8 32
    model.layers.0.attn.a_lora.lora.2.weight 32 8
    model.layers.0.attn.a_lora.lora.2.bias 32
    model.layers.0.attn.g_lora.lora.0.weight 8 32
    model.layers.0.attn.g_lora.lora.2.weight 32 8
    model.layers.0.attn.g_norm.weight 32
    model.layers.0.attn.g_norm.bias 32
    model.layers.0.ffn_norm.weight 32
    model.layers.0.ffn_norm.bias 32
    model.layers.0.ffn.x_k 32
    model.layers.0.ffn.key.weight 128 32
    model.layers.0.ffn.value.weight 32 128
    model.layers.1.attn_norm.weight 32
    model.layers.1.attn_norm.bias 32
    model.layers.1.attn.x_r 1 1 32
    model.layers.1.attn.x_w 1 1 32
    model.layers.1.attn.x_k 1 1 32
    model.layers.1.attn.x_v 1 1 32
    model.layers.1.attn.x_a 1 1 32
    model.layers.1.attn.x_g 1 1 32
    model.layers.1.attn.k_k 32
    model.layers.1.attn.k_a 32
    model.layers.1.attn.r_k 4 8
    model.layers.1.attn.r_proj.weight 32 32
    model.layers.1.attn.k_proj.weight 32 32
    model.layers.1.attn.v_proj.weight 32 32
    model.layers.1.attn.o_proj.weight 32 32
    model.layers.1.attn.w_lora.lora.0.weight 8 32
    model.layers.1.attn.w_lora.lora.2.weight 32 8
    model.layers.1.attn.w_lora.lora.2.bias 32
    model.layers.1.attn.v_lora.lora.0.weight 4 32
    model.layers.1.attn.v_lora.lora.2.weight 32 4
    model.layers.1.attn.v_lora.lora.2.bias 32
    model.layers.1.attn.a_lora.lora.0.weight 8 32
    model.layers.1.attn.a_lora.lora.2.weight 32 8
    model.layers.1.attn.a_lora.lora.2.bias 32
    model.layers.1.attn.g_lora.lora.0.weight 8 32
    model.layers.1.attn.g_lora.lora.2.weight 32 8
    model.layers.1.attn.g_norm.weight 32
    model.layers.1.attn.g_norm.bias 32
    model.layers.1.ffn_norm.weight 32
    model.layers.1.ffn_norm.bias 32
    model.layers.1.ffn.x_k 32
    model.layers.1.ffn.key.weight 128 32
    model.layers.1.ffn.value.weight 32 128
    model.norm.weight 32
    model.norm.bias 32
    lm_head.weight 64 32"""
FLA_KEYS_B = """
    model.embeddings.weight 48 32
    model.layers.0.attn_norm.weight 32
    model.layers.0.attn.x_r 1 1 32
    model.layers.0.attn.x_w 1 1 32
    model.layers.0.attn.x_k 1 1 32
    model.layers.0.attn.x_v 1 1 32
    model.layers.0.attn.x_a 1 1 32
    model.layers.0.attn.x_g 1 1 32
    model.layers.0.attn.k_k 32
    model.layers.0.attn.k_a 32
    model.layers.0.attn.r_k 2 16
    model.layers.0.attn.r_proj.weight 32 32
    model.layers.0.attn.k_proj.weight 32 32
    model.layers.0.attn.v_proj.weight 32 32
    model.layers.0.attn.o_proj.weight 32 32
    model.layers.0.attn.w_lora.lora.0.weight 8 32
    model.layers.0.attn.w_lora.lora.2.weight 32 8
    model.layers.0.attn.w_lora.lora.2.bias 32
    model.layers.0.attn.a_lora.lora.0.weight 8 32
    model.layers.0.attn.a_lora.lora.2.weight 32 8
    model.layers.0.attn.a_lora.lora.2.bias 32
    model.layers.0.attn.g_lora.lora.0.weight 8 32
    model.layers.0.attn.g_lora.lora.2.weight 32 8
    model.layers.0.attn.g_norm.weight 32
    model.layers.0.attn.g_norm.bias 32
    model.layers.0.ffn_norm.weight 32
    model.layers.0.ffn.x_k 32
    model.layers.0.ffn.key.weight 128 32
    model.layers.0.ffn.value.weight 32 128
    model.layers.1.attn_norm.weight 32
    model.layers.1.attn.x_r 1 1 32
    model.layers.1.attn.x_w 1 1 32
    model.layers.1.attn.x_k 1 1 32
    model.layers.1.attn.x_v 1 1 32
    model.layers.1.attn.x_a 1 1 32
    model.layers.1.attn.x_g 1 1 32
    model.layers.1.attn.k_k 32
    model.layers.1.attn.k_a 32
    model.layers.1.attn.r_k 2 16
    model.layers.1.attn.r_proj.weight 32 32
    model.layers.1.attn.k_proj.weight 32 32
    model.layers.1.attn.v_proj.weight 32 32
    model.layers.1.attn.o_proj.weight 32 32
    model.layers.1.attn.w_lora.lora.0.weight 8 32
    model.layers.1.attn.w_lora.lora.2.weight 32 8
    model.layers.1.attn.w_lora.lora.2.bias 32
    model.layers.1.attn.v_lora.lora.0.weight 4 32
    model.layers.1.attn.v_lora.lora.2.weight 32 4
    model.layers.1.attn.v_lora.lora.2.bias 32
    model.layers.1.attn.a_lora.lora.0.weight 8 32
    model.layers.1.attn.a_lora.lora.2.weight 32 8
    model.layers.1.attn.a_lora.lora.2.bias 32
    model.layers.1.attn.g_lora.lora.0.weight 8 32
    model.layers.1.attn.g_lora.lora.2.weight 32 8
    model.layers.1.attn.g_norm.weight 32
    model.layers.1.attn.g_norm.bias 32
    model.layers.1.ffn_norm.weight 32
    model.layers.1.ffn.x_k 32
    model.layers.1.ffn.key.weight 128 32
    model.layers.1.ffn.value.weight 32 128
    model.layers.2.attn_norm.weight 32
    model.layers.2.attn.x_r 1 1 32
    model.layers.2.attn.x_w 1 1 32
    model.layers.2.attn.x_k 1 1 32
    model.layers.2.attn.x_v 1 1 32
    model.layers.2.attn.x_a 1 1 32
    model.layers.2.attn.x_g 1 1 32
    model.layers.2.attn.k_k 32
    model.layers.2.attn.k_a 32
    model.layers.2.attn.r_k 2 16
    model.layers.2.attn.r_proj.weight 32 32
    model.layers.2.attn.k_proj.weight 32 32
    model.layers.2.attn.v_proj.weight 32 32
    model.layers.2.attn.o_proj.weight 32 32
    model.layers.2.attn.w_lora.lora.0.weight 8 32
    model.layers.2.attn.w_lora.lora.2.weight 32 8
    model.layers.2.attn.w_lora.lora.2.bias 32
    model.layers.2.attn.v_lora.lora.0.weight 4 32
    model.layers.2.attn.v_lora.lora.2.weight 32 4
    model.layers.2.attn.v_lora.lora.2.bias 32
    model.layers.2.attn.a_lora.lora.0.weight 8 32
    model.layers.2.attn.a_lora.lora.2.weight 32 8
    model.layers.2.attn.a_lora.lora.2.bias 32
    model.layers.2.attn.g_lora.lora.0.weight 8 32
    model.layers.2.attn.g_lora.lora.2.weight 32 8
    model.layers.2.attn.g_norm.weight 32
    model.layers.2.attn.g_norm.bias 32
    model.layers.2.ffn_norm.weight 32
    model.layers.2.ffn.x_k 32
    model.layers.2.ffn.key.weight 128 32
    model.layers.2.ffn.value.weight 32 128
    model.norm.weight 32
    lm_head.weight 48 32"""


def fla_naive():
    """fla's ops/generalized_delta_rule/dplr/naive.py, executed from source (fla itself is not imported)."""
    root = os.environ.get("FLA_SRC")
    if root is None:
        spec = importlib.util.find_spec("fla")
        root = spec.origin if spec is not None and spec.origin else None
        root = str(Path(root).parent) if root else None
    if root is None:
        pytest.skip("no fla source tree (set FLA_SRC)")
    root = Path(root)
    path = next((p for p in (root / "ops/generalized_delta_rule/dplr/naive.py",
                             root / "fla/ops/generalized_delta_rule/dplr/naive.py") if p.exists()), None)
    if path is None:
        pytest.skip(f"no dplr/naive.py under {root}")
    src = path.read_text()
    if importlib.util.find_spec("einops") is None:  # only dplr_chunkwise (unused here) needs it
        src = src.replace("from einops import rearrange", "rearrange = None")
    ns = {}
    exec(compile(src, str(path), "exec"), ns)
    return ns["dplr_recurrence"]


def rwkv_inputs(B, T, H, K, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, k = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    w = -LOG_DECAY_BOUND * torch.rand(B, T, H, K, generator=g)
    kk = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    a = torch.rand(B, T, H, K, generator=g)
    return r, w, k, v, kk, a, torch.randn(B, H, K, V, generator=g)


def perturbed(config, **kw):
    """A model whose zero-initialised weights (o_proj, ffn.value, LoRA downs) are made non-zero."""
    torch.manual_seed(0)
    m = RWKV7ForCausalLM(RWKV7Config(**config, **kw)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def keys(model):
    return "\n".join(f"{k} {' '.join(map(str, v.shape))}" for k, v in model.state_dict().items())


@pytest.mark.parametrize("config,frozen", [(CONFIG_A, FLA_KEYS_A), (CONFIG_B, FLA_KEYS_B)])
def test_state_dict_layout_is_flas(config, frozen):
    m = RWKV7ForCausalLM(RWKV7Config(**config))
    assert keys(m) == "\n".join(line.strip() for line in frozen.strip().splitlines())
    RWKV7ForCausalLM(RWKV7Config(**config)).load_state_dict(m.state_dict(), strict=True)


@pytest.mark.parametrize("T", [37, 130])
def test_chunked_equals_recurrent(T):
    r, w, k, v, kk, a, S0 = rwkv_inputs(2, T, 3, 8, 6)
    leaves = [x.requires_grad_() for x in (r, w, k, v, kk, a, S0)]
    o1, S1 = rule.recurrent(*leaves)
    grads1 = torch.autograd.grad(o1.square().sum() + S1.square().sum(), leaves)
    for C in (16, 32):
        o2, S2 = rule.chunked(*leaves, chunk_size=C)
        assert (o1 - o2).abs().max() <= 1e-5 * o1.abs().max()
        assert (S1 - S2).abs().max() <= 1e-5 * S1.abs().max()
        grads2 = torch.autograd.grad(o2.square().sum() + S2.square().sum(), leaves)
        for g1, g2 in zip(grads1, grads2):
            assert (g1 - g2).abs().max() <= 1e-4 * g1.abs().max()


def test_recurrence_equals_fla_naive():
    dplr_recurrence = fla_naive()
    r, w, k, v, kk, a, S0 = rwkv_inputs(2, 37, 3, 8, 6, seed=1)
    o, S = rule.recurrent(r, w, k, v, kk, a, S0)
    t = lambda x: x.transpose(1, 2)  # noqa: E731  fla's naive is [B, H, T, D] and scales q by d_k^-1/2
    o_ref, S_ref = dplr_recurrence(t(r) * 8 ** 0.5, t(k), t(v), t(-kk), t(kk * a), t(w), S0.clone())
    assert (o - t(o_ref)).abs().max() <= 1e-5 * o.abs().max()
    assert (S - S_ref).abs().max() <= 1e-5 * S.abs().max()


@pytest.mark.parametrize("config", [CONFIG_A, CONFIG_B])
@pytest.mark.parametrize("T", [37, 130])
def test_forward_equals_stepwise(config, T):
    chunk, step = perturbed(config), perturbed(config, attn_mode="fused_recurrent")
    ids = torch.randint(0, config["vocab_size"], (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        a, b = chunk(ids).logits, step(ids).logits
    assert (a - b).abs().max() <= 1e-5


def test_causal_and_padding():
    m = perturbed(CONFIG_A)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(ids).logits
        assert (m(ids[:, :23]).logits - full[:, :23]).abs().max() < 1e-5
        # left padding (fla's convention): masked steps are zeroed, so a padded row equals its unpadded self
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        padded = m(ids, attention_mask=mask).logits
        assert (padded[1, 5:] - m(ids[1:, 5:]).logits[0]).abs().max() < 1e-4 * full.abs().max()


def test_loss_and_generate():
    m = perturbed(CONFIG_B, eos_token_id=None)  # tied embeddings; no eos, so greedy runs all 5 steps
    assert m.lm_head.weight is m.model.embeddings.weight
    ids = torch.randint(0, 48, (2, 12), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, 4] = -100
    out = m(ids, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(out.loss, ref)
    gen = m.generate(ids[:, :5], attention_mask=torch.ones_like(ids[:, :5]), max_new_tokens=5, do_sample=False)
    x = ids[:, :5]
    with torch.no_grad():
        for _ in range(5):
            x = torch.cat([x, m(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, x)


def test_save_and_from_pretrained(tmp_path):
    m = perturbed(CONFIG_A)
    m.save_pretrained(tmp_path)
    back = RWKV7ForCausalLM.from_pretrained(tmp_path).eval()  # init must not overwrite loaded weights
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, back(ids).logits)


def test_unsupported_options_say_so():
    with pytest.raises(NotImplementedError, match="attn"):
        RWKV7ForCausalLM(RWKV7Config(**CONFIG_A, attn={"layers": [1], "num_heads": 2}))
    with pytest.raises(NotImplementedError, match="value_dim"):
        RWKV7ForCausalLM(RWKV7Config(**CONFIG_A, value_dim=64))
