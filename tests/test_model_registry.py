"""Which class serves a model_type does not depend on what was imported first.

Importing fla registers its own DeltaNet / GLA / RWKV-7 classes and its own ``mamba2`` with the Auto classes
(``fla/models/<name>/__init__.py``: ``AutoConfig.register(..., exist_ok=True)``). Here stand-ins registered
the same way, before and after loading, simulate that on this CPU (fla's real registrations run in
``tests/fla_lane``). The rule: the project's classes always serve, transformers' own for the types it
defines (mamba2), :mod:`writesae.models` for delta_net, gla and rwkv7.
"""
import pytest
from transformers import AutoConfig, AutoModelForCausalLM, Mamba2ForCausalLM, PretrainedConfig, PreTrainedModel

from writesae.hosts import load_host
from writesae.models import classes

FLA_TYPES = {"delta_net": "DeltaNet", "gla": "GLA", "rwkv7": "RWKV7", "mamba2": "Mamba2"}


@pytest.fixture
def registry():
    """Restore the Auto classes' registrations after the test."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    saved = [(m, dict(m._extra_content)) for m in (CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING)]
    yield
    for m, content in saved:
        m._extra_content.clear()
        m._extra_content.update(content)


def fla_registers():
    """What ``import fla`` does to the Auto classes, with stand-in classes of fla's names."""
    for model_type, name in FLA_TYPES.items():
        cfg = type(f"{name}Config", (PretrainedConfig,), {"model_type": model_type})
        lm = type(f"{name}ForCausalLM", (PreTrainedModel,), {"config_class": cfg})
        AutoConfig.register(model_type, cfg, exist_ok=True)
        AutoModelForCausalLM.register(cfg, lm, exist_ok=True)


def _loads(tmp_path):
    """model_type -> the class load_host gives for a tiny model, and for its saved checkpoint."""
    got = {}
    for model_type in FLA_TYPES:
        model = load_host(f"tiny:{model_type}", device="cpu").model
        model.save_pretrained(tmp_path / model_type)
        again = load_host(str(tmp_path / model_type), device="cpu", tokenizer=False).model
        got[model_type] = (type(model), type(again))
    return got


def _expected(model_type):
    return Mamba2ForCausalLM if model_type == "mamba2" else classes(model_type)[1]


@pytest.mark.parametrize("fla_first", [True, False], ids=["fla-imported-first", "fla-imported-later"])
def test_the_projects_classes_serve_whatever_was_imported_first(registry, tmp_path, fla_first):
    if fla_first:
        fla_registers()
    else:
        _loads(tmp_path / "before")
        fla_registers()
    for model_type, (tiny, saved) in _loads(tmp_path).items():
        assert tiny is _expected(model_type) and saved is _expected(model_type), model_type
    # loading left the registry serving the project's classes
    for model_type in FLA_TYPES:
        assert AutoConfig.for_model(model_type).__class__ is _expected(model_type).config_class


def test_fla_classes_passed_in_stay_flas(registry):
    """Registering ours leaves fla's config class mapped to fla's model: a model built from fla's own config
    is fla's (what the caller passes is what it gets)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    fla_registers()
    theirs = CONFIG_MAPPING["gla"]
    their_lm = MODEL_FOR_CAUSAL_LM_MAPPING[theirs]
    load_host("tiny:gla", device="cpu")
    assert CONFIG_MAPPING["gla"] is classes("gla")[0] and MODEL_FOR_CAUSAL_LM_MAPPING[theirs] is their_lm
