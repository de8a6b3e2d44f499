"""fla's shared building blocks (``fla.modules``) in plain torch, with fla's names and parameters.

Norms compute in float32 and cast back, like fla's kernels. Used by the DeltaNet and GLA classes (RWKV-7
uses torch's own LayerNorm / GroupNorm, as fla's RWKV-7 does in effect).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutput


def _rms(x, weight, eps):
    y = x.float()
    y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)
    return y * weight.float() if weight is not None else y


class RMSNorm(nn.Module):
    """fla's ``RMSNorm``. ``prenorm=True`` adds ``residual`` first and returns ``(norm(x + residual),
    x + residual)``, like fla's fused residual path."""

    def __init__(self, hidden_size, elementwise_affine=True, eps=1e-5, dtype=None):
        super().__init__()
        self.hidden_size, self.elementwise_affine, self.eps = hidden_size, elementwise_affine, eps
        self.register_parameter("weight", nn.Parameter(torch.ones(hidden_size, dtype=dtype))
                                if elementwise_affine else None)
        self.register_parameter("bias", None)

    def extra_repr(self):
        return f"{self.hidden_size}, eps={self.eps}"

    def forward(self, x, residual=None, prenorm=False):
        if residual is not None:
            x = x + residual
        out = _rms(x, self.weight, self.eps).to(x.dtype)
        return (out, x) if prenorm else out


def block_norm(config):
    """fla's block and final norms: its ``RMSNorm`` with ``config.fuse_norm`` (fused kernel, residual and
    ``prenorm`` accepted), else torch's ``nn.RMSNorm`` (neither), as fla 0.6.0 builds them."""
    return (RMSNorm if config.fuse_norm else nn.RMSNorm)(config.hidden_size, eps=config.norm_eps)


class FusedRMSNormGated(RMSNorm):
    """fla's ``FusedRMSNormGated``: ``RMSNorm(x) * silu(g)``."""

    def __init__(self, hidden_size, elementwise_affine=True, eps=1e-5, activation="swish", dtype=None):
        super().__init__(hidden_size, elementwise_affine, eps, dtype)
        self.activation = activation

    def extra_repr(self):
        return f"{self.hidden_size}, eps={self.eps}, activation={self.activation}"

    def forward(self, x, g):
        return (_rms(x, self.weight, self.eps) * F.silu(g.float())).to(x.dtype)


class ShortConvolution(nn.Conv1d):
    """fla's ``ShortConvolution``: causal depthwise conv over time (weight ``(D, 1, W)``), optional silu."""

    def __init__(self, hidden_size, kernel_size, bias=False, activation="silu", **kwargs):
        super().__init__(hidden_size, hidden_size, kernel_size, padding=kernel_size - 1, groups=hidden_size,
                         bias=bias)
        self.hidden_size, self.activation = hidden_size, activation

    def forward(self, x):
        """x: (B, T, D) -> (B, T, D)."""
        y = super().forward(x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2)
        return F.silu(y) if self.activation in ("silu", "swish") else y


class SwiGLULinear(nn.Module):
    """fla's parameter-free ``SwiGLULinear``: ``linear(silu(x) * y, weight, bias)``."""

    def forward(self, x, y, weight, bias):
        return F.linear(F.silu(x) * y, weight, bias)


class GatedMLP(nn.Module):
    """fla's ``GatedMLP`` with ``hidden_act='swish'``: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size, hidden_ratio=None, intermediate_size=None, hidden_act="swish",
                 fuse_swiglu=True):
        super().__init__()
        if hidden_act != "swish":
            raise NotImplementedError(f"hidden_act={hidden_act!r}: only 'swish' is implemented")
        hidden_ratio = 4 if hidden_ratio is None else hidden_ratio
        if intermediate_size is None:  # fla: 2/3 * hidden_ratio * hidden_size, rounded up to a multiple of 256
            intermediate_size = 256 * ((int(hidden_size * hidden_ratio * 2 / 3) + 255) // 256)
        self.hidden_size, self.hidden_ratio, self.intermediate_size = hidden_size, hidden_ratio, intermediate_size
        self.hidden_act, self.fuse_swiglu = hidden_act, fuse_swiglu
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        if fuse_swiglu:
            self.swiglu_linear = SwiGLULinear()

    def forward(self, x, **kwargs):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FlaCausalLM:
    """What fla's ``*ForCausalLM`` classes share here: logits = ``lm_head(model(...))``, the HF loss, and
    ``GenerationMixin`` without a cache (every step re-reads the whole prefix). Put it first in the bases."""

    def forward(self, input_ids=None, inputs_embeds=None, labels=None, attention_mask=None,
                output_hidden_states=None, **kwargs) -> CausalLMOutput:
        """Logits (B, T, vocab); with ``labels``, the mean next-token cross-entropy (labels shifted left
        inside, -100 ignored), as HF causal LMs."""
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         output_hidden_states=output_hidden_states)
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels.to(logits.device))
        return CausalLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)

    def _loss(self, logits, labels):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, attention_mask=None, **kwargs):
        if inputs_embeds is not None and input_ids.shape[1] == 0:
            return {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        return {"input_ids": input_ids, "attention_mask": attention_mask}
