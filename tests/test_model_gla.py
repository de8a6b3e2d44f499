"""Pure-torch GLA (writesae.models.gla, writesae.ops.gla): chunked vs stepwise, vs fla's naive GLA and module tree."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from writesae.models.gla import GLAConfig, GLAForCausalLM
from writesae.ops.gla import chunk_gla, recurrent_gla

TOL = 1e-5

# state_dict keys/shapes of fla 0.6.0's GLAForCausalLM (generated from fla's class) for two tiny configs
TINY_A = dict(hidden_size=32, num_hidden_layers=1, num_heads=2, vocab_size=50)
FLA_KEYS_A = [
    ('model.embeddings.weight', (50, 32)), ('model.layers.0.attn_norm.weight', (32,)),
    ('model.layers.0.attn.q_proj.weight', (16, 32)), ('model.layers.0.attn.k_proj.weight', (16, 32)),
    ('model.layers.0.attn.v_proj.weight', (32, 32)), ('model.layers.0.attn.g_proj.weight', (32, 32)),
    ('model.layers.0.attn.gk_proj.0.weight', (16, 32)), ('model.layers.0.attn.gk_proj.1.weight', (16, 16)),
    ('model.layers.0.attn.gk_proj.1.bias', (16,)), ('model.layers.0.attn.o_proj.weight', (32, 32)),
    ('model.layers.0.attn.g_norm_swish_gate.weight', (16,)), ('model.layers.0.mlp_norm.weight', (32,)),
    ('model.layers.0.mlp.gate_proj.weight', (256, 32)), ('model.layers.0.mlp.up_proj.weight', (256, 32)),
    ('model.layers.0.mlp.down_proj.weight', (32, 256)), ('model.norm.weight', (32,)), ('lm_head.weight', (50, 32))]
TINY_B = dict(hidden_size=32, num_hidden_layers=1, num_heads=4, num_kv_heads=2, use_short_conv=True, fuse_norm=False,
              tie_word_embeddings=True, expand_k=1.0, vocab_size=50)
FLA_KEYS_B = [
    ('model.embeddings.weight', (50, 32)), ('model.layers.0.attn_norm.weight', (32,)),
    ('model.layers.0.attn.q_proj.weight', (32, 32)), ('model.layers.0.attn.k_proj.weight', (16, 32)),
    ('model.layers.0.attn.v_proj.weight', (16, 32)), ('model.layers.0.attn.g_proj.weight', (32, 32)),
    ('model.layers.0.attn.q_conv1d.weight', (32, 1, 4)), ('model.layers.0.attn.k_conv1d.weight', (16, 1, 4)),
    ('model.layers.0.attn.v_conv1d.weight', (16, 1, 4)), ('model.layers.0.attn.gk_proj.0.weight', (16, 32)),
    ('model.layers.0.attn.gk_proj.1.weight', (16, 16)), ('model.layers.0.attn.gk_proj.1.bias', (16,)),
    ('model.layers.0.attn.o_proj.weight', (32, 32)), ('model.layers.0.attn.g_norm.weight', (8,)),
    ('model.layers.0.mlp_norm.weight', (32,)), ('model.layers.0.mlp.gate_proj.weight', (256, 32)),
    ('model.layers.0.mlp.up_proj.weight', (256, 32)), ('model.layers.0.mlp.down_proj.weight', (32, 256)),
    ('model.norm.weight', (32,)), ('lm_head.weight', (50, 32))]


def inputs(T, B=2, H=3, K=8, V=5, strength=1.0, seed=0):
    """strength 1: log decays up to ~-10 per step; "mixed": fla-like gates (logsigmoid/16) plus one key
    dimension at -9 per step and a stretch at -200 (chunks past max_log_ratio take the pairwise path)."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    if strength == "mixed":
        gk = F.logsigmoid(torch.randn(B, T, H, K, generator=g)) / 16
        gk[0, :, 1, 3] = -9.
        gk[1, T // 3:T // 3 + 20, 2, :] = -200.
    else:
        gk = F.logsigmoid(torch.randn(B, T, H, K, generator=g) * 4) * strength
    return q, k, v, gk, torch.randn(B, H, K, V, generator=g)


def model(seed=0, **kw):
    """A tiny model with weights spread wider than the init, so that every path matters."""
    torch.manual_seed(seed)
    m = GLAForCausalLM(GLAConfig(**{**dict(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=50), **kw}))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.15 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("T", [1, 37, 130])
@pytest.mark.parametrize("strength", [1 / 16, 1.0, "mixed"])
def test_chunk_equals_stepwise(T, strength):
    q, k, v, gk, h0 = inputs(T, strength=strength)
    o1, s1 = recurrent_gla(q, k, v, gk, initial_state=h0, output_final_state=True)
    for C in (16, 32, 64):
        o2, s2 = chunk_gla(q, k, v, gk, initial_state=h0, output_final_state=True, chunk_size=C)
        assert (o1 - o2).abs().max() <= TOL * 10 and (s1 - s2).abs().max() <= TOL * 10  # |o| ~ 10
    # V-first layout (fla's layer cache) is the transpose, in and out
    o3, s3 = chunk_gla(q, k, v, gk, initial_state=h0.transpose(-1, -2), output_final_state=True, state_v_first=True)
    assert torch.allclose(o3, o2, atol=TOL) and torch.allclose(s3.transpose(-1, -2), s2, atol=TOL)


def test_chunk_gradients_equal_stepwise():
    q, k, v, gk, h0 = (x.double().requires_grad_() for x in inputs(21, strength=0.3))
    grads = []
    for fn in (recurrent_gla, lambda *a, **kw: chunk_gla(*a, chunk_size=8, **kw)):
        o, s = fn(q, k, v, gk, initial_state=h0, output_final_state=True)
        grads.append(torch.autograd.grad(o.square().sum() + s.sum(), (q, k, v, gk, h0)))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("kw", [{}, dict(num_heads=4, num_kv_heads=2, use_short_conv=True, expand_k=1.0),
                                dict(fuse_norm=False, feature_map="relu", clamp_min=-0.05, use_output_gate=False)])
def test_model_chunk_equals_stepwise(kw):
    m = model(**kw)
    ids = torch.randint(0, 50, (2, 130), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for T in (37, 130):
            chunked = m(ids[:, :T]).logits
            for layer in m.model.layers:
                layer.attn.mode = "fused_recurrent"      # the stepwise reference loop
            stepwise = m(ids[:, :T]).logits
            for layer in m.model.layers:
                layer.attn.mode = "chunk"
            assert (chunked - stepwise).abs().max() <= TOL, T


def _fla_naive():
    """fla's ops/gla/naive.py loaded by path (fla itself is never imported), or None."""
    roots = []
    if os.environ.get("FLA_SRC"):
        roots.append(Path(os.environ["FLA_SRC"]))
    try:
        spec = importlib.util.find_spec("fla")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        roots.append(Path(spec.origin).parent)
    for root in roots:
        for path in (root / "ops/gla/naive.py", root / "fla/ops/gla/naive.py"):
            if path.is_file():
                spec = importlib.util.spec_from_file_location("_fla_gla_naive", path)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
                return mod.naive_recurrent_gla
    return None


def test_matches_fla_naive():
    naive = _fla_naive()
    if naive is None:
        pytest.skip("no fla source tree (set FLA_SRC to fla's package directory)")
    for T in (37, 130):
        q, k, v, gk, h0 = inputs(T, strength=0.2)
        o_ref, s_ref = naive(q, k, v, gk, h0, output_final_state=True)   # (B,H,K,V) state
        o, s = chunk_gla(q, k, v, gk, initial_state=h0, output_final_state=True)
        assert (o - o_ref).abs().max() <= TOL * 10 and (s - s_ref).abs().max() <= TOL * 10


@pytest.mark.parametrize("kw, keys", [(TINY_A, FLA_KEYS_A), (TINY_B, FLA_KEYS_B)])
def test_state_dict_matches_fla(kw, keys):
    m = GLAForCausalLM(GLAConfig(**kw))
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == keys
    GLAForCausalLM(GLAConfig(**kw)).load_state_dict(m.state_dict(), strict=True)
    if kw.get("tie_word_embeddings"):
        assert m.lm_head.weight is m.model.embeddings.weight


def test_loss_and_generate():
    m = model()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    out = m(ids, labels=ids)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1)))
    gen = m.generate(ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]), max_new_tokens=5, do_sample=False,
                     pad_token_id=0)
    x = ids[:, :4]
    with torch.no_grad():
        for _ in range(5):
            x = torch.cat([x, m(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, x)


@pytest.mark.parametrize("kw", [dict(attn={"layers": [0], "num_heads": 2}), dict(attnres_block_size=2),
                                dict(feature_map="bias_gelu")])
def test_unsupported_options_raise(kw):
    with pytest.raises(NotImplementedError):
        GLAForCausalLM(GLAConfig(hidden_size=32, num_hidden_layers=1, num_heads=2, vocab_size=50, **kw))
