"""The passages a run reads: its corpus, cut into token windows and split into train and held-out passages.

``corpus`` (the parameter of every section, the sweep and ``writesae extract --corpus``) is one of

``"embedded"``
    the text shipped with the embedded model (``train.txt`` for state datasets, ``heldout.txt`` for
    measurements), tokenised whole and cut into consecutive windows: the default.
a file or a folder
    ``.txt`` (continuous text), ``.jsonl`` (one JSON object per line) or ``.parquet`` (a column per field), or
    a folder holding such files (every one below it, in sorted path order); a ``save_to_disk`` directory of
    the ``datasets`` library (a ``Dataset``, or a ``DatasetDict`` of which ``split`` is read).
a Hugging Face dataset name
    e.g. ``"Skylion007/openwebtext"``, read with ``datasets``: streamed from the hub on a machine with network,
    from the local datasets cache when ``HF_HUB_OFFLINE=1`` (memory-mapped, nothing loaded whole).

Options follow a ``?``, as in a URL: ``field`` (the text field of a record; default ``text``), ``split`` (the
dataset split to read; default ``train``) and ``config`` (a hub dataset's configuration), e.g.
``"data/news.jsonl?field=body"`` or ``"wikitext?config=wikitext-103-raw-v1"``.

Every corpus but the embedded one is read as a stream in a fixed order (files in sorted order, records in
file order; a ``.txt`` file in blocks of lines), each record tokenised without special tokens and followed by
the tokenizer's end-of-text token (when it has one), the tokens cut into consecutive windows of ``window``
tokens, and window ``i`` made a held-out passage when a hash of ``(seed, i)`` falls below
:data:`HELDOUT_SHARE`: the split is fixed by the seed and does not depend on how many windows are asked
for. Reading stops once enough windows are found; asking for more windows than the corpus holds is an
error naming both numbers.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from urllib.parse import parse_qsl, urlparse

import torch

__all__ = ["EMBEDDED", "HELDOUT_SHARE", "SPLITS", "parse", "describe", "windows", "count"]

EMBEDDED = "embedded"
HELDOUT_SHARE = 0.1                      # share of a corpus's windows that are held-out passages
SPLITS = ("train", "heldout")
SUFFIXES = (".txt", ".jsonl", ".parquet")
OPTIONS = ("field", "split", "config")
_BATCH = 64                              # records tokenised per tokenizer call
_TXT_BLOCK = 1 << 16                     # characters of a .txt file tokenised per call (cut at a line end)


def parse(corpus) -> tuple[str, dict]:
    """``(source, options)`` of a corpus spec (see the module docstring); unknown options are an error."""
    if not isinstance(corpus, (str, os.PathLike)) or not str(corpus).strip():
        raise ValueError(f"corpus {corpus!r}: give 'embedded', a .txt/.jsonl/.parquet file or folder, a "
                         "save_to_disk directory or a Hugging Face dataset name")
    source, _, query = str(corpus).partition("?")
    opts = dict(parse_qsl(query, keep_blank_values=True))
    if bad := sorted(set(opts) - set(OPTIONS)):
        raise ValueError(f"corpus {corpus!r}: unknown option {', '.join(bad)}; options: {', '.join(OPTIONS)} "
                         "(e.g. 'data/news.jsonl?field=body')")
    return source, {"field": "text", "split": "train", **opts}


def kind(corpus) -> str:
    """``"embedded"``, ``"files"``, ``"disk"`` (a save_to_disk directory) or ``"hub"``; a path that does not
    exist, or a folder without readable files, is a FileNotFoundError naming what is accepted."""
    source, _ = parse(corpus)
    if source == EMBEDDED:
        return "embedded"
    p = Path(source).expanduser()
    if p.is_dir():
        if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return "disk"
        if not _files(p):
            raise FileNotFoundError(f"corpus folder {source} holds no {'/'.join(SUFFIXES)} file and is not a "
                                    "datasets save_to_disk directory")
        return "files"
    if p.is_file():
        if p.suffix not in SUFFIXES:
            raise ValueError(f"corpus file {source}: read are {', '.join(SUFFIXES)} files (or a folder of them)")
        return "files"
    if source.startswith((".", "/", "~")) or p.suffix in SUFFIXES or source.count("/") > 1:
        raise FileNotFoundError(f"corpus {source!r} does not exist: give 'embedded', an existing file or folder, "
                                "or a Hugging Face dataset name")
    return "hub"


def describe(corpus) -> str:
    """One line saying what ``corpus`` is (for ``writesae plan`` and the pages)."""
    source, opts = parse(corpus)
    k = kind(corpus)
    if k == "embedded":
        return "the text shipped with the embedded model"
    if k == "files":
        p = Path(source).expanduser()
        files = _files(p) if p.is_dir() else [p]
        size = sum(f.stat().st_size for f in files)
        return f"{len(files)} file{'s' * (len(files) != 1)} ({size / 2 ** 20:,.1f} MiB) in {source}, field {opts['field']!r}"
    if k == "disk":
        return f"the datasets directory {source} (split {opts['split']!r}, field {opts['field']!r})"
    return f"the Hugging Face dataset {source!r} (split {opts['split']!r}, field {opts['field']!r})"


def _files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.suffix in SUFFIXES and f.is_file())


# ------------------------------------------------------------------------------------------ records
def _records(corpus):
    """``(text, ends_record)`` of the corpus in its fixed order: one per record (a ``.txt`` file: its blocks of
    lines, the last one ending the file's record)."""
    source, opts = parse(corpus)
    k = kind(corpus)
    if k == "files":
        p = Path(source).expanduser()
        for f in (_files(p) if p.is_dir() else [p]):
            if f.suffix == ".txt":
                yield from _txt(f)
            else:
                yield from ((t, True) for t in {".jsonl": _jsonl, ".parquet": _parquet}[f.suffix](f, opts["field"]))
    elif k in ("disk", "hub"):
        yield from ((t, True) for t in _dataset(source, opts, k))


def _txt(path):
    """A .txt file as continuous text: ``(block, is_last)`` in blocks of about ``_TXT_BLOCK`` characters cut at
    line ends."""
    block, size, last = [], 0, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            block.append(line)
            size += len(line)
            if size >= _TXT_BLOCK:
                if last is not None:
                    yield last, False
                last, block, size = "".join(block), [], 0
    if block:
        if last is not None:
            yield last, False
        last = "".join(block)
    if last is not None:
        yield last, True


def _field(path, where, record, field):
    if not isinstance(record, dict) or field not in record:
        have = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"corpus {path} {where} has no text field {field!r} (it has {have}): name the field, "
                         f"e.g. corpus='{path}?field=<name>'")
    if not isinstance(record[field], str):
        raise ValueError(f"corpus {path} {where}: field {field!r} is {type(record[field]).__name__}, not text")
    return record[field]


def _jsonl(path, field):
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise ValueError(f"corpus {path} line {i} is not JSON ({err})") from None
                yield _field(path, f"line {i}", record, field)


def _parquet(path, field):
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    if field not in f.schema_arrow.names:
        raise ValueError(f"corpus {path} has no text column {field!r} (it has {f.schema_arrow.names}): name the "
                         f"field, e.g. corpus='{path}?field=<name>'")
    for batch in f.iter_batches(columns=[field], batch_size=_BATCH):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _dataset(source, opts, k):
    """Records of a save_to_disk directory (memory-mapped) or a hub dataset (streamed, or from the local
    datasets cache when offline)."""
    try:
        import datasets
    except ImportError:
        raise ImportError("a datasets corpus needs the `datasets` package: pip install datasets") from None
    if k == "disk":
        ds = datasets.load_from_disk(str(Path(source).expanduser()))
        if isinstance(ds, datasets.DatasetDict):
            if opts["split"] not in ds:
                raise ValueError(f"corpus {source} has splits {list(ds)}, not {opts['split']!r}: add ?split=<name>")
            ds = ds[opts["split"]]
    else:
        offline = datasets.config.HF_HUB_OFFLINE
        fetch = (f"on a machine with network run `python -c \"import datasets; datasets.load_dataset('{source}', "
                 f"split='{opts['split']}').save_to_disk('DIR')\"`, copy DIR here and pass corpus=DIR")
        if not offline and (host := _unresolvable_hub()):  # else the hub client retries for 23 s before failing
            raise FileNotFoundError(f"corpus {source!r}: the hub ({host}) cannot be reached from here: if the dataset "
                                    f"is in the local datasets cache, set HF_HUB_OFFLINE=1; else {fetch}")
        try:
            ds = datasets.load_dataset(source, opts.get("config"), split=opts["split"], streaming=not offline)
        except (ConnectionError, FileNotFoundError, OSError, ValueError) as err:
            raise FileNotFoundError(
                f"corpus {source!r} is not in the local datasets cache{' (HF_HUB_OFFLINE=1)' if offline else ''} and "
                f"the hub cannot be reached ({type(err).__name__}): {fetch}") from None
    if opts["field"] not in (ds.column_names or [opts["field"]]):
        raise ValueError(f"corpus {source} has no text field {opts['field']!r} (it has {ds.column_names}): add "
                         "?field=<name>")
    for batch in ds.select_columns([opts["field"]]).iter(batch_size=_BATCH):
        yield from (t for t in batch[opts["field"]] if t is not None)


def _unresolvable_hub() -> str | None:
    """The hub's host name when it does not resolve and no proxy is set (no way to reach it), else None."""
    import socket
    from urllib.request import getproxies

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    if not host or getproxies():
        return None
    try:
        socket.getaddrinfo(host, 443)
    except socket.gaierror:
        return host
    return None


# ------------------------------------------------------------------------------------------ windows
def heldout(seed, i) -> bool:
    """Whether window ``i`` of a (non-embedded) corpus is a held-out passage under ``seed``."""
    h = hashlib.blake2b(f"{int(seed)}:{int(i)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < HELDOUT_SHARE * 2 ** 64


def _stream(tokenizer, corpus, window, seed):
    """(split, window of token ids) for every window of the corpus, in order."""
    if kind(corpus) == "embedded":
        from .extract import embedded_text, token_windows

        for split in SPLITS:
            for w in token_windows(tokenizer, embedded_text(split), window):
                yield split, w
        return
    sep = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    buf, i, batch = [], 0, []

    def flush(batch):
        nonlocal buf, i
        ids = tokenizer([t for t, _ in batch], add_special_tokens=False, verbose=False)["input_ids"]
        for t, (_, ends) in zip(ids, batch):
            buf.extend(t)
            if ends:
                buf.extend(sep)
        n = len(buf) // window
        for j in range(n):
            yield ("heldout" if heldout(seed, i) else "train"), torch.tensor(buf[j * window:(j + 1) * window])
            i += 1
        buf = buf[n * window:]

    for rec in _records(corpus):
        batch.append(rec)
        if len(batch) == _BATCH:
            yield from flush(batch)
            batch = []
    if batch:
        yield from flush(batch)


def windows(tokenizer, corpus=EMBEDDED, split="train", window=128, n_windows=None, seed=0) -> torch.Tensor:
    """``(n_windows, window)`` token ids of ``split`` (``"train"`` or ``"heldout"``) of ``corpus``, in corpus
    order (``n_windows=None``: every one). More than the corpus holds is a ValueError naming both numbers."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: use 'train' or 'heldout'")
    if n_windows is not None and n_windows < 1:
        raise ValueError(f"n_windows={n_windows} must be >= 1 (or None for every window of the corpus)")
    if kind(corpus) == "embedded":
        from .extract import embedded_text, token_windows

        return token_windows(tokenizer, embedded_text(split), window, n_windows)
    out = []
    for s, w in _stream(tokenizer, corpus, window, seed):
        if s == split:
            out.append(w)
            if len(out) == n_windows:
                break
    if not out or n_windows is not None and len(out) < n_windows:
        raise ValueError(f"corpus {corpus!r} holds {len(out):,} {split} windows of {window} tokens (seed {seed}), "
                         f"{f'{n_windows:,}' if n_windows is not None else 'at least one'} asked for: lower the count or "
                         "give a larger corpus")
    return torch.stack(out)


def count(tokenizer, corpus, window, seed=0, need=None) -> dict:
    """``{"train": n, "heldout": m}`` windows of ``corpus``; with ``need`` (the same dict of counts) reading
    stops once both are reached, and the counts say at least that many."""
    n = dict.fromkeys(SPLITS, 0)
    for s, _ in _stream(tokenizer, corpus, window, seed):
        n[s] += 1
        if need and all(n[k] >= need.get(k, 0) for k in SPLITS):
            break
    return n
