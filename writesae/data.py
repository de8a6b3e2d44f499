"""On-disk format for recurrent-state datasets: one directory per extraction run.

Layout of a dataset directory::

    manifest.json               what was extracted (params, cells, dims, dtype, shards, counts)
    shard_00000.safetensors     one file per shard, written atomically (tmp file + fsync + rename)
    shard_00001.safetensors
    ...
    mean.safetensors            per-cell mean state M (float32), written by ShardWriter.finish()

The manifest records each file's size and SHA-256; a shard is checked against it and against the header
it must have (keys, dtypes, shapes) before it is read, so a truncated or altered file is named, never
half-read, and a resumed extraction writes it again.

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
import operator
import re
import struct
import warnings
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from safetensors import safe_open

from .cache import check_file, save_tensors, write_text
from .errors import CorruptFileError

__all__ = [
    "cell_key",
    "cell_tuple",
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


_CELL = re.compile(r"L(\d+)H(\d+)", re.IGNORECASE)


def cell_tuple(cell) -> tuple[int, int]:
    """``(layer, head)`` of ``(layer, head)``, a host ``Cell`` or ``"L9H4"`` (any case); ValueError otherwise."""
    if hasattr(cell, "layer"):
        cell = (cell.layer, cell.head)
    m = _CELL.fullmatch(cell.strip()) if isinstance(cell, str) else None
    try:
        layer, head = (int(x) for x in m.groups()) if m else (operator.index(x) for x in cell)
    except (TypeError, ValueError):
        layer = head = -1
    if min(layer, head) < 0:
        raise ValueError(f"bad cell {cell!r}: write a cell as 'L<layer>H<head>' (e.g. 'L9H4') or (layer, head)")
    return layer, head


def parse_cell(cell) -> str:
    """Accept ``(layer, head)``, a host ``Cell`` or ``"L9H4"`` (any case) and return the key string."""
    return cell_key(*cell_tuple(cell))


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported state dtype {dtype}; use one of {list(_DTYPES)}")


def _read_manifest(path: Path) -> dict:
    """The manifest at ``path``, checked to be one (CorruptFileError naming it otherwise)."""
    fix = f"delete {path.parent} and run `writesae extract` again"
    try:
        man = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise CorruptFileError(path, f"it is not valid JSON ({err})", fix) from None
    keys = ("format", "cells", "d_k", "d_v", "dtype", "shards")
    if not isinstance(man, dict) or man.get("format") != FORMAT or not all(k in man for k in keys):
        raise CorruptFileError(path, f"it is not a {FORMAT} manifest (one holds {', '.join(keys)})", fix)
    return man


def _open_shard(dir: Path, entry: dict, man: dict) -> tuple[int, dict]:
    """Check shard ``entry`` of manifest ``man`` (size and SHA-256 as recorded, then the header: every key with
    its dtype and shape, data inside the file) and return (data start, header). Raises FileNotFoundError or
    CorruptFileError naming the file."""
    path = dir / entry["file"]
    fix = f"run `writesae extract` again with the same parameters: it writes shard {entry['idx']} anew"
    check_file(path, entry if "sha256" in entry else None, fix)  # older manifests recorded no size / SHA-256
    size = path.stat().st_size
    try:
        base, header = _read_header(path)
    except (struct.error, ValueError) as err:  # short file, bad JSON or UTF-8
        raise CorruptFileError(path, f"its safetensors header cannot be read ({err})", fix) from None
    n, dk, dv = entry["n"], man["d_k"], man["d_v"]
    tag = next(t for t, (_, dt) in _ST_DTYPES.items() if dt == _DTYPES[man["dtype"]])
    want = {key: ("I64", [n]) for key in SHARED_KEYS}
    for c in man["cells"]:
        want.update({f"{c}.state": (tag, [n, dk, dv]), f"{c}.write": (tag, [n, dk, dv]), f"{c}.a": ("F32", [n]),
                     f"{c}.b": ("F32", [n])})
    for key, (dtype, shape) in want.items():
        info = header.get(key) if isinstance(header, dict) else None
        if not isinstance(info, dict):
            raise CorruptFileError(path, f"{key} is absent from its header", fix)
        if (info.get("dtype"), info.get("shape")) != (dtype, shape):
            raise CorruptFileError(path, f"{key} is {info.get('dtype')} {info.get('shape')}, expected {dtype} {shape}", fix)
        if base + info["data_offsets"][1] > size:
            raise CorruptFileError(path, f"{key} ends at byte {base + info['data_offsets'][1]} but the file has "
                                         f"{size} bytes (truncated)", fix)
    return base, header


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
            old = _read_manifest(path)
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
        write_text(path, json.dumps(self.manifest, indent=1))

    def done_shards(self) -> set[int]:
        """Indices of shards already written and intact (listed in the manifest, present, and matching their
        recorded size, SHA-256 and header); a missing or corrupt one is left out, with a warning, so that the
        extraction writes it again."""
        done = set()
        for s in self.manifest["shards"]:
            try:
                _open_shard(self.dir, s, self.manifest)
                done.add(s["idx"])
            except (FileNotFoundError, CorruptFileError) as err:
                warnings.warn(f"shard {s['idx']} will be extracted again: {err}", stacklevel=2)
        return done

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
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"shard {shard_idx}: NaN/Inf in {name}; refusing to write it (the host produced "
                                 "non-finite states: run it in float32, or on shorter windows)")
        name = _shard_name(shard_idx)
        record = save_tensors(out, self.dir / name, metadata={"shard": str(shard_idx)})
        shards = [s for s in self.manifest["shards"] if s["idx"] != shard_idx]
        shards.append({"idx": int(shard_idx), "file": name, "n": n, **record})
        self.manifest["shards"] = sorted(shards, key=lambda s: s["idx"])
        self.manifest["n_states"] = sum(s["n"] for s in self.manifest["shards"])
        self.manifest["complete"] = False
        write_text(self.dir / MANIFEST, json.dumps(self.manifest, indent=1))

    def finish(self) -> dict[str, torch.Tensor]:
        """Stream over all shards, write the per-cell mean state, mark the dataset complete."""
        if not self.manifest["shards"]:
            raise ValueError(f"{self.dir}: no shards written; nothing to finish")
        sums = {c: torch.zeros(self.d_k, self.d_v, dtype=torch.float64) for c in self.cells}
        count = 0
        for s in self.manifest["shards"]:
            _open_shard(self.dir, s, self.manifest)
            with safe_open(str(self.dir / s["file"]), framework="pt") as f:
                for c in self.cells:
                    sums[c] += f.get_tensor(f"{c}.state").to(torch.float64).sum(0)
            count += s["n"]
        means = {c: (sums[c] / count).to(torch.float32) for c in self.cells}
        self.manifest["mean_file"] = save_tensors(means, self.dir / MEAN_FILE)
        self.manifest["complete"] = True
        write_text(self.dir / MANIFEST, json.dumps(self.manifest, indent=1))
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
        if 8 + n > path.stat().st_size:
            raise ValueError(f"a header of {n} bytes does not fit in the file")
        return 8 + n, json.loads(f.read(n))


def split_indices(n: int, groups: np.ndarray | None, split: str, seed: int, val_frac: float) -> np.ndarray:
    """Sorted indices of ``split`` ("train", "val", "all") among ``n`` items.

    With ``groups`` (e.g. sequence ids) whole groups go to one side, so no sequence is in both
    splits; the groups are permuted with ``np.random.default_rng(seed)`` and the first
    ``round(val_frac * n_groups)`` of them are validation. Without groups, items are split.
    """
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', not {split!r}")
    if not 0 <= val_frac < 1:
        raise ValueError(f"val_frac={val_frac} must be in [0, 1): the fraction of sequences kept for validation")
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
        self.manifest = _read_manifest(mpath)
        if self.cell not in self.manifest["cells"]:
            raise ValueError(f"cell {self.cell} is not in {self.dir}; cells present: {', '.join(self.manifest['cells'])} "
                             f"(extract {self.cell} with `writesae extract --cells {self.cell}` into another directory)")
        if not self.manifest.get("complete") or not (self.dir / MEAN_FILE).exists():
            raise ValueError(f"{self.dir} is incomplete (extraction did not finish); rerun `writesae extract` to resume it")
        self.d_k, self.d_v = int(self.manifest["d_k"]), int(self.manifest["d_v"])
        self._entries = self.manifest["shards"]
        self._files = [self.dir / s["file"] for s in self._entries]
        sizes = np.array([s["n"] for s in self.manifest["shards"]], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self._maps: dict[int, tuple[np.memmap, int, dict]] = {}
        seq = np.concatenate([self._array(i, "seq_ids") for i in range(len(self._files))])
        self.indices = split_indices(len(seq), seq, split, seed, val_frac)
        self._mean = None

    # -- low level ---------------------------------------------------------------------------
    def _file_map(self, shard: int) -> tuple[np.memmap, int, dict]:
        """Memory map of a whole shard file, checked first (one open file per shard, at most 64 kept)."""
        if shard in self._maps:
            self._maps[shard] = self._maps.pop(shard)  # most recently used last
        else:
            base, header = _open_shard(self.dir, self._entries[shard], self.manifest)
            self._maps[shard] = (np.memmap(self._files[shard], dtype=np.uint8, mode="r"), base, header)
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
            if not torch.isfinite(block).all():  # only a shard without a recorded SHA-256 can get here
                raise ValueError(f"NaN/Inf in {key} of {self._files[s].name}; delete that shard and run `writesae "
                                 "extract` again with the same parameters")
            out[torch.from_numpy(sel[order])] = block
        return out

    # -- public ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.indices)

    @property
    def mean(self) -> torch.Tensor:
        """(d_k, d_v) float32 mean state of this cell over the whole dataset (from mean.safetensors)."""
        if self._mean is None:
            check_file(self.dir / MEAN_FILE, self.manifest.get("mean_file"),
                       "run `writesae extract` again with the same parameters to recompute it")
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

    def in_memory(self) -> "TensorStates":
        """This split's states read once into memory (float32, ``4 d_k d_v`` bytes per state), as
        :class:`TensorStates`: the same rows in the same order, so batches drawn with the same seed are
        identical, each one an index into memory instead of reads from every shard it touches."""
        return TensorStates(self.states(np.arange(len(self))), self.mean, self.cell)

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
        for pos in _batch_positions(len(self), batch_size, shuffle, epoch_seed, drop_last, start_batch):
            glob = self.indices[pos]
            x = self._gather("state", glob)
            yield Batch(x, self._gather("write", glob), pos) if with_meta else x

    def __repr__(self) -> str:
        return f"StateDataset({str(self.dir)!r}, cell={self.cell!r}, split={self.split!r}, n={len(self)}, d_k={self.d_k}, d_v={self.d_v})"


def _batch_positions(n: int, batch_size: int, shuffle: bool, epoch_seed: int, drop_last: bool, start_batch: int):
    """Positions of each batch of one epoch over ``n`` items (see ``StateDataset.iter_batches``)."""
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    order = np.random.default_rng(epoch_seed).permutation(n) if shuffle else np.arange(n)
    n_batches = n // batch_size if drop_last else -(-n // batch_size)
    for b in range(start_batch, n_batches):
        yield order[b * batch_size : (b + 1) * batch_size]


class TensorStates:
    """In-memory stand-in for ``StateDataset`` (same ``len``, ``mean``, ``states``,
    ``iter_batches``): ``states`` is (N, d_k, d_v), finite; ``mean`` defaults to its mean.
    ``cell`` ("L9H4"), if given, is checked where an SAE meets these states."""

    def __init__(self, states: torch.Tensor, mean: torch.Tensor | None = None, cell=None):
        states = torch.as_tensor(states)
        if states.ndim != 3 or not states.is_floating_point():
            raise ValueError(f"states must be a float (N, d_k, d_v) tensor, got {states.dtype} of shape "
                             f"{tuple(states.shape)}; stack one cell's (d_k, d_v) states along dim 0")
        if not torch.isfinite(states).all():
            bad = (~torch.isfinite(states)).flatten(1).any(1).nonzero().flatten()
            raise ValueError(f"states hold NaN/Inf in {len(bad)} of {len(states)} rows (first: row {int(bad[0])}); "
                             "drop those rows (states[torch.isfinite(states).flatten(1).all(1)]) or fix their source")
        if mean is not None and tuple(mean.shape) != tuple(states.shape[1:]):
            raise ValueError(f"mean has shape {tuple(mean.shape)}, the states are {tuple(states.shape[1:])}")
        self.data = states
        self.d_k, self.d_v = states.shape[1], states.shape[2]
        self.cell = parse_cell(cell) if cell is not None else None
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
        for pos in _batch_positions(len(self), batch_size, shuffle, epoch_seed, drop_last, start_batch):
            yield self.data[torch.from_numpy(pos)].float()
