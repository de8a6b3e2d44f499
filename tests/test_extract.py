"""State extraction: exact states, resume after interruption, refusal to mix parameters, CLI errors."""
import json

import pytest
import torch

from writesae.cli import main
from writesae.data import StateDataset
from writesae.extract import extract
from writesae.hosts import load_host


@pytest.fixture(scope="module")
def host():
    return load_host("tiny")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 101, (40, 32), generator=torch.Generator().manual_seed(3))


def test_states_are_the_traced_states(host, ids, tmp_path):
    extract(host, ids, [(0, 1), (2, 3)], tmp_path, positions_per_seq=8, batch_size=16, progress=False)
    ds = StateDataset(tmp_path, (2, 3), split="all")
    meta = ds.meta()
    assert len(ds) == 40 * 8
    tr = host.trace(ids, cells=[(2, 3)])[(2, 3)]
    for i in (0, 77, 319):
        s, p = int(meta["seq_ids"][i]), int(meta["positions"][i])
        ref = tr.state[s, p]
        assert (ds.states([i])[0] - ref).abs().max() <= 1e-2 * ref.abs().max()  # bf16 storage
        assert int(meta["token_ids"][i]) == int(ids[s, p])
    assert torch.allclose(ds.mean, ds.states(range(len(ds))).mean(0), atol=1e-4)


def test_resume_after_interruption(host, ids, tmp_path, monkeypatch):
    ref_dir = tmp_path / "ref"
    extract(host, ids, [(1, 0)], ref_dir, positions_per_seq=4, batch_size=8, progress=False)
    calls, orig, interrupted = [], host.trace, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 3 and not interrupted:
            interrupted.append(1)
            raise RuntimeError("interrupted")
        return orig(*a, **kw)

    monkeypatch.setattr(host, "trace", flaky)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="interrupted"):
        extract(host, ids, [(1, 0)], out, positions_per_seq=4, batch_size=8, progress=False)
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 2
    calls.clear()
    extract(host, ids, [(1, 0)], out, positions_per_seq=4, batch_size=8, progress=False)
    assert len(calls) == 3  # only the 3 missing shards of 5
    a, b = StateDataset(ref_dir, (1, 0), split="all"), StateDataset(out, (1, 0), split="all")
    assert torch.equal(a.states(range(len(a))), b.states(range(len(b))))


def test_other_parameters_are_refused(host, ids, tmp_path):
    extract(host, ids[:8], [(1, 0)], tmp_path, positions_per_seq=4, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="positions_per_seq"):
        extract(host, ids[:8], [(1, 0)], tmp_path, positions_per_seq=5, batch_size=8, progress=False)


def test_cli_names_the_fix(tmp_path, capsys):
    assert main(["extract", "--model", "tiny", "--cells", "L3H0", "--out", str(tmp_path)]) == 2
    assert "recurrent (Gated DeltaNet) layers are [0, 1, 2]" in capsys.readouterr().err
    assert main(["extract", "--model", "tiny", "--cells", "L0H0", "--n-windows", "16", "--window", "32",
                 "--positions-per-seq", "4", "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "mean.safetensors").exists()
