"""Training loop for WriteSAE (PAPER.md §2 defaults), resumable, no pickles.

``train_sae`` trains on one cell of a state dataset directory; ``train_on_tensors`` on an
in-memory (N, d_k, d_v) tensor; both run ``fit``. Output directory::

    out_dir/best/   sae.safetensors + cfg.json + fire_rates.safetensors   (best validation MSE)
    out_dir/last/   model.safetensors + optim.safetensors + state.json     (resume point)
    out_dir/metrics.json                                                   (final metrics)
    out_dir/train_log.jsonl   training curves: one JSON row per ``log_every`` steps (split "train":
                              loss, mse, fvu, l0, dead fraction, lr) and per validation (split "val")

Calling again with the same ``out_dir`` and parameters resumes from ``last/`` and ends with
the same weights as an uninterrupted run: batch order, resampling draws and the initialisation
are all derived from ``seed``, and the optimizer, dead-atom counters and RNG are checkpointed.
``best/`` and ``last/`` are replaced whole (written beside, then renamed); ``last/state.json``
records the size and SHA-256 of its tensor files, checked before resuming.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .cache import check_file, save_tensors, write_text
from .data import StateDataset, TensorStates, parse_cell
from .errors import CorruptFileError
from .sae import SAEConfig, WriteSAE

__all__ = ["TrainResult", "train_sae", "train_on_tensors", "fit", "evaluate_sae", "lr_at", "read_log"]

LOG_FILE = "train_log.jsonl"
STATS_SAMPLE = 16384
"""At most this many training states (a seeded sample) set the mean state M and the input scale c."""
VAL_SAMPLE = 8192
"""Periodic validation (picking the best checkpoint) reads at most this many validation states (a fixed
seeded sample); the final metrics are over the whole validation split."""
IN_MEMORY_BYTES = 1 << 30
"""``train_sae`` reads a cell's states into memory (float32) when both splits fit in this many bytes (the
book's datasets: ~64 MiB); larger ones stream from the shards batch by batch. Same batches either way."""
TIMING_KEYS = ("seconds", "steps_per_s", "samples_per_s")
"""Throughput entries of the result metrics (they vary from run to run; everything else is reproducible)."""


@dataclass
class TrainResult:
    sae: WriteSAE
    """The best SAE (lowest validation MSE; the last one without a validation split)."""
    metrics: dict
    """evaluate_sae of that SAE on the validation split (JSON-able: no fire_rates), plus
    best_step, steps, dead_train (atoms inactive >= dead_after steps at the end of training)."""
    fire_rates: np.ndarray
    """(n_feat,) fraction of validation states on which each atom fires."""
    step: int
    """Optimizer steps done so far."""
    best_step: int
    finished: bool
    """False when stopped early by ``max_steps`` (call again to resume)."""
    out_dir: Path | None
    log: list = field(default_factory=list)
    """The training curves: the rows of ``out_dir/train_log.jsonl`` (see :func:`read_log`)."""


def lr_at(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@torch.no_grad()
def centred_rms(dataset, mean, batch_size: int = 4096) -> float:
    """sqrt(mean((S - M)^2)) over a dataset: the SAE's input scale."""
    acc, n = 0.0, 0
    for x in dataset.iter_batches(batch_size, shuffle=False):
        acc += float((x.float() - mean.cpu()).double().pow(2).sum())
        n += x.numel()
    return (acc / max(n, 1)) ** 0.5 or 1.0


class _Sample:
    """A fixed subset of a dataset's rows (seeded, in stored order), read like the dataset itself."""

    def __init__(self, dataset, n: int, seed: int):
        self.dataset, self.cell = dataset, getattr(dataset, "cell", None)
        self.d_k, self.d_v = dataset.d_k, dataset.d_v
        self.idx = np.sort(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False))

    def __len__(self) -> int:
        return len(self.idx)

    def iter_batches(self, batch_size, shuffle=False, **_):
        for i in range(0, len(self.idx), batch_size):
            yield self.dataset.states(self.idx[i:i + batch_size])


def _sampled(dataset, cap: int | None, seed: int):
    """``dataset`` itself when it holds at most ``cap`` states (or cap is None), else a seeded sample of cap."""
    return dataset if cap is None or len(dataset) <= cap else _Sample(dataset, cap, seed)


@torch.no_grad()
def _stats(dataset, batch_size: int = 4096) -> tuple[torch.Tensor, float]:
    """(mean state M (float32), input scale c = sqrt(mean((S - M)^2))) in one streamed pass, float64 sums.
    M equals ``compute_mean`` of the same states; c equals :func:`centred_rms` up to float64 rounding."""
    s1 = torch.zeros(dataset.d_k, dataset.d_v, dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    n = 0
    for x in dataset.iter_batches(batch_size, shuffle=False):
        s1 += x.sum(0, dtype=torch.float64)
        s2 += x.square().sum(0, dtype=torch.float64)
        n += len(x)
    n = max(n, 1)
    mean = (s1 / n).float()
    m = mean.double()
    var = float((s2 - 2 * m * s1 + n * m.pow(2)).sum()) / (n * m.numel())
    return mean, max(var, 0.0) ** 0.5 or 1.0


def read_log(out_dir) -> list[dict]:
    """The training curves of a run: the rows of ``out_dir/train_log.jsonl`` (``[]`` when there is none).
    Each row has ``step`` and ``split``: "train" rows (every ``log_every`` steps, on that step's batch: loss
    (the training objective, in units of the scaled input), mse (state units), fvu, l0, dead = fraction of
    atoms silent for ``dead_after`` steps, lr) and "val" rows (each
    validation: mse, fvu, l0, dead = fraction of atoms that never fired on the validation states)."""
    path = Path(out_dir) / LOG_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by an interruption (only the last one can be)
            continue
    return rows


class _Log:
    """Append-only JSONL training log that survives interruption: on resume from a checkpoint at step s,
    rows after s (which the resumed run writes again) are dropped first, so no row is lost or doubled."""

    def __init__(self, out_dir: Path | None, resume_step: int | None, wandb=None):
        self.path = out_dir / LOG_FILE if out_dir is not None else None
        self.rows: list[dict] = []
        self.wandb = None
        if self.path is not None:
            keep = [r for r in read_log(out_dir) if r.get("step", 0) <= resume_step] if resume_step is not None else []
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise ValueError("wandb= asks for Weights & Biases logging, but wandb is not installed: pip install "
                                 f"wandb, or leave wandb off (the curves are in out_dir/{LOG_FILE} either way)") from None
            self.wandb = wb.run or wb.init(**(wandb if isinstance(wandb, dict) else {}))

    def __call__(self, **row) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        else:
            self.rows.append(row)
        if self.wandb is not None:
            self.wandb.log({f"{row['split']}/{k}": v for k, v in row.items() if k not in ("step", "split")},
                           step=row["step"])

    def all(self) -> list[dict]:
        return read_log(self.path.parent) if self.path is not None else self.rows


@torch.no_grad()
def evaluate_sae(sae: WriteSAE, dataset, batch_size: int = 1024) -> dict:
    """Reconstruction metrics of ``sae`` (in eval mode) over every state of ``dataset``.

    Returns mse (per element), fvu (squared error / total variance of the states), l0 (mean
    active atoms), alive / dead (atoms firing at least once / never), n_states and fire_rates
    ((n_feat,) numpy array: fraction of states on which each atom fires).
    """
    sae.check_cell(getattr(dataset, "cell", None))
    was_training = sae.training
    sae.eval()
    n = sae.cfg.n_feat
    sq_err = sum_sq = 0.0
    sum_x = torch.zeros(sae.cfg.d_k, sae.cfg.d_v, dtype=torch.float64)
    fires = torch.zeros(n, dtype=torch.float64)
    active = count = 0
    f64 = torch.float64
    for S in dataset.iter_batches(batch_size, shuffle=False):
        S = sae._check(S)
        acts, idx = sae.encode(S)  # encode + decode: what forward computes, without its training losses
        sq_err += float((S - sae.decode(acts, idx)).square().sum(dtype=f64))
        sum_sq += float(S.square().sum(dtype=f64))
        sum_x += S.sum(0, dtype=f64).cpu()
        on = acts > 0
        fires += torch.bincount(idx[on].cpu(), minlength=n).double()
        active += int(on.sum())
        count += len(S)
    sae.train(was_training)
    if count == 0:
        raise ValueError("evaluate_sae: the dataset is empty")
    total_var = sum_sq - float(sum_x.pow(2).sum()) / count
    rates = (fires / count).numpy()
    alive = int((fires > 0).sum())
    return {
        "mse": sq_err / (count * sae.cfg.d_in),
        "fvu": sq_err / max(total_var, 1e-30),
        "l0": active / count,
        "alive": alive,
        "dead": n - alive,
        "n_states": count,
        "fire_rates": rates,
    }


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in d.items() if k != "fire_rates"}, default=str))


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace directory ``final`` by ``tmp`` (old copy removed only after the new one is in place)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _restore(final: Path) -> None:
    """Undo a ``_swap_in`` interrupted between its two renames (``final`` gone, ``final.old`` kept)."""
    old = final.with_name(final.name + ".old")
    if old.exists() and not final.exists():
        old.rename(final)


def _per_atom_params(sae: WriteSAE):
    return [p for p in (sae.enc_v, sae.enc_w, sae.W_enc, sae.dec_v, sae.dec_w, sae.W_dec, sae.b_enc, sae.log_threshold) if p is not None]


def _save_last(out_dir: Path, sae, opt, since_active, state: dict) -> None:
    tmp = out_dir / "last.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    files = {"model.safetensors": save_tensors({k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()},
                                               tmp / "model.safetensors")}
    osd = opt.state_dict()
    tensors = {"since_active": since_active.cpu(), "rng_torch": torch.get_rng_state()}
    for pid, st in osd["state"].items():
        for name, t in st.items():
            tensors[f"opt.{pid}.{name}"] = torch.as_tensor(t).detach().cpu().contiguous()
    files["optim.safetensors"] = save_tensors(tensors, tmp / "optim.safetensors")
    doc = {**state, "param_groups": osd["param_groups"], "files": files}
    write_text(tmp / "state.json", json.dumps(doc, indent=1))
    _swap_in(tmp, out_dir / "last")


def _read_state(last: Path) -> dict:
    """``last/state.json`` (CorruptFileError naming it if it does not parse)."""
    try:
        return json.loads((last / "state.json").read_text())
    except ValueError as err:
        raise CorruptFileError(last / "state.json", f"it is not valid JSON ({err})",
                               f"delete {last} to train from the start") from None


def _load_last(out_dir: Path, sae, opt, device) -> tuple[torch.Tensor, dict]:
    last = out_dir / "last"
    doc = _read_state(last)
    for name, record in doc.pop("files", {}).items():
        check_file(last / name, record, f"delete {last} to train from the start")
    sae.load_state_dict(load_file(str(last / "model.safetensors"), device=str(device)))
    t = load_file(str(last / "optim.safetensors"))
    state: dict = {}
    for key, val in t.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = val if name == "step" else val.to(device)
    opt.load_state_dict({"state": state, "param_groups": doc.pop("param_groups")})
    torch.set_rng_state(t["rng_torch"])
    return t["since_active"].to(device), doc


def _save_best(out_dir: Path, sae: WriteSAE, metrics: dict, info: dict) -> None:
    tmp = out_dir / "best.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    sae.save(tmp, cell=info.get("cell"), model=info.get("model"), train=info.get("train"), metrics=_jsonable(metrics))
    if "fire_rates" in metrics:
        save_tensors({"fire_rates": torch.as_tensor(metrics["fire_rates"], dtype=torch.float32)}, tmp / "fire_rates.safetensors")
    _swap_in(tmp, out_dir / "best")


def _rank_world(distributed: bool, batch_size: int) -> tuple[int, int]:
    """(rank, world size) of the default process group for ``fit(distributed=True)``, else (0, 1)."""
    if not distributed:
        return 0, 1
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("fit(distributed=True) needs a torch.distributed process group: launch with torchrun "
                         "(python -m writesae.distributed ...) or call torch.distributed.init_process_group first")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} does not divide over {world} ranks; use a multiple of {world}")
    return rank, world


def _ddp(sae: WriteSAE, device):
    """``sae`` wrapped in DistributedDataParallel (gradients averaged over the ranks)."""
    dev = torch.device(device)
    return torch.nn.parallel.DistributedDataParallel(sae, device_ids=[dev] if dev.type == "cuda" else None)


def _finite(ok: torch.Tensor, world: int) -> bool:
    """Whether ``ok`` (a bool flag: every loss since the last check was finite) holds on every rank (so that all
    ranks stop together)."""
    ok = ok.to(torch.int32)
    if world > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok)


def fit(
    sae: WriteSAE,
    train,
    val=None,
    *,
    out_dir=None,
    lr: float = 3e-4,
    min_lr: float = 3e-5,
    warmup: int = 50,
    batch_size: int = 256,
    epochs: int = 20,
    seed: int = 0,
    resample_every: int = 250,
    dead_after: int = 100,
    renorm_every: int = 100,
    val_every: int | None = None,
    ckpt_every: int = 500,
    max_steps: int | None = None,
    device="cpu",
    progress: bool = True,
    info: dict | None = None,
    log_every: int = 10,
    wandb: bool | dict = False,
    distributed: bool = False,
) -> TrainResult:
    """Train ``sae`` on ``train`` (a StateDataset or TensorStates), validating on ``val``.

    Sets the SAE's mean state M to the mean of ``train`` (unless resuming). Adam with linear
    warmup + cosine decay (``lr_at``); per step: loss = MSE + lambda_aux * AuxK (+ JumpReLU L0);
    atoms that did not fire for ``dead_after`` steps are "dead" (AuxK targets) and are resampled
    every ``resample_every`` steps; decoder factors are renormalised every ``renorm_every`` steps.
    Validation every ``val_every`` steps (default: once per epoch) keeps the best SAE by MSE
    (``out_dir/best``); ``out_dir/last`` is written every ``ckpt_every`` steps and when stopping
    at ``max_steps`` (total steps, for interruption); a later call with the same ``out_dir``
    and parameters resumes. ``info`` (cell, model, ...) goes into the saved cfg.json.

    M and the input scale c come from one pass over the training states (a seeded sample of
    ``STATS_SAMPLE`` when there are more); periodic validation reads at most ``VAL_SAMPLE`` states; the
    final metrics are those of the best checkpoint over the whole validation split (measured when it was
    picked, not again), plus ``seconds``, ``steps_per_s`` (optimizer steps per second of stepping) and
    ``samples_per_s`` (training samples per second end to end, start-up and evaluation included) of this
    call. Training curves go to ``out_dir/train_log.jsonl`` every ``log_every`` steps (see
    :func:`read_log`; ``TrainResult.log``) and, with ``wandb=True`` (or a dict of ``wandb.init``
    arguments, wandb installed), to Weights & Biases too.

    ``distributed=True`` inside a ``torch.distributed`` process group (``torchrun``; see
    :mod:`writesae.distributed`): data-parallel training of this one SAE. Every rank reads the same global
    batch and trains on its ``rank::world`` share (``batch_size`` must divide by the world size), DDP averages
    the gradients, the fired atoms (hence the dead-atom counters, AuxK and resampling, which uses the whole
    batch) are all-reduced, so every rank holds the weights a single process would (to float rounding;
    BatchTopK's threshold buffer is rank 0's). Rank 0 alone writes ``out_dir``; the log holds rank 0's share.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir) if out_dir is not None else None
    info = dict(info or {})
    bad = [f"{name}={v} (must be {want})" for name, v, ok, want in (
        ("batch_size", batch_size, batch_size >= 1, ">= 1"), ("epochs", epochs, epochs >= 1, ">= 1"),
        ("lr", lr, lr > 0, "> 0"), ("min_lr", min_lr, 0 <= min_lr <= lr, "in [0, lr]"), ("warmup", warmup, warmup >= 0, ">= 0"),
        ("ckpt_every", ckpt_every, ckpt_every >= 1, ">= 1"), ("renorm_every", renorm_every, renorm_every >= 1, ">= 1"),
        ("resample_every", resample_every, resample_every >= 1, ">= 1"),
        ("log_every", log_every, log_every >= 1, ">= 1")) if not ok]  # fmt: skip
    if bad:
        raise ValueError(f"bad training parameters: {', '.join(bad)}")
    for split, ds in (("train", train), ("val", val)):
        if ds is not None and (ds.d_k, ds.d_v) != (sae.cfg.d_k, sae.cfg.d_v):
            where = f" of {info['data_dir']} cell {info['cell']}" if "data_dir" in info else ""
            raise ValueError(f"the {split} states{where} are (d_k, d_v) = ({ds.d_k}, {ds.d_v}) but the SAE config has "
                             f"({sae.cfg.d_k}, {sae.cfg.d_v}); build SAEConfig with the states' d_k, d_v")
    if len(train) == 0:
        raise ValueError("the training split is empty: give more states (or a smaller val_frac)")
    sae.to(device).train()
    n = sae.cfg.n_feat
    drop_last = len(train) >= batch_size
    per_epoch = len(train) // batch_size if drop_last else 1
    total = epochs * per_epoch
    val_every = val_every or per_epoch
    params = {
        "cfg": asdict(sae.cfg),
        "lr": lr, "min_lr": min_lr, "warmup": warmup, "batch_size": batch_size, "epochs": epochs,
        "seed": seed, "resample_every": resample_every, "dead_after": dead_after,
        "renorm_every": renorm_every, "val_every": val_every, "ckpt_every": ckpt_every,
        **{k: v for k, v in info.items() if k in ("cell", "data_dir", "val_frac")},
    }  # fmt: skip
    params = json.loads(json.dumps(params, default=str))
    info["train"] = params
    # fused: one pass over each parameter per step instead of ~7 (a FlatSAE's step at the book's size: 3 ms of Adam, not 10)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, fused=torch.device(device).type in ("cpu", "cuda"))
    since_active = torch.zeros(n, dtype=torch.long, device=device)
    state = {"step": 0, "best_val": None, "best_step": -1, "params": params}
    best_mem = None  # best weights when there is no out_dir
    best_rates = None  # fire rates of the best checkpoint, when picked in this call

    rank, world = _rank_world(distributed, batch_size)
    writer = out_dir if rank == 0 else None  # one writer: rank 0; the others keep their best weights in memory
    for name in ("last", "best") if writer is not None else ():
        _restore(out_dir / name)
    if world > 1:
        torch.distributed.barrier()  # the other ranks read out_dir/last once rank 0 has restored it
    if out_dir is not None and (out_dir / "last" / "state.json").exists():
        saved = _read_state(out_dir / "last").get("params", {})
        diff = [k for k in sorted(set(saved) | set(params)) if saved.get(k) != params.get(k)]
        if diff:
            lines = "\n".join(f"  {k}: checkpoint {saved.get(k)!r} != now {params.get(k)!r}" for k in diff)
            raise ValueError(f"{out_dir} holds a run with different parameters:\n{lines}\nUse another out_dir.")
        since_active, state = _load_last(out_dir, sae, opt, device)
        log = _Log(writer, state["step"], wandb and rank == 0)
    else:
        mean, scale = _stats(_sampled(train, STATS_SAMPLE, _seed(seed, 2)))
        sae.set_mean(mean)
        sae.set_scale(scale)
        sae.normalize_decoder()
        log = _Log(writer, None, wandb and rank == 0)
    out_dir = writer
    net = _ddp(sae, device) if world > 1 else sae
    val_part = _sampled(val, VAL_SAMPLE, _seed(seed, 3)) if val is not None else None

    def validate():
        m = evaluate_sae(sae, val_part)
        log(step=state["step"], split="val", mse=m["mse"], fvu=m["fvu"], l0=m["l0"], dead=m["dead"] / n)
        if state["best_val"] is None or m["mse"] < state["best_val"]:
            nonlocal best_mem, best_rates
            state["best_val"], state["best_step"] = m["mse"], state["step"]
            state["best_metrics"] = _jsonable(m) if val_part is val else None  # final metrics (whole split)
            best_rates = m["fire_rates"]
            if out_dir is not None:
                _save_best(out_dir, sae, m, info)
            else:
                best_mem = {k: v.detach().clone() for k, v in sae.state_dict().items()}
        return m

    bar = tqdm(total=total, initial=state["step"], disable=not progress, desc=f"train {info.get('cell', '')}".strip())
    stopped = False
    step0, t_steps = state["step"], time.perf_counter()
    # Divergence check: each step's loss is folded into a flag on the device; reading the flag waits for the
    # device, so on a GPU it is read only on steps after which something is logged, validated or saved (a
    # checkpoint never holds diverged weights), on a CPU (where reading costs nothing) after every step.
    check_every = 1 if torch.device(device).type == "cpu" else math.gcd(log_every, val_every, ckpt_every)
    finite = torch.ones((), dtype=torch.bool, device=device)
    while state["step"] < total and not stopped:
        epoch, first = divmod(state["step"], per_epoch)
        batches = train.iter_batches(batch_size, shuffle=True, epoch_seed=_seed(seed, epoch), drop_last=drop_last, start_batch=first)
        for S in batches:
            step = state["step"]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, lr, min_lr, warmup)
            S = S.to(device)
            dead_mask = since_active >= dead_after
            logged = (step + 1) % log_every == 0 or step + 1 == total  # the FVU and L0 only where they are logged
            out = net(S[rank::world] if world > 1 else S, dead_mask=dead_mask, recon=logged)
            finite &= torch.isfinite(out.loss.detach())
            due = (step + 1) % check_every == 0 or step + 1 == total or (max_steps is not None and step + 1 >= max_steps)
            if due and not _finite(finite, world):
                raise ValueError(f"training diverged {'at' if check_every == 1 else 'by'} step {step}: the loss is "
                                 f"{out.loss.item()} (lr {lr}); lower lr"
                                 + (f" and delete {out_dir / 'last'} (its checkpoint may be past the divergence)"
                                    if out_dir is not None else ""))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            # index n collects the zero (padding) entries: no boolean-mask indexing, which costs more than the rest here
            fired = torch.zeros(n + 1, dtype=torch.bool, device=device).index_fill_(
                0, torch.where(out.top_acts > 0, out.top_indices, n).flatten(), True)[:n]
            if world > 1:  # an atom fired if it fired on any rank's share: the same dead counters everywhere
                fired = fired.to(torch.uint8)
                torch.distributed.all_reduce(fired, op=torch.distributed.ReduceOp.MAX)
                fired = fired.bool()
            since_active = torch.where(fired, 0, since_active + 1)
            state["step"] = step = step + 1
            if step % renorm_every == 0:
                sae.normalize_decoder()
            if step % resample_every == 0:
                dead = torch.nonzero(since_active >= dead_after).flatten()
                if len(dead):
                    sae.resample(dead, S, generator=torch.Generator().manual_seed(_seed(seed, step, 1)))
                    for p in _per_atom_params(sae):
                        for buf in ("exp_avg", "exp_avg_sq"):
                            if buf in opt.state.get(p, {}):
                                opt.state[p][buf][dead] = 0
                    since_active[dead] = 0
            if logged:
                row = dict(loss=out.loss.item(), mse=out.mse.item() * float(sae.scale) ** 2, fvu=out.fvu.item(), l0=out.l0.item(),
                           dead=float(dead_mask.float().mean()))
                log(step=step, split="train", **row, lr=opt.param_groups[0]["lr"])
                rate = (step - step0) * batch_size / max(time.perf_counter() - t_start, 1e-9)
                bar.set_postfix(loss=f"{row['loss']:.3g}", fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}",
                                dead=f"{row['dead']:.2f}", samples_s=f"{rate:.0f}")  # fmt: skip
            bar.update(1)
            if val is not None and len(val) and (step % val_every == 0 or step == total):
                validate()
            if out_dir is not None and (step % ckpt_every == 0 or step == total):
                _save_last(out_dir, sae, opt, since_active, state)
            if max_steps is not None and step >= max_steps and step < total:
                if out_dir is not None:
                    _save_last(out_dir, sae, opt, since_active, state)
                stopped = True
                break
            if step >= total:
                break
    bar.close()
    t_steps = time.perf_counter() - t_steps

    finished = state["step"] >= total
    # Adam's moments and the gradients go before the best SAE is loaded beside the trained one: for a FlatSAE of
    # GLA-1.3B's 256 x 512 heads they are 6.4 GB of the 8.6 GB training holds (the end of fit peaked at 14.5 GB)
    opt.state.clear()
    sae.zero_grad(set_to_none=True)
    if state["best_step"] >= 0:  # bring back the best weights
        if out_dir is not None:
            best = WriteSAE.load(out_dir / "best", device=device)
        else:
            best = WriteSAE(sae.cfg, device=device)
            best.load_state_dict(best_mem)
    else:
        best = WriteSAE(sae.cfg, device=device)
        best.load_state_dict(sae.state_dict())
    best.info = dict(sae.info, **{k: info[k] for k in ("cell", "model", "train") if k in info})
    metrics = None
    if state.get("best_metrics") is not None:  # measured over the whole validation split when it was picked
        if best_rates is None and out_dir is not None and (out_dir / "best" / "fire_rates.safetensors").exists():
            best_rates = load_file(str(out_dir / "best" / "fire_rates.safetensors"))["fire_rates"].double().numpy()
        if best_rates is not None:
            metrics = {**state["best_metrics"], "fire_rates": best_rates}
    if metrics is None:  # no validation split (a sample of the training states), or a sampled one
        metrics = evaluate_sae(best, val if val is not None and len(val) else _sampled(train, VAL_SAMPLE, _seed(seed, 4)))
    rates = metrics["fire_rates"]
    metrics.update(best_step=state["best_step"], steps=state["step"], dead_train=int((since_active >= dead_after).sum()))
    wall = time.perf_counter() - t_start
    done = state["step"] - step0
    metrics.update(seconds=wall, steps_per_s=done / max(t_steps, 1e-9), samples_per_s=done * batch_size / max(wall, 1e-9))
    if out_dir is not None and finished:
        if state["best_step"] < 0:
            _save_best(out_dir, best, metrics, info)
        write_text(out_dir / "metrics.json", json.dumps(_jsonable(metrics), indent=1))
        best.info["metrics"] = _jsonable(metrics)
        best.save(out_dir / "best")
        save_tensors({"fire_rates": torch.as_tensor(rates, dtype=torch.float32)}, out_dir / "best" / "fire_rates.safetensors")
    return TrainResult(best, _jsonable(metrics), rates, state["step"], state["best_step"], finished, out_dir, log.all())


def train_on_tensors(states: torch.Tensor, cfg: SAEConfig, out_dir=None, *, val_frac: float = 0.2, seed: int = 0, **kw) -> TrainResult:
    """Train on an in-memory (N, d_k, d_v) tensor with the seeded 80/20 split (split seed = seed)."""
    ds = TensorStates(states)
    train = ds.split("train", seed, val_frac)
    val = ds.split("val", seed, val_frac) if val_frac > 0 else None
    sae = WriteSAE(cfg, device=kw.get("device", "cpu"), seed=seed)
    return fit(sae, train, val, out_dir=out_dir, seed=seed, info={"val_frac": val_frac}, **kw)


def train_sae(
    data_dir,
    cell,
    cfg: SAEConfig,
    out_dir,
    *,
    lr: float = 3e-4,
    min_lr: float = 3e-5,
    warmup: int = 50,
    batch_size: int = 256,
    epochs: int = 20,
    seed: int = 0,
    resample_every: int = 250,
    dead_after: int = 100,
    renorm_every: int = 100,
    val_every: int | None = None,
    ckpt_every: int = 500,
    val_frac: float = 0.2,
    max_steps: int | None = None,
    device="cpu",
    progress: bool = True,
    log_every: int = 10,
    wandb: bool | dict = False,
    distributed: bool = False,
) -> TrainResult:
    """Train an SAE on one cell ((layer, head) or "L9H4") of the state dataset in ``data_dir``.

    fp32 SAE on the stored (bf16) states; seeded 80/20 split by sequence with split seed = init
    seed = ``seed``; M = mean of the training split. See ``fit`` for the loop, checkpoints and
    resuming (call again with the same ``out_dir``; ``max_steps`` stops early).
    """
    key = parse_cell(cell)
    train = StateDataset(data_dir, key, "train", seed=seed, val_frac=val_frac)
    val = StateDataset(data_dir, key, "val", seed=seed, val_frac=val_frac)
    man = train.manifest
    if 4 * train.d_k * train.d_v * (len(train) + len(val)) <= IN_MEMORY_BYTES:  # the same batches, read from memory
        train, val = train.in_memory(), val.in_memory()
    model = man.get("model") or (man.get("params") or {}).get("model")
    info = {"cell": key, "model": model, "data_dir": str(Path(data_dir).resolve()), "val_frac": val_frac}
    sae = WriteSAE(cfg, device=device, seed=seed)
    return fit(
        sae, train, val, out_dir=out_dir, lr=lr, min_lr=min_lr, warmup=warmup, batch_size=batch_size,
        epochs=epochs, seed=seed, resample_every=resample_every, dead_after=dead_after,
        renorm_every=renorm_every, val_every=val_every, ckpt_every=ckpt_every, max_steps=max_steps,
        device=device, progress=progress, info=info, log_every=log_every, wandb=wandb, distributed=distributed,
    )  # fmt: skip
