"""``overview.cell_memory`` at a real model's scale: it traces every cell's states and writes, which at Qwen3.5-0.8B's
(18 x 16 heads of 128 x 128, 8 passages of 1,024 tokens) is ~300 GB at once; under ``max_bytes`` it traces the
cells and passages in pieces, with the same table."""
import numpy as np
import pandas as pd
import torch

from writesae.experiments import overview as O
from writesae.hosts import load_host


def test_cell_memory_in_pieces_is_the_same_table():
    host = load_host("tiny", device="cpu")
    ids = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(0))
    whole = O.cell_memory(host, ids)
    sizes, walks, trace_layers = [], [], host.trace_layers

    def spy(input_ids, cells=None, positions=None):  # the bytes held at once: one layer's traced heads
        walks.append(len(cells))
        for layer, tr in trace_layers(input_ids, cells=cells, positions=positions):
            c = host.cells[0]
            sizes.append(len(input_ids) * len(tr) * len(positions) * c.d_k * c.d_v * 4 * 2)
            yield layer, tr

    host.trace_layers = spy
    budget = 2 * 12 * host.cells[0].d_k * host.cells[0].d_v * 4 * 2  # two cells of one passage's 12 positions
    pieces = O.cell_memory(host, ids, max_bytes=budget)
    pd.testing.assert_frame_equal(whole, pieces, rtol=1e-5)
    assert len(sizes) > 1 and max(sizes) <= budget
    # the budget holds 2 passages of one head per layer: 2 pieces of passages x one walk per head, each walk over
    # every layer, every cell traced once per piece
    assert len(walks) == 2 * host.n_heads and sum(walks) == 2 * len(host.cells)


def test_trace_layers_is_the_trace_layer_by_layer():
    host = load_host("tiny", device="cpu")
    ids = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(1))
    cells = [(host.recurrent_layers[0], 1), (host.recurrent_layers[-1], 0), (host.recurrent_layers[-1], 2)]
    # with an edit in the first traced layer, seen by the later one
    from writesae.hosts import Edit

    c0 = host.cell(*cells[0])
    edits = [Edit(1, c0.layer, c0.head, 3, "add", torch.randn(c0.d_k, c0.d_v, generator=torch.Generator().manual_seed(2)))]
    full = host.trace(ids, cells=cells, positions=[4, 19], edits=edits)
    assert not torch.allclose(full[cells[1]].state, host.trace(ids, cells=cells[1:], positions=[4, 19])[cells[1]].state)
    got = list(host.trace_layers(ids, cells=cells, positions=[4, 19], edits=edits))
    assert [layer for layer, _ in got] == [host.recurrent_layers[0], host.recurrent_layers[-1]]
    assert [sorted(tr) for _, tr in got] == [[cells[0]], cells[1:]]
    for _, tr in got:
        for key, t in tr.items():
            for name in t._fields:
                a, b = getattr(t, name), getattr(full[key], name)
                assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6, rtol=1e-5), (key, name)


def test_reader_heads_is_the_traced_response():
    """reader_heads reads the later heads' outputs without keeping their states (host.head_outputs): its table is
    the response computed from full traces of every later head, unedited and edited."""
    from writesae.experiments import partition as P
    from writesae.hosts import Edit
    from writesae.sae import SAEConfig, WriteSAE

    host = load_host("tiny", device="cpu")
    ids = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(0))
    c = host.cells[0]
    torch.manual_seed(0)
    sae = WriteSAE(SAEConfig("bilinear", d_k=c.d_k, d_v=c.d_v, n_feat=8, k=2))
    firings = pd.DataFrame(dict(feature=[1, 1, 1], seq=[0, 1, 2], pos=[5, 9, 12], coef=[1.0, 2.0, 0.5]))
    got = P.reader_heads(host, sae, (c.layer, c.head), ids, firings, [1], n_sites=3, batch=3)
    later = [(d.layer, d.head) for d in host.cells if d.layer > c.layer]
    A = sae.atom(1).float()
    sites = P._sites(firings, 1, 3, 0)
    x = ids[torch.tensor(sites["seq"].tolist())]
    edits = [Edit(r, c.layer, c.head, int(p), "add", float(k) * A) for r, (p, k) in enumerate(zip(sites["pos"], sites["coef"]))]
    base, edit = host.trace(x, cells=later), host.trace(x, cells=later, edits=edits)
    for d in later:
        d_out, o = (edit[d].out - base[d].out).norm(dim=-1), base[d].out.norm(dim=-1)
        want = np.mean([float(d_out[r, p:].mean() / o[r, p:].mean()) for r, p in enumerate(sites["pos"])])
        row = got[(got["layer"] == d[0]) & (got["head"] == d[1])]
        assert len(row) == 1 and abs(float(row["response"].iloc[0]) - want) <= 1e-4 * want + 1e-7, d
    assert len(got) == len(later) and (got["response"] > 0).all()
