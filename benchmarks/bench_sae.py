"""Training throughput of WriteSAE: sparse vs dense decode, and vs FlatSAE.

    python benchmarks/bench_sae.py [--sizes 64 128 | --book] [--batch 256] [--steps 3] [--device cpu] [--threads N]

For each state size (d_k = d_v; ``--book``: the sizes and n_feat, k the book trains, ``BOOK_SIZES``) it times full
training steps (forward, AuxK off, backward, Adam) of four models at n_feat = 2048, k = 32 (``--n-feat``, ``-k``,
``--batch``):

    bilinear/sparse      WriteSAE as trained (the defaults): the decoder gathers the k active factor
                         pairs; the encoder's gradient goes through the k selected pre-activations only
    bilinear/dense-grad  the same, but autograd through all n_feat pre-activations
    bilinear/dense       and the decoder multiplying the dense code by all n_feat atoms
    flat/sparse          FlatSAE (dense encoder and dense-atom decoder, gathered by embedding_bag)
    bilinear/compiled    with ``--compile``: the first, its loss through ``torch.compile`` (checked equal to eager)

and prints each number next to its limit:

- the speed-ups against their FLOP bounds. Matmul FLOPs per step (B batch, n atoms, d = d_k d_v; the
  input needs no gradient): encoder forward 2Bnd, its weight gradient 2Bnd dense, or through the
  selection 2 x 2Bkd for bilinear factors (X w and X^T v) and 2Bkd for a matrix, decoder 3 x 2Bnd dense or
  3 x 2Bkd sparse; so sparse decode gains at most (4n + 6n) / (4n + 6k) and the selected gradient at most
  (4n + 6k) / (2n + 10k);
- training FLOP/s (of the FLOPs each method does) as a fraction of this machine's dense fp32 matmul
  throughput, measured on a GEMM of the encoder's shape timed just before each step (the faster of two runs);
  the fraction is the median over steps of each step's ratio to its own GEMM, since this shared CPU's speed
  drifts by 10-30% within minutes.

All variants are checked equal (reconstruction and every gradient) before timing.
The bound assumes both decoders run at the same FLOP efficiency; the dense one also writes the
(n, d) atom matrix and the dense code, so on a memory-starved machine it can exceed the bound.

On a shared CPU, ``--threads 1`` avoids thread oversubscription (which can cost 5x here). The benchmark keeps
freed memory in the process (``writesae.runtime.keep_freed_memory``, as the notebooks and the command line do), so
a step's large allocations are not faulted in afresh every step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from writesae.runtime import keep_freed_memory
from writesae.sae import SAEConfig, WriteSAE


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def step_flops(sparse: bool, sparse_grad: bool, B: int, n: int, k: int, d: int, flat: bool = False) -> float:
    """Matmul FLOPs of one training step (see the module docstring)."""
    enc = 2 * B * n * d + (2 * B * k * d * (1 if flat else 2) if sparse_grad else 2 * B * n * d)
    dec = 3 * 2 * B * (k if sparse else n) * d
    return float(enc + dec)


def time_steps(cfg: SAEConfig, S: torch.Tensor, steps: int, device, gemm: tuple[int, int, int] | None = None,
               compiled: bool = False):
    """Seconds of each of ``steps`` training steps (after a warm-up step) as the trainer takes them, and with
    ``gemm`` = (B, n, d), of a dense fp32 (B, d) @ (d, n) GEMM timed just before each step (the faster of two runs):
    this CPU's throughput drifts by 10-30% within minutes, so a step is compared with the GEMM of its own moment.
    ``compiled``: the loss through ``torch.compile`` (the trainer does not; ``--compile`` measures what it would
    gain). Returns (step seconds, GEMM seconds, warm-up seconds: the compile for a compiled step)."""
    sae = WriteSAE(cfg, device=device, seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, fused=torch.device(device).type in ("cpu", "cuda"))  # as the trainer
    loss = _loss(sae, compiled)
    a, b = (torch.randn(gemm[0], gemm[2], device=device), torch.randn(gemm[2], gemm[1], device=device)) if gemm else (None, None)
    step_s, gemm_s, warmup = [], [], 0.0
    for i in range(steps + 1):
        if gemm:
            g = min(timed(lambda: a @ b, device)[1] for _ in range(2))
        t = timed(lambda: _step(loss, opt, S), device)[1]
        if i:
            step_s.append(t)
            gemm_s += [g] if gemm else []
        else:
            warmup = t
    return step_s, gemm_s, warmup


def _loss(sae, compiled):
    """The training loss of states S, as the trainer computes it on the steps it does not log (losses only)."""
    fn = lambda S: sae(S, recon=False).loss  # noqa: E731
    return torch.compile(fn) if compiled else fn


def _step(loss, opt, S):
    value = loss(S)
    opt.zero_grad(set_to_none=True)
    value.backward()
    opt.step()


def timed(fn, device):
    """(fn's output, its seconds), the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def _worst(results, what: str) -> float:
    """Max relative difference between two runs' lists of tensors; raises above 1e-4."""
    worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(*results))
    if worst > 1e-4:
        raise AssertionError(f"{what} differ: max relative difference {worst:.2e}")
    return worst


def check_equal(dk: int, dv: int, n: int, k: int, B: int, device) -> float:
    """Max relative difference between the sparse and dense methods' reconstructions and gradients."""
    cfg = SAEConfig("bilinear", dk, dv, n_feat=n, k=k)
    sae = WriteSAE(cfg, device=device, seed=1)
    S = torch.randn(B, dk, dv, device=device)
    dead = torch.zeros(n, dtype=torch.bool, device=device)
    dead[::2] = True  # exercise the AuxK decode too
    results = []
    for sparse in (True, False):
        cfg.sparse_decode = cfg.sparse_encoder_grad = sparse
        sae.zero_grad()
        out = sae(S, dead_mask=dead)
        out.loss.backward()
        results.append([out.recon.detach()] + [p.grad.detach().clone() for p in sae.parameters()])
    return _worst(results, "sparse and dense methods")


# (d_k, d_v, n_feat, k, batch) of the SAEs the book trains on this CPU: chapters 01-07 (the embedded model's 32 x 32
# heads), chapter 08's zoo at its batch of 32 (Qwen3.5 / Mamba-2 32 x 32, GLA 32 x 64, DeltaNet / RWKV-7 64 x 64; its
# DeltaNet k sweep at n_feat 256)
BOOK_SIZES = [(32, 32, 1024, 16, 256), (32, 32, 128, 8, 32), (32, 64, 128, 8, 32), (64, 64, 128, 8, 32),
              (64, 64, 256, 32, 32)]


def _row(name, cfg, S, steps, dev, flops, compiled=False) -> tuple[float, float]:
    """Time one method and print its row; (median seconds of a step, seconds of the warm-up step)."""
    B, n, d = len(S), cfg.n_feat, cfg.d_k * cfg.d_v
    step_s, gemm_s, warmup = time_steps(cfg, S, steps, dev, gemm=(B, n, d), compiled=compiled)
    t, peak = statistics.median(step_s), 2 * B * n * d / statistics.median(gemm_s)
    frac = statistics.median(flops * g / (2 * B * n * d * s) for s, g in zip(step_s, gemm_s))
    print(f"  {name:20s} {B / t:9.0f} states/s  {t * 1e3:8.1f} ms/step  {flops / t / 1e9:7.1f} GFLOP/s = "
          f"{frac:5.1%} of the matmul throughput alongside ({peak / 1e9:.1f} GFLOP/s)")  # fmt: skip
    return t, warmup


def check_compiled(cfg, S, device) -> float:
    """Max relative difference of the loss and every gradient between the eager and the compiled loss."""
    sae = WriteSAE(cfg, device=device, seed=2)
    results = []
    for compiled in (False, True):
        sae.zero_grad()
        value = _loss(sae, compiled)(S)
        value.backward()
        results.append([value.detach()] + [p.grad.detach().clone() for p in sae.parameters()])
    return _worst(results, "compiled and eager steps")


def bench_size(dk: int, dv: int, n: int, k: int, B: int, steps: int, dev, compiled: bool = False) -> None:
    """Time the four methods on (d_k, d_v) states at n_feat n, k; print each against its limit."""
    d = dk * dv
    diff = check_equal(dk, dv, n, k, 16, dev)
    S = torch.randn(B, dk, dv, device=dev).to(torch.bfloat16).float()
    print(f"\n{dk}x{dv} states, n_feat {n}, k {k}, batch {B}: sparse == dense methods (max rel diff {diff:.1e})")
    rows = {}
    for name, variant, sparse, sparse_grad in [
            ("bilinear/sparse", "bilinear", True, True), ("bilinear/dense-grad", "bilinear", True, False),
            ("bilinear/dense", "bilinear", False, False), ("flat/sparse", "flat", True, True)]:  # fmt: skip
        cfg = SAEConfig(variant, dk, dv, n_feat=n, k=k, sparse_decode=sparse, sparse_encoder_grad=sparse_grad)
        rows[name] = _row(name, cfg, S, steps, dev, step_flops(sparse, sparse_grad, B, n, k, d, flat=variant == "flat"))[0]
    dec_bound = step_flops(False, False, B, n, k, 1) / step_flops(True, False, B, n, k, 1)
    grad_bound = step_flops(True, False, B, n, k, 1) / step_flops(True, True, B, n, k, 1)
    dec = rows["bilinear/dense"] / rows["bilinear/dense-grad"]
    grad = rows["bilinear/dense-grad"] / rows["bilinear/sparse"]
    print(f"  sparse/dense decode {dec:.2f}x (FLOP bound {dec_bound:.2f}x; {dec / dec_bound:.0%} of it); "
          f"selected/dense encoder gradient {grad:.2f}x (bound {grad_bound:.2f}x; {grad / grad_bound:.0%}); "
          f"WriteSAE vs FlatSAE {rows['flat/sparse'] / rows['bilinear/sparse']:.2f}x")  # fmt: skip
    if compiled:
        cfg = SAEConfig("bilinear", dk, dv, n_feat=n, k=k)
        t, first = _row("bilinear/compiled", cfg, S, steps, dev, step_flops(True, True, B, n, k, d), compiled=True)
        print(f"  torch.compile: {rows['bilinear/sparse'] / t:.2f}x over eager, its first step (compiling) {first:.1f} s; "
              f"loss and gradients equal to eager's within {check_compiled(cfg, S, dev):.1e} (relative)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="square states d_k = d_v = size")
    ap.add_argument("--book", action="store_true", help="the sizes the book trains (BOOK_SIZES) instead")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n-feat", type=int, default=2048)
    ap.add_argument("-k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--compile", action="store_true", help="also the default model with its loss through torch.compile")
    args = ap.parse_args()
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"median of {args.steps} training steps")  # fmt: skip
    sizes = BOOK_SIZES if args.book else [(s, s, args.n_feat, args.k, args.batch) for s in args.sizes]
    for dk, dv, n, k, B in sizes:
        bench_size(dk, dv, n, k, B, args.steps, args.device, args.compile)


if __name__ == "__main__":
    main()
