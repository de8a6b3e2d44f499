"""Pure-torch model classes for families that live in flash-linear-attention (no Triton).

DeltaNet, GLA and RWKV-7 are not in transformers; their reference implementation is fla's, whose model
classes need Triton even to import and whose kernels need CUDA. The classes here mirror fla 0.6.0's module
trees and parameter names (so fla-hub checkpoints load strictly) and run on any device with torch alone.
:func:`register` makes ``AutoConfig`` / ``AutoModelForCausalLM`` serve them under fla's ``model_type``, on
every device: also over fla's own classes, which importing fla registers under the same names (fla serves the
hosts' kernels only; see :func:`writesae.hosts._register`).
"""
from __future__ import annotations

import importlib

# model_type -> (module, config class, causal LM class)
CLASSES = {
    "delta_net": ("delta_net", "DeltaNetConfig", "DeltaNetForCausalLM"),
    "gla": ("gla", "GLAConfig", "GLAForCausalLM"),
    "rwkv7": ("rwkv7", "RWKV7Config", "RWKV7ForCausalLM"),
}


def classes(model_type):
    """(config class, causal LM class) of our pure-torch implementation of ``model_type``."""
    mod, cfg, lm = CLASSES[model_type]
    m = importlib.import_module(f"{__name__}.{mod}")
    return getattr(m, cfg), getattr(m, lm)


def register(*model_types):
    """Register our classes with the transformers Auto classes for each model_type (default all), in place of
    whatever is registered there."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for model_type in model_types or CLASSES:
        cfg, lm = classes(model_type)
        AutoConfig.register(model_type, cfg, exist_ok=True)
        AutoModelForCausalLM.register(cfg, lm, exist_ok=True)
