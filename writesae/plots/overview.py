"""Figures of the opening section: what one cell's cache holds and how an atom compares with a write."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..ops import recurrence


def _heat(ax, M, title):
    M = torch.as_tensor(M).detach().float().cpu().numpy()
    lim = float(np.abs(M).max()) or 1.0
    im = ax.imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("$d_v$")
    ax.set_ylabel("$d_k$")
    plt.colorbar(im, ax=ax, fraction=0.046)


def cache_overview(ct, seq=0, pos=-1, title=""):
    """One traced cell (a CellTrace over all positions): write and state at ``pos``, gates over
    positions, and the singular values of the state (how far from rank 1 the cache is)."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))  # 2 x 2: readable at page width
    axes = axes.ravel()
    _heat(axes[0], ct.write[seq, pos], "native write $W_t = b_t k_t v_t^T$")
    _heat(axes[1], ct.state[seq, pos], "state $S_t$")
    a = recurrence.mean_decay(ct.a)[seq]  # a per-key-row or elementwise decay: its mean
    axes[2].plot(a.cpu(), label="forget gate $a_t$")
    axes[2].plot(ct.b[seq].cpu(), label="write gate $b_t$")
    axes[2].set_xlabel("position")
    axes[2].legend(fontsize=8)
    axes[2].set_title("gates", fontsize=10)
    sv = torch.linalg.svdvals(ct.state[seq, pos].float()).cpu()
    axes[3].semilogy(np.arange(1, len(sv) + 1), sv / sv[0], "o-", ms=3, label="$S_t$")
    wsv = torch.linalg.svdvals(ct.write[seq, pos].float()).cpu()
    axes[3].semilogy(np.arange(1, len(wsv) + 1), (wsv / wsv[0]).clamp_min(1e-8), "s-", ms=3, label="$W_t$")
    axes[3].set_title("singular values (relative)", fontsize=10)
    axes[3].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_vs_atom(W, atom, coef, title=""):
    """The native write, the SAE's coefficient-scaled atom, and what substituting leaves behind."""
    A = coef * torch.as_tensor(atom).detach().float()
    W = torch.as_tensor(W).float()
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.3))  # narrow figure: its labels stay legible at page width
    _heat(axes[0], W, "native write $W_t$")
    _heat(axes[1], A, "atom $a_i v_i w_i^T$")
    _heat(axes[2], A - W, "substitution residual $a_i v_i w_i^T - W_t$")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
