"""RWKV-7 ("Goose") causal LM in plain torch: a Triton-free mirror of flash-linear-attention 0.6.0.

Mirrors ``fla.models.rwkv7`` (``RWKV7Config``, ``RWKV7Model``, ``RWKV7ForCausalLM``) and
``fla.layers.rwkv7.RWKV7Attention``: for the same config the module tree, attribute names and
parameter names/shapes are identical, so fla checkpoints (``fla-hub/rwkv7-*``) load strictly into
these classes and back. The forward is fla's math with its Triton kernels replaced by torch
(token shift, addcmul, L2 norm, group norm, k update, gate/bonus correction, the recurrence).

Per layer and head, the time-mixing state ``S`` has shape ``(d_k, d_v)`` (fla's ``[B, H, K, V]``)::

    S_t = diag(exp(w_t)) S_{t-1} - (kk_t * a_t) (kk_t^T S_{t-1}) + k_t v_t^T        o_t = S_t^T r_t

with (x the token-shift-mixed input of that role, ``x + (x_{t-1} - x) * x_role``)
``w = -exp(-1/2) sigmoid(w_lora(x_w))`` the log-decay, ``kk = l2norm(k_proj(x_k) * k_k)`` per head,
``a = sigmoid(a_lora(x_a))``, the write key ``k = k_proj(x_k) * (1 + (a - 1) k_a)`` and
``v = lerp(v_proj(x_v), v_first, sigmoid(v_lora(x_v)))`` (layer 0's ``v`` is ``v_first``, the
cross-layer value residual). The head output is
``(GroupNorm(o) + (sum(r * k * r_k) v)) * g_lora(x_g)`` (the second term is the "bonus"), then ``o_proj``.
See :mod:`writesae.ops.rwkv7` for the recurrence itself.

Config options: ``attn_mode="chunk"`` runs :func:`writesae.ops.rwkv7.chunked`, ``"fused_recurrent"`` the
token-by-token loop (same math; fla itself picks its kernel by length and grad mode). ``fuse_norm`` only
picks fla's L2-norm epsilon for ``kk`` (``1e-6`` inside the square root vs ``F.normalize``'s floor).
``use_l2warp`` wraps the loss in fla's L2Wrap. ``fuse_cross_entropy``, ``fuse_linear_cross_entropy``,
``use_cache``, ``max_position_embeddings`` and ``initializer_range`` (unused by fla's RWKV-7 init too) are
accepted and ignored. Not implemented (``NotImplementedError``): hybrid ``attn`` layers, ``value_dim`` other
than ``hidden_size`` (fla 0.6.0's own init fails on those), ``hidden_act`` other than ``sqrelu``.
``attention_mask`` follows fla: left padding, the masked steps' inputs and values are zeroed. fla's
migration of pre-2025 checkpoints (a stacked ``x_x`` parameter) is not mirrored. No cache: ``generate``
re-runs the whole prefix each step.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput

from writesae.ops import rwkv7 as rule

from .modules import FlaCausalLM

LOG_DECAY_BOUND = math.exp(-0.5)  # w = -LOG_DECAY_BOUND * sigmoid(.) in [-0.6065, 0)


class RWKV7Config(PretrainedConfig):
    """fla's ``RWKV7Config`` (same fields and defaults; ``value_dim`` expanded to one per layer)."""

    model_type = "rwkv7"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, attn_mode="chunk", hidden_size=2048, hidden_ratio=4, intermediate_size=None,
                 num_hidden_layers=24, head_dim=64, num_heads=None, decay_low_rank_dim=64,
                 gate_low_rank_dim=128, a_low_rank_dim=64, v_low_rank_dim=16, hidden_act="sqrelu",
                 max_position_embeddings=2048, norm_first=True, norm_bias=True, norm_eps=1e-5, attn=None,
                 use_cache=True, pad_token_id=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                 initializer_range=0.02, fuse_norm=True, fuse_cross_entropy=True, fuse_linear_cross_entropy=False,
                 use_l2warp=True, vocab_size=32000, value_dim=None, **kwargs):
        if head_dim is None and num_heads is not None:
            head_dim = int(hidden_size // num_heads)
        elif head_dim is not None and num_heads is None:
            num_heads = int(hidden_size // head_dim)
        if value_dim is None:
            value_dim = hidden_size
        if isinstance(value_dim, int):
            value_dim = [value_dim] * num_hidden_layers
        if len(value_dim) != num_hidden_layers or any(v < hidden_size or v % hidden_size for v in value_dim):
            raise ValueError(f"value_dim {value_dim}: one multiple of hidden_size ({hidden_size}) per layer")
        if fuse_cross_entropy and fuse_linear_cross_entropy:
            raise ValueError("`fuse_cross_entropy` and `fuse_linear_cross_entropy` cannot both be True")
        self.attn_mode = attn_mode
        self.hidden_size = hidden_size
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.norm_first = norm_first
        self.num_hidden_layers = num_hidden_layers
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.value_dim = value_dim
        self.decay_low_rank_dim = decay_low_rank_dim
        self.gate_low_rank_dim = gate_low_rank_dim
        self.a_low_rank_dim = a_low_rank_dim
        self.v_low_rank_dim = v_low_rank_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.norm_bias = norm_bias
        self.norm_eps = norm_eps
        self.attn = attn
        self.use_cache = use_cache
        self.initializer_range = initializer_range
        self.fuse_norm = fuse_norm
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        self.use_l2warp = use_l2warp
        self.vocab_size = vocab_size
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


class LoRA(nn.Module):
    """fla's ``LoRA``: ``Linear(in, rank) -> activation -> Linear(rank, out)``."""

    ACTIVATIONS = {None: nn.Identity, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}

    def __init__(self, input_dim, output_dim, low_rank_dim, bias=True, activation="tanh"):
        super().__init__()
        self.activation = self.ACTIVATIONS[activation]()
        self.lora = nn.Sequential(nn.Linear(input_dim, low_rank_dim, bias=False), self.activation,
                                  nn.Linear(low_rank_dim, output_dim, bias=bias))

    def forward(self, x):
        return self.lora(x)


def _norm(config, size):
    return nn.LayerNorm(size, eps=config.norm_eps, bias=config.norm_bias)


def _token_shift(module, x):
    """x_{t-1} - x_t, with x_{-1} = 0 (``time_shift`` pads one step in front and drops the last)."""
    return module.time_shift(x) - x


class RWKV7Attention(nn.Module):
    """Time mixing (fla's ``RWKV7Attention``); see the module docstring for the math."""

    def __init__(self, config: RWKV7Config, layer_idx: int):
        super().__init__()
        if config.attn_mode not in ("chunk", "fused_recurrent"):
            raise ValueError(f"attn_mode {config.attn_mode!r} is not 'chunk' or 'fused_recurrent'")
        h = self.hidden_size = config.hidden_size
        if config.value_dim[layer_idx] != h:  # fla 0.6.0's own init fails on such a model (v_lora bias size)
            raise NotImplementedError(f"value_dim {config.value_dim[layer_idx]} != hidden_size {h}")
        self.head_dim = config.head_dim
        self.num_heads = h // config.head_dim
        self.key_dim = self.value_dim = h
        self.layer_idx, self.num_hidden_layers = layer_idx, config.num_hidden_layers
        self.mode, self.fuse_norm = config.attn_mode, config.fuse_norm

        self.time_shift = nn.ZeroPad2d((0, 0, 1, -1))
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, h)))
        self.k_k = nn.Parameter(torch.zeros(self.key_dim))
        self.k_a = nn.Parameter(torch.zeros(self.key_dim))
        self.r_k = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))
        self.r_proj = nn.Linear(h, self.key_dim, bias=False)
        self.k_proj = nn.Linear(h, self.key_dim, bias=False)
        self.v_proj = nn.Linear(h, self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.value_dim, h, bias=False)
        self.w_lora = LoRA(h, self.key_dim, config.decay_low_rank_dim, activation="tanh")
        if layer_idx != 0:
            self.v_lora = LoRA(h, self.value_dim, config.v_low_rank_dim, activation=None)
        self.a_lora = LoRA(h, self.key_dim, config.a_low_rank_dim, activation=None)
        self.g_lora = LoRA(h, self.value_dim, config.gate_low_rank_dim, activation="sigmoid", bias=False)
        self.g_norm = nn.GroupNorm(self.num_heads, self.value_dim, eps=self.head_dim * config.norm_eps)

    def forward(self, x, v_first=None, attention_mask=None):
        """x: (B, T, hidden). Returns (output (B, T, hidden), v_first)."""
        B, T, _ = x.shape
        if attention_mask is not None:  # left padding: zero the padded steps' inputs and values
            mask = attention_mask[:, -T:, None].to(x.dtype)
            x = x * mask
        delta = _token_shift(self, x)
        xr, xw, xk, xv, xa, xg = (x.addcmul(delta, mix) for mix in (self.x_r, self.x_w, self.x_k, self.x_v,
                                                                      self.x_a, self.x_g))
        r = self.r_proj(xr)
        w = -LOG_DECAY_BOUND * self.w_lora(xw).sigmoid()
        k = self.k_proj(xk)
        v = self.v_proj(xv)
        if self.layer_idx == 0:
            v_first = v
        else:
            v = torch.lerp(v, v_first, self.v_lora(xv).sigmoid())
        a = self.a_lora(xa).sigmoid()
        g = self.g_lora(xg)

        def heads(t):
            return t.view(B, T, self.num_heads, -1)

        kk = heads(k * self.k_k)
        if self.fuse_norm:  # fla's Triton l2norm: x / sqrt(|x|^2 + 1e-6)
            kk = kk * torch.rsqrt(kk.square().sum(-1, keepdim=True) + 1e-6)
        else:
            kk = F.normalize(kk, dim=-1)
        k = k.addcmul(k * (a - 1), self.k_a)
        if attention_mask is not None:
            v = v * mask
        r, w, k, a, v = map(heads, (r, w, k, a, v))

        if self.mode == "chunk":
            o, _ = rule.chunked(r, w, k, v, kk, a)
        else:
            o, _ = rule.recurrent(r, w, k, v, kk, a)
        o = self.g_norm(o.reshape(B * T, -1)).view(B, T, -1)
        bonus = (r * k * self.r_k).sum(-1, keepdim=True) * v
        return self.o_proj((o + bonus.reshape(B, T, -1)) * g), v_first


class RWKV7FeedForward(nn.Module):
    """Channel mixing: token shift, then ``value(relu(key(x))^2)``."""

    def __init__(self, config: RWKV7Config, layer_idx: int):
        super().__init__()
        if config.hidden_act != "sqrelu":
            raise NotImplementedError(f"hidden_act {config.hidden_act!r}: only 'sqrelu' is implemented")
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        if self.intermediate_size is None:  # hidden_size * hidden_ratio (default 4), rounded up to a multiple of 32
            ratio = 4 if config.hidden_ratio is None else config.hidden_ratio
            self.intermediate_size = 32 * math.ceil(int(config.hidden_size * ratio) / 32)
        self.layer_idx, self.num_hidden_layers = layer_idx, config.num_hidden_layers
        self.time_shift = nn.ZeroPad2d((0, 0, 1, -1))
        self.x_k = nn.Parameter(torch.zeros(self.hidden_size))
        self.key = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.value = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)

    def forward(self, x, attention_mask=None):
        if attention_mask is not None:
            x = x * attention_mask[:, -x.shape[1]:, None].to(x.dtype)
        return self.value(F.relu(self.key(x.addcmul(_token_shift(self, x), self.x_k))).square())


class RWKV7Block(nn.Module):
    """Pre-norm block; layer 0 also norms the embeddings (``pre_norm``) when ``norm_first``."""

    def __init__(self, config: RWKV7Config, layer_idx: int):
        super().__init__()
        if config.norm_first and layer_idx == 0:
            self.pre_norm = _norm(config, config.hidden_size)
        self.attn_norm = _norm(config, config.hidden_size)
        self.attn = RWKV7Attention(config, layer_idx)
        self.ffn_norm = _norm(config, config.hidden_size)
        self.ffn = RWKV7FeedForward(config, layer_idx)

    def forward(self, x, v_first=None, attention_mask=None):
        residual = self.pre_norm(x) if hasattr(self, "pre_norm") else x
        out, v_first = self.attn(self.attn_norm(residual), v_first, attention_mask)
        residual = residual + out
        return residual + self.ffn(self.ffn_norm(residual), attention_mask), v_first


class RWKV7PreTrainedModel(PreTrainedModel):
    config_class = RWKV7Config
    base_model_prefix = "model"
    _no_split_modules = ["RWKV7Block"]
    _input_embed_layer = "embeddings"
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
        """fla's init (after BlinkDL's RWKV-7 trainer). Children are initialised before parents."""
        if isinstance(module, nn.Embedding):
            init.uniform_(module.weight, a=-1e-4, b=1e-4)
        elif isinstance(module, nn.Linear) and module is getattr(self, "lm_head", None):
            V, H = self.config.vocab_size, self.config.hidden_size
            init.orthogonal_(module.weight, gain=0.5 * math.sqrt(V / H) if V > H else 0.5)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RWKV7Attention):
            _init_attention(module)
        elif isinstance(module, RWKV7FeedForward):
            ddd = torch.arange(module.hidden_size) / module.hidden_size
            init.copy_(module.x_k, 1.0 - ddd ** ((1.0 - module.layer_idx / module.num_hidden_layers) ** 4))
            init.orthogonal_(module.key.weight)
            init.zeros_(module.value.weight)


@torch.no_grad()
def _init_attention(m: RWKV7Attention):
    """fla's ``RWKV7Attention._initialize_weights`` (LoRAs included: transformers skips modules without
    parameters of their own): per-channel ramps that depend on the layer depth."""
    n, L = torch.arange(m.hidden_size, dtype=torch.float64), m.num_hidden_layers
    ratio_0_to_1 = m.layer_idx / max(L - 1, 1)
    ratio_1_to_almost0 = 1.0 - m.layer_idx / L
    ddd = (n / m.hidden_size).view(1, 1, -1)
    linear = n / (m.hidden_size - 1) - 0.5
    zigzag = ((n % m.head_dim) - (m.head_dim - 1) / 2) / ((m.head_dim - 1) / 2)
    zigzag = zigzag * zigzag.abs()
    www = -6 + 6 * (n / (m.hidden_size - 1)) ** (1 + ratio_0_to_1 ** 0.3)
    for lora in (m.w_lora, m.a_lora, m.g_lora) + ((m.v_lora,) if m.layer_idx != 0 else ()):
        init.zeros_(lora.lora[0].weight)
        out_dim, rank = lora.lora[2].weight.shape
        init.orthogonal_(lora.lora[2].weight, gain=0.1 * (math.sqrt(rank / out_dim) if rank > out_dim else 1))
    for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
        init.copy_(getattr(m, name), 1.0 - ddd ** (power * ratio_1_to_almost0))
    init.constant_(m.k_a, 1.02)
    init.constant_(m.r_k, -0.04)
    init.copy_(m.k_k, 0.71 - linear * 0.1)
    init.copy_(m.w_lora.lora[2].bias, www + 0.5 + zigzag * 2.5)
    init.copy_(m.a_lora.lora[2].bias, -0.19 + zigzag * 0.3 + linear * 0.4)
    if m.layer_idx != 0:
        init.copy_(m.v_lora.lora[2].bias, 0.73 - linear * 0.4)
    init.constant_(m.g_norm.weight, ((m.layer_idx + 1) / L) ** 0.7)
    init.orthogonal_(m.r_proj.weight)
    init.orthogonal_(m.k_proj.weight, gain=0.1)
    init.orthogonal_(m.v_proj.weight)
    init.zeros_(m.o_proj.weight)


class RWKV7Model(RWKV7PreTrainedModel):
    def __init__(self, config: RWKV7Config):
        super().__init__(config)
        if config.attn is not None:
            raise NotImplementedError("attn (hybrid softmax-attention layers) is not implemented; set attn=None")
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([RWKV7Block(config, i) for i in range(config.num_hidden_layers)])
        self.norm = _norm(config, config.hidden_size)
        self.post_init()

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, output_hidden_states=None,
                **kwargs) -> BaseModelOutput:
        """Returns last_hidden_state (after the final norm) and, if asked, the input of every block plus it."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        all_hidden = ()
        v_first = None  # set by layer 0
        for layer in self.layers:
            all_hidden += (x,)
            x, v_first = layer(x, v_first, attention_mask)
        x = self.norm(x)
        return BaseModelOutput(last_hidden_state=x, hidden_states=all_hidden + (x,) if output_hidden_states else None)


class L2Wrap(torch.autograd.Function):
    """fla's ``l2_warp`` (BlinkDL's L2Wrap): returns the loss unchanged; its backward adds
    ``1e-4 / (B*T) * max_logit`` to the gradient of each position's largest logit."""

    @staticmethod
    def forward(ctx, loss, logits):
        maxx, ids = logits.max(-1, keepdim=True)
        ctx.save_for_backward(maxx * (1e-4 / (logits.shape[0] * logits.shape[1])), ids)
        ctx.shape = logits.shape
        return loss

    @staticmethod
    def backward(ctx, dloss):
        maxx, ids = ctx.saved_tensors
        return dloss, maxx.new_zeros(ctx.shape).scatter_(-1, ids, maxx * dloss)


class RWKV7ForCausalLM(FlaCausalLM, RWKV7PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: RWKV7Config):
        super().__init__(config)
        self.model = RWKV7Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _loss(self, logits, labels):
        """The HF next-token loss, through L2Wrap when ``config.use_l2warp`` (as fla)."""
        shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], 1)
        loss = F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100)
        return L2Wrap.apply(loss, logits) if self.config.use_l2warp else loss
