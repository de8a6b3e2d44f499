"""On-disk format for recurrent-state datasets: one directory per extraction run.

Layout of a dataset directory::

    manifest.json               what was extracted (params, cells, dims, dtype, shards, counts)
    shard_00000.safetensors     one file per shard, written atomically (tmp file + rename)
    shard_00001.safetensors
    ...
    mean.safetensors            per-cell mean state M (float32), written by ShardWriter.finish()

Tensor keys inside a shard, for every cell key ``"L{layer}H{head}"``:

    "{key}.state"   (n, d_k, d_v)   the state S_t after the write at token t   (dtype, default bf16)
    "{key}.write"   (n, d_k, d_v)   the native write W_t = b_t k_t v_t^T          (dtype)
    "{key}.a"       (n,)            decay a_t (mean over key rows if per-row)     (float32)
    "{key}.b"       (n,)            write gate b_t                                  (float32)

and, shared by all cells: "token_ids", "seq_ids", "positions" (n,) int64.

``ShardWriter`` writes it (the extraction code calls it); ``StateDataset`` reads one cell
lazily through memory maps, so a dataset larger than RAM is fine. ``TensorStates`` offers the
same reading interface over an in-memory tensor (tests, small experiments).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "cell_key",
    "parse_cell",
    "ShardWriter",
    "StateDataset",
    "TensorStates",
    "Batch",
    "split_indices",
]

FORMAT = "writesae-states"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MEAN_FILE = "mean.safetensors"
SHARED_KEYS = ("token_ids", "seq_ids", "positions")
CELL_FIELDS = ("state", "write", "a", "b")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# safetensors dtype tag -> (numpy dtype used for the memory map, torch dtype it holds)
_ST_DTYPES = {
    "BF16": (np.int16, torch.bfloat16),
    "F16": (np.float16, torch.float16),
    "F32": (np.float32, torch.float32),
    "F64": (np.float64, torch.float64),
    "I64": (np.int64, torch.int64),
    "I32": (np.int32, torch.int32),
}


def cell_key(layer: int, head: int) -> str:
    """Key string of a (layer, head) cell: ``cell_key(9, 4) == "L9H4"``."""
    return f"L{int(layer)}H{int(head)}"


def parse_cell(cell) -> str:
    """Accept ``(layer, head)`` or ``"L9H4"`` and return the key string."""
    if isinstance(cell, str):
        return cell
    layer, head = cell
    return cell_key(layer, head)


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported state dtype {dtype}; use one of {list(_DTYPES)}")


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _shard_name(idx: int) -> str:
    return f"shard_{idx:05d}.safetensors"


class ShardWriter:
    """Write a state dataset shard by shard; resumable.

    ``manifest`` is the caller's description of the run; its ``"params"`` entry (a dict of
    whatever determines the data: model, layers, heads, prompts, seq_len, ...) is compared with
    an existing manifest in ``dir``: if they differ, the directory belongs to another run and
    ``ValueError`` is raised. Otherwise shards listed in ``done_shards()`` can be skipped.
    """

    def __init__(self, dir, manifest: dict, cells, d_k: int, d_v: int, dtype=torch.bfloat16):
        self.dir = Path(dir)
        self.cells = [parse_cell(c) for c in cells]
        if not self.cells:
            raise ValueError("ShardWriter needs at least one cell")
        self.d_k, self.d_v, self.dtype = int(d_k), int(d_v), dtype
        new = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **manifest,
            "cells": self.cells,
            "d_k": self.d_k,
            "d_v": self.d_v,
            "dtype": _dtype_name(dtype),
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / MANIFEST
        if path.exists():
            old = json.loads(path.read_text())
            diff = _manifest_diff(old, new)
            if diff:
                lines = "\n".join(f"  {k}: existing {a!r} != new {b!r}" for k, a, b in diff)
                raise ValueError(
                    f"{self.dir} already holds a dataset extracted with different parameters:\n"
                    f"{lines}\nUse another directory (or delete this one) for the new parameters."
                )
            new["shards"] = old.get("shards", [])
        else:
            new["shards"] = []
        new["n_states"] = sum(s["n"] for s in new["shards"])
        new["complete"] = False
        self.manifest = new
        _atomic_write_json(path, self.manifest)

    def done_shards(self) -> set[int]:
        """Indices of shards already written (listed in the manifest and present on disk)."""
        return {s["idx"] for s in self.manifest["shards"] if (self.dir / s["file"]).exists()}

    def write(self, shard_idx: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write one shard atomically and record it in the manifest. See the module doc for keys."""
        expected = set(SHARED_KEYS) | {f"{c}.{f}" for c in self.cells for f in CELL_FIELDS}
        missing, extra = expected - set(tensors), set(tensors) - expected
        if missing or extra:
            raise ValueError(f"shard {shard_idx}: missing keys {sorted(missing)}, unexpected keys {sorted(extra)}")
        n = int(tensors["token_ids"].shape[0])
        out = {}
        for key in SHARED_KEYS:
            t = tensors[key]
            if t.shape != (n,):
                raise ValueError(f"shard {shard_idx}: {key} has shape {tuple(t.shape)}, expected ({n},)")
            out[key] = t.detach().to("cpu", torch.int64).contiguous()
        for c in self.cells:
            for f in ("state", "write"):
                t = tensors[f"{c}.{f}"]
                if t.shape != (n, self.d_k, self.d_v):
                    raise ValueError(
                        f"shard {shard_idx}: {c}.{f} has shape {tuple(t.shape)}, expected ({n}, {self.d_k}, {self.d_v})"
                    )
                out[f"{c}.{f}"] = t.detach().to("cpu", self.dtype).contiguous()
            for f in ("a", "b"):
                t = tensors[f"{c}.{f}"]
                if t.shape != (n,):
                    raise ValueError(f"shard {shard_idx}: {c}.{f} has shape {tuple(t.shape)}, expected ({n},)")
                out[f"{c}.{f}"] = t.detach().to("cpu", torch.float32).contiguous()
        for name, t in out.items():
            if t.is_floating_point() and torch.isnan(t).any():
                raise ValueError(f"shard {shard_idx}: NaN in {name}; refusing to write it")
        name = _shard_name(shard_idx)
        _atomic_save(out, self.dir / name, metadata={"shard": str(shard_idx)})
        shards = [s for s in self.manifest["shards"] if s["idx"] != shard_idx]
        shards.append({"idx": int(shard_idx), "file": name, "n": n})
        self.manifest["shards"] = sorted(shards, key=lambda s: s["idx"])
        self.manifest["n_states"] = sum(s["n"] for s in self.manifest["shards"])
        self.manifest["complete"] = False
        _atomic_write_json(self.dir / MANIFEST, self.manifest)

    def finish(self) -> dict[str, torch.Tensor]:
        """Stream over all shards, write the per-cell mean state, mark the dataset complete."""
        if not self.manifest["shards"]:
            raise ValueError(f"{self.dir}: no shards written; nothing to finish")
        sums = {c: torch.zeros(self.d_k, self.d_v, dtype=torch.float64) for c in self.cells}
        count = 0
        for s in self.manifest["shards"]:
            with safe_open(str(self.dir / s["file"]), framework="pt") as f:
                for c in self.cells:
                    sums[c] += f.get_tensor(f"{c}.state").to(torch.float64).sum(0)
            count += s["n"]
        means = {c: (sums[c] / count).to(torch.float32) for c in self.cells}
        _atomic_save(means, self.dir / MEAN_FILE)
        self.manifest["complete"] = True
        _atomic_write_json(self.dir / MANIFEST, self.manifest)
        return means


def _manifest_diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(name, old, new) for every parameter that differs between two manifests."""
    diff = []
    op, np_ = old.get("params", {}) or {}, new.get("params", {}) or {}
    for k in sorted(set(op) | set(np_), key=str):
        if op.get(k) != np_.get(k):
            diff.append((f"params.{k}", op.get(k), np_.get(k)))
    for k in ("cells", "d_k", "d_v", "dtype"):
        if old.get(k) != new.get(k):
            diff.append((k, old.get(k), new.get(k)))
    return diff


def _read_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def split_indices(n: int, groups: np.ndarray | None, split: str, seed: int, val_frac: float) -> np.ndarray:
    """Sorted indices of ``split`` ("train", "val", "all") among ``n`` items.

    With ``groups`` (e.g. sequence ids) whole groups go to one side, so no sequence is in both
    splits; the groups are permuted with ``np.random.default_rng(seed)`` and the first
    ``round(val_frac * n_groups)`` of them are validation. Without groups, items are split.
    """
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', not {split!r}")
    if split == "all":
        return np.arange(n, dtype=np.int64)
    if groups is None:
        groups = np.arange(n)
    uniq = np.unique(groups)
    perm = np.random.default_rng(seed).permutation(len(uniq))
    n_val = int(round(val_frac * len(uniq)))
    if len(uniq) >= 2 and val_frac > 0:
        n_val = min(max(n_val, 1), len(uniq) - 1)
    val_groups = uniq[perm[:n_val]]
    is_val = np.isin(groups, val_groups)
    return np.flatnonzero(is_val if split == "val" else ~is_val).astype(np.int64)


class Batch(NamedTuple):
    state: torch.Tensor
    """(B, d_k, d_v) float32 states."""
    write: torch.Tensor
    """(B, d_k, d_v) float32 native writes W_t."""
    index: np.ndarray
    """(B,) positions within this split; index ``meta()`` arrays with them."""


class StateDataset:
    """One cell of a state dataset directory, one split, read lazily through memory maps.

    ``split`` is "train", "val" or "all"; the train/val split is by sequence (``seq_ids``), seeded
    by ``seed`` (the trainer passes its init seed), with ``val_frac`` of the sequences in "val".
    """

    def __init__(self, dir, cell, split: str = "train", seed: int = 0, val_frac: float = 0.2):
        self.dir = Path(dir)
        self.cell = parse_cell(cell)
        self.split, self.seed, self.val_frac = split, seed, val_frac
        self.indices = np.zeros(0, dtype=np.int64)
        self.d_k = self.d_v = None
        if not self.dir.is_dir():
            raise FileNotFoundError(f"state dataset {self.dir} does not exist; run `writesae extract` first")
        mpath = self.dir / MANIFEST
        if not mpath.exists():
            raise FileNotFoundError(f"{self.dir} has no {MANIFEST}; run `writesae extract` first")
        self.manifest = json.loads(mpath.read_text())
        if self.cell not in self.manifest["cells"]:
            raise KeyError(f"cell {self.cell} is not in {self.dir}; cells present: {', '.join(self.manifest['cells'])}")
        if not self.manifest.get("complete") or not (self.dir / MEAN_FILE).exists():
            raise ValueError(f"{self.dir} is incomplete (extraction did not finish); rerun `writesae extract` to resume it")
        self.d_k, self.d_v = int(self.manifest["d_k"]), int(self.manifest["d_v"])
        self._files = [self.dir / s["file"] for s in self.manifest["shards"]]
        sizes = np.array([s["n"] for s in self.manifest["shards"]], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self._maps: dict[int, tuple[np.memmap, int, dict]] = {}
        seq = np.concatenate([self._array(i, "seq_ids") for i in range(len(self._files))])
        self.indices = split_indices(len(seq), seq, split, seed, val_frac)
        self._mean = None

    # -- low level ---------------------------------------------------------------------------
    def _file_map(self, shard: int) -> tuple[np.memmap, int, dict]:
        """Memory map of a whole shard file (one open file per shard, at most 64 kept)."""
        if shard in self._maps:
            self._maps[shard] = self._maps.pop(shard)  # most recently used last
        else:
            path = self._files[shard]
            if not path.exists():
                raise FileNotFoundError(f"{path} is listed in the manifest but missing")
            base, header = _read_header(path)
            self._maps[shard] = (np.memmap(path, dtype=np.uint8, mode="r"), base, header)
            if len(self._maps) > 64:
                self._maps.pop(next(iter(self._maps)))
        return self._maps[shard]

    def _map(self, shard: int, key: str) -> tuple[np.ndarray, torch.dtype]:
        """Zero-copy view of tensor ``key`` of a shard, and the torch dtype its bits hold."""
        mm, base, header = self._file_map(shard)
        info = header[key]
        np_dtype, torch_dtype = _ST_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        arr = np.ndarray(tuple(info["shape"]), dtype=np_dtype, buffer=mm, offset=base + start) if end > start \
            else np.zeros(tuple(info["shape"]), dtype=np_dtype)
        return arr, torch_dtype

    def _array(self, shard: int, key: str) -> np.ndarray:
        return np.array(self._map(shard, key)[0])

    def _gather(self, field: str, glob: np.ndarray) -> torch.Tensor:
        """float32 rows ``glob`` (global, any order) of ``{cell}.{field}``."""
        key = f"{self.cell}.{field}"
        out = torch.empty((len(glob), self.d_k, self.d_v), dtype=torch.float32)
        shard_of = np.searchsorted(self._starts, glob, side="right") - 1
        for s in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == s)
            rows = glob[sel] - self._starts[s]
            order = np.argsort(rows)
            arr, tdt = self._map(int(s), key)
            block = torch.from_numpy(np.ascontiguousarray(arr[rows[order]])).view(tdt).float()
            if torch.isnan(block).any():
                raise ValueError(f"NaN in {key} of {self._files[s].name}; re-extract that shard")
            out[torch.from_numpy(sel[order])] = block
        return out

    # -- public ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.indices)

    @property
    def mean(self) -> torch.Tensor:
        """(d_k, d_v) float32 mean state of this cell over the whole dataset (from mean.safetensors)."""
        if self._mean is None:
            with safe_open(str(self.dir / MEAN_FILE), framework="pt") as f:
                self._mean = f.get_tensor(self.cell).float()
        return self._mean

    def compute_mean(self, batch_size: int = 4096) -> torch.Tensor:
        """(d_k, d_v) float32 mean of this split's states (one streamed pass; float64 accumulator)."""
        acc = torch.zeros(self.d_k, self.d_v, dtype=torch.float64)
        for x in self.iter_batches(batch_size, shuffle=False):
            acc += x.double().sum(0)
        return (acc / max(len(self), 1)).float()

    def states(self, idx) -> torch.Tensor:
        """float32 states at positions ``idx`` of this split: (d_k, d_v) for an int, else (B, d_k, d_v)."""
        return self._rows("state", idx)

    def writes(self, idx) -> torch.Tensor:
        """float32 native writes W_t at positions ``idx`` of this split (same shapes as ``states``)."""
        return self._rows("write", idx)

    def _rows(self, field: str, idx) -> torch.Tensor:
        scalar = np.ndim(idx) == 0
        pos = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        if len(pos) and (pos.min() < -len(self) or pos.max() >= len(self)):
            raise IndexError(f"index out of range for a split of {len(self)} states")
        out = self._gather(field, self.indices[pos])
        return out[0] if scalar else out

    def meta(self) -> dict[str, np.ndarray]:
        """Per-state metadata of this split, aligned with its positions: token_ids, seq_ids,
        positions (int64), a, b (float32, this cell) and ``index`` (global row in the dataset)."""
        out = {}
        for key, src in [(k, k) for k in SHARED_KEYS] + [("a", f"{self.cell}.a"), ("b", f"{self.cell}.b")]:
            out[key] = np.concatenate([self._array(i, src) for i in range(len(self._files))])[self.indices]
        out["index"] = self.indices.copy()
        return out

    def iter_batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        epoch_seed: int = 0,
        *,
        drop_last: bool = False,
        start_batch: int = 0,
        with_meta: bool = False,
    ) -> Iterator:
        """Yield float32 (B, d_k, d_v) states, or ``Batch(state, write, index)`` with ``with_meta``.

        The order is a permutation of the split seeded by ``epoch_seed`` (or the stored order
        without ``shuffle``). ``start_batch`` skips the first batches without reading them (resume).
        """
        order = np.random.default_rng(epoch_seed).permutation(len(self)) if shuffle else np.arange(len(self))
        n_batches = len(self) // batch_size if drop_last else -(-len(self) // batch_size)
        for b in range(start_batch, n_batches):
            pos = order[b * batch_size : (b + 1) * batch_size]
            glob = self.indices[pos]
            x = self._gather("state", glob)
            yield Batch(x, self._gather("write", glob), pos) if with_meta else x

    def __repr__(self) -> str:
        return f"StateDataset({str(self.dir)!r}, cell={self.cell!r}, split={self.split!r}, n={len(self)}, d_k={self.d_k}, d_v={self.d_v})"


class TensorStates:
    """In-memory stand-in for ``StateDataset`` (same ``len``, ``mean``, ``states``,
    ``iter_batches``): ``states`` is (N, d_k, d_v); ``mean`` defaults to its mean."""

    def __init__(self, states: torch.Tensor, mean: torch.Tensor | None = None, cell: str = "tensor"):
        if states.ndim != 3:
            raise ValueError(f"states must be (N, d_k, d_v), got {tuple(states.shape)}")
        self.data = states
        self.d_k, self.d_v = states.shape[1], states.shape[2]
        self.cell = cell
        self._mean = mean

    def split(self, split: str, seed: int = 0, val_frac: float = 0.2) -> "TensorStates":
        """The seeded train/val split of the rows (same rule as ``StateDataset``, per state)."""
        idx = split_indices(len(self.data), None, split, seed, val_frac)
        return TensorStates(self.data[torch.from_numpy(idx)], self._mean, self.cell)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def mean(self) -> torch.Tensor:
        if self._mean is None:
            self._mean = self.data.double().mean(0).float()
        return self._mean

    def compute_mean(self, batch_size: int = 4096) -> torch.Tensor:
        return self.data.double().mean(0).float()

    def states(self, idx) -> torch.Tensor:
        return self.data[idx].float()

    def iter_batches(self, batch_size, shuffle=True, epoch_seed=0, *, drop_last=False, start_batch=0):
        order = np.random.default_rng(epoch_seed).permutation(len(self)) if shuffle else np.arange(len(self))
        n_batches = len(self) // batch_size if drop_last else -(-len(self) // batch_size)
        for b in range(start_batch, n_batches):
            yield self.data[torch.from_numpy(order[b * batch_size : (b + 1) * batch_size])].float()
