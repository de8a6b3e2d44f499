"""`writesae cells` (memory statistics of every cell) and the --threads option."""
import re

import torch

from writesae.cli import main


def test_cells_lists_every_cell_with_its_memory(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WRITESAE_CACHE", str(tmp_path))
    before = torch.get_num_threads()
    try:
        assert main(["cells", "--model", "tiny", "--window", "16", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    from writesae.pipeline import host

    h = host("tiny")
    rows = re.findall(r"^(L\d+H\d+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert [r[0] for r in rows] == [c.key for c in h.cells]  # every cell, in order
    vals = [(float(d), float(w)) for _, d, w in rows]
    assert all(0 <= d <= 1 and 0 < w <= 1 for d, w in vals)
    assert len({w for _, w in vals}) > 1  # measured per cell, not a constant
    assert "write_share: median ||W_t||_F / ||S_t||_F" in out


def test_threads_must_be_positive(capsys):
    assert main(["cells", "--model", "tiny", "--no-memory", "--threads", "0"]) == 2
    assert "--threads 0: give a positive number of threads" in capsys.readouterr().err
