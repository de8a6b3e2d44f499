"""The artifacts every section needs, cached by their parameters: host -> windows -> states -> SAE.

Each notebook calls these with its parameters; a second call (or another notebook with the same
parameters) loads what the first one built, and an interrupted build resumes.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from . import corpus as _corpus
from .cache import artifact_dir, atomic_write, busy, computing, write_text
from .extract import extract, token_windows
from .hosts import load_host
from .sae import SAEConfig, WriteSAE
from .train import train_sae


# Part of every SAE artifact's key: bump when training changes what a given set of parameters produces.
TRAINER_VERSION = 3  # 2: input scale c (SAE trains on (S - M) / c); 3: fused Adam, gradients through the selected
# entries for every rule, AuxK by columns (the same math, other rounding: trained weights differ in the last bits)


DTYPES = ("float32", "bfloat16", "float16")  # the model's weights; states, edits and SAEs stay float32


@functools.lru_cache(maxsize=4)
def host(model="embedded", device=None, dtype="float32", trust_remote_code=False):
    """The host for ``model`` (memoised per process), its weights in ``dtype`` (one of :data:`DTYPES`; the
    paper's GPU runs: bfloat16). The recurrence, its states and edits run in float32 whatever the dtype
    (:mod:`writesae.hosts.recurrent`). ``trust_remote_code``: the opt-in for a tokenizer shipped as code
    (RWKV-7-world's; :func:`writesae.hosts.load_host`)."""
    from transformers.utils import logging

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)} (the model's weights; float32 on a CPU, "
                         "bfloat16 on a GPU)")
    logging.disable_progress_bar()  # no weight-loading bars in the book's pages
    # nor transformers' note that a CPU runs its torch form of the fla / causal-conv kernels: the book's pages
    # run on the CPU on purpose, and the host says which kernels it runs (its kernel lane)
    logging.get_logger("transformers.integrations.hub_kernels").setLevel(logging.ERROR)
    return load_host(model, device=device, dtype=getattr(torch, dtype), trust_remote_code=bool(trust_remote_code))


def weights_dtype(h) -> str:
    """The dtype of ``h``'s weights, as a name of :data:`DTYPES`."""
    return str(next(h.model.parameters()).dtype).removeprefix("torch.")


def windows(h, text="train", window=128, n_windows=None, seed=0, corpus=_corpus.EMBEDDED):
    """(N, window) token windows of split ``text`` (``"train"`` or ``"heldout"``) of ``corpus``
    (:mod:`writesae.corpus`; default the shipped text); for a tokenizer-less tiny model, seeded random tokens.
    An existing ``.txt`` file as ``text`` is one text cut whole into windows (no split), as the shipped text is."""
    if h.tokenizer is None:
        if corpus != _corpus.EMBEDDED:
            raise ValueError(f"{h.name} has no tokenizer: it reads seeded random tokens, not corpus {corpus!r}; "
                             "leave corpus='embedded'")
        g = torch.Generator().manual_seed(seed + (1 if text == "heldout" else 0))
        return torch.randint(0, h.vocab_size, (64 if n_windows is None else n_windows, window), generator=g)
    if text not in _corpus.SPLITS:
        if not (Path(text).suffix == ".txt" and Path(text).is_file()):
            raise FileNotFoundError(f"text {text!r} is neither 'train' / 'heldout' (the corpus's splits) nor an "
                                    "existing .txt file; pass one of those")
        return token_windows(h.tokenizer, Path(text).read_text(), window, n_windows)
    return _corpus.windows(h.tokenizer, corpus, text, window, n_windows, seed)


def run_key(h, corpus=_corpus.EMBEDDED) -> dict:
    """What decides the artifacts of a host's passages besides the model's name and the sizes: the dtype of its
    weights and the corpus, each named only when it is not the default (float32, the shipped text), so the keys
    of the embedded book's artifacts stay as they were."""
    dt = weights_dtype(h)
    return {**({} if dt == "float32" else {"model_dtype": dt}),
            **({} if corpus == _corpus.EMBEDDED else {"corpus": str(corpus)})}


def states(h, cells, *, text="train", window=128, n_windows=256, positions_per_seq=32, seed=0,
           corpus=_corpus.EMBEDDED, model_dtype=None, root=None, progress=True):
    """Directory of the state dataset for ``cells`` (extracted once, then loaded) from ``n_windows`` windows of
    split ``text`` of ``corpus``. ``model_dtype`` (from a :func:`data_spec`) must be the host's."""
    if model_dtype is not None and model_dtype != weights_dtype(h):
        raise ValueError(f"this state-dataset spec is for a {model_dtype} model, {h.name} is {weights_dtype(h)}: "
                         "build the spec with data_spec on this host")
    cells = [[int(l), int(hd)] for l, hd in cells]
    params = dict(model=h.name, cells=cells, text=text, window=window, n_windows=n_windows,
                  positions_per_seq=positions_per_seq, seed=seed, **run_key(h, corpus))
    d = artifact_dir("states", params, root)
    with computing(d, (d / "mean.safetensors").exists) as todo:
        if todo:
            ids = windows(h, text, window, n_windows, seed, corpus)
            source = text if corpus == _corpus.EMBEDDED else f"{text} of {corpus}"
            extract(h, ids, cells, d, positions_per_seq=positions_per_seq, seed=seed, source=source, progress=progress)
    return d


def _sae_key(h, cell, *, variant="bilinear", n_feat=2048, k=32, activation="topk", rank=1, epochs=20,
             batch_size=256, lr=3e-4, warmup=50, seed=0, data=None, root=None, progress=True, **options):
    """(cache folder, states folder, training arguments) of :func:`sae`'s SAE; extracts the states if missing."""
    bad = sorted(set(options) - set(SAEConfig.__dataclass_fields__))
    if bad:
        raise ValueError(f"unknown SAE option(s) {bad}: use fields of writesae.sae.SAEConfig")
    layer, head = h.cell(*cell)[:2]
    data = dict(data or {})
    d_states = states(h, data.pop("cells", [[layer, head]]), root=root, progress=progress, **data)
    params = dict(trainer=TRAINER_VERSION, model=h.name, cell=[layer, head], variant=variant, n_feat=n_feat, k=k, activation=activation,
                  rank=rank, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, states=d_states.name,
                  **({} if warmup == 50 else {"warmup": warmup}), **options)
    cfg = dict(variant=variant, d_k=h.d_k, d_v=h.d_v, n_feat=n_feat, k=k, activation=activation, rank=rank, **options)
    return artifact_dir("sae", params, root), d_states, dict(cell=(layer, head), cfg=cfg, epochs=epochs,
                                                            batch_size=batch_size, lr=lr, warmup=warmup, seed=seed,
                                                            progress=progress)


def sae(h, cell, **kw):
    """The best checkpoint of an SAE on ``cell`` trained on ``data`` (a dict of :func:`states` kwargs).
    Keywords: variant, n_feat, k, activation, rank, epochs, batch_size, lr, warmup (learning-rate warm-up steps;
    in the key only when not 50), seed, data, root, progress; further
    :class:`SAEConfig` fields (e.g. JumpReLU's ``l0_coeff``, ``jumprelu_init_threshold``) are part of the cache
    key only when given.

    Training metrics (validation MSE, FVU, L0, alive/dead) are in ``sae.info["metrics"]``."""
    return _trained(h, *_sae_key(h, cell, **kw))


def _trained(h, d, d_states, a, load=True):
    """The SAE of cache folder ``d`` (from :func:`_sae_key`), trained first unless it is there; trained and loaded
    on the host's device (the SAE is float32 whatever the model's dtype). ``load=False``: trained only (None)."""
    best = d / "best"
    with computing(d, lambda: (best / "cfg.json").exists() and (d / "done").exists()) as todo:
        if todo:
            train_sae(d_states, a["cell"], SAEConfig(**a["cfg"]), d, epochs=a["epochs"], batch_size=a["batch_size"],
                      lr=a["lr"], warmup=a["warmup"], seed=a["seed"], progress=a["progress"], device=h.device)
            write_text(d / "done", "ok\n")
    if not load:
        return None
    return WriteSAE.load(best, expect_cell=a["cell"], expect_dims=(h.d_k, h.d_v), device=h.device)


def savefig(fig, name, root=None, dpi=None):
    """Save a figure as ``<cache root>/figures/<name>`` (PNG) too, next to the other artifacts, at ``dpi``
    (default: the figure's own, :data:`writesae.plots.DPI`, as the page shows it); returns None, so a notebook
    cell ending with it shows nothing extra."""
    from .cache import cache_root

    path = cache_root(root) / "figures" / name
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=dpi or "figure", bbox_inches="tight", format="png")


def data_spec(h, cells, *, heads_layer=None, window=128, n_windows=256, positions_per_seq=32, seed=0,
              corpus=_corpus.EMBEDDED):
    """The state-dataset parameters every section shares: ``cells`` plus, if given, every head of
    ``heads_layer`` (for the all-heads test), extracted once into one dataset, the model's dtype and the corpus
    (:func:`run_key`): every table keyed by the spec is keyed by them too."""
    want = {(int(l), int(hd)) for l, hd in cells}
    if heads_layer is not None:
        want |= {(int(heads_layer), hd) for hd in range(h.n_heads)}
    return dict(cells=[list(c) for c in sorted(want)], window=window, n_windows=n_windows,
                positions_per_seq=positions_per_seq, seed=seed, **run_key(h, corpus))


def saes(h, cells, data, **kw):
    """{(layer, head): SAE} for ``cells`` (in their order), each trained (once) on the dataset ``data`` (see
    :func:`sae`), in the order of :func:`sae_list`."""
    cells = [tuple(int(x) for x in h.cell(*c)[:2]) for c in cells]
    return dict(zip(cells, sae_list(h, [dict(kw, cell=c, data=data) for c in cells])))


def sae_list(h, specs):
    """[SAE] for ``specs`` (dicts of :func:`sae`'s keywords, ``cell`` included), in their order, each trained once.
    One that another process is training right now (a notebook beside this one in ``writesae book``) is taken
    last: this process trains the others meanwhile instead of waiting for it."""
    keys, order = _keys_in_order(h, specs)
    got = {i: _trained(h, *keys[i]) for i in order}
    return [got[i] for i in range(len(keys))]


def sae_iter(h, specs):
    """:func:`sae_list`'s SAEs one at a time: every one trained first (in that order, none loaded), then each
    loaded as the caller takes it, so that one is held at a time (a FlatSAE of GLA-1.3B's 256 x 512 heads is 2 GB;
    a list of them killed the rehearsal's chapter 07 for memory)."""
    keys, order = _keys_in_order(h, specs)
    for i in order:
        _trained(h, *keys[i], load=False)
    for key in keys:
        yield _trained(h, *key)


def _keys_in_order(h, specs):
    """The cache keys of ``specs`` and the order to train them in: one another process is training now, last."""
    keys = [_sae_key(h, s["cell"], **{k: v for k, v in s.items() if k != "cell"}) for s in specs]
    return keys, sorted(range(len(keys)), key=lambda i: busy(keys[i][0]))
