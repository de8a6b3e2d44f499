"""writesae.models.delta_net / writesae.ops.delta_net: the pure-torch DeltaNet against itself and fla 0.6.0.

fla is never imported: its module tree is pasted below (state_dict keys and shapes printed by fla's own
``DeltaNetForCausalLM`` for configs A and B), and its naive delta rule is read from its source file, found
through ``FLA_SRC`` (the ``fla`` package folder) or ``importlib.util.find_spec('fla')``; skipped if absent.
"""
import ast
import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from writesae.models.delta_net import DeltaNetConfig, DeltaNetForCausalLM
from writesae.ops.delta_net import delta_rule_chunked, delta_rule_recurrent, l2norm

TINY = dict(vocab_size=101, hidden_size=32, num_heads=2, num_hidden_layers=2, intermediate_size=48)
CFG_A = dict(vocab_size=101, hidden_size=32, num_heads=2, num_hidden_layers=2)
CFG_B = dict(vocab_size=101, hidden_size=32, num_heads=2, num_hidden_layers=1, use_gate=True, use_short_conv=False,
             use_beta=False, expand_v=2.0, tie_word_embeddings=True, intermediate_size=48)

# printed by fla 0.6.0's DeltaNetForCausalLM(DeltaNetConfig(**CFG_A)).state_dict()
FLA_KEYS_A = [
    ('model.embeddings.weight', (101, 32)),
    ('model.layers.0.attn_norm.weight', (32,)),
    ('model.layers.0.attn.q_proj.weight', (32, 32)),
    ('model.layers.0.attn.k_proj.weight', (32, 32)),
    ('model.layers.0.attn.v_proj.weight', (32, 32)),
    ('model.layers.0.attn.b_proj.weight', (2, 32)),
    ('model.layers.0.attn.q_conv1d.weight', (32, 1, 4)),
    ('model.layers.0.attn.k_conv1d.weight', (32, 1, 4)),
    ('model.layers.0.attn.v_conv1d.weight', (32, 1, 4)),
    ('model.layers.0.attn.o_norm.weight', (16,)),
    ('model.layers.0.attn.o_proj.weight', (32, 32)),
    ('model.layers.0.mlp_norm.weight', (32,)),
    ('model.layers.0.mlp.gate_proj.weight', (256, 32)),
    ('model.layers.0.mlp.up_proj.weight', (256, 32)),
    ('model.layers.0.mlp.down_proj.weight', (32, 256)),
    ('model.layers.1.attn_norm.weight', (32,)),
    ('model.layers.1.attn.q_proj.weight', (32, 32)),
    ('model.layers.1.attn.k_proj.weight', (32, 32)),
    ('model.layers.1.attn.v_proj.weight', (32, 32)),
    ('model.layers.1.attn.b_proj.weight', (2, 32)),
    ('model.layers.1.attn.q_conv1d.weight', (32, 1, 4)),
    ('model.layers.1.attn.k_conv1d.weight', (32, 1, 4)),
    ('model.layers.1.attn.v_conv1d.weight', (32, 1, 4)),
    ('model.layers.1.attn.o_norm.weight', (16,)),
    ('model.layers.1.attn.o_proj.weight', (32, 32)),
    ('model.layers.1.mlp_norm.weight', (32,)),
    ('model.layers.1.mlp.gate_proj.weight', (256, 32)),
    ('model.layers.1.mlp.up_proj.weight', (256, 32)),
    ('model.layers.1.mlp.down_proj.weight', (32, 256)),
    ('model.norm.weight', (32,)),
    ('lm_head.weight', (101, 32)),
]
FLA_KEYS_B = [
    ('model.embeddings.weight', (101, 32)),
    ('model.layers.0.attn_norm.weight', (32,)),
    ('model.layers.0.attn.q_proj.weight', (32, 32)),
    ('model.layers.0.attn.k_proj.weight', (32, 32)),
    ('model.layers.0.attn.v_proj.weight', (64, 32)),
    ('model.layers.0.attn.g_proj.weight', (64, 32)),
    ('model.layers.0.attn.o_norm.weight', (32,)),
    ('model.layers.0.attn.o_proj.weight', (32, 64)),
    ('model.layers.0.mlp_norm.weight', (32,)),
    ('model.layers.0.mlp.gate_proj.weight', (48, 32)),
    ('model.layers.0.mlp.up_proj.weight', (48, 32)),
    ('model.layers.0.mlp.down_proj.weight', (32, 48)),
    ('model.norm.weight', (32,)),
    ('lm_head.weight', (101, 32)),
]


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return DeltaNetForCausalLM(DeltaNetConfig(**{**TINY, **kw})).eval()


def _inputs(B, T, H, dk, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (l2norm(torch.randn(B, T, H, dk, generator=g)) for _ in range(2))
    return q, k, torch.randn(B, T, H, dv, generator=g), torch.rand(B, T, H, generator=g)


@pytest.mark.parametrize("T", [37, 130])
def test_chunked_equals_recurrent(T):
    q, k, v, b = _inputs(2, T, 3, 16, 8)
    S0 = torch.randn(2, 3, 16, 8)
    o1, s1 = delta_rule_recurrent(q, k, v, b, initial_state=S0)
    for C in (16, 64):
        o2, s2 = delta_rule_chunked(q, k, v, b, initial_state=S0, chunk_size=C)
        assert (o1 - o2).abs().max() <= 1e-5 and (s1 - s2).abs().max() <= 1e-5
    assert s1.shape == (2, 3, 16, 8)  # fla's layout: (B, H, d_k, d_v)


def test_chunked_gradients_equal_recurrent():
    ins = [x.requires_grad_() for x in _inputs(1, 23, 2, 8, 4)]
    grads = []
    for fn in (delta_rule_recurrent, lambda *a: delta_rule_chunked(*a, chunk_size=8)):
        o, S = fn(*ins)
        grads.append(torch.autograd.grad((o.sin().sum() + S.cos().sum()), ins))
    for g1, g2 in zip(*grads):
        assert (g1 - g2).abs().max() <= 1e-5


@pytest.mark.parametrize("T", [37, 130])
@pytest.mark.parametrize("kw", [dict(), dict(use_gate=True, qk_activation="relu", qk_norm="sum")])
def test_model_chunked_equals_recurrent(T, kw):
    m = _model(**kw)
    with torch.no_grad():
        for p in m.parameters():  # move away from the init so that the recurrence matters
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, 101, (2, T), generator=torch.Generator().manual_seed(1))
    for layer in m.model.layers:
        layer.attn.chunk_size = 16
    with torch.no_grad():
        chunked = m(ids).logits
        for layer in m.model.layers:
            layer.attn.mode = "fused_recurrent"
        recurrent = m(ids).logits
    assert (chunked - recurrent).abs().max() <= 1e-5


def _fla_naive():
    src = os.environ.get("FLA_SRC")
    if not src:
        spec = importlib.util.find_spec("fla")  # finds, does not import
        src = str(Path(spec.origin).parent) if spec and spec.origin else None
    path = next((p for p in (Path(src or "/nonexistent") / "ops/delta_rule/naive.py",
                             Path(src or "/nonexistent") / "fla/ops/delta_rule/naive.py") if p.exists()), None)
    if path is None:
        pytest.skip("no fla source tree (set FLA_SRC to the fla package folder)")
    tree = ast.parse(path.read_text())  # only the torch function: naive.py also imports einops
    tree.body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "delta_rule_recurrence"]
    ns = {"torch": torch}
    exec(compile(tree, str(path), "exec"), ns)
    return ns["delta_rule_recurrence"]


def test_recurrence_matches_fla_naive():
    naive = _fla_naive()
    q, k, v, b = _inputs(2, 45, 3, 16, 8, seed=3)
    S0 = torch.randn(2, 3, 16, 8)
    o_ref, s_ref = naive(*(x.transpose(1, 2) for x in (q, k, v, b)), initial_state=S0)  # fla naive: (B,H,T,D)
    for fn in (delta_rule_recurrent, delta_rule_chunked):
        o, s = fn(q, k, v, b, initial_state=S0)
        assert (o - o_ref.transpose(1, 2)).abs().max() <= 1e-5 and (s - s_ref).abs().max() <= 1e-5


@pytest.mark.parametrize("cfg,keys", [(CFG_A, FLA_KEYS_A), (CFG_B, FLA_KEYS_B)])
def test_state_dict_matches_fla(cfg, keys):
    m = DeltaNetForCausalLM(DeltaNetConfig(**cfg))
    assert [(k, tuple(t.shape)) for k, t in m.state_dict().items()] == keys
    m2 = DeltaNetForCausalLM(DeltaNetConfig(**cfg))
    m2.load_state_dict(m.state_dict(), strict=True)
    assert (m2.lm_head.weight is m2.model.embeddings.weight) == bool(cfg.get("tie_word_embeddings"))


def test_o_norm_stays_fp32_and_init():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        m = DeltaNetForCausalLM(DeltaNetConfig(**{**TINY, "num_hidden_layers": 1}))
    finally:
        torch.set_default_dtype(old)
    assert [k for k, t in m.state_dict().items() if t.dtype == torch.float32] == ["model.layers.0.attn.o_norm.weight"]
    m = _model()
    assert torch.equal(m.model.norm.weight, torch.ones(32))
    assert 0.015 < m.model.layers[0].attn.q_proj.weight.std() < 0.025


def test_loss_and_generate():
    m = _model()
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    out = m(ids, labels=ids)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 101), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ref)
    gen = m.generate(ids[:, :5], max_new_tokens=5, do_sample=False)
    seq = ids[:, :5]
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, m(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, seq)
    assert torch.equal(m(inputs_embeds=m.model.embeddings(ids)).logits, m(ids).logits)


@pytest.mark.parametrize("kw", [dict(attn={"layers": [0], "num_heads": 2}), dict(attnres_block_size=2),
                                dict(hidden_act="powlu")])
def test_unsupported_options_raise(kw):
    with pytest.raises(NotImplementedError):
        DeltaNetForCausalLM(DeltaNetConfig(**{**TINY, **kw}))
