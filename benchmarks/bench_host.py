"""Edited forwards with prefix reuse vs the naive method, and extraction throughput.

    python benchmarks/bench_host.py [--model embedded] [--seqs 4] [--firings 16] [--window 128] [--read last]

Naive: one full forward from position 0 per (firing, condition), batch 1. Optimised: one unedited pass
per sequence, then each firing's 3 conditions as one batch starting at the edited position and layer.
The analytic limit is naive work / minimal work with minimal = (layers from the edited one on) x
(positions from the edit on); a second limit counts multiply-adds with the read-out (the unembedding,
``host.work_per_token``) on both sides: the naive forward reads out every position; an edited run, every
position from its edit on (``--read all``, the default) or the last position only (``--read last``, e.g. a
next-token effect). Results are checked equal.
"""
import argparse
import tempfile
import time

import torch

from writesae import pipeline
from writesae.extract import extract
from writesae.hosts import Edit


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="embedded")
    p.add_argument("--seqs", type=int, default=4)
    p.add_argument("--firings", type=int, default=16, help="firings per sequence")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--read", choices=("all", "last"), default="all", help="the logits returned per row")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    host = pipeline.host(a.model)
    ids = pipeline.windows(host, "heldout", a.window, a.seqs)
    g = torch.Generator().manual_seed(0)
    L, T = len(host.layers), a.window
    rows, naive_work, min_work = [], 0, 0
    per_layer, readout = host.work_per_token  # multiply-adds per token: a second limit, read-out included
    naive_macs = min_macs = 0
    for s in range(a.seqs):
        for _ in range(a.firings):
            c = host.cells[int(torch.randint(len(host.cells), (1,), generator=g))]
            pos = int(torch.randint(T // 4, T, (1,), generator=g))
            atom = torch.randn(host.d_k, host.d_v, generator=g)
            rand = torch.randn(host.d_k, host.d_v, generator=g)
            for m in (atom, None, rand):
                rows.append(Edit(s, c.layer, c.head, pos, "delete" if m is None else "replace", m))
                naive_work += L * T
                min_work += (L - c.layer) * (T - pos)
                naive_macs += (sum(per_layer) + readout) * T
                min_macs += sum(per_layer[c.layer:]) * (T - pos) + readout * (T - pos if a.read == "all" else 1)
    n = len(rows) // 3
    t0 = time.perf_counter()
    positions = None if a.read == "all" else [-1]
    fast = host.run_edits(ids, rows, positions=positions)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = host.run_edits(ids, rows, positions=positions, reuse_prefix=False)
    t_naive = time.perf_counter() - t0
    diff = (fast.logits - naive.logits).abs().max().item()
    limit = naive_work / min_work
    ratio = t_naive / t_fast
    print(f"model={host.name} layers={L} window={T} sequences={a.seqs} firings={n} (x3 conditions), read {a.read}")
    print(f"naive     {n / t_naive:8.2f} firings/s   ({t_naive:.1f} s)")
    print(f"optimised {n / t_fast:8.2f} firings/s   ({t_fast:.1f} s)   max |logit diff| = {diff:.2e}")
    print(f"speed-up {ratio:.2f}x   analytic limit {limit:.2f}x   fraction of limit {ratio / limit:.2f}")
    print(f"           limit with the read-out (unembedding the positions read) "
          f"{naive_macs / min_macs:.2f}x   fraction {ratio * min_macs / naive_macs:.2f}")
    assert diff < 1e-3, "optimised and naive edited runs disagree"

    # tracing the heads one layer at a time (cell_memory, extraction of a few layers): a trace that reads no
    # logits stops at its last traced layer; the same trace with the logits runs every layer and the read-out
    t_with = t_without = 0.0
    for layer in host.recurrent_layers:
        heads = [(c.layer, c.head) for c in host.cells if c.layer == layer]
        t0 = time.perf_counter()
        full = host.trace(ids, cells=heads)
        t_with += time.perf_counter() - t0
        t0 = time.perf_counter()
        part = host.trace(ids, cells=heads, logits=False)
        t_without += time.perf_counter() - t0
        assert all(torch.equal(full[c].state, part[c].state) for c in heads), "the traces disagree"
    limit = len(host.recurrent_layers) * len(host.layers) / sum(l + 1 for l in host.recurrent_layers)
    print(f"trace per layer: with logits (every layer) {t_with:.2f} s, without (up to the traced layer) "
          f"{t_without:.2f} s: {t_with / t_without:.2f}x (layer limit {limit:.2f}x, read-out not counted); "
          f"states equal")
    # the same heads in one walk up the model (host.trace_layers, what cell_memory does)
    t0 = time.perf_counter()
    walked = {k: t.state for _, tr in host.trace_layers(ids) for k, t in tr.items()}
    t_walk = time.perf_counter() - t0
    diff = max(float((walked[c] - host.trace(ids, cells=[c], logits=False)[c].state).abs().max())
               for c in [(x.layer, x.head) for x in host.cells[::max(1, len(host.cells) // 4)]])
    limit = sum(l + 1 for l in host.recurrent_layers) / (host.recurrent_layers[-1] + 1)
    print(f"every head in one walk (trace_layers) {t_walk:.2f} s vs a trace per layer {t_without:.2f} s: "
          f"{t_without / t_walk:.2f}x (layer limit {limit:.2f}x); max |state diff| = {diff:.1e}")
    assert diff < 1e-5, "the walk and the traces disagree"
    # what later heads output at every position (partition.reader_heads): from traces (states kept at every
    # position, so every step runs in Python) vs host.head_outputs (the blocks' o, chunked forms)
    every = list(range(T))
    t0 = time.perf_counter()
    traced = {k: t.out for _, tr in host.trace_layers(ids, positions=every) for k, t in tr.items()}
    t_traced = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = {k: o for _, os in host.head_outputs(ids, positions=every) for k, o in os.items()}
    t_outs = time.perf_counter() - t0
    diff = max(float((outs[k] - traced[k]).abs().max() / traced[k].abs().max()) for k in traced)
    print(f"every head's output at every position: head_outputs {t_outs:.2f} s vs trace_layers {t_traced:.2f} s: "
          f"{t_traced / t_outs:.2f}x; max relative |out diff| = {diff:.1e}")
    assert diff < 1e-4, "head_outputs and the traces disagree"

    cells = [(c.layer, c.head) for c in host.cells]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        extract(host, ids, cells, d, positions_per_seq=32, batch_size=a.seqs, progress=False)
        dt = time.perf_counter() - t0
    n_states = a.seqs * 32 * len(cells)
    print(f"extraction: {n_states} states ({len(cells)} cells x {a.seqs * 32} positions) in {dt:.2f} s "
          f"= {n_states / dt:.0f} states/s ({host.d_k}x{host.d_v})")


if __name__ == "__main__":
    main()
