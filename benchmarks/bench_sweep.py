"""Wall time of the 4-cell tiny sweep (params/tiny.yaml, L1H0-L1H3) with 1 and 2 local Ray workers, and of the same
cells one by one in this process (``serial=True``); each run from an empty cache. Ray's start-up is timed apart,
and each Ray sweep runs twice: first on workers that still have to import torch and load the model, then again
(another empty cache) on the same warm workers.

    python benchmarks/bench_sweep.py [--cells L1H0,L1H1,L1H2,L1H3] [--workers 1 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from writesae import pipeline
from writesae import sweep as S


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--params", default="params/tiny.yaml")
    p.add_argument("--cells", default="L1H0,L1H1,L1H2,L1H3")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    a = p.parse_args()
    torch.set_num_threads(1)
    import ray

    s = S.settings(a.params)
    pipeline.host(s["model"], s["device"])  # the driver's host load is not part of any timing
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        S.sweep(a.params, a.cells, root=f"{root}/serial", serial=True, progress=False)
        print(f"serial (this process, no Ray): {time.perf_counter() - t0:.1f} s")
    times = {}
    for w in a.workers:
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            S._ray_init(ray, None, w)
            t1 = time.perf_counter()
            S.sweep(a.params, a.cells, root=f"{root}/cold", workers=w, progress=False)
            t2 = time.perf_counter()
            # again from an empty cache on the same (now warm) workers: the cells' compute, not the workers' imports
            S.sweep(a.params, a.cells, root=f"{root}/warm", workers=w, progress=False)
            t3 = time.perf_counter()
            ray.shutdown()
            times[w] = (t2 - t1, t3 - t2)
            print(f"{w} Ray worker(s): Ray start {t1 - t0:.1f} s, sweep {t2 - t1:.1f} s (workers starting), "
                  f"{t3 - t2:.1f} s (warm workers)")
    if 1 in times and len(times) > 1:
        print("speed-up over 1 worker: " + ", ".join(f"{w} workers {times[1][0] / t[0]:.2f}x cold, {times[1][1] / t[1]:.2f}x warm"
                                                      for w, t in times.items() if w != 1))


if __name__ == "__main__":
    main()
