"""State datasets: run a host over a token stream and store the states of sampled positions.

``extract(host, windows, cells, out_dir)`` writes one shard per batch of windows through
:class:`writesae.data.ShardWriter` (resumable, refuses to mix parameters) and the mean state M.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import ShardWriter, cell_key, cell_tuple
from .hosts import EMBEDDED_DIR
from .ops import recurrence


def embedded_text(name="heldout"):
    """Text shipped with the embedded model: ``"train"`` (for state datasets) or ``"heldout"`` (evaluations)."""
    path = EMBEDDED_DIR / f"{name}.txt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: re-export the embedded model "
                                "(`python -m writesae.embedded_train --export-only`)")
    return path.read_text()


def token_windows(tokenizer, text, window=128, n_windows=None, stride=None):
    """Tokenise ``text`` once and cut it into ``(N, window)`` non-overlapping windows (in order): the first
    ``n_windows``, or every one (``None``); more than the text holds is a ValueError naming both numbers."""
    if n_windows is not None and n_windows < 1:
        raise ValueError(f"n_windows={n_windows} must be >= 1 (or None for every window of the text)")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    stride = stride or window
    n = (len(ids) - window) // stride + 1
    if n < 1:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    if n_windows is not None and n_windows > n:
        raise ValueError(f"the text holds {n} windows of {window} tokens, {n_windows} asked for: lower the count, "
                         "shorten the window or give a larger corpus")
    out = ids.unfold(0, window, stride)
    return out[:n_windows] if n_windows is not None else out


def extract(host, windows, cells, out_dir, *, positions_per_seq=32, min_pos=8, batch_size=16, seed=0,
            dtype=torch.bfloat16, source="", progress=True):
    """Write the states (plus writes, gates, token/sequence ids, positions) of sampled positions.

    windows: (N, T) token ids. cells: list of (layer, head) or "L9H4". Each shard holds ``batch_size`` windows x
    ``positions_per_seq`` positions drawn (seeded per shard) from ``min_pos..T-1``. Re-running with the
    same parameters resumes; other parameters in the same directory are refused. Returns the directory."""
    windows = torch.as_tensor(windows)
    if windows.ndim != 2 or windows.is_floating_point() or windows.is_complex() or not windows.numel():
        raise ValueError(f"windows must be a non-empty (N, T) tensor of token ids, got {windows.dtype} of shape "
                         f"{tuple(windows.shape)} (one window: ids[None])")
    if int(windows.min()) < 0 or int(windows.max()) >= host.vocab_size:
        raise ValueError(f"token ids span {int(windows.min())}..{int(windows.max())}, but {host.name} has a vocabulary "
                         f"of {host.vocab_size}: tokenise with this model's tokenizer")
    cells = [host.cell(*cell_tuple(c)) for c in cells]
    N, T = windows.shape
    if batch_size < 1 or positions_per_seq < 1 or min_pos < 0:
        raise ValueError(f"batch_size={batch_size} and positions_per_seq={positions_per_seq} must be >= 1, "
                         f"min_pos={min_pos} >= 0")
    if positions_per_seq > T - min_pos:
        raise ValueError(f"positions_per_seq={positions_per_seq} > {T - min_pos} available positions per window "
                         f"(window {T} - min_pos {min_pos}): lower positions_per_seq or use longer windows")
    digest = hashlib.sha1(windows.numpy().tobytes()).hexdigest()[:16]
    params = dict(model=host.name, cells=[[c.layer, c.head] for c in cells], n_windows=N, window=T,
                  tokens_sha1=digest, positions_per_seq=positions_per_seq, min_pos=min_pos,
                  batch_size=batch_size, seed=seed, source=source)
    writer = ShardWriter(out_dir, {"params": params}, [cell_key(c.layer, c.head) for c in cells],
                         host.d_k, host.d_v, dtype=dtype)
    done = writer.done_shards()
    n_shards = (N + batch_size - 1) // batch_size
    t0, n_new = time.time(), 0
    bar = tqdm(range(n_shards), disable=not progress, desc="extract states", unit="shard")
    for s in bar:
        if s in done:
            continue
        ids = windows[s * batch_size:(s + 1) * batch_size]
        g = torch.Generator().manual_seed(seed * 1_000_003 + s)
        pos = (torch.randperm(T - min_pos, generator=g)[:positions_per_seq] + min_pos).sort().values
        tr = host.trace(ids, cells=[(c.layer, c.head) for c in cells], positions=pos, logits=False)
        B, P = ids.shape[0], len(pos)
        out = {"token_ids": ids[:, pos].reshape(-1),
               "seq_ids": (torch.arange(B)[:, None] + s * batch_size).expand(B, P).reshape(-1),
               "positions": pos[None].expand(B, P).reshape(-1)}
        for c in cells:
            ct = tr[(c.layer, c.head)]
            key = cell_key(c.layer, c.head)
            out[f"{key}.state"] = ct.state.reshape(B * P, c.d_k, c.d_v)
            out[f"{key}.write"] = ct.write.reshape(B * P, c.d_k, c.d_v)
            out[f"{key}.a"] = recurrence.mean_decay(ct.a).reshape(-1)  # per-row or elementwise decays: their mean
            out[f"{key}.b"] = ct.b.reshape(-1)
        writer.write(s, out)
        n_new += B * P * len(cells)
        bar.set_postfix(states_per_s=f"{n_new / (time.time() - t0):.0f}")
    writer.finish()
    return Path(out_dir)
