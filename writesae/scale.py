"""What a run costs at scale, by formula: disk for state datasets and SAEs, peak GPU memory, and GPU-hours
from measured rates. One implementation for ``benchmarks/bench_scale.py`` (which measures the rates on a
device and prints its projection through :func:`hours`) and ``writesae plan`` (which adds up a parameter
file's work).

Rates (:class:`Rates`, measured by ``python benchmarks/bench_scale.py --rates-out FILE`` on the GPU):
``extract_tokens_per_s`` (model tokens a state extraction pass runs), ``sae_samples_per_s`` (states an SAE of
``n_feat`` 2048 on 128 x 128 states trains on; other sizes scale with ``n_feat * d_k * d_v``, the matmuls'
size) and ``edited_tokens_per_s`` (tokens the edited runs of the substitution test recompute; a firing at
position t of a T-token window re-runs T - t tokens per condition).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["PAPER", "Rates", "state_bytes", "sae_bytes", "sae_samples", "hours", "peak_memory"]

# The paper's figures (PAPER.md) the projections are printed beside
PAPER = dict(passages=5000, window=1024, epochs=20, firings=4851, states_per_head=5_000_000,
             h100_hours_per_sae=6.0, h100_hours_total=180.0)
REFERENCE_SAE = 2048 * 128 * 128       # n_feat * d_k * d_v of the SAE whose rate bench_scale measures
STATE_FIELDS_BYTES = 8                 # a and b (float32) per state and cell
SHARED_BYTES = 24                      # token_ids, seq_ids, positions (int64) per sampled position
TRAIN_SHARE = 0.8                      # the SAE trains on 80% of the states (the paper's 80/20 split)


@dataclass(frozen=True)
class Rates:
    """Throughputs measured on one device (see the module docstring)."""

    device: str
    extract_tokens_per_s: float
    sae_samples_per_s: float
    edited_tokens_per_s: float

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "Rates":
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path} is not a rates file written by bench_scale.py --rates-out ({err})") from None


def state_bytes(n_windows, positions_per_seq, n_cells, d_k, d_v, dtype_bytes=2) -> int:
    """Bytes of a state dataset: per sampled position, each cell's state and write (``dtype_bytes`` each element,
    bf16 by default) and its two gates, plus the shared token, sequence and position ids."""
    per_position = n_cells * (2 * d_k * d_v * dtype_bytes + STATE_FIELDS_BYTES) + SHARED_BYTES
    return int(n_windows) * int(positions_per_seq) * per_position


def sae_bytes(n_params) -> int:
    """Bytes an SAE's training folder keeps: the best checkpoint and the last one with Adam's two moments,
    float32 (4 copies of the parameters)."""
    return 16 * int(n_params)


def sae_samples(n_windows, positions_per_seq, epochs) -> int:
    """States one SAE trains on over its epochs (the train share of the dataset, ``epochs`` times)."""
    return int(TRAIN_SHARE * n_windows * positions_per_seq * epochs)


def hours(rates: Rates, *, extract_tokens=0, sae_samples=0, sae_size=REFERENCE_SAE, edited_tokens=0) -> dict:
    """{extraction, training, substitution, total} hours of that work at ``rates`` (``sae_size``:
    ``n_feat * d_k * d_v`` of the SAEs trained)."""
    out = dict(extraction=extract_tokens / rates.extract_tokens_per_s / 3600,
               training=sae_samples * (sae_size / REFERENCE_SAE) / rates.sae_samples_per_s / 3600,
               substitution=edited_tokens / rates.edited_tokens_per_s / 3600)
    return dict(out, total=sum(out.values()))


def peak_memory(*, weight_bytes, hidden, intermediate, vocab, window, batch=16, n_feat=2048, d_k=128, d_v=128,
                sae_batch=256, logits_bytes=2 ** 30, act_bytes=2) -> dict:
    """Estimated peak GPU memory (bytes) of the three kinds of work, each on top of the model's weights:
    ``extraction`` (a batch of ``batch`` windows through one layer at a time: its hidden and MLP activations,
    a few copies), ``substitution`` (the float32 logits the measurement holds at once, ``logits_bytes``, and one
    window's unedited logits kept by the prefix) and ``sae`` (the SAE with its gradient and Adam's moments, and
    a batch's dense codes and states, float32). An estimate of the largest tensors alive, not a measurement:
    ``bench_scale.py`` measures it."""
    tokens = batch * window
    extraction = weight_bytes + 4 * tokens * (2 * hidden + intermediate) * act_bytes
    substitution = weight_bytes + logits_bytes + min(window * vocab * 4, logits_bytes)
    sae_params = 2 * n_feat * (d_k + d_v) + d_k * d_v
    sae = weight_bytes + 4 * 4 * sae_params + 4 * sae_batch * (3 * n_feat + 4 * d_k * d_v)
    return dict(extraction=extraction, substitution=substitution, sae=sae, peak=max(extraction, substitution, sae))
