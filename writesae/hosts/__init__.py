"""Host adapters: one module per recurrent family, the only code that knows a model's internals.

``load_host(source)`` returns a host object that lists cells, traces and runs cache edits.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .base import Cell, CellTrace, Edit, EditRun, Trace
from .gated_deltanet import GatedDeltaNetHost
from .mamba2 import Mamba2Host

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded"
_GDN_TYPES = ("qwen3_5", "qwen3_5_text", "qwen3_next")


def tiny_config(family="qwen3_5", n_k_heads=2, n_v_heads=4, layers=4, vocab_size=101):
    """A tiny randomly initialisable config of a real transformers class (tests, CI notebooks)."""
    from transformers import Qwen3_5TextConfig, Qwen3NextConfig

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, linear_num_key_heads=n_k_heads,
                  linear_num_value_heads=n_v_heads, linear_key_head_dim=16, linear_value_head_dim=8,
                  layer_types=(["linear_attention"] * 3 + ["full_attention"]) * (layers // 4))
    if family == "qwen3_5":
        return Qwen3_5TextConfig(**common)
    if family == "qwen3_next":
        return Qwen3NextConfig(**common, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                               shared_expert_intermediate_size=32)
    if family == "mamba2":
        from transformers import Mamba2Config

        return Mamba2Config(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=3, num_heads=n_v_heads,
                            head_dim=16, state_size=8, expand=1, n_groups=n_v_heads, chunk_size=16,
                            conv_kernel=4)
    raise ValueError(f"unknown tiny family {family!r}: use 'qwen3_5', 'qwen3_next' or 'mamba2'")


def _host_class(config):
    mt = getattr(config, "model_type", "")
    if mt in _GDN_TYPES:
        return GatedDeltaNetHost
    if mt == "mamba2":
        return Mamba2Host
    raise ValueError(f"no host adapter for model_type {mt!r}; supported: {', '.join(_GDN_TYPES)}, mamba2")


def _model_from_config(config):
    from transformers import AutoModelForCausalLM

    if getattr(config, "model_type", "") == "qwen3_5" and hasattr(config, "text_config"):
        config = config.text_config
    return AutoModelForCausalLM.from_config(config)


def load_host(source="embedded", *, dtype=torch.float32, device=None, tokenizer=True):
    """Load a model as a host.

    source: ``"embedded"`` (the model shipped with this package, no network), ``"tiny"`` / ``"tiny:qwen3_next"`` /
    ``"tiny:mamba2"``
    (a seeded random tiny model, no tokenizer), a local directory or hub
    name of a real checkpoint (e.g. ``"Qwen/Qwen3.5-0.8B"``, offline when cached), a transformers config
    (random init, for tests), or an already-loaded model. device: default CUDA when available, else CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok, name = None, None
    if isinstance(source, torch.nn.Module):
        model = source
    elif isinstance(source, str) and source.startswith("tiny"):
        torch.manual_seed(0)
        model = _model_from_config(tiny_config(*source.split(":")[1:2]))
        name = source
    elif isinstance(source, PretrainedConfig):
        _host_class(source)
        model = _model_from_config(source)
        name = f"random-{source.model_type}"
    else:
        path = EMBEDDED_DIR if source == "embedded" else source
        if source == "embedded" and not (EMBEDDED_DIR / "model.safetensors").exists():
            raise FileNotFoundError(f"the embedded model is missing from {EMBEDDED_DIR}: "
                                    "train it with `python -m writesae.embedded_train`")
        if isinstance(path, Path) or os.path.isdir(str(path)):
            path = str(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        name = str(source)
        if tokenizer:
            tok = AutoTokenizer.from_pretrained(path)
    model = model.to(device=device, dtype=dtype)
    return _host_class(model.config)(model, tokenizer=tok, name=name)


__all__ = ["Cell", "CellTrace", "Edit", "EditRun", "Trace", "GatedDeltaNetHost", "Mamba2Host", "load_host", "tiny_config", "EMBEDDED_DIR"]
