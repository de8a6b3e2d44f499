"""Where a short SAE training run spends its time (issue 12: trainer overhead outside the steps).

    python benchmarks/bench_train.py [--d 128] [--n 4000] [--n-feat 2048] [--epochs 2] [--threads 1]

Writes a state dataset of ``n`` random low-rank-plus-noise (d, d) states (bf16 shards, as
``writesae extract`` writes them), trains ``writesae.train.train_sae`` on it with a checkpoint
directory, and splits the wall time into: the statistics pass at start-up (mean and input scale),
validation passes, checkpoint writes, the final evaluation and the optimizer steps (the rest).
Prints steps/s and end-to-end samples/s (also in the run's metrics), wall and CPU seconds (CPU time is the
steadier figure on a shared machine). ``--trainer old_train.py`` times another version of the trainer
(``git show <commit>:writesae/train.py > old_train.py``) for a before/after comparison.
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


def dataset(root: Path, d: int, n: int, shard: int = 1000) -> Path:
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
        data = dataset(Path(tmp) / "states", a.d, a.n)
        cfg = SAEConfig("bilinear", a.d, a.d, n_feat=a.n_feat, k=a.k)
        t0, c0 = time.perf_counter(), time.process_time()
        res = T_.train_sae(data, "L0H0", cfg, Path(tmp) / "sae", epochs=a.epochs, batch_size=a.batch, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    outside = sum(v[0] for v in spent.values())
    outside_cpu = sum(v[1] for v in spent.values())
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


if __name__ == "__main__":
    main()
