"""Substitution firings/s: batched edited forwards from the cached prefix vs the naive per-condition
full forward (``run_edits(..., reuse_prefix=False)``), with the same KLs to 1e-6.

    python benchmarks/bench_substitution.py [--model embedded] [--cell 1 0] [--seqs 4] [--firings 8] [--reads next final]

The SAE is a seeded random WriteSAE whose mean is set from the cell's states (speed does not depend on
training; ``--trained`` uses ``pipeline.sae`` with n_feat 512, k 16 instead). Analytic limit: naive work /
minimal work, naive = (conditions x firings) full forwards (layers x window), minimal = per row the layers
from the edited one on x the positions from the edit on. A second limit counts multiply-adds with the read-out
(the unembedding, needed at every position a KL reads) on both sides: the bound an edited run can reach.
The default reads include the mean over positions, so every position from the edit on is read out; with
``--reads next final`` only the edit's position and the last are, and the two limits nearly coincide.
"""
import argparse
import time

import torch

from writesae import pipeline
from writesae.experiments import firings, substitution
from writesae.sae import SAEConfig, WriteSAE


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="embedded")
    p.add_argument("--cell", type=int, nargs=2, default=None, help="layer head (default: first recurrent layer, head 0)")
    p.add_argument("--seqs", type=int, default=4)
    p.add_argument("--firings", type=int, default=8, help="top-1 firings per sequence")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--trained", action="store_true")
    p.add_argument("--reads", nargs="+", default=list(substitution.READS), choices=substitution.READS,
                   help="the KL reads: without 'mean' only each edit's position and the last are read out")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    host = pipeline.host(a.model)
    cell = tuple(a.cell) if a.cell else (host.recurrent_layers[0], 0)
    ids = pipeline.windows(host, "heldout", a.window, a.seqs)
    if a.trained:
        sae = pipeline.sae(host, cell, n_feat=512, k=16, data=dict(n_windows=256, window=a.window), progress=False)
    else:
        sae = WriteSAE(SAEConfig("bilinear", host.d_k, host.d_v, n_feat=512, k=16), seed=0)
        sae.set_mean(host.trace(ids, cells=[cell], logits=False)[cell].state.flatten(0, 1).mean(0))
    fir = firings.collect(host, sae, cell, ids)
    sites = firings.select(fir, "top1", max_firings=a.seqs * a.firings, seed=0)
    conds = ("atom", "delete", "random")
    kw = dict(conditions=conds, direction=substitution.DIRECTIONS, reads=tuple(a.reads))
    t0 = time.perf_counter()
    fast = substitution.substitute(host, sae, ids, sites, **kw)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = substitution.substitute(host, sae, ids, sites, reuse_prefix=False, **kw)
    t_naive = time.perf_counter() - t0
    diff = max(float((fast[f"kl_{c}"] - naive[f"kl_{c}"]).abs().max()) for c in conds)
    L, T, n = len(host.layers), a.window, len(sites)
    naive_work = len(conds) * n * L * T
    min_work = len(conds) * sum((L - cell[0]) * (T - int(q)) for q in sites["pos"])
    limit, ratio = naive_work / min_work, t_naive / t_fast
    # the same limit counting multiply-adds, the read-out (unembedding at every position read) included:
    # both methods must unembed every position from the edit on, so no edited run can beat this one
    # the naive method reads out every position (a full forward); an edited run needs, per row, every position
    # from the edit on for a mean, else the edit's and the last
    per_layer, readout = host.work_per_token
    reads_at = lambda q: T - q if "mean" in a.reads else 1 + (q < T - 1)  # noqa: E731
    naive_macs = n * (sum(per_layer) + readout) * T
    min_macs = sum(sum(per_layer[cell[0]:]) * (T - int(q)) + readout * reads_at(int(q)) for q in sites["pos"])
    limit_ro = naive_macs / min_macs
    print(f"model={host.name} cell=L{cell[0]}H{cell[1]} layers={L} window={T} sequences={a.seqs} firings={n} "
          f"(x{len(conds)} conditions; KLs read {'/'.join(a.reads)}, both directions)")
    print(f"naive     {n / t_naive:8.2f} firings/s   ({t_naive:.1f} s)")
    print(f"optimised {n / t_fast:8.2f} firings/s   ({t_fast:.1f} s)   max |KL diff| = {diff:.2e}")
    print(f"speed-up {ratio:.2f}x   analytic limit {limit:.2f}x   fraction of limit {ratio / limit:.2f}")
    print(f"           limit with the read-out ({readout / (sum(per_layer) / L):.1f} layers' work per position) "
          f"{limit_ro:.2f}x   fraction {ratio / limit_ro:.2f}")
    assert diff < 1e-6, "optimised and naive substitution KLs disagree"


if __name__ == "__main__":
    main()
