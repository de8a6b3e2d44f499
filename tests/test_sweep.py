"""The all-cells sweep on Ray (writesae.sweep), on 4 cells of the tiny random model with 2 local Ray workers.

One Ray instance serves the module (starting Ray costs ~30 s on this machine). The fault test also checks
the Ray table against the cells run one by one in this process.
"""
import json
import os

import numpy as np
import pandas as pd
import pytest

from writesae import notebook, sweep as S
from writesae.cli import main
from writesae.plots import sweep as splots

CELLS = "L1H0,L1H1,L1H2,L1H3"
PARAMS = "params/tiny.yaml"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ray2():
    ray = pytest.importorskip("ray")  # an extra (pip install -e .[scale]); requirements.txt installs it for CI
    S._ray_init(ray, None, 2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The cells one by one in this process, no Ray."""
    root = tmp_path_factory.mktemp("serial")
    return S.sweep(os.path.join(ROOT, PARAMS), CELLS, root=root, serial=True, progress=False), root


def _results(root):
    return sorted((root / "sweep_cell").glob("*/result.json"))


def test_defaults_are_the_notebooks():
    for nb in ("02_feature_classes", "03_substitution", "04_closed_form"):
        mine = {k: v for k, v in notebook.defaults(nb).items() if k in S.DEFAULTS}
        assert mine and mine == {k: S.DEFAULTS[k] for k in mine}, nb
    with pytest.raises(ValueError, match="unknown parameter n_fet"):
        S.settings(PARAMS, n_fet=3)
    with pytest.raises(ValueError, match="sweep: pool must be one of 'top1', 'registers', got 'register'"):
        S.settings(PARAMS, pool="register")


def test_a_sweep_on_the_top1_pool(reference):
    """pool = "top1" (chapter 03's parameter) substitutes every top-1 firing of each cell, up to max_firings;
    the SAE, the partition and the closed form are the register pool's (the same cached artifacts)."""
    ref, root = reference
    cell = CELLS.split(",")[0]
    top = S.sweep(os.path.join(ROOT, PARAMS), cell, root=root, serial=True, progress=False, pool="top1")
    mine, theirs = top.iloc[0], ref.iloc[0]
    s = S.settings(PARAMS)
    assert theirs["n_sub"] < mine["n_sub"] == s["max_firings"]  # registers are a part of the top-1 firings
    same = ["fvu", "l0", "alive_sae", "n_alive", "n_register", "n_bundle", "dbic", "cf_atoms", "r2_direct"]
    assert mine[same].tolist() == theirs[same].tolist()
    assert mine["win_rate"] != theirs["win_rate"]


def test_ray_sweep_equals_serial_and_survives_a_raise_and_a_killed_worker(ray2, reference, tmp_path, monkeypatch):
    ref, _ = reference
    assert list(ref.columns) == S.COLUMNS and ref["cell"].tolist() == CELLS.split(",")
    assert ref["n_alive"].min() > 10 and np.isfinite(ref["win_rate"]).all() and np.isfinite(ref["r2_direct"]).all()
    # one task raises, another one's worker process dies once (Ray runs that task again)
    monkeypatch.setenv("WRITESAE_SWEEP_FAULT", "L1H1:raise,L1H2:exit")
    with pytest.raises(RuntimeError, match=r"1 of 4 cells failed[\s\S]*L1H1: .*injected fault") as err:
        S.sweep(PARAMS, CELLS, root=tmp_path, workers=2, progress=False)
    assert "L1H2" not in str(err.value)
    assert (tmp_path / "sweep_faults" / "L1H2.exit").exists()  # its worker was killed, the retry finished it
    first = {p: p.stat().st_mtime_ns for p in _results(tmp_path)}
    assert len(first) == 3
    monkeypatch.delenv("WRITESAE_SWEEP_FAULT")
    table = S.sweep(PARAMS, CELLS, root=tmp_path, workers=2, progress=False)
    # the rerun computed only the missing cell; the cache holds every cell exactly once, nothing half-written
    done = _results(tmp_path)
    assert len(done) == 4 and all(first[p] == p.stat().st_mtime_ns for p in first)
    assert sorted(json.loads(p.read_text())["cell"] for p in done) == CELLS.split(",")
    assert not list(tmp_path.rglob(".tmp-*"))
    assert len(list((tmp_path / "sweep").glob("*/table.csv"))) == 1
    cols = [c for c in S.COLUMNS if c != "seconds"]
    pd.testing.assert_frame_equal(table[cols], ref[cols])
    # a third call reads the stored table without Ray
    assert S.sweep(PARAMS, CELLS, root=tmp_path, serial=True, progress=False).equals(table)


def test_cli_and_figure(reference, monkeypatch, capsys):
    ref, root = reference
    monkeypatch.setenv("WRITESAE_CACHE", str(root))
    assert main(["sweep", "--params", PARAMS, "--cells", CELLS, "--serial"]) == 0  # stored: printed at once
    out = capsys.readouterr().out
    assert all(c in out for c in CELLS.split(",")) and "win_rate" in out
    assert main(["sweep", "--params", PARAMS, "--cells", "L9H9"]) == 2
    assert "layer 9 does not exist" in capsys.readouterr().err
    fig = splots.heatmaps(ref)
    assert len(fig.axes) == 4  # two panels and their colour bars
    img = fig.axes[0].images[0].get_array()
    assert img.shape == (1, 4) and np.allclose(img.filled(np.nan)[0], ref["win_rate"])
