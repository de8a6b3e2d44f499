"""Artifact cache keyed by parameters.

Every artifact (state dataset, SAE checkpoint, result table) lives in
``<root>/<kind>/<key>/`` where ``key`` is the first 12 hex digits of the
SHA-256 of the canonical JSON of its parameters, and the folder holds a
``params.json`` with those parameters. Same parameters -> same folder, so a
notebook can run alone and a rebuild recomputes only what changed.

``root`` defaults to ``$WRITESAE_CACHE`` or ``./artifacts``.

Writes are atomic: files are written to a temporary name in the same folder
and renamed into place (``os.replace``), so an interrupted run never leaves a
half-written artifact; at worst a stray ``.tmp-*`` file.

Tables are stored as CSV (readable by anything; pandas needs no extra
package for it). A non-default index is stored as ordinary column(s). The
first call returns the table as read back from disk, so the first and every
later call return identical frames.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd

__all__ = ["canonical_json", "params_key", "cache_root", "artifact_dir",
           "atomic_write", "cached_table", "cached_json"]


def _default(o):
    """JSON for numpy scalars/arrays and paths."""
    if hasattr(o, "tolist"):  # numpy scalar or array
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def canonical_json(params: dict) -> str:
    """Sorted keys, no whitespace, tuples as lists: one string per parameter set."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"), default=_default,
                      allow_nan=False)


def params_key(params: dict) -> str:
    """First 12 hex digits of the SHA-256 of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(params).encode()).hexdigest()[:12]


def cache_root(root=None) -> Path:
    return Path(root or os.environ.get("WRITESAE_CACHE") or "artifacts")


@contextlib.contextmanager
def atomic_write(path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    ``with atomic_write(d / "sae.safetensors") as tmp: save_file(tensors, tmp)``.
    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    tmp.chmod(0o644)  # mkstemp makes 0600; artifacts are ordinary files
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def artifact_dir(kind: str, params: dict, root=None) -> Path:
    """The folder ``<root>/<kind>/<key>`` for ``params``, created with its ``params.json``.

    Raises ``RuntimeError`` if the folder holds a ``params.json`` for other
    parameters (a hash-prefix collision or a hand-edited file).
    """
    d = cache_root(root) / kind / params_key(params)
    pj = d / "params.json"
    canon = json.loads(canonical_json(params))
    if pj.exists():
        if json.loads(pj.read_text()) != canon:
            raise RuntimeError(f"{pj} holds other parameters than {canon}")
    else:
        _write_text(pj, json.dumps(canon, indent=2, sort_keys=True) + "\n")
    return d


# pandas >= 3 parses floats exactly by default (and deprecates the option)
_EXACT = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}


def _read_csv(path: Path) -> pd.DataFrame:
    # only empty fields are missing values: keep strings like "NA" or "null" as text
    return pd.read_csv(path, keep_default_na=False, na_values=[""], **_EXACT)


def cached_table(kind: str, params: dict, compute: Callable[[], pd.DataFrame], root=None,
                 name: str = "table.csv") -> pd.DataFrame:
    """Load ``<artifact_dir>/<name>`` or, if absent, ``compute()`` it, store it and load it.

    Floats round-trip exactly; ints, bools and strings keep their dtypes;
    empty strings come back as NaN; a non-default index comes back as columns.
    """
    path = artifact_dir(kind, params, root) / name
    if not path.exists():
        df = compute()
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"compute() returned {type(df).__name__}, not a DataFrame")
        if not (isinstance(df.index, pd.RangeIndex) and df.index.start == 0
                and df.index.step == 1 and df.index.name is None):
            df = df.reset_index()
        with atomic_write(path) as tmp:
            df.to_csv(tmp, index=False)
    return _read_csv(path)


def cached_json(kind: str, params: dict, compute: Callable[[], Any], root=None,
                name: str = "result.json") -> Any:
    """Like :func:`cached_table` for a JSON-serialisable result (numpy values allowed).

    Returns the value as read back from disk (tuples become lists, numpy
    scalars plain numbers), on the first call as on later ones.
    """
    path = artifact_dir(kind, params, root) / name
    if not path.exists():
        _write_text(path, json.dumps(compute(), indent=1, default=_default) + "\n")
    return json.loads(path.read_text())
