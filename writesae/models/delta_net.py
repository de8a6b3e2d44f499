"""DeltaNet causal LM in pure torch (no Triton), mirroring flash-linear-attention 0.6.0.

Mirrors ``fla.models.delta_net`` (``DeltaNetConfig``, ``DeltaNetModel``, ``DeltaNetForCausalLM``,
``DeltaNetBlock``), ``fla.layers.delta_net.DeltaNet`` and the fla modules they use (``ShortConvolution``,
``RMSNorm``, ``FusedRMSNormGated``, ``GatedMLP``): same module tree, attribute names, parameter names and
shapes for the same config, so fla-hub DeltaNet checkpoints (``fla-hub/delta_net-1.3B-100B``, ...) load
strictly and a model trained here loads into fla. The recurrence is ``writesae.ops.delta_net``.

One DeltaNet layer, per token and head (``x`` the attn-normed hidden state)::

    q, k, v = conv_q(W_q x), conv_k(W_k x), silu(conv_v(W_v x))    causal depthwise conv, width conv_size
    q, k    = act(q), act(k)            silu (fused into the conv), relu, elu+1 or identity
    q, k    = l2norm(q), l2norm(k)      (qk_norm='l2', eps 1e-6 inside the root) or x / sum|x| ('sum')
    beta    = sigmoid(W_b x)            (1 without use_beta; doubled with allow_neg_eigval)
    S_t     = S_{t-1} + beta k (v - S_{t-1}^T k)^T,   o = S_t^T q / sqrt(d_k)    S: (d_k, d_v)
    o       = RMSNorm(o) per head       (use_gate: RMSNorm(o) * silu(W_g x))
    out     = W_o concat_heads(o)

Not supported (raise ``NotImplementedError``): hybrid softmax-attention layers (``attn``), attention
residuals (``attnres_block_size``), ``hidden_act='powlu'``, padding masks and caches (generation
re-runs the whole prefix each step). ``fuse_norm=False`` builds torch's ``nn.RMSNorm`` for the block and
final norms, as fla does; ``fuse_swiglu``, ``fuse_cross_entropy``, ``use_l2warp`` and ``use_output_norm`` are
accepted and change nothing here (fla ignores ``use_output_norm`` too).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput

from ..ops.delta_net import delta_rule_chunked, delta_rule_recurrent, l2norm
from .modules import FusedRMSNormGated, GatedMLP, FlaCausalLM, RMSNorm, ShortConvolution, block_norm


class DeltaNetConfig(PretrainedConfig):
    """fla's ``DeltaNetConfig``: same fields and defaults (``model_type = "delta_net"``)."""

    model_type = "delta_net"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, attn_mode="chunk", hidden_size=2048, expand_k=1.0, expand_v=1.0, use_gate=False,
                 use_short_conv=True, allow_neg_eigval=False, conv_size=4, use_beta=True, use_output_norm=True,
                 num_heads=16, qk_norm="l2", qk_activation="silu", max_position_embeddings=2048,
                 hidden_ratio=4, intermediate_size=None, hidden_act="swish", num_hidden_layers=24,
                 norm_eps=1e-6, attn=None, use_cache=True, pad_token_id=None, bos_token_id=1, eos_token_id=2,
                 tie_word_embeddings=False, initializer_range=0.02, fuse_norm=True, fuse_swiglu=True,
                 fuse_cross_entropy=True, fuse_linear_cross_entropy=False, use_l2warp=False, vocab_size=32000,
                 attnres_block_size=None, **kwargs):
        self.attn_mode = attn_mode
        self.hidden_size = hidden_size
        self.expand_k = expand_k
        self.expand_v = expand_v
        self.use_gate = use_gate
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.use_beta = use_beta
        self.use_output_norm = use_output_norm
        self.num_heads = num_heads
        self.qk_norm = qk_norm
        self.qk_activation = qk_activation
        self.max_position_embeddings = max_position_embeddings
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.num_hidden_layers = num_hidden_layers
        self.norm_eps = norm_eps
        self.attn = attn
        self.use_cache = use_cache
        self.initializer_range = initializer_range
        self.fuse_norm = fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        self.use_l2warp = use_l2warp
        self.vocab_size = vocab_size
        self.allow_neg_eigval = allow_neg_eigval
        self.attnres_block_size = attnres_block_size
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


# ------------------------------------------------------------------ fla.modules, in torch
# ------------------------------------------------------------------ the DeltaNet layer
class DeltaNet(nn.Module):
    """fla's ``fla.layers.delta_net.DeltaNet`` token mixer (see the module docstring for the math).

    ``mode='chunk'`` runs the chunked recurrence, ``'fused_recurrent'`` the step-by-step reference (fla picks
    by kernel; the two are equal up to rounding). ``inputs(x)`` gives the per-token ``(q, k, v, beta)``
    the recurrence sees (q not yet scaled), ``output(o, x)`` maps head outputs to the residual stream."""

    def __init__(self, mode="chunk", hidden_size=1024, expand_k=1.0, expand_v=1.0, num_heads=4, use_beta=True,
                 use_gate=False, use_short_conv=True, conv_size=4, conv_bias=False, allow_neg_eigval=False,
                 layer_idx=None, qk_activation="silu", qk_norm="l2", norm_eps=1e-5, **kwargs):
        super().__init__()
        if mode == "fused_chunk":
            raise NotImplementedError("attn_mode='fused_chunk' is deprecated in fla; use 'chunk'")
        if mode not in ("chunk", "fused_recurrent"):
            raise NotImplementedError(f"attn_mode={mode!r}: use 'chunk' or 'fused_recurrent'")
        if qk_activation not in ("silu", "relu", "elu", "identity"):
            raise NotImplementedError(f"qk_activation={qk_activation!r}")
        if qk_norm not in ("l2", "sum"):
            raise NotImplementedError(f"qk_norm={qk_norm!r}")
        self.mode, self.qk_activation, self.qk_norm = mode, qk_activation, qk_norm
        self.hidden_size, self.expand_k, self.expand_v, self.num_heads = hidden_size, expand_k, expand_v, num_heads
        self.use_gate, self.use_short_conv, self.use_beta = use_gate, use_short_conv, use_beta
        self.conv_size, self.conv_bias, self.allow_neg_eigval = conv_size, conv_bias, allow_neg_eigval
        self.key_dim, self.value_dim = round(hidden_size * expand_k), round(hidden_size * expand_v)
        if not (math.isclose(hidden_size * expand_k, self.key_dim)
                and math.isclose(hidden_size * expand_v, self.value_dim)):
            raise ValueError("hidden_size * expand_k and hidden_size * expand_v must be integers")
        if self.key_dim % num_heads or self.value_dim % num_heads:
            raise ValueError(f"key/value dims must be divisible by num_heads={num_heads}")
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.layer_idx = layer_idx
        self.chunk_size = 64  # of the chunked recurrence; any value gives the same result up to rounding

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        if use_beta:
            self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        if use_short_conv:
            qk_conv_act = "silu" if qk_activation == "silu" else None
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias, activation=qk_conv_act)
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias, activation=qk_conv_act)
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, bias=conv_bias, activation="silu")
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
            self.o_norm = FusedRMSNormGated(self.head_v_dim, eps=norm_eps)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps, dtype=torch.float32)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def inputs(self, x):
        """x (B, T, hidden) -> q, k (B, T, H, d_k) activated and normalised; v (B, T, H, d_v); beta (B, T, H)."""
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            q, k, v = self.q_conv1d(q), self.k_conv1d(k), self.v_conv1d(v)
        else:
            if self.qk_activation == "silu":
                q, k = F.silu(q), F.silu(k)
            v = F.silu(v)
        q, k = q.view(B, T, self.num_heads, self.head_k_dim), k.view(B, T, self.num_heads, self.head_k_dim)
        v = v.view(B, T, self.num_heads, self.head_v_dim)
        if self.qk_activation == "relu":
            q, k = q.relu(), k.relu()
        elif self.qk_activation == "elu":  # fla's elu_p1
            q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
        if self.qk_norm == "l2":  # fla does this inside the kernel, in float32
            q, k = l2norm(q.float()).to(q.dtype), l2norm(k.float()).to(k.dtype)
        else:  # fla's sum_norm
            q, k = F.normalize(q, p=1, dim=-1, eps=1e-6), F.normalize(k, p=1, dim=-1, eps=1e-6)
        beta = self.b_proj(x).sigmoid() if self.use_beta else torch.ones_like(q[..., 0])
        if self.allow_neg_eigval:
            beta = beta * 2.0
        return q, k, v, beta

    def output(self, o, x):
        """Head outputs o (B, T, H, d_v) -> per-head (gated) RMSNorm -> o_proj: (B, T, hidden)."""
        if self.use_gate:
            o = self.o_norm(o, self.g_proj(x).view(*o.shape))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.flatten(2))

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("padding masks (attention_mask with zeros)")
        q, k, v, beta = self.inputs(hidden_states)
        if self.mode == "chunk":
            o, _ = delta_rule_chunked(q, k, v, beta, chunk_size=self.chunk_size)
        else:
            o, _ = delta_rule_recurrent(q, k, v, beta)
        return self.output(o, hidden_states)


# ------------------------------------------------------------------ blocks and models
class DeltaNetBlock(GradientCheckpointingLayer):
    """fla's ``DeltaNetBlock``: pre-norm DeltaNet mixer and gated MLP, each with a residual."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.attn_norm = block_norm(config)
        self.attn = DeltaNet(mode=config.attn_mode, hidden_size=config.hidden_size, expand_k=config.expand_k,
                             expand_v=config.expand_v, num_heads=config.num_heads, use_gate=config.use_gate,
                             use_beta=config.use_beta, use_short_conv=config.use_short_conv,
                             allow_neg_eigval=config.allow_neg_eigval, conv_size=config.conv_size,
                             qk_norm=config.qk_norm, qk_activation=config.qk_activation,
                             norm_eps=config.norm_eps, layer_idx=layer_idx)
        self.mlp_norm = block_norm(config)
        self.mlp = GatedMLP(config.hidden_size, config.hidden_ratio, config.intermediate_size, config.hidden_act,
                            config.fuse_swiglu)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        hidden_states = hidden_states + self.attn(self.attn_norm(hidden_states), attention_mask=attention_mask)
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class DeltaNetPreTrainedModel(PreTrainedModel):
    config_class = DeltaNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeltaNetBlock"]
    _input_embed_layer = "embeddings"

    def _init_weights(self, module):
        """fla's ``FLAPreTrainedModel._init_weights`` (default strategy): linears, convs and embeddings
        ~ N(0, initializer_range), biases 0, norm weights 1."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, nn.RMSNorm)):
            init.ones_(module.weight)


def _check_supported(config):
    if config.attn is not None:
        raise NotImplementedError("attn (hybrid softmax-attention layers) is not implemented")
    if config.attnres_block_size is not None:
        raise NotImplementedError("attnres_block_size (attention residuals) is not implemented")


class DeltaNetModel(DeltaNetPreTrainedModel):
    """fla's ``DeltaNetModel``: embeddings -> blocks -> final RMSNorm."""

    def __init__(self, config):
        super().__init__(config)
        _check_supported(config)
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DeltaNetBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = block_norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, output_hidden_states=False,
                **kwargs):
        """``hidden_states`` (when asked) are fla's: each block's input, then the final normed output."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        h = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        states = []
        for layer in self.layers:
            states.append(h)
            h = layer(h, attention_mask=attention_mask)
        h = self.norm(h)
        return BaseModelOutput(last_hidden_state=h, hidden_states=tuple(states + [h]) if output_hidden_states
                               else None)


class DeltaNetForCausalLM(FlaCausalLM, DeltaNetPreTrainedModel, GenerationMixin):
    """fla's ``DeltaNetForCausalLM`` (logits = lm_head(model(...))). No cache: ``generate`` re-runs the prefix."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = DeltaNetModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.criterion = None
        self.post_init()

    def get_decoder(self):
        return self.model
