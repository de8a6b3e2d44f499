"""Figures of the opening section: what one head's cache holds and how an atom compares with a write."""
from __future__ import annotations

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from ..ops import recurrence
from . import figure


def _np(M):
    return torch.as_tensor(M).detach().float().cpu().numpy()


def _heat(ax, M, title, lim=None, ylabel=True):
    """A heatmap of ``M`` on the symmetric scale [-lim, lim] (default: its own largest entry)."""
    lim = lim or float(np.abs(M).max()) or 1.0
    im = ax.imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # indices
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("$d_v$")
    if ylabel:
        ax.set_ylabel("$d_k$")
    return im


def cache_overview(ct, seq=0, pos=-1, title=""):
    """One traced head (a CellTrace over all positions): write and state at ``pos``, gates over
    positions, and the singular values of the state (how far from rank 1 the cache is)."""
    fig, axes = figure(2, 2, 8, 6.4)  # 2 x 2: readable at page width
    axes = axes.ravel()
    for ax, M, name in ((axes[0], ct.write[seq, pos], "native write $W_t = b_t k_t v_t^T$"),
                        (axes[1], ct.state[seq, pos], "state $S_t$")):
        fig.colorbar(_heat(ax, _np(M), name), ax=ax, fraction=0.046)  # each its own scale: S_t is a sum of writes
    a = recurrence.mean_decay(ct.a)[seq]  # a per-key-row or elementwise decay: its mean
    axes[2].plot(a.cpu(), label="forget gate $a_t$")
    axes[2].plot(ct.b[seq].cpu(), label="write gate $b_t$")
    axes[2].set_xlabel("position")
    axes[2].legend(fontsize=9)
    axes[2].set_title("gates", fontsize=10)
    sv = torch.linalg.svdvals(ct.state[seq, pos].float()).cpu()
    axes[3].semilogy(np.arange(1, len(sv) + 1), sv / sv[0], "o-", ms=3, label="$S_t$")
    wsv = torch.linalg.svdvals(ct.write[seq, pos].float()).cpu()
    axes[3].semilogy(np.arange(1, len(wsv) + 1), (wsv / wsv[0]).clamp_min(1e-8), "s-", ms=3, label="$W_t$")
    axes[3].set_title("singular values (relative)", fontsize=10)
    axes[3].set_xlabel("index")
    axes[3].legend(fontsize=9)
    fig.suptitle(title)
    return fig


def write_vs_atom(W, atom, coef, title=""):
    """The native write, the SAE's coefficient-scaled atom, and what substituting leaves behind, on one
    symmetric colour scale (one colour bar), so that their sizes compare; each title gives its Frobenius norm."""
    A = _np(coef * torch.as_tensor(atom).detach().float())
    W = _np(W)
    R = A - W
    lim = float(max(np.abs(W).max(), np.abs(A).max(), np.abs(R).max())) or 1.0
    nw = float(np.linalg.norm(W)) or 1.0
    fig, axes = figure(1, 3, 8, 3.2, sharey=True)
    im = _heat(axes[0], W, f"native write $W_t$\n$\\|W_t\\|_F$ = {nw:.2g}", lim)
    for ax, M, name in ((axes[1], A, "atom $a_i v_i w_i^T$"), (axes[2], R, "residual $a_i v_i w_i^T - W_t$")):
        _heat(ax, M, f"{name}\nnorm {float(np.linalg.norm(M)) / nw:.2f} $\\|W_t\\|_F$", lim, ylabel=False)
    fig.colorbar(im, ax=list(axes), fraction=0.04, label="entry (one scale for all three)")
    fig.suptitle(title)
    return fig
