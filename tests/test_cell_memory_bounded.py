"""``overview.cell_memory`` at a real model's scale: it traces every cell's states and writes, which at Qwen3.5-0.8B's
(18 x 16 heads of 128 x 128, 8 passages of 1,024 tokens) is ~300 GB at once; under ``max_bytes`` it traces the
cells and passages in pieces, with the same table."""
import pandas as pd
import torch

from writesae.experiments import overview as O
from writesae.hosts import load_host


def test_cell_memory_in_pieces_is_the_same_table():
    host = load_host("tiny", device="cpu")
    ids = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(0))
    whole = O.cell_memory(host, ids)
    sizes, trace = [], host.trace

    def spy(input_ids, cells=None, positions=None, **kw):
        c = host.cells[0]
        sizes.append(len(input_ids) * len(cells) * len(positions) * c.d_k * c.d_v * 4 * 2)
        return trace(input_ids, cells=cells, positions=positions, **kw)

    host.trace = spy
    budget = 2 * 12 * host.cells[0].d_k * host.cells[0].d_v * 4 * 2  # two cells of one passage's 12 positions
    pieces = O.cell_memory(host, ids, max_bytes=budget)
    pd.testing.assert_frame_equal(whole, pieces)
    assert len(sizes) > 1 and max(sizes) <= budget


def test_reader_heads_in_pieces_is_the_same_table():
    """reader_heads traces every later head (Qwen3.5-0.8B after L9: 144 heads, both unedited and edited): under
    ``max_bytes`` in groups of heads, with the same table."""
    from writesae.experiments import partition as P
    from writesae.sae import SAEConfig, WriteSAE

    host = load_host("tiny", device="cpu")
    ids = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(0))
    c = host.cells[0]
    torch.manual_seed(0)
    sae = WriteSAE(SAEConfig("bilinear", d_k=c.d_k, d_v=c.d_v, n_feat=8, k=2))
    firings = pd.DataFrame(dict(feature=[1, 1, 1], seq=[0, 1, 2], pos=[5, 9, 12], coef=[1.0, 2.0, 0.5]))
    whole = P.reader_heads(host, sae, (c.layer, c.head), ids, firings, [1], n_sites=3)
    sizes, trace = [], host.trace

    def spy(input_ids, cells=None, positions=None, **kw):
        sizes.append(len(input_ids) * len(cells) * len(positions) * c.d_k * c.d_v * 4 * 2)
        return trace(input_ids, cells=cells, positions=positions, **kw)

    host.trace = spy
    budget = 3 * 4 * 15 * c.d_k * c.d_v * 4 * 2  # three heads of a batch of 4 sites over 15 positions
    pieces = P.reader_heads(host, sae, (c.layer, c.head), ids, firings, [1], n_sites=3, max_bytes=budget)
    pd.testing.assert_frame_equal(whole, pieces)
    assert len(sizes) > 2 and max(sizes) <= budget
