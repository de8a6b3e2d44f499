"""Gated Linear Attention (GLA) causal LM in pure torch: fla's ``GLAForCausalLM`` without Triton.

Mirrors flash-linear-attention 0.6.0 (``fla/models/gla``, ``fla/layers/gla.py``): the same config fields and
defaults, and the same module tree, attribute names and parameter names/shapes, so fla checkpoints (e.g.
``fla-hub/gla-1.3B-100B``) load strictly, in both directions. The recurrence is ``writesae.ops.gla``.

One block (pre-norm)::

    h = x + attn(attn_norm(x));   out = h + mlp(mlp_norm(h))

and ``GatedLinearAttention`` per token (``H`` heads, ``d_k = hidden*expand_k/H``, ``d_v = hidden*expand_v/H``)::

    q, k, v = q_proj(x), k_proj(x), v_proj(x)          (each optionally through a causal SiLU short conv)
    gk = logsigmoid(gk_proj(x)) / gate_logit_normalizer  (gk_proj: hidden -> 16 -> key dim; clamp_min opt.)
    q, k = feature_map(q), feature_map(k)              (identity when feature_map is None)
    o = GLA(q, k, v, gk, scale=d_k**-0.5)              S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t s
    o = RMSNorm_{d_v}(o) * swish(g_proj(x))            (per head; no gate without use_output_gate)
    out = o_proj(o)

Not supported (``NotImplementedError``): hybrid ``attn`` layers, ``attnres_block_size``, ``hidden_act`` other
than swish, the ``bias_gelu`` feature map, padded ``attention_mask``. Ignored like fla 0.6.0 ignores them:
``use_gk``/``use_gv``, a config ``gate_logit_normalizer`` (a layer argument, always 16 from the
config); ``attn_mode``/``fuse_*`` only change kernels (and the name ``g_norm_swish_gate`` vs ``g_norm``;
``fuse_norm=False`` builds torch's ``nn.RMSNorm`` for the block and final norms, as fla does), except that
``attn_mode="fused_recurrent"`` here selects the stepwise reference loop. No cache:
``generate`` re-runs the whole prefix each step.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast

from writesae.ops.gla import chunk_gla, recurrent_gla

from .modules import FusedRMSNormGated, GatedMLP, FlaCausalLM, RMSNorm, ShortConvolution, block_norm


class GLAConfig(PretrainedConfig):
    """fla's ``GLAConfig`` (same fields and defaults)."""

    model_type = "gla"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, hidden_size=2048, expand_k=0.5, expand_v=1., hidden_ratio=4, intermediate_size=None,
                 num_hidden_layers=24, num_heads=4, num_kv_heads=None, feature_map=None, attn_mode="chunk",
                 use_short_conv=False, conv_size=4, use_output_gate=True, clamp_min=None, hidden_act="swish",
                 max_position_embeddings=2048, elementwise_affine=True, norm_eps=1e-6, use_gk=True, use_gv=False,
                 attn=None, use_cache=True, pad_token_id=None, bos_token_id=1, eos_token_id=2,
                 tie_word_embeddings=False, initializer_range=0.02, fuse_norm=True, fuse_swiglu=True,
                 fuse_cross_entropy=True, fuse_linear_cross_entropy=False, use_l2warp=False, vocab_size=32000,
                 attnres_block_size=None, **kwargs):
        self.hidden_size = hidden_size
        self.expand_k = expand_k
        self.expand_v = expand_v
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.feature_map = feature_map
        self.attn_mode = attn_mode
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.use_output_gate = use_output_gate
        self.clamp_min = clamp_min
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.elementwise_affine = elementwise_affine
        self.norm_eps = norm_eps
        self.use_gk = use_gk
        self.use_gv = use_gv
        self.attn = attn
        self.use_cache = use_cache
        self.initializer_range = initializer_range
        self.fuse_norm = fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        self.use_l2warp = use_l2warp
        self.vocab_size = vocab_size
        self.attnres_block_size = attnres_block_size
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


# fla.modules.activations.ACT2FN, the entries usable as a feature map
FEATURE_MAPS = {"relu": F.relu, "sigmoid": torch.sigmoid, "logsigmoid": F.logsigmoid, "silu": F.silu,
                "swish": F.silu, "sqrelu": lambda x: F.relu(x) ** 2, "gelu": _gelu_tanh}


class GatedLinearAttention(nn.Module):
    """fla's ``GatedLinearAttention`` layer (same arguments, attributes and submodules)."""

    def __init__(self, mode="chunk", hidden_size=1024, expand_k=0.5, expand_v=1.0, num_heads=4, num_kv_heads=None,
                 feature_map=None, use_short_conv=False, conv_size=4, conv_bias=False, use_output_gate=True,
                 gate_fn="swish", elementwise_affine=True, norm_eps=1e-5, gate_logit_normalizer=16,
                 gate_low_rank_dim=16, clamp_min=None, fuse_norm=True, layer_idx=None):
        super().__init__()
        if mode not in ("chunk", "fused_recurrent", "fused_chunk"):
            raise ValueError(f"Not supported mode `{mode}`.")
        if feature_map is not None and feature_map not in FEATURE_MAPS:
            raise NotImplementedError(f"feature_map={feature_map!r} (supported: None, {sorted(FEATURE_MAPS)})")
        if gate_fn != "swish":
            raise NotImplementedError(f"gate_fn (hidden_act)={gate_fn!r} (only 'swish')")
        self.mode, self.hidden_size, self.expand_k, self.expand_v = mode, hidden_size, expand_k, expand_v
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        assert num_heads % self.num_kv_heads == 0, "num_heads must be divisible by num_kv_heads"
        self.num_kv_groups = num_heads // self.num_kv_heads
        self.feature_map_fn = FEATURE_MAPS[feature_map] if feature_map is not None else None
        self.use_short_conv, self.conv_size, self.conv_bias = use_short_conv, conv_size, conv_bias
        self.use_output_gate = use_output_gate

        key_dim, value_dim = hidden_size * expand_k, hidden_size * expand_v
        self.key_dim, self.value_dim = round(key_dim), round(value_dim)
        assert math.isclose(key_dim, self.key_dim) and math.isclose(value_dim, self.value_dim), \
            "hidden_size * expand_k and hidden_size * expand_v must be integers"
        assert self.key_dim % num_heads == 0 and self.value_dim % num_heads == 0, "dims must divide by num_heads"
        self.key_dim_per_group = self.key_dim // self.num_kv_groups
        self.value_dim_per_group = self.value_dim // self.num_kv_groups
        self.clamp_min, self.layer_idx = clamp_min, layer_idx
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim_per_group, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim_per_group, bias=False)
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias)
            self.k_conv1d = ShortConvolution(self.key_dim_per_group, conv_size, bias=conv_bias)
            self.v_conv1d = ShortConvolution(self.value_dim_per_group, conv_size, bias=conv_bias)
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, self.key_dim_per_group, bias=True))
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        # the two names fla uses for the same per-head norm; the gate is applied in forward either way
        self.fuse_norm_and_gate = fuse_norm and use_output_gate
        if self.fuse_norm_and_gate:
            self.g_norm_swish_gate = FusedRMSNormGated(self.head_v_dim, elementwise_affine, norm_eps)
        else:
            self.g_norm = RMSNorm(self.head_v_dim, elementwise_affine, norm_eps, dtype=torch.float32)
        self.gate_logit_normalizer = gate_logit_normalizer

    def _heads(self, x, d):
        """(B, T, n*d) -> (B, T, H, d), repeating each kv head num_kv_groups times (fla's `(h g) d`)."""
        x = x.unflatten(-1, (-1, d))
        return x.repeat_interleave(self.num_kv_groups, dim=2) if x.shape[2] != self.num_heads else x

    def qkvg(self, x):
        """The recurrence's per-token inputs: q, k, gk (B,T,H,d_k) and v (B,T,H,d_v), before the scale."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            q, k, v = self.q_conv1d(q), self.k_conv1d(k), self.v_conv1d(v)
        gk = F.logsigmoid(self._heads(self.gk_proj(x), self.head_k_dim)) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            gk = gk.clamp_min(self.clamp_min)
        q, k, v = self._heads(q, self.head_k_dim), self._heads(k, self.head_k_dim), self._heads(v, self.head_v_dim)
        if self.feature_map_fn is not None:
            q, k = self.feature_map_fn(q), self.feature_map_fn(k)
        return q, k, v, gk

    def forward(self, hidden_states, **kwargs):
        q, k, v, gk = self.qkvg(hidden_states)
        gla = recurrent_gla if self.mode == "fused_recurrent" else chunk_gla
        o, _ = gla(q, k, v, gk)                       # (B, T, H, d_v), scale d_k**-0.5
        if self.use_output_gate:
            g = self.g_proj(hidden_states).unflatten(-1, (-1, self.head_v_dim))
            o = self.g_norm_swish_gate(o, g) if self.fuse_norm_and_gate else self.g_norm(o) * F.silu(g)
        else:
            o = self.g_norm(o)
        return self.o_proj(o.flatten(-2).to(hidden_states.dtype))


class GLABlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.attn_norm = block_norm(config)
        self.attn = GatedLinearAttention(
            mode=config.attn_mode, hidden_size=config.hidden_size, expand_k=config.expand_k,
            expand_v=config.expand_v, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
            feature_map=config.feature_map, use_short_conv=config.use_short_conv, conv_size=config.conv_size,
            use_output_gate=config.use_output_gate, gate_fn=config.hidden_act,
            elementwise_affine=config.elementwise_affine, norm_eps=config.norm_eps, clamp_min=config.clamp_min,
            fuse_norm=config.fuse_norm, layer_idx=layer_idx)
        self.mlp_norm = block_norm(config)
        self.mlp = GatedMLP(config.hidden_size, config.hidden_ratio, config.intermediate_size, config.hidden_act,
                            config.fuse_swiglu)

    def forward(self, hidden_states):
        hidden_states = hidden_states + self.attn(self.attn_norm(hidden_states))
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class GLAPreTrainedModel(PreTrainedModel):
    config_class = GLAConfig
    base_model_prefix = "model"
    _no_split_modules = ["GLABlock"]
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
        """fla's ``FLAPreTrainedModel._init_weights`` (no prenorm-residual rescaling): N(0, initializer_range)
        for Linear/Conv1d/Embedding weights, zero biases, ones for norm weights."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, nn.RMSNorm)) and module.weight is not None:
            init.ones_(module.weight)


def _check_supported(config):
    for name in ("attn", "attnres_block_size"):
        if getattr(config, name, None) is not None:
            raise NotImplementedError(f"GLAConfig.{name}={getattr(config, name)!r} (pure-GLA models only)")


class GLAModel(GLAPreTrainedModel):
    def __init__(self, config):
        _check_supported(config)
        super().__init__(config)
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([GLABlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = block_norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, output_hidden_states=None, **kwargs):
        """Returns last_hidden_state (after the final norm) and, if asked, the input of every block plus it."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("attention_mask with padding (zeros)")
        hidden_states = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        all_hidden = ()
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states = layer(hidden_states)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states,
                                       hidden_states=all_hidden if output_hidden_states else None)


class GLAForCausalLM(FlaCausalLM, GLAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = GLAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.criterion = None
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings
