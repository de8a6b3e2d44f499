"""Sparse autoencoders on matrix states (PAPER.md §2): WriteSAE and the ablation variants.

One module, ``WriteSAE``, covers every variant; ``SAEConfig.variant`` picks the encoder and the
decoder:

=================  ==============================  =======================================
variant            encoder (pre-activation a_i)    decoder atom A_i (d_k x d_v)
=================  ==============================  =======================================
``bilinear``       v_i^T X w_i   (own factors)     v_i w_i^T (rank 1, untied from encoder)
``tied``           v_i^T X w_i   (decoder factors) v_i w_i^T
``flat``           <E_i, vec X>  (dense)           dense, unit-norm column
``matrix``         <E_i, vec X>  (dense)           v_i w_i^T
``bilinear_flat``  v_i^T X w_i                     dense, unit-norm column
``rank``           sum_r v_ir^T X w_ir             sum_r v_ir w_ir^T (rank r = cfg.rank)
=================  ==============================  =======================================

with ``X = S - M`` (M, the mean state, is the ``mean`` buffer), plus an encoder bias. The
reconstruction is ``S_hat = M + b_dec + sum_{i active} a_i A_i``; decoder factors (or dense
columns) are unit norm, restored by ``normalize_decoder()``.

Parameter counts (n = n_feat, d_in = d_k d_v, r = rank, with both biases):
flat ``2 n d_in + n + d_in``; bilinear ``2 n (d_k + d_v) + n + d_in``; tied ``n (d_k + d_v) + n +
d_in``; matrix ``n d_in + n (d_k + d_v) + n + d_in``; bilinear_flat ``n (d_k + d_v) + n d_in + n +
d_in``; rank ``2 r n (d_k + d_v) + n + d_in``; JumpReLU adds ``n`` thresholds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from . import __version__
from .cache import check_file, save_tensors, write_text
from .data import parse_cell
from .errors import CorruptFileError

__all__ = [
    "SAEConfig",
    "WriteSAE",
    "ForwardOutput",
    "EncoderOutput",
    "VARIANTS",
    "ACTIVATIONS",
    "convert_reference_checkpoint",
]

VARIANTS = ("bilinear", "tied", "flat", "matrix", "bilinear_flat", "rank")
ACTIVATIONS = ("topk", "batchtopk", "jumprelu")
_DENSE_ENCODER = ("flat", "matrix")
_DENSE_DECODER = ("flat", "bilinear_flat")


@dataclass
class SAEConfig:
    variant: str
    """One of VARIANTS (see the module docstring)."""
    d_k: int
    d_v: int
    n_feat: int = 2048
    k: int = 32
    """Active atoms per state (TopK), or the target mean L0 (BatchTopK)."""
    activation: str = "topk"
    """"topk", "batchtopk" (top k*B over the batch while training, a threshold at inference)
    or "jumprelu" (a learned threshold per atom, straight-through gradients, L0 penalty)."""
    rank: int = 1
    """Decoder (and bilinear encoder) rank per atom; only the "rank" variant may use r > 1."""
    k_aux: int = 256
    lambda_aux: float = 1e-2
    encoder_bias: bool = True
    decoder_bias: bool = True
    sparse_decode: bool = True
    """Decode by gathering the k active atoms (cost ~ k); False multiplies the dense code
    by all n_feat atoms (for benchmarks and checks only)."""
    sparse_encoder_grad: bool = True
    """Training: the encoder's gradient through the selected pre-activations only (TopK's k, BatchTopK's and
    JumpReLU's active atoms; cost ~ k, the same gradient); False backpropagates through all n_feat (for benchmarks
    and checks only)."""
    jumprelu_init_threshold: float = 0.1
    """JumpReLU: initial threshold, in units of the scaled input (S - M) / c (c = the RMS of the
    centred training states, so thresholds do not depend on the host's state scale)."""
    jumprelu_bandwidth: float = 0.1
    """JumpReLU: width of the straight-through rectangle kernel, in the same scaled units."""
    l0_coeff: float = 1e-3
    """JumpReLU: weight of the mean-L0 penalty in the loss."""
    batchtopk_momentum: float = 0.01
    """BatchTopK: EMA rate of the inference threshold (mean of each batch's smallest kept act)."""

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {VARIANTS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {ACTIVATIONS}")
        if self.rank < 1 or (self.rank != 1 and self.variant != "rank"):
            raise ValueError(f"rank={self.rank}: only variant 'rank' takes rank > 1 (and rank >= 1)")
        if not 1 <= self.k <= self.n_feat:
            raise ValueError(f"k={self.k} must be in [1, n_feat={self.n_feat}]")
        if min(self.d_k, self.d_v) < 1:
            raise ValueError(f"d_k, d_v must be positive, got {self.d_k}, {self.d_v}")

    @property
    def d_in(self) -> int:
        return self.d_k * self.d_v


class EncoderOutput(NamedTuple):
    top_acts: Tensor
    """(B, k) non-negative activations of the active atoms (zeros pad BatchTopK/JumpReLU rows)."""
    top_indices: Tensor
    """(B, k) indices of those atoms."""


class ForwardOutput(NamedTuple):
    recon: Tensor | None
    """(B, d_k, d_v) reconstructed state S_hat = M + b_dec + sum_i a_i A_i (None when called with recon=False)."""
    top_acts: Tensor
    """(B, k) activations of the active atoms (BatchTopK/JumpReLU: width = most active in a row,
    zero-padded)."""
    top_indices: Tensor
    """(B, k) indices of the active atoms."""
    mse: Tensor
    """Mean squared reconstruction error per state element."""
    fvu: Tensor | None
    """Fraction of variance unexplained: ||S - S_hat||^2 / ||S - batch mean||^2 (None with recon=False)."""
    auxk_loss: Tensor
    """AuxK loss (Gao et al. 2024): MSE of the top-k_aux dead atoms fitting the residual
    (0 without a dead mask or dead atoms)."""
    sparsity_loss: Tensor
    """JumpReLU L0 penalty l0_coeff * mean L0 (0 for the other activations)."""
    loss: Tensor
    """Training loss: mse + lambda_aux * auxk_loss + sparsity_loss."""
    l0: Tensor | None
    """Mean number of non-zero activations per state (None with recon=False)."""


class _JumpReLU(torch.autograd.Function):
    """z * H(z - theta); d/dz = H, d/dtheta = -(theta / h) rect((z - theta) / h) (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, z, theta, h):
        ctx.save_for_backward(z, theta)
        ctx.h = h
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        rect = ((z - theta).abs() <= ctx.h / 2).to(g.dtype)
        g_theta = -(theta / ctx.h) * rect * g  # theta (n,) broadcast over the batch, or gathered to z's shape
        return g * (z > theta), g_theta.sum(0) if theta.ndim < z.ndim else g_theta, None


class _Step(torch.autograd.Function):
    """H(z - theta), gradient to theta only: -(1 / h) rect((z - theta) / h)."""

    @staticmethod
    def forward(ctx, z, theta, h):
        ctx.save_for_backward(z, theta)
        ctx.h = h
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        rect = ((z - theta).abs() <= ctx.h / 2).to(g.dtype)
        return None, (-(1.0 / ctx.h) * rect * g).sum(0), None


class _Selected(torch.autograd.Function):
    """Pre-activations at selected indices (B, m), given their values (computed without autograd); the gradient
    reaches the encoder and its bias through those entries only: B m d_in multiply-adds, where autograd through
    the dense product spends B n d_in on a gradient that is zero outside the selection (the loss sees nothing
    else). Same gradient, other summation order. The encoder is a matrix ``E`` (n, d_in) (one sparse (n, B) x
    (B, d_in) product) or bilinear factors ``V`` (n, r, d_k), ``W`` (n, r, d_v) (batched products with the
    selected factors only: no (n, d_in) matrix is formed, which at 128 x 128 states is the larger cost).

    ``idx`` may instead be (m,) columns shared by every row (AuxK's dead atoms): then the gradient is dense
    products, G = g^T X (m, d_in) and, for factors, G w and G^T v per column, not B m gathered rows."""

    @staticmethod
    def forward(ctx, values, x, b, idx, *enc):
        ctx.save_for_backward(x, idx, *enc)
        ctx.has_b = b is not None
        return values.clone()

    @staticmethod
    def backward(ctx, g):
        x, idx, *enc = ctx.saved_tensors
        if idx.ndim == 1:
            gb, *grads = _columns_backward(g, x, idx, ctx.has_b, enc)
            return (None, None, gb, None, *grads)
        (B, m), n, at = idx.shape, enc[0].shape[0], idx.reshape(-1)
        if len(enc) == 1:
            rows = torch.arange(B, device=idx.device).repeat_interleave(m)
            G = torch.sparse_coo_tensor(torch.stack([at, rows]), g.reshape(-1), (n, B), check_invariants=False)
            grads = (torch.sparse.mm(G, x.reshape(B, -1)),)
        else:  # d pre / d v = X w, d pre / d w = X^T v, for the selected (b, i) pairs
            V, W = enc
            r, dk, dv = V.shape[1], V.shape[2], W.shape[2]
            XW = (x @ _gather(W, idx).reshape(B, m * r, dv).mT).mT.reshape(B * m, r, dk)
            XtV = (x.mT @ _gather(V, idx).reshape(B, m * r, dk).mT).mT.reshape(B * m, r, dv)
            ga = g.reshape(B * m, 1, 1)
            grads = (V.new_zeros(V.shape).index_add_(0, at, ga * XW), W.new_zeros(W.shape).index_add_(0, at, ga * XtV))
        gb = g.new_zeros(n).index_add_(0, at, g.reshape(-1)) if ctx.has_b else None
        return (None, None, gb, None, *grads)


def _columns_backward(g: Tensor, x: Tensor, cols: Tensor, has_b: bool, enc) -> tuple:
    """(bias gradient or None, *encoder gradients) from the (B, m) gradient ``g`` of the pre-activations of the
    columns ``cols`` (the same for every row of ``x``)."""
    n, m = enc[0].shape[0], len(cols)
    gb = g.new_zeros(n).index_add_(0, cols, g.sum(0)) if has_b else None
    G = g.mT @ x.reshape(len(x), -1)  # (m, d_in): sum_b g_bj X_b
    if len(enc) == 1:
        return gb, enc[0].new_zeros(enc[0].shape).index_add_(0, cols, G)
    V, W = enc  # d pre_j / d v_jr = X w_jr, d pre_j / d w_jr = X^T v_jr: summed over b, G_j w_jr and G_j^T v_jr
    G = G.reshape(m, V.shape[2], W.shape[2])
    gV = (G @ W.index_select(0, cols).mT).mT  # (m, r, d_k)
    gW = (G.mT @ V.index_select(0, cols).mT).mT  # (m, r, d_v)
    return gb, V.new_zeros(V.shape).index_add_(0, cols, gV), W.new_zeros(W.shape).index_add_(0, cols, gW)


def _outer(V: Tensor, W: Tensor) -> Tensor:
    """sum_r v_r w_r^T as (n, d_k, d_v) from factors V (n, r, d_k), W (n, r, d_v). Rank 1 without a gradient (the
    encoder's selection, atoms): by broadcasting, the same values as the batched matmul (one product per entry)
    several times faster than n tiny GEMMs. Where a gradient flows the batched matmul stays: its backward sums in
    another order than the broadcast's, and trained weights would change in the last bits."""
    if V.shape[1] == 1 and not (torch.is_grad_enabled() and (V.requires_grad or W.requires_grad)):
        return V[:, 0, :, None] * W[:, 0, None, :]
    return V.mT @ W


def _gather(P: Tensor, idx: Tensor) -> Tensor:
    """Rows ``P[idx]`` (idx of any shape): index_select on the flattened indices, the same values and gradient as
    advanced indexing at a fraction of its cost (index_add_ instead of an accumulating index_put_ backward)."""
    return P.index_select(0, idx.reshape(-1)).reshape(*idx.shape, *P.shape[1:])


class _SquaredNorm(torch.autograd.Function):
    """(mean, sum) of the squares of the error ``d`` (rec - x, or AuxK's e_hat - e); the gradient in one pass,
    d * (2 g / N). Autograd through ``d.pow(2).mean()`` spends four passes over the batch on it (the mean's
    expanded gradient, the power's copy, doubling and product), and the forward two more (the squares, then their
    mean): at 64 x 64 states more than the step's matmuls. The sum is one read (a dot product); the gradient is
    autograd's to the bit (doubling is exact, so both round once, the product of the same two numbers), the
    values differ from ``pow(2).mean()`` in their last bits (summation order). The sum is not differentiable (it
    serves the FVU, logged only)."""

    @staticmethod
    def forward(ctx, d):
        flat = d.reshape(-1)
        sq = torch.dot(flat, flat)
        ctx.save_for_backward(d)
        ctx.mark_non_differentiable(sq)
        return sq / d.numel(), sq

    @staticmethod
    def backward(ctx, g, _sum):
        (d,) = ctx.saved_tensors
        return d * ((g / d.numel()) * 2)


def _compact(acts: Tensor) -> tuple[Tensor, Tensor]:
    """Dense (B, n) activations -> (B, w) values and indices, w = most non-zeros in a row."""
    width = max(int((acts > 0).sum(-1).max()), 1)
    vals, idx = acts.topk(width, dim=-1, sorted=False)
    return vals, idx


class WriteSAE(nn.Module):
    """Sparse autoencoder on one cell's (d_k, d_v) states; see the module docstring.

    ``seed`` makes the initialisation reproducible without touching the global RNG.
    """

    def __init__(self, cfg: SAEConfig, device=None, dtype=torch.float32, seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.info: dict = {}  # cell, model, train params, metrics: saved into cfg.json
        self.path: Path | None = None  # the directory it was loaded from
        n, dk, dv, r = cfg.n_feat, cfg.d_k, cfg.d_v, cfg.rank
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        kw = dict(dtype=dtype)

        def unit(*shape):
            return F.normalize(torch.randn(*shape, generator=g, **kw), dim=-1)

        def param(t):
            return nn.Parameter(t.to(device))

        self.enc_v = self.enc_w = self.W_enc = self.dec_v = self.dec_w = self.W_dec = None
        self.b_enc = self.b_dec = self.log_threshold = None
        v, w = unit(n, r, dk), unit(n, r, dv)
        outer = _outer(v, w).reshape(n, -1)  # (n, d_in): atoms of the random factors
        # Decoder; encoders start as the transpose of the decoder (Gao et al. 2024).
        if cfg.variant in _DENSE_DECODER:
            self.W_dec = param(F.normalize(outer if cfg.variant == "bilinear_flat" else unit(n, dk * dv), dim=-1))
        else:
            self.dec_v, self.dec_w = param(v), param(w)
        if cfg.variant in _DENSE_ENCODER:
            self.W_enc = param(self.W_dec.detach().clone() if cfg.variant == "flat" else outer)
        elif cfg.variant != "tied":
            self.enc_v, self.enc_w = param(v.clone()), param(w.clone())
        if cfg.encoder_bias:
            self.b_enc = param(torch.zeros(n, **kw))
        if cfg.decoder_bias:
            self.b_dec = param(torch.zeros(dk, dv, **kw))
        if cfg.activation == "jumprelu":
            self.log_threshold = param(torch.full((n,), math.log(cfg.jumprelu_init_threshold), **kw))
        self.register_buffer("mean", torch.zeros(dk, dv, device=device, **kw))
        # Input scale c: the SAE works on x = (S - M) / c internally (c = RMS of the centred training
        # states, set by the trainer), so biases and learning rate do not depend on the host's state
        # scale. Every public quantity (coefficients, reconstructions, decode) is in state units.
        self.register_buffer("scale", torch.ones((), device=device, **kw))
        if cfg.activation == "batchtopk":
            # inference threshold; negative = not estimated yet (then eval falls back to TopK)
            self.register_buffer("threshold", torch.tensor(-1.0, device=device, **kw))

    # -- shapes and factors ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype

    def _label(self) -> str:
        """"SAE at <dir> (cell L9H4, model m)": what error messages call it."""
        known = ", ".join(f"{k} {self.info[k]}" for k in ("cell", "model") if self.info.get(k))
        return "SAE" + (f" at {self.path}" if self.path else "") + (f" ({known})" if known else "")

    def _check(self, S: Tensor) -> Tensor:
        if S.ndim != 3 or S.shape[1:] != (self.cfg.d_k, self.cfg.d_v):
            hint = " (transposed: the state is d_k x d_v)" if S.shape[-2:] == (self.cfg.d_v, self.cfg.d_k) else ""
            raise ValueError(
                f"{self._label()} takes states of shape (B, d_k, d_v) = (B, {self.cfg.d_k}, {self.cfg.d_v}), got "
                f"{tuple(S.shape)}{hint}; pass states of the cell it was trained on (a single state: S[None])"
            )
        return S.to(device=self.device, dtype=self.dtype)

    def check_cell(self, cell=None, dims=None) -> None:
        """Raise ValueError unless this SAE fits ``cell`` ("L9H4", (layer, head), or a host ``Cell``, whose
        (d_k, d_v) is checked too) and states of ``dims`` = (d_k, d_v). The cell is compared when the SAE knows
        its own (``info["cell"]``: set when trained on a state dataset, saved in cfg.json). Call it where an SAE
        meets a cell that its states do not show (atoms written into a host's cache, same-shaped cells)."""
        if hasattr(cell, "d_k"):
            dims = (cell.d_k, cell.d_v)
        problems = []
        if dims is not None and tuple(int(d) for d in dims) != (self.cfg.d_k, self.cfg.d_v):
            problems.append(f"state shape: the SAE takes (d_k, d_v) = ({self.cfg.d_k}, {self.cfg.d_v}), "
                            f"the cell has {tuple(dims)}")
        key = parse_cell(cell) if cell is not None else None
        if key is not None and self.info.get("cell") is not None and key != self.info["cell"]:
            problems.append(f"cell: the SAE was trained on {self.info['cell']}, used on {key}")
        if problems:
            raise ValueError(f"{self._label()} does not match: {'; '.join(problems)}. Use the SAE trained on that cell "
                             "(`writesae train-sae --cell ...` trains one)")

    def _check_indices(self, idx: Tensor) -> Tensor:
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.cfg.n_feat):
            raise IndexError(f"atom index {int(idx.min()) if int(idx.min()) < 0 else int(idx.max())} out of range: "
                             f"{self._label()} has n_feat={self.cfg.n_feat} atoms, 0..{self.cfg.n_feat - 1}")
        return idx

    def _enc_factors(self) -> tuple[Tensor, Tensor]:
        if self.cfg.variant == "tied":
            return self.dec_v, self.dec_w
        return self.enc_v, self.enc_w

    def _rank_decoder(self) -> None:
        if self.dec_v is None:
            raise ValueError(f"variant {self.cfg.variant!r} has a dense decoder; use atom()/atoms() instead of v/w")

    @property
    def v(self) -> Tensor:
        """Decoder factors v_i: (n_feat, d_k), or (n_feat, d_k, r) for rank r > 1."""
        self._rank_decoder()
        return self.dec_v[:, 0] if self.cfg.rank == 1 else self.dec_v.transpose(1, 2)

    @property
    def w(self) -> Tensor:
        """Decoder factors w_i: (n_feat, d_v), or (n_feat, d_v, r) for rank r > 1."""
        self._rank_decoder()
        return self.dec_w[:, 0] if self.cfg.rank == 1 else self.dec_w.transpose(1, 2)

    def atoms(self, indices=None) -> Tensor:
        """Decoder atoms A_i as (len(indices), d_k, d_v) matrices (all atoms without indices)."""
        if indices is None:
            if self.W_dec is not None:
                return self.W_dec.reshape(-1, self.cfg.d_k, self.cfg.d_v)
            return _outer(self.dec_v, self.dec_w)
        sel = self._check_indices(torch.as_tensor(indices, device=self.device, dtype=torch.long).reshape(-1))
        if self.W_dec is not None:
            return _gather(self.W_dec, sel).reshape(-1, self.cfg.d_k, self.cfg.d_v)
        return _outer(_gather(self.dec_v, sel), _gather(self.dec_w, sel))

    def atom(self, i: int) -> Tensor:
        """Decoder atom A_i, a (d_k, d_v) matrix."""
        return self.atoms([int(i)])[0]

    # -- encoder -----------------------------------------------------------------------------
    def _pre(self, x: Tensor) -> Tensor:
        """(B, n_feat) pre-activations of centred states x (B, d_k, d_v)."""
        B, dk, dv = x.shape
        if self.W_enc is not None:
            pre = x.reshape(B, -1) @ self.W_enc.T
        else:
            V, W = self._enc_factors()  # (n, r, d_k), (n, r, d_v)
            n, r = V.shape[:2]
            if dv <= B * r:
                # Materialise the n encoder atoms (n x d_in, independent of B): one GEMM.
                pre = x.reshape(B, -1) @ _outer(V, W).reshape(n, -1).T
            else:
                # Small batch: v^T (X w) for all atoms via X @ W^T, (B, d_k, n r) intermediate.
                Y = x @ W.reshape(n * r, dv).T
                pre = (Y * V.reshape(n * r, dk).T).sum(1).reshape(B, n, r).sum(-1)
        if self.b_enc is not None:
            pre = pre + self.b_enc
        return pre

    def _activate(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(top_acts, top_indices, sparsity_loss) from pre-activations."""
        cfg, zero = self.cfg, pre.new_zeros(())
        if cfg.activation == "topk":
            vals, idx = pre.topk(cfg.k, dim=-1, sorted=False)
            return F.relu(vals), idx, zero
        if cfg.activation == "batchtopk":
            relu = F.relu(pre)
            if self.training:
                kept = relu.flatten().topk(min(cfg.k * pre.shape[0], relu.numel()), sorted=False).values
                kth = kept.min()
                with torch.no_grad():
                    pos = kept[kept > 0]
                    if len(pos):
                        t = pos.min()
                        m = cfg.batchtopk_momentum
                        self.threshold.copy_(t if self.threshold < 0 else (1 - m) * self.threshold + m * t)
                acts = relu * (relu >= kth) * (relu > 0)
            elif self.threshold >= 0:
                acts = relu * (relu > self.threshold)
            else:
                vals, idx = pre.topk(cfg.k, dim=-1, sorted=False)
                return F.relu(vals), idx, zero
            vals, idx = _compact(acts)
            return vals, idx, zero
        theta = self.log_threshold.exp()
        h = cfg.jumprelu_bandwidth
        acts = _JumpReLU.apply(F.relu(pre), theta, h)
        l0_loss = cfg.l0_coeff * _Step.apply(pre, theta, h).sum(-1).mean()
        vals, idx = _compact(acts)
        return vals, idx, l0_loss

    def _x(self, S: Tensor) -> Tensor:
        """Centred, scaled states (S - M) / c."""
        return torch.sub(self._check(S), self.mean).div_(self.scale)

    def pre_acts(self, S: Tensor) -> Tensor:
        """All n_feat pre-activations (B, n_feat) of states S (B, d_k, d_v), bias included, in state units."""
        return self._pre(self._x(S)) * self.scale

    def encode(self, S: Tensor) -> EncoderOutput:
        """Active atoms of states S (B, d_k, d_v); coefficients in state units (S_hat = M + b + sum a_i A_i)."""
        acts, idx, _ = self._activate(self._pre(self._x(S)))
        return EncoderOutput(acts * self.scale, idx)

    # -- decoder -----------------------------------------------------------------------------
    def _combine(self, acts: Tensor, idx: Tensor) -> Tensor:
        """sum_j acts[:, j] A_{idx[:, j]} as (B, d_k, d_v): no mean, no bias. ``idx`` may be (m,) columns shared by
        every row (AuxK's dead atoms): then one dense product with those m atoms."""
        B = acts.shape[0]
        dk, dv = self.cfg.d_k, self.cfg.d_v
        acts = acts.to(self.dtype)
        if idx.ndim == 1:
            return (acts @ self.atoms(idx).reshape(len(idx), -1)).reshape(B, dk, dv)
        if not self.cfg.sparse_decode:
            dense = acts.new_zeros(B, self.cfg.n_feat).scatter(1, idx, acts)
            return (dense @ self.atoms().reshape(self.cfg.n_feat, -1)).reshape(B, dk, dv)
        if self.W_dec is not None:
            out = F.embedding_bag(idx, self.W_dec, per_sample_weights=acts, mode="sum")
            return out.reshape(B, dk, dv)
        # Gather the k active factor pairs, one batched matmul: (B, d_k, k r) @ (B, k r, d_v).
        kr = idx.shape[1] * self.cfg.rank
        Vg = (_gather(self.dec_v, idx) * acts[..., None, None]).reshape(B, kr, dk)
        Wg = _gather(self.dec_w, idx).reshape(B, kr, dv)
        return Vg.mT @ Wg

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """Reconstructed states S_hat = M + c b_dec + sum_j a_j A_j, (B, d_k, d_v); a_j in state units."""
        if top_acts.ndim != 2 or top_acts.shape != top_indices.shape:
            raise ValueError(f"decode takes (B, k) top_acts and top_indices of one shape (from encode), got "
                             f"{tuple(top_acts.shape)} and {tuple(top_indices.shape)}")
        out = self._combine(top_acts, self._check_indices(top_indices)) + self.mean
        return out + self.scale * self.b_dec if self.b_dec is not None else out

    # -- forward -----------------------------------------------------------------------------
    def forward(self, S: Tensor, dead_mask: Tensor | None = None, recon: bool = True) -> ForwardOutput:
        """Encode and decode states S (B, d_k, d_v); ``dead_mask`` (n_feat,) bool enables AuxK.

        ``mse``, ``auxk_loss`` and ``loss`` are in units of the scaled input (S - M) / c (what training
        optimises); ``recon`` and ``top_acts`` are in state units. ``recon=False`` returns the losses and the code
        only (``recon``, ``fvu`` and ``l0`` are None): the trainer's call on the steps it does not log, where the
        passes over the batch that form them were a tenth of a step at 64 x 64 states (the reconstruction) and the
        FVU's variance another 2% at the book's 32 x 32."""
        x = self._x(S)
        act = self.cfg.activation
        selected = self.cfg.sparse_encoder_grad and torch.is_grad_enabled()
        if selected:  # select without autograd (encode()'s values, to the bit), then let the gradient through
            with torch.no_grad():  # the selected entries only: no rule's loss sees the others
                pre = self._pre(x)
                if act == "topk":
                    vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
                else:  # BatchTopK (its threshold's update included) and JumpReLU: rows zero-padded to one width
                    vals, idx, _ = self._activate(pre)
            enc = (self.W_enc,) if self.W_enc is not None else self._enc_factors()
            z = F.relu(_Selected.apply(vals if act == "topk" else pre.gather(1, idx), x, self.b_enc, idx, *enc))
            sparsity_loss = pre.new_zeros(())
            if act == "topk":
                acts = z
            elif act == "batchtopk":
                acts = z * (vals > 0)  # the padding: no value, no gradient
            else:  # JumpReLU at the selected entries (the padding's threshold gradient too, as the dense rule gives)
                theta, h = self.log_threshold.exp(), self.cfg.jumprelu_bandwidth
                acts = _JumpReLU.apply(z, theta.index_select(0, idx.reshape(-1)).reshape(idx.shape), h)
                sparsity_loss = self.cfg.l0_coeff * _Step.apply(pre, theta, h).sum(-1).mean()
        else:
            pre = self._pre(x)
            acts, idx, sparsity_loss = self._activate(pre)
        rec = self._combine(acts, idx)
        if self.b_dec is not None:
            rec = rec.add_(self.b_dec)  # in place: each pass over a fresh (B, d_k, d_v) tensor is a cache-cold write
        neg_e = rec - x
        mse, sq_err = _SquaredNorm.apply(neg_e)
        loss, auxk, fvu, l0 = mse, pre.new_zeros(()), None, None
        if recon:
            with torch.no_grad():
                # sum ||x_b - mean||^2 as sum ||x_b||^2 - B ||mean||^2: two reads, where torch's var over dim 0 takes
                # ~12x longer on CPU (a tenth of a book-sized step); the FVU is logged only, no weight depends on it
                flat, mean_x = x.reshape(-1), x.mean(0).reshape(-1)
                total_var = torch.dot(flat, flat) - len(x) * torch.dot(mean_x, mean_x)
                fvu = sq_err / total_var.clamp_min(torch.finfo(x.dtype).tiny)
                l0 = (acts > 0).sum(-1).to(x.dtype).mean()
        if dead_mask is not None and self.cfg.k_aux > 0 and (n_dead := int(dead_mask.sum())) > 0:
            dead_mask = dead_mask.to(pre.device)
            if n_dead <= self.cfg.k_aux:  # the top k_aux dead atoms are all of them: the same columns in every row,
                aux_idx = dead_mask.nonzero().flatten()  # so dense products over those m atoms (not B m gathered rows)
                aux_vals = pre.index_select(1, aux_idx)
            else:
                aux_vals, aux_idx = pre.masked_fill(~dead_mask, -torch.inf).topk(self.cfg.k_aux, sorted=False)
            if selected:
                aux_vals = _Selected.apply(aux_vals, x, self.b_enc, aux_idx, *enc)
            e_hat = self._combine(F.relu(aux_vals), aux_idx)
            auxk = _SquaredNorm.apply(e_hat.add_(neg_e.detach()))[0]  # mean (e_hat - e)^2, e = x - rec = -neg_e
            loss = loss + self.cfg.lambda_aux * auxk
        if act == "jumprelu":
            loss = loss + sparsity_loss
        out = rec * self.scale + self.mean if recon else None
        return ForwardOutput(out, acts * self.scale, idx, mse, fvu, auxk, sparsity_loss, loss, l0)

    # -- training helpers --------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder factors (rank decoders) or columns (dense decoders) to unit norm."""
        for p in (self.dec_v, self.dec_w, self.W_dec):
            if p is not None:
                p.copy_(F.normalize(p, dim=-1))

    @torch.no_grad()
    def set_mean(self, mean: Tensor) -> None:
        """Set the mean state M (d_k, d_v)."""
        if tuple(mean.shape) != tuple(self.mean.shape):
            raise ValueError(f"mean has shape {tuple(mean.shape)}; {self._label()} takes (d_k, d_v) = "
                             f"{tuple(self.mean.shape)}")
        self.mean.copy_(mean.to(self.mean))

    @torch.no_grad()
    def set_scale(self, scale: float) -> None:
        """Set the input scale c (RMS of the centred training states); see ``__init__``."""
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"input scale c (RMS of the centred training states) must be finite and positive, got "
                             f"{scale}: the training states hold NaN/Inf or are all equal")
        self.scale.fill_(float(scale))

    @torch.no_grad()
    def encoder_norms(self) -> Tensor:
        """(n_feat,) Frobenius norm of each encoder atom."""
        if self.W_enc is not None:
            return self.W_enc.norm(dim=-1)
        V, W = self._enc_factors()
        gram = (V @ V.mT) * (W @ W.mT)  # ||sum_r v_r w_r^T||_F^2 = sum_rs (v_r.v_s)(w_r.w_s)
        return gram.sum((1, 2)).clamp_min(0).sqrt()

    @torch.no_grad()
    def resample(self, dead: Tensor, S: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Re-initialise atoms ``dead`` (indices) from the residuals of states S (B, d_k, d_v).

        Residuals are drawn with probability proportional to their squared norm; a rank-r decoder
        takes their top r singular pairs, a dense one their direction; the encoder gets the same
        atom scaled to 0.2 x the mean norm of the other encoder atoms; bias and threshold reset.
        Returns the indices that were resampled.
        """
        dead = torch.as_tensor(dead, dtype=torch.long, device=self.device)
        if len(dead) == 0:
            return dead
        cfg, r = self.cfg, self.cfg.rank
        x = self._x(S)
        was_training = self.training
        self.eval()  # no BatchTopK threshold update from this pass
        resid = x - (self.forward(S).recon - self.mean) / self.scale
        self.train(was_training)
        w8 = resid.pow(2).flatten(1).sum(1).double()
        probs = w8 / w8.sum() if w8.sum() > 0 else torch.ones_like(w8)
        pick = torch.multinomial(probs.cpu(), len(dead), replacement=True, generator=generator).to(self.device)
        R = resid[pick]
        alive = torch.ones(cfg.n_feat, dtype=torch.bool, device=self.device)
        alive[dead] = False
        norms = self.encoder_norms()
        scale = 0.2 * (norms[alive].mean() if alive.any() else norms.new_tensor(1.0))
        U, _, Vh = torch.linalg.svd(R, full_matrices=False)
        u, vh = U[:, :, :r].mT, Vh[:, :r, :]  # (m, r, d_k), (m, r, d_v)
        if self.dec_v is not None:
            self.dec_v[dead], self.dec_w[dead] = u, vh
        if self.W_dec is not None:
            self.W_dec[dead] = F.normalize(R.flatten(1), dim=-1)
        if self.W_enc is not None:
            src = R.flatten(1) if cfg.variant == "flat" else (u.mT @ vh).flatten(1)
            self.W_enc[dead] = F.normalize(src, dim=-1) * scale
        elif self.enc_v is not None:
            self.enc_v[dead], self.enc_w[dead] = u * scale.sqrt(), vh * scale.sqrt()
        if self.b_enc is not None:
            self.b_enc[dead] = 0
        if self.log_threshold is not None:
            self.log_threshold[dead] = math.log(cfg.jumprelu_init_threshold)
        return dead

    # -- save / load -------------------------------------------------------------------------
    def save(self, path, *, cell=None, model=None, train: dict | None = None, metrics: dict | None = None) -> Path:
        """Write ``sae.safetensors`` and ``cfg.json`` into directory ``path`` (each atomically).

        cfg.json holds the config, the cell and host model the SAE was trained on, the training
        parameters, metrics and the writesae version (kept in ``self.info`` and restored on load), and
        the size and SHA-256 of sae.safetensors (checked on load).
        """
        path = Path(path)
        for key, val in (("cell", parse_cell(cell) if cell is not None else None), ("model", model), ("train", train),
                         ("metrics", metrics)):
            if val is not None:
                self.info[key] = val
        state = {k: t.detach().to("cpu").contiguous() for k, t in self.state_dict().items()}
        record = save_tensors(state, path / "sae.safetensors", metadata={"format": "writesae-sae"})
        doc = {**asdict(self.cfg), **self.info, "writesae_version": __version__, "sae_file": record}
        write_text(path / "cfg.json", json.dumps(doc, indent=1, default=_json_default))
        return path

    @classmethod
    def load(cls, path, expect_cell=None, expect_dims=None, device="cpu") -> "WriteSAE":
        """Load an SAE saved by ``save``. ``expect_cell`` ("L9H4", (9, 4) or a host ``Cell``) and
        ``expect_dims`` ((d_k, d_v) of the states it will see) are checked (``check_cell``); a mismatch
        raises ValueError that says what differs. Both files are checked before use: a file that does
        not parse, does not match its recorded SHA-256 or disagrees with the other raises
        CorruptFileError naming it. Never unpickles anything."""
        path = Path(path)
        if not (path / "cfg.json").exists() or not (path / "sae.safetensors").exists():
            raise FileNotFoundError(_not_writesae(path))
        fix = "save the SAE again or retrain it (pipeline: delete its artifact folder)"
        try:
            doc = json.loads((path / "cfg.json").read_text())
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            raise CorruptFileError(path / "cfg.json", f"it is not valid JSON ({err})", fix) from None
        names = {f.name for f in fields(SAEConfig)}
        try:
            cfg = SAEConfig(**{k: v for k, v in doc.items() if k in names})
        except (TypeError, ValueError, AttributeError) as err:  # not a dict, a field missing or out of range
            raise CorruptFileError(path / "cfg.json", f"it does not hold an SAE config ({err})", fix) from None
        check_file(path / "sae.safetensors", doc.get("sae_file"), fix)
        try:
            tensors = load_file(str(path / "sae.safetensors"), device=str(device))
        except SafetensorError as err:
            raise CorruptFileError(path / "sae.safetensors", f"it is not a safetensors file ({err})", fix) from None
        sae = cls(cfg, device=device)
        sae.path = path
        sae.info = {k: v for k, v in doc.items() if k not in names and k not in ("writesae_version", "sae_file")}
        want = {k: tuple(t.shape) for k, t in sae.state_dict().items()}
        got = {k: tuple(t.shape) for k, t in tensors.items()}
        if want != got:
            diff = [f"{k}: {got.get(k, 'absent')} != {want.get(k, 'absent')}" for k in sorted(set(want) | set(got))
                    if got.get(k) != want.get(k)]
            raise CorruptFileError(path / "sae.safetensors", f"its tensors do not fit cfg.json ({cfg.variant}, "
                                   f"n_feat={cfg.n_feat}, d_k={cfg.d_k}, d_v={cfg.d_v}, rank={cfg.rank}, "
                                   f"{cfg.activation}): {'; '.join(diff)} (file != cfg)", "restore the cfg.json "
                                   "saved with it, or retrain")
        sae.load_state_dict(tensors)
        sae.check_cell(expect_cell, expect_dims)
        return sae

    @classmethod
    def load_many(cls, root, device="cpu") -> dict[str, "WriteSAE"]:
        """Every SAE saved in a subdirectory of ``root`` (one per cell), keyed by directory name."""
        root = Path(root)
        return {p.name: cls.load(p, device=device) for p in sorted(root.iterdir()) if (p / "cfg.json").exists()}


def _not_writesae(path: Path) -> str:
    """Why ``path`` is not a ``WriteSAE.save`` directory, naming the format it holds and how to load it."""
    if (path / "sae_weights.safetensors").exists():
        return (f"{path} is an SAELens SAE directory (sae_weights.safetensors + cfg.json), not a WriteSAE one "
                "(sae.safetensors + cfg.json): load it with writesae.saelens.import_saelens(path)")
    if path.is_file() and path.suffix in (".pt", ".pth") or path.is_dir() and any(path.glob("*.pt")):
        return (f"{path} holds a pickled PyTorch checkpoint (the reference release's best.pt): convert it once with "
                "writesae.sae.convert_reference_checkpoint(path, out_dir, allow_pickle=True), then load out_dir")
    if path.is_file():
        return f"{path} is a file; WriteSAE.load takes the directory WriteSAE.save wrote (sae.safetensors + cfg.json)"
    return (f"{path} has no cfg.json + sae.safetensors: WriteSAE.load takes a directory written by WriteSAE.save "
            "(SAELens directories: writesae.saelens.import_saelens; reference best.pt: convert_reference_checkpoint)")


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to cfg.json")


# -- reference checkpoints ---------------------------------------------------------------------

_REF_KEYS = {
    "dec_v": ("decoder.v", "V_dec", "dec_v", "V", "decoder.V"),
    "dec_w": ("decoder.w", "W_dec", "dec_w", "W", "decoder.W"),
    "enc_v": ("encoder.v", "V_enc", "enc_v", "encoder.V"),
    "enc_w": ("encoder.w", "W_enc", "enc_w", "encoder.W"),
    "b_enc": ("b_enc", "encoder.bias", "encoder.b"),
    "b_dec": ("bias", "b_dec", "decoder.bias", "decoder.b"),
    "W_enc_dense": ("encoder.weight",),
    "W_dec_dense": ("decoder.weight",),
    "mean": ("mean", "state_mean", "M", "mean_state"),
}


def _tensors_of(obj, prefix: str = "", depth: int = 0) -> dict[str, Tensor]:
    """Flatten the tensors in a module / mapping / plain object into dotted names."""
    out: dict[str, Tensor] = {}
    if depth > 4:
        return out
    if isinstance(obj, Tensor):
        out[prefix.rstrip(".")] = obj.detach()
    elif isinstance(obj, nn.Module):
        out.update({prefix + k: t.detach() for k, t in obj.state_dict().items()})
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors_of(v, f"{prefix}{k}.", depth + 1))
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for k, v in vars(obj).items():
            out.update(_tensors_of(v, f"{prefix}{k}.", depth + 1))
    return out


def convert_reference_checkpoint(
    path, out_dir, allow_pickle: bool = False, *, k: int | None = None, cell=None, model=None
) -> WriteSAE:
    """Convert the reference release's pickled ``best.pt`` into ``sae.safetensors`` + ``cfg.json``.

    SECURITY: ``best.pt`` is a full pickle; loading it runs whatever code it contains (arbitrary
    code execution). It is refused unless ``allow_pickle=True``; pass that only for a file you
    trust. The converted directory loads with ``WriteSAE.load`` and never unpickles again.

    Lenient about layout: the SAE is ``ckpt["sae"]`` (a module or a state dict) or the checkpoint
    itself; rank-1 factors come from ``decoder.v`` / ``decoder.w`` (or ``V_dec`` / ``W_dec``), the
    encoder from ``encoder.v`` / ``V_enc`` / ``encoder.weight`` (none: tied). ``k`` defaults to the
    checkpoint's config or 32; a missing mean state is set to zero and recorded in cfg.json.
    """
    path = Path(path)
    if not allow_pickle:
        raise ValueError(
            f"{path} is a pickled checkpoint: loading it can execute arbitrary code (arbitrary code "
            "execution on load). Call convert_reference_checkpoint(..., allow_pickle=True) only if "
            "you trust the file; the converted safetensors copy is safe to share and load."
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # noqa: S614 -- explicitly allowed
    root = ckpt.get("sae", ckpt) if isinstance(ckpt, dict) else ckpt
    if isinstance(root, dict):
        root = root.get("state_dict", root.get("model_state_dict", root))
    tensors = _tensors_of(root)
    if isinstance(ckpt, dict):  # a mean stored next to the SAE
        tensors.update({k2: t for k2, t in _tensors_of({k3: v for k3, v in ckpt.items() if k3 != "sae"}).items()
                        if k2 not in tensors})
    conf: dict = {}
    if isinstance(ckpt, dict):
        for key in ("config", "cfg", "args", "sae_config"):
            c = ckpt.get(key)
            c = vars(c) if hasattr(c, "__dict__") and not isinstance(c, dict) else c
            if isinstance(c, dict):
                conf.update(c)
    conf.update({a: getattr(root, a) for a in ("k", "d_k", "d_v", "n_features", "rank") if hasattr(root, a)})

    def find(role):
        for name in _REF_KEYS[role]:
            for key, t in tensors.items():
                if key == name or key.endswith("." + name):
                    return t.float()
        return None

    def as_nrd(t):  # (n, d) or (n, r, d) -> (n, r, d)
        return t[:, None] if t.ndim == 2 else t

    got = {role: find(role) for role in _REF_KEYS}
    dec_v, dec_w, enc_v, enc_w = (as_nrd(got[r]) if got[r] is not None else None for r in ("dec_v", "dec_w", "enc_v", "enc_w"))
    W_enc, W_dec = got["W_enc_dense"], got["W_dec_dense"]
    if dec_v is not None and dec_w is not None:
        n, r, d_k = dec_v.shape
        d_v = dec_w.shape[-1]
        variant = "rank" if r > 1 else "bilinear" if enc_v is not None else "matrix" if W_enc is not None else "tied"
    elif W_dec is not None:
        n = W_dec.shape[1]  # nn.Linear(n_feat, d_in).weight is (d_in, n_feat)
        d_k, d_v = int(conf.get("d_k", 0)), int(conf.get("d_v", 0))
        if not d_k * d_v:
            side = math.isqrt(W_dec.shape[0])
            if side * side != W_dec.shape[0]:
                raise ValueError(f"{path}: dense decoder with d_in={W_dec.shape[0]} and no d_k/d_v in its config")
            d_k = d_v = side
        r, variant = 1, "bilinear_flat" if enc_v is not None else "flat"
    else:
        raise ValueError(f"{path}: found no decoder factors (decoder.v/w, V_dec/W_dec) or decoder.weight; keys: {sorted(tensors)[:20]}")
    k = int(k or conf.get("k", 32))
    cfg = SAEConfig(variant, d_k, d_v, n_feat=n, k=min(k, n), rank=r)
    sae = WriteSAE(cfg)
    with torch.no_grad():
        if sae.dec_v is not None:
            sae.dec_v.copy_(dec_v)
            sae.dec_w.copy_(dec_w)
        if sae.W_dec is not None:
            sae.W_dec.copy_(W_dec.T)
        if sae.enc_v is not None:
            sae.enc_v.copy_(enc_v)
            sae.enc_w.copy_(enc_w)
        if sae.W_enc is not None:
            sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(got["b_enc"] if got["b_enc"] is not None else torch.zeros(n))
        sae.b_dec.copy_(got["b_dec"].reshape(d_k, d_v) if got["b_dec"] is not None else torch.zeros(d_k, d_v))
        has_mean = got["mean"] is not None and got["mean"].numel() == d_k * d_v
        if has_mean:
            sae.set_mean(got["mean"].reshape(d_k, d_v))
    sae.info.update({"converted_from": str(path), "mean_missing": not has_mean})
    ref_conf = {a: b for a, b in conf.items() if isinstance(b, (int, float, str, bool))}
    sae.save(out_dir, cell=parse_cell(cell) if cell is not None else None, model=model, train={"reference_config": ref_conf})
    return sae
