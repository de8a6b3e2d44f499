"""fla's real kernels and classes on this CPU (Triton's interpreter, patched by ``shim.py``), against the torch
forms: every host's fla lane, fla's own model classes against our mirrors, transformers' own Qwen3.5 forward
through fla, and which classes load after fla has registered its own.

Tolerances: float32 lanes agree to 1e-5 of the largest logit (the kernels' float32 round-off, ~1e-6 here).
A bf16 model is ~5% off the float32 model with the same weights whichever kernels run (this tiny random
model amplifies rounding), so a bf16 lane is held to the torch lane's own accuracy: its distance to the
float32 model at most twice the torch lane's.
"""
import copy
import os

import pytest

if os.environ.get("WRITESAE_FLA_LANE") != "1":
    pytest.skip("the fla lane: run tests/fla_lane/run (its own virtualenv with Triton and fla)",
                allow_module_level=True)

import fla  # noqa: E402,F401  (registers fla's own classes: delta_net, gla, rwkv7, mamba2, ...)
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, Mamba2ForCausalLM  # noqa: E402

from writesae.hosts import Edit, host_class, load_host  # noqa: E402
from writesae.hosts.gated_deltanet import use_torch_path  # noqa: E402
from writesae.models import CLASSES, classes  # noqa: E402

IDS = torch.randint(0, 101, (1, 40), generator=torch.Generator().manual_seed(0))
KERNELS = {"deltanet": ("delta_rule", "chunk_delta_rule"), "gla": ("gla", "chunk_gla"),
           "rwkv7": ("generalized_delta_rule", "chunk_dplr_delta_rule"),
           "gdn": ("gated_delta_rule", "chunk_gated_delta_rule"),
           "olmo_hybrid": ("gated_delta_rule", "chunk_gated_delta_rule"), "kimi_linear": ("kda", "chunk_kda")}
# Kimi Linear's chunk_kda runs a kernel program per token and head in the interpreter: 16 tokens (8 s), not 40
SHORT = {"kimi_linear": 16}
F32, BF16 = torch.float32, torch.bfloat16


def _edited(host, n=IDS.shape[1]):
    """Logits of one edit row over the first ``n`` tokens: the unedited prefix and the stretch after the edit
    (at the middle) run the lane's kernel."""
    return host.run_edits(IDS[:, :n], [Edit(0, host.recurrent_layers[-1], 1, n // 2, "delete")]).logits


def _spy(monkeypatch, family):
    """Record the dtype of q each time the host calls fla's kernel."""
    module, name = KERNELS[family]
    mod = __import__(f"fla.ops.{module}", fromlist=[name])
    kernel, calls = getattr(mod, name), []

    def spy(q, *args, **kwargs):
        calls.append(q.dtype)
        return kernel(q, *args, **kwargs)

    monkeypatch.setattr(mod, name, spy)
    return calls


def _agree(got, ref):
    """float32: within the kernels' round-off."""
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def _as_accurate(got, ref, truth):
    """bf16: ``got`` as close to the float32 ``truth`` as the bf16 reference ``ref`` is, within a factor 2."""
    assert (got - truth).abs().max() <= 2 * (ref - truth).abs().max()


@pytest.mark.parametrize("family, dtype", [("deltanet", BF16), ("gla", F32), ("gla", BF16), ("rwkv7", F32),
                                           ("rwkv7", BF16), ("gdn", F32), ("gdn", BF16), ("olmo_hybrid", F32),
                                           ("kimi_linear", F32)])
def test_a_hosts_fla_lane_equals_its_torch_lane(monkeypatch, family, dtype):
    host = load_host(f"tiny:{family}", device="cpu", dtype=dtype)
    assert host.kernels == "torch"  # the default on a CPU, fla installed or not
    n = SHORT.get(family, IDS.shape[1])
    ref = _edited(host, n)
    calls = _spy(monkeypatch, family)
    host.kernels = "fla"
    got = _edited(host, n)
    # DeltaNet hands fla the model's bf16 (fla has no float32 delta rule); the others keep float32 inputs
    assert calls and set(calls) == {BF16 if family == "deltanet" else F32}
    if dtype == F32:
        _agree(got, ref)
    else:
        _as_accurate(got, ref, _edited(host_class(host.model.config)(copy.deepcopy(host.model).float()), n))


def _fla_model(ours):
    """fla's own class for our model's config, with our weights (strict; fla names GLA's unfused output norm
    g_norm)."""
    _, cfg_name, lm_name = CLASSES[ours.config.model_type]
    cfg = getattr(fla.models, cfg_name)(**{k: v for k, v in ours.config.to_dict().items()
                                           if k not in ("model_type", "architectures", "transformers_version")})
    theirs = getattr(fla.models, lm_name)(cfg)
    theirs.load_state_dict({k if cfg.fuse_norm else k.replace("g_norm_swish_gate", "g_norm"): v
                            for k, v in ours.state_dict().items()}, strict=True)
    return theirs.eval()


@pytest.mark.parametrize("family, dtype, fuse_norm", [("deltanet", BF16, True), ("deltanet", BF16, False),
                                                      ("gla", F32, True), ("rwkv7", F32, True)])
def test_flas_classes_our_mirrors_and_the_host_agree(family, dtype, fuse_norm):
    """fla's own model (its fused norms, convolutions and kernels) gives our mirror's logits; the host on
    fla's model, on the fla lane, gives them too (fuse_norm=False: torch's nn.RMSNorm in fla's blocks)."""
    ours = load_host(f"tiny:{family}", device="cpu").model
    if not fuse_norm:
        ours.config.fuse_norm = False
    theirs = _fla_model(ours).to(dtype)
    assert any(type(m) is torch.nn.RMSNorm for m in theirs.modules()) == (not fuse_norm)
    with torch.no_grad():
        ref = ours(input_ids=IDS).logits  # float32
        got = theirs(input_ids=IDS).logits.float()
    on_host = host_class(theirs.config)(theirs, kernels="fla").trace(IDS, positions=[20]).logits
    if dtype == F32:
        _agree(got, ref)
        _agree(on_host, ref)
    else:  # held to our mirror's own accuracy in bf16
        with torch.no_grad():
            ours16 = copy.deepcopy(ours).to(dtype)(input_ids=IDS).logits.float()
        _as_accurate(got, ours16, ref)
        _as_accurate(on_host, ours16, ref)


@pytest.fixture
def qwen_module():
    """transformers' Qwen3.5 modeling module with its kernel hooks as imported (fla on this CPU), restored."""
    import transformers.models.qwen3_5.modeling_qwen3_5 as mod

    names = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
             "causal_conv1d_update")
    saved = {n: getattr(mod, n) for n in names}
    yield mod
    for n, fn in saved.items():
        setattr(mod, n, fn)


def test_transformers_qwen3_5_forward_through_fla(monkeypatch, qwen_module):
    """transformers' own forward calls fla's chunked kernel (and, generating, its fused recurrent one) and
    gives the host's torch-lane logits; greedy generation picks the same tokens as the torch functions."""
    import fla.ops.gated_delta_rule.chunk as chunk
    import fla.ops.gated_delta_rule.fused_recurrent as recurrent

    calls = []
    for mod, name in ((chunk, "chunk_gated_delta_rule_fwd"), (recurrent, "fused_recurrent_gated_delta_rule_fwd")):
        def spy(*args, _fn=getattr(mod, name), _name=name, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)
        monkeypatch.setattr(mod, name, spy)  # looked up at each call by fla's autograd functions
    host = load_host("tiny:gdn", device="cpu")
    ref = host.trace(IDS).logits  # the host on the torch lane, step by step
    with torch.no_grad():
        got = host.model(input_ids=IDS).logits.float()
        assert calls == ["chunk_gated_delta_rule_fwd"] * len(host.recurrent_layers)
        tokens = host.model.generate(IDS, max_new_tokens=4, do_sample=False)
    assert "fused_recurrent_gated_delta_rule_fwd" in calls
    _agree(got, ref)
    use_torch_path(host.model)  # transformers' torch functions for every Qwen3.5 model (undone after the test)
    n = len(calls)
    with torch.no_grad():
        torch_tokens = host.model.generate(IDS, max_new_tokens=4, do_sample=False)
    assert len(calls) == n and torch.equal(tokens, torch_tokens)


def test_models_load_as_the_projects_classes_after_fla_registered(tmp_path):
    """With fla's own classes registered (as its import does: ``fla/models/<name>/__init__.py``, repeated here
    so that the order of tests does not matter), load_host gives ours, and a Mamba-2 checkpoint transformers'
    class, not fla's mamba2."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for name in ("DeltaNet", "GLA", "RWKV7", "Mamba2"):
        cfg, lm = getattr(fla.models, f"{name}Config"), getattr(fla.models, f"{name}ForCausalLM")
        AutoConfig.register(cfg.model_type, cfg, exist_ok=True)
        AutoModelForCausalLM.register(cfg, lm, exist_ok=True)
        assert CONFIG_MAPPING[cfg.model_type] is cfg
    mamba = load_host("tiny:mamba2", device="cpu").model
    mamba.save_pretrained(tmp_path)
    assert type(load_host(str(tmp_path), device="cpu", tokenizer=False).model) is Mamba2ForCausalLM
    for family, model_type in (("deltanet", "delta_net"), ("gla", "gla"), ("rwkv7", "rwkv7")):
        assert type(load_host(f"tiny:{family}", device="cpu").model) is classes(model_type)[1]
