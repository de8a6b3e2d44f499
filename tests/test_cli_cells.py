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


def test_wandb_is_optional(tmp_path):
    """Asking for wandb without it installed is a one-line error naming the fix; not asking never imports it."""
    import importlib.util

    import pytest

    from writesae.sae import SAEConfig
    from writesae.train import train_on_tensors

    S = torch.randn(64, 3, 3, generator=torch.Generator().manual_seed(0))
    cfg = SAEConfig("bilinear", 3, 3, n_feat=8, k=2)
    res = train_on_tensors(S, cfg, tmp_path / "a", epochs=2, batch_size=16, log_every=1, progress=False)
    assert [r["step"] for r in res.log if r["split"] == "train"] == list(range(1, 7))
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ValueError, match="pip install wandb"):
        train_on_tensors(S, cfg, tmp_path / "b", epochs=1, batch_size=16, progress=False, wandb=True)
