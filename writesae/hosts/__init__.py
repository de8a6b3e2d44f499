"""Host adapters: one module per recurrent family, the only code that knows a model's internals.

``load_host(source)`` returns a host (see :mod:`writesae.hosts.recurrent` for the contract) that lists
cells, traces, runs cache edits and reads a head's output through to the logits. :data:`HOSTS` says which
host serves each model_type, :data:`FORMS` each host's form of the one recurrence and :data:`CHECKPOINTS` a
public checkpoint per type; :func:`family_table` (``python -m writesae.hosts``) writes them as the two tables
of the README and the book's method page.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

from .base import Cell, CellTrace, Edit, EditRun, LayerOut, LayerState, Readout, Trace

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded"

# model_type -> (family module, host class): the one table of supported families
HOSTS = {
    "qwen3_5": ("gated_deltanet", "GatedDeltaNetHost"),
    "qwen3_5_text": ("gated_deltanet", "GatedDeltaNetHost"),
    "qwen3_5_moe": ("gated_deltanet", "GatedDeltaNetHost"),
    "qwen3_5_moe_text": ("gated_deltanet", "GatedDeltaNetHost"),
    "qwen3_next": ("gated_deltanet", "GatedDeltaNetHost"),
    "mamba2": ("mamba2", "Mamba2Host"),
    "nemotron_h": ("mamba2", "NemotronHHost"),
    "granitemoehybrid": ("mamba2", "GraniteMoeHybridHost"),
    "bamba": ("mamba2", "BambaHost"),
    "falcon_h1": ("mamba2", "FalconH1Host"),
    "zamba2": ("mamba2", "Zamba2Host"),
    "delta_net": ("delta_net", "DeltaNetHost"),
    "gla": ("gla", "GLAHost"),
    "rwkv7": ("rwkv7", "RWKV7Host"),
    "olmo_hybrid": ("olmo_hybrid", "OlmoHybridHost"),
    "kimi_linear": ("kimi_linear", "KimiLinearHost"),
    "minimax": ("minimax", "MiniMaxHost"),
    "mamba": ("mamba", "MambaHost"),
    "falcon_mamba": ("mamba", "MambaHost"),
    "jamba": ("mamba", "JambaHost"),
    "xlstm": ("xlstm", "XLSTMHost"),
}
# family names accepted by "tiny:<family>" and "embedded:<family>" -> the model_type they build
FAMILIES = {"gdn": "qwen3_5", "gated_deltanet": "qwen3_5", "qwen3_5": "qwen3_5", "qwen3_next": "qwen3_next",
            "qwen3_5_moe": "qwen3_5_moe", "mamba2": "mamba2",
            "nemotron_h": "nemotron_h", "granitemoehybrid": "granitemoehybrid", "bamba": "bamba",
            "falcon_h1": "falcon_h1", "zamba2": "zamba2", "deltanet": "delta_net", "delta_net": "delta_net",
            "gla": "gla", "rwkv7": "rwkv7",
            "olmo_hybrid": "olmo_hybrid", "kimi_linear": "kimi_linear", "minimax": "minimax", "mamba": "mamba",
            "falcon_mamba": "falcon_mamba", "jamba": "jamba", "xlstm": "xlstm"}
ZOO = ("gdn", "mamba2", "deltanet", "gla", "rwkv7")  # one embedded model per family
ZOO_DIRS = {"qwen3_5": "gdn", "delta_net": "deltanet"}  # model_type -> folder of writesae/embedded/, where it differs


# host class -> its layer in the one recurrence S_t = D_t * S_{t-1} + e_t (f_t^T S_{t-1}) + b_t k_t v_t^T, read o_t =
# S_t^T q_t: (decay D_t, erase pair (e, f), the write, the update S_t - D_t S_{t-1}); a subclass has its base's
FORMS = {
    "GatedDeltaNetHost": ("scalar `exp(g)`", "`(-b k, exp(g) k)`", "`b k v^T`, rank 1", "rank 1"),
    "KimiLinearHost": ("per key row `exp(g)`", "`(-b k, exp(g) k)`", "`b k v^T`, rank 1", "rank 1"),
    "Mamba2Host": ("scalar `exp(dt A)`", "none", "`dt B x^T`, rank 1", "= write"),
    "DeltaNetHost": ("1", "`(-b k, k)`", "`b k v^T`, rank 1", "rank 1"),
    "GLAHost": ("per key row", "none", "`k v^T`, rank 1", "= write"),
    "RWKV7Host": ("per key row", "`(-(kk * a), kk)`", "`k v^T`, rank 1", "rank 2"),
    "MiniMaxHost": ("fixed scalar `exp(-slope)`", "none", "`k v^T`, rank 1", "= write"),
    "MambaHost": ("per entry `exp(dt A)`", "none", "`B (dt x)^T`, rank 1", "= write"),
    "XLSTMHost": ("scalar forget gate (stabilised)", "none", "`exp(i - m) k v^T`, rank 1", "= write"),
}
# model_type -> a public checkpoint it serves (the GPU parameter files name one per family)
CHECKPOINTS = {
    "qwen3_5": "Qwen/Qwen3.5-0.8B ... 27B", "qwen3_5_text": "(the text model of the above)",
    "qwen3_5_moe": "a Qwen3.5 mixture-of-experts checkpoint", "qwen3_5_moe_text": "(the text model of the above)",
    "qwen3_next": "Qwen/Qwen3-Next-80B-A3B-Instruct", "mamba2": "AntonV/mamba2-370m-hf",
    "nemotron_h": "nvidia/NVIDIA-Nemotron-Nano-9B-v2", "granitemoehybrid": "ibm-granite/granite-4.0-h-micro",
    "bamba": "ibm-ai-platform/Bamba-9B-v2", "falcon_h1": "tiiuae/Falcon-H1-0.5B-Base", "zamba2": "Zyphra/Zamba2-1.2B",
    "delta_net": "fla-hub/delta_net-1.3B-100B", "gla": "fla-hub/gla-1.3B-100B", "rwkv7": "fla-hub/rwkv7-1.5B-world",
    "olmo_hybrid": "allenai/Olmo-Hybrid-7B", "kimi_linear": "moonshotai/Kimi-Linear-48B-A3B-Instruct",
    "minimax": "MiniMaxAI/MiniMax-Text-01 (456B: no single GPU)", "mamba": "state-spaces/mamba-130m-hf",
    "falcon_mamba": "tiiuae/falcon-mamba-7b", "jamba": "ai21labs/AI21-Jamba-Mini-1.5", "xlstm": "NX-AI/xLSTM-7b",
}


def family_table() -> str:
    """Every hosted model_type as two markdown tables, from :data:`HOSTS`, :data:`FORMS` and :data:`CHECKPOINTS`:
    each layer rule's terms of the one recurrence (decay, erase, write, update; one row per rule), then each
    model_type's host, layer rule and a checkpoint. The tables of the README and the book's method page."""
    forms = ["| layer | decay `D_t` | erase `(e, f)` | write | update `S_t - D_t S_{t-1}` |", "|---|---|---|---|---|"]
    types = ["| model_type | host | layer | a checkpoint |", "|---|---|---|---|"]
    seen = set()
    for mt, (_, cls) in HOSTS.items():
        h = host_class(mt)
        if h.kind not in seen:
            seen.add(h.kind)
            form = next(FORMS[c.__name__] for c in h.__mro__ if c.__name__ in FORMS)
            forms.append(f"| {h.kind} | " + " | ".join(form) + " |")
        types.append(f"| `{mt}` | `{cls}` | {h.kind} | {CHECKPOINTS[mt]} |")
    return "\n".join(forms) + "\n\n" + "\n".join(types) + "\n"


def host_class(config_or_type):
    """The host class for a config (or a model_type string); errors list what is supported."""
    mt = config_or_type if isinstance(config_or_type, str) else getattr(config_or_type, "model_type", "")
    if mt not in HOSTS:
        raise ValueError(f"no host adapter for model_type {mt!r}; supported: {', '.join(HOSTS)}")
    mod, cls = HOSTS[mt]
    return getattr(importlib.import_module(f"{__name__}.{mod}"), cls)


def _family(name):
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}: use one of {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def tiny_config(family="qwen3_5", n_k_heads=2, n_v_heads=4, layers=4, vocab_size=101):
    """A tiny randomly initialisable config of the family's real class (tests, CI notebooks). Where the
    family allows it the heads are grouped and d_k != d_v."""
    mt = _family(family)
    if mt in ("qwen3_5", "qwen3_next", "qwen3_5_moe"):
        from transformers import Qwen3_5MoeTextConfig, Qwen3_5TextConfig, Qwen3NextConfig

        common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, linear_num_key_heads=n_k_heads,
                      linear_num_value_heads=n_v_heads, linear_key_head_dim=16, linear_value_head_dim=8,
                      layer_types=(["linear_attention"] * 3 + ["full_attention"]) * (layers // 4))
        moe = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32)
        return {"qwen3_5": lambda: Qwen3_5TextConfig(**common),
                "qwen3_next": lambda: Qwen3NextConfig(**common, **moe),
                "qwen3_5_moe": lambda: Qwen3_5MoeTextConfig(**common, **moe)}[mt]()
    if mt == "olmo_hybrid":
        from transformers import OlmoHybridConfig

        return OlmoHybridConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                num_attention_heads=2, num_key_value_heads=1, linear_num_key_heads=n_k_heads,
                                linear_num_value_heads=n_v_heads, linear_key_head_dim=16, linear_value_head_dim=8,
                                pad_token_id=None, eos_token_id=None,
                                # attention second: its post-norm output (unit RMS, against a random init's tiny
                                # residual) would otherwise drown the last recurrent layer's direct path
                                layer_types=(["linear_attention", "full_attention"] + ["linear_attention"] * 2) * (layers // 4))
    if mt == "kimi_linear":
        from transformers import KimiLinearConfig

        return KimiLinearConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16,
                                qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, num_local_experts=4,
                                num_experts_per_tok=2, linear_num_heads=n_v_heads, linear_head_dim=16,
                                layer_types=(["linear_attention", "full_attention"] + ["linear_attention"] * 2) * (layers // 4),
                                pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if mt == "minimax":
        from transformers import MiniMaxConfig

        return MiniMaxConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=32, num_hidden_layers=layers,
                             num_attention_heads=n_v_heads, num_key_value_heads=n_k_heads, head_dim=16, block_size=16,
                             num_local_experts=4, num_experts_per_tok=2,
                             layer_types=(["linear_attention", "full_attention"] + ["linear_attention"] * 2) * (layers // 4),
                             bos_token_id=None, eos_token_id=None)
    if mt in ("mamba", "falcon_mamba"):  # d_inner 256: four heads of 64 channels (writesae.hosts.mamba)
        import transformers

        cls = transformers.MambaConfig if mt == "mamba" else transformers.FalconMambaConfig
        return cls(vocab_size=vocab_size, hidden_size=64, state_size=8, num_hidden_layers=3, expand=4, conv_kernel=4,
                   pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if mt == "jamba":
        from transformers import JambaConfig

        return JambaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=n_k_heads, num_experts=4, num_experts_per_tok=2,
                           expert_layer_period=2, expert_layer_offset=1, attn_layer_period=4, attn_layer_offset=1,
                           mamba_d_state=8, mamba_expand=4, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if mt == "xlstm":  # qk 64 / v 128 over 4 heads: 16 x 32 memories; chunks of 16 (the library's chunkwise form)
        from transformers import xLSTMConfig

        return xLSTMConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=3, num_heads=n_v_heads,
                           qk_dim_factor=0.5, v_dim_factor=1.0, chunk_size=16, ffn_proj_factor=1.0,
                           pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if mt in ("nemotron_h", "granitemoehybrid", "bamba", "falcon_h1", "zamba2"):
        import transformers

        # tiny:mamba2's mixer (heads of 16 x 8 states, B and C in 2 groups, chunks of 16) in each type's layout, an
        # attention layer (Falcon-H1: beside every mixer; Zamba2: one shared block before the mixers of layers 1 and
        # 3), the types' multipliers away from 1 (Falcon-H1's muP vector and gate-only norm: test_mamba2_hosts.py).
        # Weights of initializer_range 0.15 (at 0.02 a deleted write moves the logits by 1e-6; Zamba2 at 0.15
        # amplifies float32 round-off to 3e-5 in the logits: 0.1); NemotronH and Zamba2 draw dt in [0.01, 0.3] (at
        # their default [1e-3, 0.1] the longest-memory heads write almost nothing). Layer counts and orders are
        # ones on whose random weights test_every_family's properties hold (Bamba, Granite-4.0-H and Falcon-H1 start
        # every dt_bias at 1: the longest memory decays by ~0.3 a step, which leaves little margin there).
        att = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_attention_heads=2,
                   num_key_value_heads=1, pad_token_id=None, bos_token_id=None, eos_token_id=None, initializer_range=0.15)
        mix = dict(mamba_n_heads=n_v_heads, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=16)
        return {
            "nemotron_h": lambda: transformers.NemotronHConfig(
                **att, layers_block_type=["linear_attention", "moe", "full_attention", "linear_attention", "mlp",
                                          "linear_attention"], head_dim=32, mamba_num_heads=n_v_heads,
                mamba_head_dim=16, ssm_state_size=8, n_groups=2, chunk_size=16, n_routed_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1,
                time_step_min=0.01, time_step_max=0.3),
            "granitemoehybrid": lambda: transformers.GraniteMoeHybridConfig(
                **att, **mix, mamba_n_groups=2, mamba_expand=1, num_hidden_layers=4,
                layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
                shared_intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, position_embedding_type="rope",
                embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0),
            "bamba": lambda: transformers.BambaConfig(**att, **mix, mamba_n_groups=2, mamba_expand=1,
                                                      num_hidden_layers=5, attn_layer_indices=[1]),
            "falcon_h1": lambda: transformers.FalconH1Config(
                **att, **mix, mamba_n_groups=2, mamba_d_ssm=64, num_hidden_layers=3, mamba_rms_norm=True,
                lm_head_multiplier=0.5, embedding_multiplier=2.0, mlp_multipliers=[0.8, 1.2], key_multiplier=0.7,
                attention_in_multiplier=0.9, attention_out_multiplier=1.1, ssm_multipliers=[1.0] * 5,
                ssm_in_multiplier=1.2, ssm_out_multiplier=0.8),
            # Zamba2: one shared block (tied weights, per-layer adapters) in layers 1 and 3; key/value heads = heads
            # (its adapters add to q, k and v alike)
            "zamba2": lambda: transformers.Zamba2Config(
                **{**att, "num_key_value_heads": 2, "initializer_range": 0.1}, n_mamba_heads=n_v_heads, mamba_expand=1,
                mamba_d_state=8, mamba_ngroups=2, chunk_size=16, num_hidden_layers=4, time_step_min=0.01, time_step_max=0.3,
                layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid"], num_mem_blocks=1,
                use_shared_attention_adapter=True, adapter_rank=8, use_mem_rope=True),
        }[mt]()
    if mt == "mamba2":
        from transformers import Mamba2Config

        return Mamba2Config(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=3, num_heads=n_v_heads,
                            head_dim=16, state_size=8, expand=1, n_groups=2, chunk_size=16, conv_kernel=4)
    from ..models import classes

    cfg = classes(mt)[0]
    # fla's init (std 0.02) leaves a tiny random model's writes almost without effect on the logits: the
    # tests' "an edit did something" checks need the larger weights of initializer_range 0.1
    if mt == "delta_net":
        return cfg(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=3, num_heads=n_v_heads, expand_k=0.5,
                   expand_v=1.0, use_gate=True, use_short_conv=True, conv_size=4, intermediate_size=96,
                   initializer_range=0.1)
    if mt == "gla":
        return cfg(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=3, num_heads=n_v_heads, expand_k=0.5,
                   expand_v=1.0, num_kv_heads=n_k_heads, use_short_conv=True, conv_size=4, intermediate_size=96,
                   initializer_range=0.1)
    return cfg(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=3, head_dim=16, intermediate_size=128,
               decay_low_rank_dim=8, gate_low_rank_dim=16, a_low_rank_dim=8, v_low_rank_dim=8)


def _model_from_config(config):
    from transformers import AutoModelForCausalLM

    _register(getattr(config, "model_type", ""))
    if getattr(config, "model_type", "") in ("qwen3_5", "qwen3_5_moe") and hasattr(config, "text_config"):
        config = config.text_config
    return AutoModelForCausalLM.from_config(config)


def _register(model_type):
    """Make the Auto classes serve ``model_type`` with the project's class, on every device and whatever was
    imported before: transformers' own class for the types transformers defines (mamba2, qwen3_5, ...), ours
    (:mod:`writesae.models`) for delta_net, gla and rwkv7. Importing fla registers fla's classes under
    delta_net, gla, rwkv7 and mamba2 (``exist_ok=True``); called before each load, this puts the project's
    back. fla serves kernels only (the hosts' kernel lane); a model built from fla's classes and passed to
    :func:`load_host` stays fla's."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    from ..models import CLASSES, register

    if model_type in CLASSES:
        register(model_type)
    elif model_type in CONFIG_MAPPING_NAMES:
        theirs = getattr(transformers, CONFIG_MAPPING_NAMES[model_type])
        if CONFIG_MAPPING[model_type] is not theirs:
            transformers.AutoConfig.register(model_type, theirs, exist_ok=True)


def _resolve(source):
    """A local directory for ``source``: the embedded zoo, a directory, or a hub name already in the local
    cache (no network: a name that is neither fails at once, saying what to do)."""
    if source == "embedded" or source.startswith("embedded:"):
        fam = source.split(":", 1)[1] if ":" in source else "gdn"
        fam, recall = (fam[:-len("-recall")], True) if fam.endswith("-recall") else (fam, False)
        _family(fam)
        path = EMBEDDED_DIR if ":" not in source else EMBEDDED_DIR / ZOO_DIRS.get(FAMILIES[fam], fam)
        if recall:  # the zoo member trained further on recall passages: embedded/recall/<family>
            path = path.parent / "recall" / path.name
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"the embedded {fam} model is missing from {path}: train it with "
                                    f"`python -m writesae.embedded_train --family {path.name}"
                                    + (" --task recall`" if recall else "`"))
        return str(path)
    if os.path.isdir(source):
        if not os.path.exists(os.path.join(source, "config.json")):
            raise FileNotFoundError(f"{source} is a directory but holds no config.json: point at a saved model "
                                    "(save_pretrained) or a hub snapshot")
        return source
    if source.startswith((".", "/", "~")) or os.sep in source and source.count("/") != 1:
        raise FileNotFoundError(f"model directory {source!r} does not exist")
    if source.count("/") != 1:
        raise ValueError(f"model {source!r} is not 'embedded', 'embedded:<family>', 'tiny:<family>', a directory "
                         f"or a hub name 'org/name' (families: {', '.join(ZOO)})")
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(source, "config.json")
    if not isinstance(hit, str):
        raise FileNotFoundError(f"{source!r} is not in the local Hugging Face cache and there is no network here: "
                                f"download it on a machine with access (huggingface-cli download {source}) and copy "
                                "the cache, or pass a local directory")
    return os.path.dirname(hit)


def tokenizer_source(path, source=None, trust_remote_code=False):
    """(the tokenizer's directory for the checkpoint at ``path``, whether that tokenizer is code the checkpoint
    ships): the zoo shares the embedded tokenizer; a tokenizer_config.json with an ``auto_map`` is code, refused
    in one line naming ``trust_remote_code`` unless that opt-in is given."""
    import json

    shared = EMBEDDED_DIR in Path(path).resolve().parents  # the zoo shares the embedded tokenizer
    tok_dir = str(EMBEDDED_DIR) if shared and not os.path.exists(os.path.join(path, "tokenizer.json")) else path
    cfg = Path(tok_dir, "tokenizer_config.json")
    code = cfg.is_file() and json.loads(cfg.read_text()).get("auto_map")
    if code and not trust_remote_code:
        raise ValueError(f"{source or path}'s tokenizer is code shipped with the checkpoint (auto_map {code}): load "
                         "it only if you trust that code, with trust_remote_code=True (the parameter "
                         "`trust_remote_code: true` of a params file)")
    return tok_dir, bool(code)


def load_host(source="embedded", *, dtype=torch.float32, device=None, tokenizer=True, trust_remote_code=False,
              kernels=None):
    """Load a model as a host.

    source: ``"embedded"`` (the shipped Gated DeltaNet model) or ``"embedded:<family>"`` (the zoo: gdn,
    mamba2, deltanet, gla, rwkv7; ``"embedded:<family>-recall"``: the member trained further on recall passages), ``"tiny"`` / ``"tiny:<family>"`` (a seeded random tiny model, no
    tokenizer), a local directory or a hub name of a real checkpoint (e.g. ``"Qwen/Qwen3.5-0.8B"``,
    ``"fla-hub/rwkv7-1.5B-world"``; offline, from the local cache), a transformers config (random init), or
    an already-loaded model. device: default CUDA when available, else CPU. trust_remote_code: let a checkpoint
    whose tokenizer is Python code it ships (tokenizer_config.json ``auto_map``, e.g. RWKV-7-world's
    ``RwkvTokenizer``) run that code; without it such a checkpoint is refused before its weights load. No other
    code of a checkpoint ever runs (configs and models load into the registered classes). kernels: the kernel
    lane of a host that has one (``"fla"``, ``"torch"``; None: by device, see :mod:`writesae.hosts.fla`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok, name = None, None
    if isinstance(source, torch.nn.Module):
        model = source
    elif isinstance(source, PretrainedConfig):
        host_class(source)
        model = _model_from_config(source)
        name = f"random-{source.model_type}"
    elif not isinstance(source, str):
        raise TypeError(f"load_host takes a name, a directory, a config or a model, got {type(source).__name__}")
    elif source == "tiny" or source.startswith("tiny:"):
        torch.manual_seed(0)
        cfg = tiny_config(*source.split(":")[1:2])
        model = _model_from_config(cfg)
        if cfg.model_type == "rwkv7":  # fla's init zeroes o_proj and the LoRA outputs: no state would reach the logits
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
        if cfg.model_type == "xlstm":
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "gate_preact" in name:  # xLSTM's init zeroes the gates' weights and opens the input gate at
                        p.normal_(0.0, 0.1)    # e^-10 only: writes too faint to reach the logits
                    elif name.endswith("mlstm_layer.v.weight"):  # values at a tenth: memories of the other tiny
                        p.mul_(0.1)                                # models' scale, for the suite's float32 tolerances
        name = source
    else:
        import json

        from transformers import AutoConfig

        path = _resolve(source)
        tok_dir, code = tokenizer_source(path, source, trust_remote_code) if tokenizer else (None, False)
        try:
            _register(AutoConfig.from_pretrained(path, trust_remote_code=False).model_type)
        except ValueError:  # a model_type transformers does not know yet: read it from the file
            _register(json.loads(Path(path, "config.json").read_text()).get("model_type", ""))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
        name = str(source)
        if tokenizer:
            tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=bool(code))
    model = model.to(device=device, dtype=dtype)
    host = host_class(model.config)(model, tokenizer=tok, name=name)
    if kernels is not None:
        from .fla import KernelLane

        if not isinstance(host, KernelLane):
            raise ValueError(f"kernels={kernels!r}: {type(host).__name__} has no fla kernel lane (its unedited "
                             f"stretches always run its torch form); leave kernels unset")
        host.kernels = kernels
    return host


__all__ = ["Cell", "CellTrace", "Edit", "EditRun", "LayerOut", "LayerState", "Readout", "Trace", "HOSTS", "ZOO",
           "FORMS", "CHECKPOINTS", "family_table", "host_class", "load_host", "tiny_config", "EMBEDDED_DIR"]
