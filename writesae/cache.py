"""Artifact cache keyed by parameters.

Every artifact (state dataset, SAE checkpoint, result table) lives in
``<root>/<kind>/<key>/`` where ``key`` is the first 12 hex digits of the
SHA-256 of the canonical JSON of its parameters, and the folder holds a
``params.json`` with those parameters. Same parameters -> same folder, so a
notebook can run alone and a rebuild recomputes only what changed.

``root`` defaults to one rule, :func:`cache_root`: ``$WRITESAE_CACHE`` if set, else the ``artifacts/``
folder of the repository root, the nearest directory at or above the working directory that holds
``_toc.yml`` (so a kernel started in ``notebooks/``, as Voila and Jupyter do, finds the same cache as a
terminal at the root), else ``./artifacts``.

Writes are atomic: files are written to a temporary name in the same folder,
fsynced and renamed into place (``os.replace``), so an interrupted run never
leaves a half-written artifact; at worst a stray ``.tmp-*`` file. Files that are
read back later (state shards, SAEs, checkpoints) have their size and SHA-256
recorded at write time (:func:`file_record`) and checked on open
(:func:`check_file`).

Each artifact is computed under its folder's lock (:func:`computing`, an ``flock`` on ``<dir>/.lock``): two
processes that want the same artifact at once (the book's notebooks run side by side, two readers) compute it
once; the second waits and then loads it.

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
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
from safetensors.torch import save_file

from .errors import CorruptFileError

__all__ = ["canonical_json", "params_key", "cache_root", "artifact_dir", "computing", "seconds_by_kind",
           "atomic_write", "write_text", "save_tensors", "file_record", "check_file", "cached_table",
           "cached_json"]


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


def cache_root(root=None, start=None) -> Path:
    """``root`` if given, else ``$WRITESAE_CACHE``, else ``<repository root>/artifacts`` where the repository
    root is the nearest directory at or above ``start`` (default: the working directory) holding
    ``_toc.yml``, else ``./artifacts``."""
    if root or os.environ.get("WRITESAE_CACHE"):
        return Path(root or os.environ["WRITESAE_CACHE"])
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "_toc.yml").is_file():
            return d / "artifacts"
    return Path("artifacts")


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
        with open(tmp, "rb") as f:  # the bytes are on disk before the name points at them
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_record(path) -> dict:
    """``{"bytes": size, "sha256": hex digest}`` of a file, stored with it at write time (manifest, cfg.json)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": Path(path).stat().st_size, "sha256": h.hexdigest()}


_VERIFIED: set = set()  # (path, inode, size, mtime, sha256) of files already hashed in this process


def check_file(path, record: dict | None, fix: str) -> None:
    """Raise ``FileNotFoundError`` if ``path`` is missing, :class:`CorruptFileError` if its size or SHA-256
    differs from ``record`` (from :func:`file_record` at write time; no record: only existence is checked).
    ``fix`` ends both messages. A file is hashed once per process while its inode, size and mtime stay."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {fix}")
    if not record:
        return
    st = path.stat()
    if st.st_size != record["bytes"]:
        raise CorruptFileError(path, f"it has {st.st_size} bytes, {record['bytes']} were written (truncated or "
                                     "overwritten)", fix)
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, record["sha256"])
    if key not in _VERIFIED:
        if file_record(path)["sha256"] != record["sha256"]:
            raise CorruptFileError(path, "its SHA-256 differs from the one recorded when it was written", fix)
        _VERIFIED.add(key)


def write_text(path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def save_tensors(tensors: dict, path, metadata: dict | None = None) -> dict:
    """Write a safetensors file atomically; return its :func:`file_record`."""
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        record = file_record(tmp)
    return record


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
        write_text(pj, json.dumps(canon, indent=2, sort_keys=True) + "\n")
    return d


@contextlib.contextmanager
def computing(d, done: Callable[[], bool]) -> Iterator[bool]:
    """Compute artifact folder ``d``'s content once: yields whether the caller must compute it.

    ``with computing(d, lambda: path.exists()) as todo: if todo: compute and write`` checks ``done()``; if it
    is false, it takes the folder's lock, checks again and yields ``True`` to one process at a time; a
    process that finds the lock taken waits, then sees the finished files and gets ``False``. A computation
    that finishes records its seconds in ``d/seconds.json`` (``writesae book`` sums them by kind). The lock
    is an ``flock`` on ``d/.lock`` (released by the kernel when its holder dies: a killed run leaves no stale
    lock); where ``fcntl`` does not exist (Windows) there is no lock."""
    d = Path(d)
    if done():
        yield False
        return
    d.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        fcntl = None
    with open(d / ".lock", "a") as f:
        if fcntl:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if done():
                yield False
            else:
                t0 = time.perf_counter()
                yield True
                write_text(d / "seconds.json", json.dumps({"seconds": round(time.perf_counter() - t0, 2)}) + "\n")
        finally:
            if fcntl:
                fcntl.flock(f, fcntl.LOCK_UN)


def busy(d) -> bool:
    """Whether another process is computing artifact folder ``d`` right now (holds its :func:`computing` lock);
    False where there is no lock (Windows). For ordering work only: the answer may change at once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return False
    lock = Path(d) / ".lock"
    if not lock.exists():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def seconds_by_kind(root=None) -> dict[str, tuple[int, float]]:
    """{kind: (artifacts computed, seconds)} from the ``seconds.json`` that :func:`computing` leaves, most
    seconds first: where a build's compute time went, waits for other processes excluded."""
    out = {}
    for f in cache_root(root).glob("*/*/seconds.json"):
        n, sec = out.get(f.parent.parent.name, (0, 0.0))
        out[f.parent.parent.name] = (n + 1, sec + float(json.loads(f.read_text())["seconds"]))
    return dict(sorted(out.items(), key=lambda kv: -kv[1][1]))


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
    with computing(path.parent, path.exists) as todo:
        if todo:
            df = compute()
            if not isinstance(df, pd.DataFrame):
                raise TypeError(f"compute() returned {type(df).__name__}, not a DataFrame")
            if not (isinstance(df.index, pd.RangeIndex) and df.index.start == 0
                    and df.index.step == 1 and df.index.name is None):
                df = df.reset_index()
            with atomic_write(path) as tmp:
                df.to_csv(tmp, index=False)
    return _read_csv(path)


def parts_dir(kind: str, params: dict, root=None) -> Path:
    """Where a long computation cached as ``kind`` / ``params`` keeps its finished parts, so that an
    interrupted run resumes (e.g. ``substitute(..., resume=parts_dir(...))``)."""
    return artifact_dir(kind, params, root) / "parts"


def cached_json(kind: str, params: dict, compute: Callable[[], Any], root=None,
                name: str = "result.json") -> Any:
    """Like :func:`cached_table` for a JSON-serialisable result (numpy values allowed).

    Returns the value as read back from disk (tuples become lists, numpy
    scalars plain numbers), on the first call as on later ones.
    """
    path = artifact_dir(kind, params, root) / name
    with computing(path.parent, path.exists) as todo:
        if todo:
            write_text(path, json.dumps(compute(), indent=1, default=_default) + "\n")
    return json.loads(path.read_text())
