import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from writesae.data import ShardWriter, StateDataset, TensorStates, cell_key, parse_cell
from writesae.errors import CorruptFileError

CELLS = [(1, 2), (3, 0)]
D_K, D_V = 4, 3
PARAMS = {"model": "tiny", "seq_len": 8, "layers": [1, 3]}


def make_shard(idx, n=24, seqs_per_shard=3, seed=None):
    g = torch.Generator().manual_seed(100 + idx if seed is None else seed)
    out = {
        "token_ids": torch.randint(0, 50, (n,), generator=g),
        "seq_ids": torch.arange(n) // (n // seqs_per_shard) + idx * seqs_per_shard,
        "positions": torch.arange(n) % (n // seqs_per_shard),
    }
    for c in CELLS:
        k = cell_key(*c)
        out[f"{k}.state"] = torch.randn(n, D_K, D_V, generator=g) * 3 + 1
        out[f"{k}.write"] = torch.randn(n, D_K, D_V, generator=g)
        out[f"{k}.a"] = torch.rand(n, generator=g)
        out[f"{k}.b"] = torch.rand(n, generator=g)
    return out


def write_dataset(path, n_shards=4, params=PARAMS):
    w = ShardWriter(path, {"params": params, "model": params["model"]}, CELLS, D_K, D_V)
    shards = [make_shard(i) for i in range(n_shards)]
    for i, s in enumerate(shards):
        w.write(i, s)
    w.finish()
    return shards


def test_cell_key():
    assert cell_key(9, 4) == "L9H4"
    assert parse_cell((9, 4)) == "L9H4" and parse_cell("L1H2") == "L1H2"


def test_round_trip(tmp_path):
    shards = write_dataset(tmp_path / "d")
    ds = StateDataset(tmp_path / "d", (3, 0), split="all")
    assert len(ds) == 4 * 24 and (ds.d_k, ds.d_v) == (D_K, D_V)
    want = torch.cat([s["L3H0.state"] for s in shards]).to(torch.bfloat16).float()
    got = ds.states(np.arange(len(ds)))
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(ds.states(5), want[5])
    wants_w = torch.cat([s["L3H0.write"] for s in shards]).to(torch.bfloat16).float()
    assert torch.equal(ds.writes([7, 70]), wants_w[[7, 70]])
    meta = ds.meta()
    assert np.array_equal(meta["token_ids"], torch.cat([s["token_ids"] for s in shards]).numpy())
    assert np.array_equal(meta["a"], torch.cat([s["L3H0.a"] for s in shards]).numpy())
    assert meta["positions"].dtype == np.int64
    man = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert man["complete"] and man["n_states"] == 96 and man["dtype"] == "bfloat16"
    assert man["params"] == PARAMS and man["cells"] == ["L1H2", "L3H0"]


def test_mean_is_mean_of_stored_states(tmp_path):
    shards = write_dataset(tmp_path / "d")
    for c in CELLS:
        key = cell_key(*c)
        want = torch.cat([s[f"{key}.state"] for s in shards]).to(torch.bfloat16).double().mean(0).float()
        ds = StateDataset(tmp_path / "d", c, split="train")
        assert ds.mean.shape == (D_K, D_V) and ds.mean.dtype == torch.float32
        torch.testing.assert_close(ds.mean, want, atol=1e-6, rtol=0)
        sub = ds.states(np.arange(len(ds))).double().mean(0).float()
        torch.testing.assert_close(ds.compute_mean(batch_size=7), sub, atol=1e-6, rtol=0)
        assert (ds.mean - sub).abs().max() > 1e-3  # the split mean is a different number


def test_resume_skips_done_shards(tmp_path):
    w = ShardWriter(tmp_path, {"params": PARAMS}, CELLS, D_K, D_V)
    assert w.done_shards() == set()
    w.write(0, make_shard(0))
    w.write(2, make_shard(2))
    (tmp_path / "shard_00001.safetensors.tmp").write_bytes(b"half written")  # a crash mid-write
    w2 = ShardWriter(tmp_path, {"params": dict(PARAMS)}, CELLS, D_K, D_V)
    assert w2.done_shards() == {0, 2}
    for i in sorted({0, 1, 2, 3} - w2.done_shards()):
        w2.write(i, make_shard(i))
    w2.finish()
    ds = StateDataset(tmp_path, "L1H2", split="all")
    assert len(ds) == 96
    want = torch.cat([make_shard(i)["L1H2.state"] for i in range(4)]).to(torch.bfloat16).float()
    assert torch.equal(ds.states(np.arange(96)), want)


def test_mismatched_params_refused(tmp_path):
    ShardWriter(tmp_path, {"params": PARAMS}, CELLS, D_K, D_V).write(0, make_shard(0))
    with pytest.raises(ValueError, match=r"params.seq_len.*8.*16[\s\S]*another directory"):
        ShardWriter(tmp_path, {"params": {**PARAMS, "seq_len": 16}}, CELLS, D_K, D_V)
    with pytest.raises(ValueError, match="d_k"):
        ShardWriter(tmp_path, {"params": PARAMS}, CELLS, D_K + 1, D_V)


def test_split_deterministic_disjoint_by_sequence(tmp_path):
    write_dataset(tmp_path, n_shards=5)  # 15 sequences
    tr = StateDataset(tmp_path, "L1H2", "train", seed=3)
    va = StateDataset(tmp_path, "L1H2", "val", seed=3)
    assert len(tr) + len(va) == 120
    assert not set(tr.indices) & set(va.indices)
    assert not set(tr.meta()["seq_ids"]) & set(va.meta()["seq_ids"])  # no sequence on both sides
    assert len(set(va.meta()["seq_ids"])) == 3  # 20% of 15 sequences
    assert np.array_equal(StateDataset(tmp_path, "L3H0", "val", seed=3).indices, va.indices)
    assert not np.array_equal(StateDataset(tmp_path, "L1H2", "val", seed=4).indices, va.indices)


def test_iter_batches(tmp_path):
    write_dataset(tmp_path)
    ds = StateDataset(tmp_path, "L1H2", "train", seed=0)
    batches = list(ds.iter_batches(10, shuffle=True, epoch_seed=1))
    assert [len(b) for b in batches[:-1]] == [10] * (len(batches) - 1)
    order = np.concatenate([b.index for b in ds.iter_batches(10, shuffle=True, epoch_seed=1, with_meta=True)])
    assert np.array_equal(np.sort(order), np.arange(len(ds)))  # each state once per epoch
    assert not np.array_equal(order, np.arange(len(ds)))  # shuffled
    assert torch.equal(torch.cat(batches), ds.states(order))
    other = np.concatenate([b.index for b in ds.iter_batches(10, shuffle=True, epoch_seed=2, with_meta=True)])
    assert not np.array_equal(order, other)
    again = list(ds.iter_batches(10, shuffle=True, epoch_seed=1, start_batch=2))
    assert torch.equal(torch.cat(again), torch.cat(batches[2:]))
    assert len(list(ds.iter_batches(10, drop_last=True))) == len(ds) // 10
    b = next(ds.iter_batches(5, shuffle=True, epoch_seed=2, with_meta=True))
    assert torch.equal(b.state, ds.states(b.index)) and torch.equal(b.write, ds.writes(b.index))


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="writesae extract"):
        StateDataset(tmp_path / "nope", "L1H2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json.*writesae extract"):
        StateDataset(tmp_path / "empty", "L1H2")
    write_dataset(tmp_path / "d")
    with pytest.raises(ValueError, match="L5H5.*L1H2, L3H0"):
        StateDataset(tmp_path / "d", (5, 5))
    bad = make_shard(9)
    bad["L1H2.state"][3, 0, 0] = float("nan")
    w = ShardWriter(tmp_path / "d", {"params": PARAMS, "model": "tiny"}, CELLS, D_K, D_V)
    with pytest.raises(ValueError, match="NaN/Inf in L1H2.state"):
        w.write(9, bad)
    w.finish()
    # a NaN that reached disk anyway: the recorded SHA-256 names the shard on open; in a dataset written
    # without SHA-256s (older manifests) the read itself catches it
    path = tmp_path / "d" / "shard_00001.safetensors"
    tensors = make_shard(1)
    tensors["L1H2.state"][0, 1, 1] = float("nan")
    tensors = {k: (v.to(torch.bfloat16) if v.ndim == 3 else v.float() if k.endswith((".a", ".b")) else v) for k, v in tensors.items()}
    save_file(tensors, str(path))
    with pytest.raises(CorruptFileError, match="shard_00001.safetensors is corrupt: .*bytes.*writesae extract. again"):
        StateDataset(tmp_path / "d", "L1H2", "all")
    man = json.loads((tmp_path / "d" / "manifest.json").read_text())
    for s in man["shards"]:
        del s["sha256"], s["bytes"]
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(man))
    ds = StateDataset(tmp_path / "d", "L1H2", "all")
    with pytest.raises(ValueError, match="NaN/Inf in L1H2.state of shard_00001"):
        ds.states(np.arange(len(ds)))


def test_incomplete_dataset_refused(tmp_path):
    ShardWriter(tmp_path, {"params": PARAMS}, CELLS, D_K, D_V).write(0, make_shard(0))
    with pytest.raises(ValueError, match="incomplete"):
        StateDataset(tmp_path, "L1H2")


def test_reads_are_memory_mapped(tmp_path):
    write_dataset(tmp_path)
    ds = StateDataset(tmp_path, "L1H2", "all")
    arr, dtype = ds._map(0, "L1H2.state")
    assert isinstance(arr.base, np.memmap) and dtype == torch.bfloat16 and not arr.flags.owndata


def test_tensor_states_split():
    x = torch.randn(50, 2, 3)
    ds = TensorStates(x)
    tr, va = ds.split("train", seed=1), ds.split("val", seed=1)
    assert len(tr) == 40 and len(va) == 10
    rows = torch.cat([tr.data, va.data])
    assert torch.allclose(rows.sum(0), x.sum(0), atol=1e-5)
    torch.testing.assert_close(ds.mean, x.mean(0))
