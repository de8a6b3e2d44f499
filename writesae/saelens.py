"""SAELens's on-disk format: export an SAE as an SAELens ``topk`` SAE, import one as a FlatSAE.

An SAELens directory holds ``sae_weights.safetensors`` (``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae,),
``W_dec`` (d_sae, d_in), ``b_dec`` (d_in,)) and ``cfg.json`` (``architecture``, ``d_in``, ``d_sae``, ``k``,
``apply_b_dec_to_input``, ``normalize_activations``, ``metadata``, ...), as written by SAELens 6's
``SAE.save_model`` and read by ``SAE.load_from_disk``. Its TopK SAE computes, for an input ``x`` (d_in,)::

    acts = TopK-ReLU((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc);  x_hat = acts @ W_dec + b_dec

A state ``S`` (d_k, d_v) is the input ``x = vec(S)``, flattened row-major (``S.reshape(-1)``). A WriteSAE
works on ``(S - M) / c`` (mean state M, input scale c); the export folds both into the biases (with
``apply_b_dec_to_input = False``) so SAELens, given ``vec(S)``, picks the same atoms with the same
coefficients (in state units) and returns ``vec(S_hat)``. Any TopK variant exports: a bilinear or rank-r
encoder and a rank-1 decoder are written out as their dense (d_in-wide) matrices, so what comes back
from :func:`import_saelens` is a ``flat`` WriteSAE computing the same function (for the ``flat`` variant
the same weights, with M and c folded into the biases).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .cache import save_tensors, write_text
from .errors import CorruptFileError
from .sae import SAEConfig, WriteSAE

__all__ = ["export_saelens", "import_saelens", "is_saelens_dir", "WEIGHTS_FILE", "CFG_FILE"]

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
FORMAT_VERSION = "6.0.0"
"""Written as ``metadata.sae_lens_version``: the SAELens release whose format this is (6.x; older files
lack the field and are read by SAELens as a pre-6.0 layout)."""


def is_saelens_dir(path) -> bool:
    """True when ``path`` looks like an SAELens SAE directory (``sae_weights.safetensors`` inside)."""
    return (Path(path) / WEIGHTS_FILE).exists()


@torch.no_grad()
def _dense(sae: WriteSAE) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder (n, d_in), decoder (n, d_in)) of any variant as dense matrices acting on vec(X)."""
    n = sae.cfg.n_feat
    if sae.W_enc is not None:
        enc = sae.W_enc
    else:
        V, W = sae._enc_factors()  # (n, r, d_k), (n, r, d_v): encoder atom sum_r v_r w_r^T
        enc = (V.mT @ W).reshape(n, -1)
    return enc.detach().float(), sae.atoms().reshape(n, -1).detach().float()


@torch.no_grad()
def export_saelens(sae: WriteSAE, path, *, model_name=None, hook_name=None) -> Path:
    """Write ``sae`` into directory ``path`` in SAELens's format (``sae_weights.safetensors`` +
    ``cfg.json``, architecture ``topk``; see the module docstring). Returns ``path``.

    ``model_name`` / ``hook_name`` go into ``cfg.json``'s metadata (defaults: the SAE's host model, and
    ``"L<l>H<h>.state"`` for its cell); the WriteSAE config, cell and metrics ride along under
    ``metadata.writesae``. Only TopK SAEs export (SAELens's ``topk`` architecture has no BatchTopK
    threshold or JumpReLU thresholds in this form)."""
    cfg = sae.cfg
    if cfg.activation != "topk":
        raise ValueError(f"only TopK SAEs export to SAELens's topk format; this one uses {cfg.activation!r}: "
                         "train it with activation='topk'")
    enc, dec = _dense(sae)
    c, m = float(sae.scale), sae.mean.detach().float().reshape(-1)
    b_enc = sae.b_enc.detach().float() if sae.b_enc is not None else torch.zeros(cfg.n_feat)
    b_dec = sae.b_dec.detach().float().reshape(-1) if sae.b_dec is not None else torch.zeros(cfg.d_in)
    tensors = {
        "W_enc": enc.T.contiguous(),  # (d_in, d_sae)
        "b_enc": (c * b_enc - enc @ m).contiguous(),  # c * pre((S - M) / c) = vec(S) @ W_enc + b_enc
        "W_dec": dec.contiguous(),  # (d_sae, d_in)
        "b_dec": (c * b_dec + m).contiguous(),  # S_hat = M + c b_dec + sum_i (c a_i) A_i
    }
    path = Path(path)
    save_tensors({k: t.cpu() for k, t in tensors.items()}, path / WEIGHTS_FILE)
    cell = sae.info.get("cell")
    doc = {
        "architecture": "topk", "d_in": cfg.d_in, "d_sae": cfg.n_feat, "k": cfg.k, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "sae_lens_version": FORMAT_VERSION, "sae_lens_training_version": None,
            "model_name": model_name or sae.info.get("model"),
            "hook_name": hook_name or (f"{cell}.state" if cell else None),
            "writesae": {"d_k": cfg.d_k, "d_v": cfg.d_v, "variant": cfg.variant, "rank": cfg.rank,
                         "cell": cell, "model": sae.info.get("model"), "metrics": sae.info.get("metrics"),
                         "layout": "x = vec(S), S (d_k, d_v) flattened row-major"},
        },
    }  # fmt: skip
    write_text(path / CFG_FILE, json.dumps(doc, indent=1, default=str))
    return path


@torch.no_grad()
def import_saelens(path, d_k: int | None = None, d_v: int | None = None, device="cpu") -> WriteSAE:
    """Load an SAELens SAE directory (``sae_weights.safetensors`` + ``cfg.json``, architecture ``topk``) as a
    ``flat`` WriteSAE on (d_k, d_v) states (``d_in = d_k d_v``, inputs flattened row-major). ``d_k``, ``d_v``
    default to the shape recorded by :func:`export_saelens`, else a square state. SAELens's ``b_dec``
    subtraction (``apply_b_dec_to_input``) and decoder-norm rescaling are folded into the weights; the result
    has mean state M = 0 and input scale c = 1 and computes what SAELens computes."""
    path = Path(path)
    if not is_saelens_dir(path):
        raise FileNotFoundError(f"{path} has no {WEIGHTS_FILE}: it is not an SAELens SAE directory"
                                + (" (it is a WriteSAE directory: load it with WriteSAE.load)"
                                   if (path / "sae.safetensors").exists() else ""))
    fix = "export it again (SAELens: sae.save_model(path); writesae: export_saelens)"
    try:
        doc = json.loads((path / CFG_FILE).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} has {WEIGHTS_FILE} but no {CFG_FILE}: {fix}") from None
    except ValueError as err:
        raise CorruptFileError(path / CFG_FILE, f"it is not valid JSON ({err})", fix) from None
    arch = doc.get("architecture", "standard")
    if arch != "topk":
        raise ValueError(f"{path} holds an SAELens {arch!r} SAE; only 'topk' SAEs import (a WriteSAE is TopK)")
    if doc.get("normalize_activations", "none") != "none":
        raise ValueError(f"{path}: normalize_activations={doc['normalize_activations']!r} is not supported; fold the "
                         "normalisation into the weights in SAELens first (or export with 'none')")
    try:
        t = {k: v.float() for k, v in load_file(str(path / WEIGHTS_FILE), device=str(device)).items()}
    except SafetensorError as err:
        raise CorruptFileError(path / WEIGHTS_FILE, f"it is not a safetensors file ({err})", fix) from None
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in t]
    if missing:
        raise CorruptFileError(path / WEIGHTS_FILE, f"it lacks {missing} (has {sorted(t)})", fix)
    W_enc, b_enc, W_dec, b_dec = t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"]
    d_in, n = W_enc.shape
    if W_dec.shape != (n, d_in) or b_enc.shape != (n,) or b_dec.shape != (d_in,):
        raise CorruptFileError(path / WEIGHTS_FILE, f"shapes W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)}, "
                               f"W_dec {tuple(W_dec.shape)}, b_dec {tuple(b_dec.shape)} do not fit SAELens's layout "
                               "(W_enc (d_in, d_sae), W_dec (d_sae, d_in))", fix)
    meta = (doc.get("metadata") or {}).get("writesae") or {}
    d_k, d_v = d_k or meta.get("d_k"), d_v or meta.get("d_v")
    if d_k is None and d_v is None and math.isqrt(d_in) ** 2 == d_in:
        d_k = d_v = math.isqrt(d_in)
    elif d_k is None and d_v:
        d_k = d_in // d_v
    elif d_v is None and d_k:
        d_v = d_in // d_k
    if d_k is None or d_v is None or d_k * d_v != d_in:
        raise ValueError(f"{path}: d_in = {d_in} is not d_k x d_v = {d_k} x {d_v}; pass the state shape: "
                         "import_saelens(path, d_k=..., d_v=...)")
    if doc.get("apply_b_dec_to_input", True):  # (x - b_dec) @ W_enc + b_enc
        b_enc = b_enc - b_dec @ W_enc
    if doc.get("rescale_acts_by_decoder_norm", False):  # pre * |W_dec_i| picks, acts / |W_dec_i| decode
        norm = W_dec.norm(dim=-1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * norm, b_enc * norm, W_dec / norm[:, None]
    k = int(doc.get("k", 32))
    sae = WriteSAE(SAEConfig("flat", int(d_k), int(d_v), n_feat=int(n), k=min(k, int(n))), device=device)
    sae.W_enc.copy_(W_enc.T)
    sae.W_dec.copy_(W_dec)
    sae.b_enc.copy_(b_enc)
    sae.b_dec.copy_(b_dec.reshape(d_k, d_v))
    sae.info = {key: meta[key] for key in ("cell", "model", "metrics") if meta.get(key) is not None}
    sae.info["imported_from"] = {"format": "saelens", "path": str(path), "architecture": arch,
                                 "model_name": (doc.get("metadata") or {}).get("model_name"),
                                 "hook_name": (doc.get("metadata") or {}).get("hook_name")}
    sae.path = path
    return sae
