"""The paper's scale: extraction, SAE training and the substitution test on a randomly initialised model with
Qwen3.5-0.8B's shape, and the projected H100-hours of the paper's headline cell.

    python benchmarks/bench_scale.py                 # on a GPU: bf16, flash-linear-attention's kernels
    python benchmarks/bench_scale.py --rates-out rates.json   # ... and keep the rates for `writesae plan --rates`
    python benchmarks/bench_scale.py --small         # anywhere: a small config that proves the path runs
    python benchmarks/bench_scale.py --passages 2 --steps 5 --firings 4   # without a GPU: the full
                                                     # configuration in fp32 on the CPU (13 min, 13 GiB here)

Model: ``Qwen3_5TextConfig`` with hidden 1024, 24 layers (3 Gated DeltaNet : 1 full attention), 16 value heads
of 128 x 128 (16 key heads), as the paper describes Qwen3.5-0.8B; intermediate 3584, 8 attention heads / 2 kv
heads of 256 and vocab 248,320 are the released 0.8B model's values as this project recalls them (no network
here to check the hub config). Weights are random: speed does not depend on them.

Measured, side by side in one run:
1. extraction: states/s of ``writesae.extract`` at three cells (L1/L9/L17 H4) over 1,024-token passages;
2. SAE training: samples/s of full training steps at n_feat 2048, k 32, batch 256 on 128 x 128 states, and
   the matmul FLOP/s they reach as a fraction of this device's measured dense matmul throughput (fp32 and bf16);
3. substitution: firings/s of ``substitute`` (prefix reuse) against the release's method, a full forward from
   position 0 per condition (``reuse_prefix=False``, what a deep copy of the cache and a fresh forward per
   condition amounts to), with the KLs of the two checked equal.
Projection for the headline cell (5,000 passages x 1,024 tokens, states at every position of one cell, 80% of
them for 20 epochs, 4,851 firings x 3 conditions), next to the paper's ~6 H100-hours per canonical SAE
configuration (~180 in all). Peak memory is printed after each stage: the GPU's allocated tensors (target: under
40 GiB), or on a CPU the process's resident set.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

import bench_sae
from writesae.experiments import firings, substitution
from writesae.extract import extract
from writesae.hosts import load_host
from writesae.sae import SAEConfig, WriteSAE
from writesae.scale import PAPER, Rates, hours as projected_hours


def config(small):
    from transformers import Qwen3_5TextConfig

    if small:
        return Qwen3_5TextConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=64, linear_num_key_heads=2,
                                 linear_num_value_heads=2, linear_key_head_dim=32, linear_value_head_dim=32,
                                 layer_types=["linear_attention"] * 3 + ["full_attention"])
    return Qwen3_5TextConfig(vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                             linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
                             layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 6, tie_word_embeddings=True)


def peak_memory(device) -> str:
    """Peak memory so far: the GPU's allocated tensors, or this process's resident set on a CPU."""
    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB (target < 40 GiB)"
    import resource

    return f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GiB"


def matmul_peak(device, dtype, n=4096, reps=5):
    """Dense square-matmul FLOP/s of this device at ``dtype`` (best of ``reps``)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = min(bench_sae.timed(lambda: a @ b, device)[1] for _ in range(reps))
    return 2 * n ** 3 / best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true", help="a small config for a CPU (proves the path, not the scale)")
    p.add_argument("--passages", type=int, default=None, help="passages to extract (default 32; small: 4)")
    p.add_argument("--steps", type=int, default=20, help="SAE training steps timed")
    p.add_argument("--firings", type=int, default=None, help="firings of the substitution test (default 48; small: 8)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a small shared CPU)")
    p.add_argument("--rates-out", default=None, help="write the measured rates (JSON) for `writesae plan --rates`")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not a.small else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = config(a.small)
    host = load_host(cfg, device=device, dtype=dtype)
    T = 128 if a.small else PAPER["window"]
    L = len(host.layers)
    cells = [(1, 1), (2, 1)] if a.small else [(1, 4), (9, 4), (17, 4)]
    n_pass = a.passages or (4 if a.small else 32)
    ids = torch.randint(0, host.vocab_size, (n_pass, T), generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    print(f"model: hidden {cfg.hidden_size}, {L} layers, {host.n_heads} value heads of {host.d_k} x {host.d_v}, "
          f"vocab {cfg.vocab_size}, {dtype}, {device}; {peak_memory(device)}")

    # 1. extraction (every position from 8 on, of each cell)
    P = T - 8
    with tempfile.TemporaryDirectory() as d:
        _, dt = bench_sae.timed(lambda: extract(host, ids, cells, d, positions_per_seq=P,
                                                batch_size=4 if a.small else 8, progress=False), device)
    states_per_s = n_pass * P * len(cells) / dt
    print(f"extraction: {n_pass * P * len(cells)} states in {dt:.1f} s = {states_per_s:,.0f} states/s; {peak_memory(device)}")

    # 2. SAE training at n_feat 2048, k 32 on d_k x d_v states (bench_sae's step and FLOP count)
    sae_cfg, B = SAEConfig("bilinear", host.d_k, host.d_v, n_feat=2048, k=32), 256
    d = host.d_k * host.d_v
    step_s, gemm_s, _ = bench_sae.time_steps(sae_cfg, torch.randn(B, host.d_k, host.d_v, device=device), a.steps, device,
                                          gemm=(B, sae_cfg.n_feat, d))
    sec = statistics.median(step_s)
    samples_per_s = B / sec
    flops = bench_sae.step_flops(True, True, B, sae_cfg.n_feat, sae_cfg.k, d) / sec
    peaks = {"fp32": 2 * B * sae_cfg.n_feat * d / statistics.median(gemm_s)}  # an encoder-shaped GEMM beside each step
    if device.type == "cuda":
        peaks["bf16"] = matmul_peak(device, torch.bfloat16)
    frac = ", ".join(f"{flops / v:.0%} of the {k_} matmul peak ({v / 1e12:.2f} TFLOP/s)" for k_, v in peaks.items())
    print(f"SAE training (n_feat 2048, k 32, batch {B}, fp32): {samples_per_s:,.0f} samples/s; {frac}; "
          f"{peak_memory(device)}")

    # 3. substitution: prefix reuse vs a full forward per condition, KLs checked equal
    cell = cells[len(cells) // 2]
    sub_sae = WriteSAE(SAEConfig("bilinear", host.d_k, host.d_v, n_feat=512, k=16), device=device, seed=0)
    with torch.no_grad():
        sub_sae.set_mean(host.trace(ids[:2], cells=[cell], positions=range(8, T, 8), logits=False)[cell].state.flatten(0, 1).mean(0))
    fir = firings.collect(host, sub_sae, cell, ids[:4])
    sites = firings.select(fir, "top1", max_firings=a.firings or (8 if a.small else 48), seed=0)
    kw = dict(conditions=("atom", "delete", "random"))
    fast, t_fast = bench_sae.timed(lambda: substitution.substitute(host, sub_sae, ids[:4], sites, **kw), device)
    naive, t_naive = bench_sae.timed(
        lambda: substitution.substitute(host, sub_sae, ids[:4], sites, reuse_prefix=False, **kw), device)
    diff = max(float((fast[f"kl_{c}"] - naive[f"kl_{c}"]).abs().max()) for c in kw["conditions"])
    assert diff < (1e-6 if dtype == torch.float32 else 1e-2), f"substitution paths disagree by {diff}"
    fir_s, fir_naive = len(sites) / t_fast, len(sites) / t_naive
    edited = len(kw["conditions"]) * int((T - sites["pos"]).sum())  # tokens the edited runs re-run
    print(f"substitution at L{cell[0]}H{cell[1]}: {fir_s:.3g} firings/s vs the release's method {fir_naive:.3g} "
          f"({fir_s / fir_naive:.2f}x; max |KL diff| {diff:.1e}); {peak_memory(device)}")

    # projection for the headline cell (writesae.scale's formulas, the ones `writesae plan` uses)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    rates = Rates(name + (" (small config)" if a.small else ""), extract_tokens_per_s=n_pass * T / dt,
                  sae_samples_per_s=samples_per_s * d * sae_cfg.n_feat / (2048 * 128 * 128), edited_tokens_per_s=edited / t_fast)
    if a.rates_out:
        rates.save(a.rates_out)
    n_states = PAPER["passages"] * PAPER["window"]
    hours = projected_hours(rates, extract_tokens=n_states, sae_samples=int(0.8 * n_states * PAPER["epochs"]),
                            edited_tokens=PAPER["firings"] * len(kw["conditions"]) * PAPER["window"] // 2)
    total = hours.pop("total")
    where = "this device" if not a.small else "this device, SMALL config: not the paper's scale"
    print(f"projected hours on {where} for the headline cell: " + ", ".join(f"{k_} {v:.2f}" for k_, v in hours.items())
          + f"; total {total:.2f} (paper: ~{PAPER['h100_hours_per_sae']:.0f} H100-hours per canonical SAE "
          f"configuration, ~{PAPER['h100_hours_total']:.0f} in all; release's substitution method: "
          f"{PAPER['firings'] / fir_naive / 3600:.2f} h)")
    print(peak_memory(device))


if __name__ == "__main__":
    main()
