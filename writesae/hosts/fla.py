"""What the hosts of flash-linear-attention's families (DeltaNet, GLA, RWKV-7) share.

fla's causal LMs have one layout: ``model.model.embeddings``, ``model.model.layers[i].attn`` (the token
mixer, with ``o_proj``), ``model.model.norm`` and ``model.lm_head``; fla's classes on CUDA and the
pure-torch mirrors in :mod:`writesae.models` alike. Every layer is recurrent.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch
import torch.nn.functional as F

from .recurrent import RecurrentHost, grow, tail


def short_conv(conv, state, i, x):
    """fla's ShortConvolution over ``x`` (B, T, C) continuing window ``i`` of ``state``: (output, new window)."""
    K = conv.weight.shape[-1]
    prev = tail(state.windows[i], K - 1).to(x) if state else x.new_zeros(x.shape[0], K - 1, x.shape[-1])
    y = F.conv1d(torch.cat([prev, x], 1).transpose(1, 2), conv.weight, conv.bias, groups=x.shape[-1]).transpose(1, 2)
    if getattr(conv, "activation", None) in ("silu", "swish"):
        y = F.silu(y)
    return y, grow(state, i, x)


def fla_kernel(module, name, device):
    """fla's kernel ``fla.ops.<module>.<name>`` on CUDA when fla is installed, else None."""
    if device.type != "cuda" or importlib.util.find_spec("fla") is None:
        return None
    return getattr(importlib.import_module(f"fla.ops.{module}"), name)


class FlaHost(RecurrentHost):
    """Base of the fla families' hosts: the layout above, the final norm and output head, and each
    head's ``d_v`` columns of ``o_proj``. A subclass sets ``n_heads``, ``d_k``, ``d_v`` and the block."""

    def __init__(self, model, tokenizer=None, name=None):
        super().__init__(model, tokenizer, name)
        self.backbone, self.lm_head = model.model, model.lm_head
        self.config = model.config
        if getattr(self.config, "attn", None):
            raise ValueError(f"{self.name} has hybrid attention layers (config.attn); this host supports pure "
                             f"{self.kind} models")
        self.layers = list(self.backbone.layers)
        self.layer_types = [self.family] * len(self.layers)
        self.recurrent_layers = list(range(len(self.layers)))

    def _embed(self, input_ids):
        return self.backbone.embeddings(input_ids.to(self.device))

    def unembed(self, residual):
        return self.lm_head(self.backbone.norm(residual))

    def _out_weight(self, cell):
        return self.layers[cell[0]].attn.o_proj.weight[:, cell[1] * self.d_v:(cell[1] + 1) * self.d_v]

    def head_unembed(self, cell):
        return self.lm_head.weight.float() @ self._out_weight(cell).float()
