import json
import multiprocessing
import os
import time

import numpy as np
import pandas as pd
import pytest

from writesae import cache


def test_same_params_same_dir_any_key_order(tmp_path):
    a = cache.artifact_dir("sae", {"layer": 9, "head": 4, "k": 32}, root=tmp_path)
    b = cache.artifact_dir("sae", {"k": 32, "head": 4, "layer": 9}, root=tmp_path)
    assert a == b
    assert a.parent == tmp_path / "sae"
    assert len(a.name) == 12
    assert json.loads((a / "params.json").read_text()) == {"layer": 9, "head": 4, "k": 32}


def test_key_is_sha256_of_canonical_json():
    import hashlib
    canon = '{"a":[1,2],"b":"x"}'
    assert cache.canonical_json({"b": "x", "a": (1, 2)}) == canon
    assert cache.params_key({"b": "x", "a": (1, 2)}) == hashlib.sha256(canon.encode()).hexdigest()[:12]


def test_different_params_different_dir(tmp_path):
    a = cache.artifact_dir("sae", {"layer": 9}, root=tmp_path)
    assert cache.artifact_dir("sae", {"layer": 17}, root=tmp_path) != a
    assert cache.artifact_dir("sae", {"layer": 9.5}, root=tmp_path) != a
    assert cache.artifact_dir("states", {"layer": 9}, root=tmp_path).parent.name == "states"
    # numpy scalars hash like the plain numbers they hold
    assert cache.artifact_dir("sae", {"layer": np.int64(9)}, root=tmp_path) == a


def test_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WRITESAE_CACHE", str(tmp_path / "c"))
    assert cache.artifact_dir("t", {"x": 1}).parent.parent == tmp_path / "c"
    monkeypatch.delenv("WRITESAE_CACHE")
    monkeypatch.chdir(tmp_path)
    assert cache.artifact_dir("t", {"x": 1}).resolve().parent.parent == (tmp_path / "artifacts").resolve()


def test_collision_or_edited_params_is_an_error(tmp_path):
    d = cache.artifact_dir("t", {"x": 1}, root=tmp_path)
    (d / "params.json").write_text('{"x": 2}')
    with pytest.raises(RuntimeError):
        cache.artifact_dir("t", {"x": 1}, root=tmp_path)


def test_cached_table_computes_once_and_round_trips(tmp_path):
    calls = []
    df = pd.DataFrame({"f": [0.1, 1 / 3, np.pi * 1e-9, np.nan], "i": [1, 2, 3, 4],
                       "b": [True, False, True, True], "s": ["NA", "reg", "null", "x"]})

    def compute():
        calls.append(1)
        return df

    first = cache.cached_table("res", {"seed": 0}, compute, root=tmp_path)
    second = cache.cached_table("res", {"seed": 0}, compute, root=tmp_path)
    assert len(calls) == 1
    pd.testing.assert_frame_equal(first, df)  # exact floats, dtypes, "NA" stays text
    pd.testing.assert_frame_equal(second, df)
    cache.cached_table("res", {"seed": 1}, compute, root=tmp_path)
    assert len(calls) == 2


def test_cached_table_keeps_index_as_column(tmp_path):
    df = pd.DataFrame({"v": [1.5, 2.5]}, index=pd.Index(["L1", "L9"], name="layer"))
    out = cache.cached_table("res", {}, lambda: df, root=tmp_path)
    assert list(out.columns) == ["layer", "v"]
    assert out["layer"].tolist() == ["L1", "L9"]


def test_failed_compute_leaves_nothing(tmp_path):
    def boom():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.cached_table("res", {"a": 1}, boom, root=tmp_path)
    d = cache.artifact_dir("res", {"a": 1}, root=tmp_path)
    assert sorted(p.name for p in d.iterdir()) == [".lock", "params.json"]  # the lock file, no result
    # and the next call computes
    assert cache.cached_table("res", {"a": 1}, lambda: pd.DataFrame({"x": [1]}), root=tmp_path)["x"].tolist() == [1]


def test_atomic_write_interrupted_keeps_old_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with cache.atomic_write(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["a.txt"]
    with cache.atomic_write(p) as tmp:
        tmp.write_text("new")
    assert p.read_text() == "new"
    assert [q.name for q in tmp_path.iterdir()] == ["a.txt"]


def test_cached_json_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"win": np.float64(0.924), "n": np.int64(4851), "ci": (0.916, 0.931)}

    a = cache.cached_json("sub", {"layer": 9}, compute, root=tmp_path)
    b = cache.cached_json("sub", {"layer": 9}, compute, root=tmp_path)
    assert a == b == {"win": 0.924, "n": 4851, "ci": [0.916, 0.931]}
    assert len(calls) == 1


def _slow_table(root, log):
    def compute():
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        return pd.DataFrame({"x": [os.getpid()]})
    return cache.cached_table("res", {"shared": 1}, compute, root=root)["x"].tolist()


def test_two_processes_compute_an_artifact_once(tmp_path):
    """Notebooks run side by side (writesae book --jobs 2): the second process waits for the first's result
    instead of computing it again."""
    log = tmp_path / "computed.txt"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        got = pool.starmap(_slow_table, [(tmp_path, log), (tmp_path, log)])
    assert len(log.read_text().split()) == 1
    assert got[0] == got[1] == [int(log.read_text())]
    n, sec = cache.seconds_by_kind(tmp_path)["res"]  # the computation's own time, recorded once
    assert n == 1 and 1.0 <= sec < 5.0


def test_busy_while_an_artifact_is_being_computed(tmp_path):
    d = tmp_path / "a"
    assert not cache.busy(d)  # no folder, no lock
    with cache.computing(d, lambda: False) as todo:
        assert todo and cache.busy(d)  # flock: another open of the lock file conflicts, as another process's does
    assert not cache.busy(d)


def test_saes_trains_the_one_another_process_is_training_last(tmp_path, monkeypatch):
    from writesae import pipeline

    class Host:
        def cell(self, layer, head):
            return layer, head

    cells = [(1, 0), (2, 0), (3, 0)]
    dirs = {c: tmp_path / f"L{c[0]}H{c[1]}" for c in cells}
    monkeypatch.setattr(pipeline, "_sae_key", lambda h, c, **kw: (dirs[tuple(c)], None, tuple(c)))
    trained = []
    loaded = []
    monkeypatch.setattr(pipeline, "_trained", lambda h, d, d_states, c, load=True: trained.append(c) or (
        loaded.append(c) or f"SAE {c}" if load else None))
    with cache.computing(dirs[(1, 0)], lambda: False):  # another notebook is training (1, 0)'s SAE
        got = pipeline.saes(Host(), cells, data={})
    assert trained == [(2, 0), (3, 0), (1, 0)]
    assert list(got) == cells and got[(1, 0)] == "SAE (1, 0)"
    trained.clear()
    pipeline.saes(Host(), cells, data={})  # nothing busy: the given order
    assert trained == cells
    trained.clear()  # a list of specs (other variants, other cells): the same rule
    with cache.computing(dirs[(2, 0)], lambda: False):
        got = pipeline.sae_list(Host(), [dict(cell=c, variant="flat") for c in cells])
    assert trained == [(1, 0), (3, 0), (2, 0)] and got == [f"SAE {c}" for c in cells]
    trained.clear()  # one at a time: every one trained first (the same order, none loaded), then loaded as taken
    loaded.clear()
    with cache.computing(dirs[(2, 0)], lambda: False):
        it = pipeline.sae_iter(Host(), [dict(cell=c, variant="flat") for c in cells])
        assert next(it) == "SAE (1, 0)" and trained == [(1, 0), (3, 0), (2, 0), (1, 0)] and loaded == [(1, 0)]
        assert list(it) == ["SAE (2, 0)", "SAE (3, 0)"] and loaded == cells
