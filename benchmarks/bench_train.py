"""Where a short SAE training run spends its time (issue 12: trainer overhead outside the steps).

    python benchmarks/bench_train.py [--d 128] [--n 4000] [--n-feat 2048] [--epochs 2] [--threads 1]

Writes a state dataset of ``n`` random low-rank-plus-noise (d, d) states (bf16 shards, as
``writesae extract`` writes them), trains ``writesae.train.train_sae`` on it with a checkpoint
directory, and splits the wall time into: the statistics pass at start-up (mean and input scale),
validation passes, checkpoint writes, the final evaluation and the optimizer steps (the rest).
Prints steps/s and end-to-end samples/s (also in the run's metrics), wall and CPU seconds (CPU time is the
steadier figure on a shared machine). ``--trainer old_train.py`` times another version of the trainer
(``git show <commit>:writesae/train.py > old_train.py``) for a before/after comparison. The states fit in memory,
so the trainer reads them in once; the same run streamed from the shards (``IN_MEMORY_BYTES = 0``) follows, side by
side, its weights checked equal (``--shard``: states per shard file; the book's datasets hold 512).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from writesae import train as T
from writesae.data import ShardWriter
from writesae.sae import SAEConfig


def dataset(root: Path, d: int, n: int, shard: int = 512) -> Path:
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(64, d, generator=g)
    w = ShardWriter(root, {"params": {"model": "bench"}}, ["L0H0"], d, d)
    for i in range(0, n, shard):
        m = min(shard, n - i)
        u = torch.randn(m, 4, 64, generator=g) @ basis
        v = torch.randn(m, 4, 64, generator=g) @ basis
        S = (u.mT @ v) / 64 + 0.01 * torch.randn(m, d, d, generator=g)
        w.write(i // shard, {"L0H0.state": S, "L0H0.write": S, "L0H0.a": torch.ones(m), "L0H0.b": torch.ones(m),
                             "token_ids": torch.zeros(m, dtype=torch.long), "seq_ids": torch.arange(i, i + m) // 8,
                             "positions": torch.arange(m) % 8})  # fmt: skip
    w.finish()
    return root


def timed(spent, name, fn):
    def wrap(*a, **k):
        t, c = time.perf_counter(), time.process_time()
        try:
            return fn(*a, **k)
        finally:
            spent[name][0] += time.perf_counter() - t
            spent[name][1] += time.process_time() - c
    return wrap


def trainer(path):
    if path is None:
        return T
    spec = importlib.util.spec_from_file_location("writesae._bench_trainer", path)
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--n-feat", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shard", type=int, default=512)
    ap.add_argument("--trainer", default=None, help="a train.py to time instead of writesae.train")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    T_ = trainer(a.trainer)
    spent = defaultdict(lambda: [0.0, 0.0])
    names = ("centred_rms", "evaluate_sae", "_save_last", "_save_best", "_stats")
    for name in names:  # time the trainer's helpers in place
        if hasattr(T_, name):
            setattr(T_, name, timed(spent, name, getattr(T_, name)))
    from writesae.data import StateDataset

    StateDataset.compute_mean = timed(spent, "compute_mean", StateDataset.compute_mean)
    with tempfile.TemporaryDirectory() as tmp:
        data = dataset(Path(tmp) / "states", a.d, a.n, a.shard)
        cfg = SAEConfig("bilinear", a.d, a.d, n_feat=a.n_feat, k=a.k)
        T_.train_sae(data, "L0H0", cfg, None, epochs=1, batch_size=a.batch, max_steps=2, progress=False)  # imports
        spent.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        res = T_.train_sae(data, "L0H0", cfg, Path(tmp) / "sae", epochs=a.epochs, batch_size=a.batch, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        spent = {k: tuple(v) for k, v in spent.items()}  # this run's (the streamed one adds to the counters)
        outside = sum(v[0] for v in spent.values())
        outside_cpu = sum(v[1] for v in spent.values())
        streamed = None
        if getattr(T_, "IN_MEMORY_BYTES", 0):  # the same run streamed from the shards
            keep, T_.IN_MEMORY_BYTES = T_.IN_MEMORY_BYTES, 0
            t1, c1 = time.perf_counter(), time.process_time()
            run = T_.train_sae(data, "L0H0", cfg, Path(tmp) / "sae_streamed", epochs=a.epochs, batch_size=a.batch,
                               progress=False)
            streamed = (time.perf_counter() - t1, time.process_time() - c1, run)
            T_.IN_MEMORY_BYTES = keep
    print(f"{a.d}x{a.d} states, n_feat {a.n_feat}, k {a.k}, {res.step} steps of {a.batch}, {a.threads} thread(s), "
          f"trainer {a.trainer or 'writesae.train'}")
    print(f"wall {wall:.1f} s (CPU {cpu:.1f} s); steps and the rest {wall - outside:.1f} s (CPU {cpu - outside_cpu:.1f} s)")
    for k, (v, c) in sorted(spent.items(), key=lambda kv: -kv[1][1]):
        print(f"  {k:<14} wall {v:6.1f} s ({100 * v / wall:4.1f}%)  CPU {c:6.1f} s ({100 * c / cpu:4.1f}%)")
    print(f"outside the steps: wall {outside:.1f} s ({100 * outside / wall:.0f}%), CPU {outside_cpu:.1f} s "
          f"({100 * outside_cpu / cpu:.0f}%)")
    print(f"steps/s {res.step / (wall - outside):.3f} (steps only); end-to-end samples/s {res.step * a.batch / wall:.1f}")
    for k in ("steps_per_s", "samples_per_s"):
        if k in res.metrics:
            print(f"  metrics[{k!r}] = {res.metrics[k]:.3f}")
    if streamed is not None:
        s_wall, s_cpu, run = streamed
        same = all(torch.equal(v, run.sae.state_dict()[k]) for k, v in res.sae.state_dict().items())
        print(f"streamed from {-(-a.n // a.shard)} shards: wall {s_wall:.1f} s (CPU {s_cpu:.1f} s); in memory "
              f"{s_wall / wall:.2f}x faster by wall, {s_cpu / cpu:.2f}x by CPU; weights equal: {same}")
        assert same, "the in-memory and the streamed runs differ"


if __name__ == "__main__":
    main()
