"""What the hosts of flash-linear-attention's families (DeltaNet, GLA, RWKV-7) share.

fla's causal LMs have one layout: ``model.model.embeddings``, ``model.model.layers[i].attn`` (the token
mixer, with ``o_proj``), ``model.model.norm`` and ``model.lm_head``; fla's own classes and the pure-torch
mirrors in :mod:`writesae.models` alike. Every layer is recurrent.

**The kernel lane.** A host runs the unedited stretches of its recurrence either with fla's Triton kernels
(``kernels="fla"``) or with the chunked torch forms (``kernels="torch"``); edited stretches run step by step
in torch either way. ``host.kernels`` says which; pass ``kernels=`` to the host or set ``host.kernels``.
The default (``None``) picks by device: fla on CUDA when fla is installed, torch otherwise. The Gated
DeltaNet host has the same switch. CI takes the fla lane on a CPU under Triton's interpreter
(``tests/fla_lane``).
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


def fla_installed():
    return importlib.util.find_spec("fla") is not None


def kernel_lane(kernels, device):
    """``"fla"`` or ``"torch"``: ``kernels`` checked, or for None the default on ``device`` (fla on CUDA
    when fla is installed, else torch)."""
    if kernels is None:
        return "fla" if device.type == "cuda" and fla_installed() else "torch"
    if kernels not in ("fla", "torch"):
        raise ValueError(f"kernels={kernels!r}: use 'fla' (fla's Triton kernels), 'torch' or None (by device)")
    if kernels == "fla" and not fla_installed():
        raise ModuleNotFoundError("kernels='fla' needs flash-linear-attention: `pip install -e .[gpu]` on a CUDA "
                                  "machine, or use kernels='torch'")
    return kernels


def fla_kernel(module, name):
    """fla's kernel ``fla.ops.<module>.<name>``."""
    return getattr(importlib.import_module(f"fla.ops.{module}"), name)


class KernelLane:
    """``host.kernels``, the host's kernel lane (see the module docstring; unset, the device's default), and
    ``_chunk_kernel()``, the lane's kernel for unedited stretches: built on first use by the host's
    ``_make_chunk`` (which reads ``self.kernels``), rebuilt after the lane is set."""

    @property
    def kernels(self):
        if getattr(self, "_kernels", None) is None:
            self._kernels = kernel_lane(None, self.device)
        return self._kernels

    @kernels.setter
    def kernels(self, value):
        self._kernels, self._chunk = kernel_lane(value, self.device), None

    def _chunk_kernel(self):
        if getattr(self, "_chunk", None) is None:
            self._chunk = self._make_chunk()
        return self._chunk

    def _min_chunk(self, torch_cpu):
        """The shortest unedited stretch worth the chunked kernel: 8 with fla's kernels or on CUDA; on a CPU
        the torch form's own overhead, ``torch_cpu``."""
        return torch_cpu if self.kernels == "torch" and self.device.type == "cpu" else 8


class FlaHost(KernelLane, RecurrentHost):
    """Base of the fla families' hosts: the layout above, the final norm and output head, each head's
    ``d_v`` columns of ``o_proj``, and the kernel lane. A subclass sets ``n_heads``, ``d_k``, ``d_v``, the
    block and ``_chunk_kernel``."""

    def __init__(self, model, tokenizer=None, name=None, kernels=None):
        super().__init__(model, tokenizer, name)
        self.backbone, self.lm_head = model.model, model.lm_head
        self.config = model.config
        if getattr(self.config, "attn", None):
            raise ValueError(f"{self.name} has hybrid attention layers (config.attn); this host supports pure "
                             f"{self.kind} models")
        self.layers = list(self.backbone.layers)
        self.layer_types = [self.family] * len(self.layers)
        self.recurrent_layers = list(range(len(self.layers)))
        self.kernels = kernels

    def _embed(self, input_ids):
        return self.backbone.embeddings(input_ids.to(self.device))

    def unembed(self, residual):
        return self.lm_head(self.backbone.norm(residual))

    def _out_weight(self, cell):
        return self.layers[cell[0]].attn.o_proj.weight[:, cell[1] * self.d_v:(cell[1] + 1) * self.d_v]

    def head_unembed(self, cell):
        return self.lm_head.weight.float() @ self._out_weight(cell).float()
