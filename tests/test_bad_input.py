"""Bad input, everywhere: each case asserts the exception type and the words of its message (what is wrong,
and the fix); the CLI prints one line and exits 2. Then the faults: interrupted or corrupted work resumes
without losing or duplicating anything."""
import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from writesae import pipeline
from writesae.cli import main
from writesae.data import ShardWriter, StateDataset
from writesae.errors import CorruptFileError
from writesae.experiments import closed_form as CF
from writesae.experiments import substitution as SUB
from writesae.extract import extract
from writesae.hosts import Edit, load_host
from writesae.sae import SAEConfig, WriteSAE
from writesae.train import evaluate_sae, train_on_tensors, train_sae

DK, DV = 16, 8  # the tiny host's cells
CELLS = ["L0H1", "L1H2"]


def _shard(i, n=32):
    g = torch.Generator().manual_seed(i)
    out = {"token_ids": torch.randint(0, 101, (n,), generator=g), "seq_ids": torch.arange(n) // 8 + 4 * i,
           "positions": torch.arange(n) % 8}
    for c in CELLS:
        out.update({f"{c}.state": torch.randn(n, DK, DV, generator=g), f"{c}.write": torch.randn(n, DK, DV, generator=g),
                    f"{c}.a": torch.rand(n, generator=g), f"{c}.b": torch.rand(n, generator=g)})
    return out


@pytest.fixture(scope="module")
def host():
    return load_host("tiny")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    w = ShardWriter(root / "states", {"params": {"model": "planted"}}, CELLS, DK, DV)
    for i in range(3):
        w.write(i, _shard(i))
    w.finish()
    WriteSAE(SAEConfig("bilinear", DK, DV, n_feat=32, k=4), seed=0).save(root / "sae", cell="L0H1", model="tiny")
    return root


@pytest.fixture
def c(pristine, tmp_path, host):
    """A fresh copy of the dataset (cells L0H1, L1H2; shards 0..2) and of an SAE saved for L0H1."""
    shutil.copytree(pristine, tmp_path, dirs_exist_ok=True)
    return SimpleNamespace(dir=tmp_path, host=host, states=tmp_path / "states", sae=tmp_path / "sae",
                           shard=tmp_path / "states" / "shard_00001.safetensors")


def _truncate(path, n=100):
    path.write_bytes(path.read_bytes()[:-n])


def _edit_json(path, **changes):
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def _legacy(c):
    """The dataset as written before sizes and SHA-256s were recorded."""
    man = json.loads((c.states / "manifest.json").read_text())
    for s in man["shards"]:
        del s["bytes"], s["sha256"]
    (c.states / "manifest.json").write_text(json.dumps(man))


def _nan_shard(c):
    t = load_file(str(c.shard))
    t["L0H1.state"][3, 2, 1] = float("nan")
    save_file(t, str(c.shard))


def _transposed_sae():
    return WriteSAE(SAEConfig("bilinear", DV, DK, n_feat=32, k=4), seed=0)


def _garbage_same_size(path):
    path.write_bytes(b"\x07" * path.stat().st_size)


T = torch.randn(64, DK, DV, generator=torch.Generator().manual_seed(0))
FAST = dict(epochs=1, batch_size=16, progress=False)

CASES = [
    # -- SAE files ------------------------------------------------------------------------------------
    ("sae truncated", lambda c: (_truncate(c.sae / "sae.safetensors"), WriteSAE.load(c.sae)),
     CorruptFileError, r"sae/sae.safetensors is corrupt: it has \d+ bytes, \d+ were written.*retrain"),
    ("sae garbage, same size", lambda c: (_garbage_same_size(c.sae / "sae.safetensors"), WriteSAE.load(c.sae)),
     CorruptFileError, r"sae.safetensors is corrupt: its SHA-256 differs"),
    ("sae garbage, no record (older cfg.json)",
     lambda c: (_edit_json(c.sae / "cfg.json", sae_file=None), _garbage_same_size(c.sae / "sae.safetensors"),
                WriteSAE.load(c.sae)),
     CorruptFileError, r"sae.safetensors is corrupt: it is not a safetensors file"),
    ("cfg.json not JSON", lambda c: ((c.sae / "cfg.json").write_text('{"variant": "bili'), WriteSAE.load(c.sae)),
     CorruptFileError, r"cfg.json is corrupt: it is not valid JSON.*save the SAE again or retrain"),
    ("cfg.json without d_k", lambda c: (_edit_json(c.sae / "cfg.json", d_k=None), WriteSAE.load(c.sae)),
     CorruptFileError, r"cfg.json is corrupt: it does not hold an SAE config"),
    ("cfg.json disagrees with the tensors", lambda c: (_edit_json(c.sae / "cfg.json", n_feat=64), WriteSAE.load(c.sae)),
     CorruptFileError, r"its tensors do not fit cfg.json \(bilinear, n_feat=64.*b_enc: \(32,\) != \(64,\).*restore the cfg.json"),
    ("sae dir without files", lambda c: WriteSAE.load(c.dir),
     FileNotFoundError, r"has no cfg.json \+ sae.safetensors.*convert_reference_checkpoint"),
    ("load: other state shape", lambda c: WriteSAE.load(c.sae, expect_dims=(DV, DK)),
     ValueError, r"\(d_k, d_v\) = \(16, 8\), the cell has \(8, 16\).*writesae train-sae"),
    ("load: other cell", lambda c: WriteSAE.load(c.sae, expect_cell="L1H2"),
     ValueError, r"SAE at .*sae \(cell L0H1, model tiny\) does not match: cell: the SAE was trained on L0H1, used on L1H2"),
    ("load: bad cell name", lambda c: WriteSAE.load(c.sae, expect_cell="L1-H2"),
     ValueError, r"bad cell 'L1-H2': write a cell as 'L<layer>H<head>'"),
    # -- an SAE meeting a cell ---------------------------------------------------------------------------
    ("encode transposed states", lambda c: WriteSAE.load(c.sae).encode(T.mT),
     ValueError, r"takes states of shape \(B, d_k, d_v\) = \(B, 16, 8\), got \(64, 8, 16\) \(transposed"),
    ("encode one state without batch dim", lambda c: WriteSAE.load(c.sae).encode(T[0]),
     ValueError, r"got \(16, 8\); pass states of the cell it was trained on \(a single state: S\[None\]\)"),
    ("40x24 SAE meets a 24x40 host cell (substitute / closed_form)",
     lambda c: _transposed_sae().check_cell(c.host.cell(0, 1)),
     ValueError, r"the SAE takes \(d_k, d_v\) = \(8, 16\), the cell has \(16, 8\)"),
    ("transposed SAE handed to substitute",
     lambda c: SUB.substitute(
         c.host, _transposed_sae(), torch.zeros(1, 20, dtype=torch.long),
         pd.DataFrame(dict(seq=[0], pos=[10], layer=[0], head=[1], feature=[0], coef=[1.0]))),
     ValueError, r"the SAE takes \(d_k, d_v\) = \(8, 16\), the cell has \(16, 8\)"),
    ("SAE of L0H1 handed to closed_form on L1H2",
     lambda c: CF.closed_form(
         c.host, WriteSAE.load(c.sae), torch.zeros(1, 20, dtype=torch.long),
         pd.DataFrame(dict(seq=[0], pos=[10], layer=[1], head=[2], feature=[0], coef=[1.0]))),
     ValueError, r"trained on L0H1, used on L1H2"),
    ("load() without expect_cell, then another cell's states",
     lambda c: evaluate_sae(WriteSAE.load(c.sae), StateDataset(c.states, "L1H2", "all")),
     ValueError, r"trained on L0H1, used on L1H2"),
    ("atom index out of range", lambda c: WriteSAE.load(c.sae).atom(32),
     IndexError, r"atom index 32 out of range: .* n_feat=32 atoms, 0..31"),
    ("decode with mismatched acts / indices",
     lambda c: WriteSAE.load(c.sae).decode(torch.ones(2, 4), torch.zeros(2, 3, dtype=torch.long)),
     ValueError, r"decode takes \(B, k\) top_acts and top_indices of one shape"),
    ("set_mean of another shape", lambda c: WriteSAE.load(c.sae).set_mean(torch.zeros(DV, DK)),
     ValueError, r"mean has shape \(8, 16\); SAE .* takes \(d_k, d_v\) = \(16, 8\)"),
    ("config k > n_feat", lambda c: SAEConfig("bilinear", DK, DV, n_feat=8, k=16),
     ValueError, r"k=16 must be in \[1, n_feat=8\]"),
    ("config unknown variant", lambda c: SAEConfig("bilinar", DK, DV),
     ValueError, r"unknown variant 'bilinar'; choose one of"),
    # -- state datasets ----------------------------------------------------------------------------------
    ("shard truncated", lambda c: (_truncate(c.shard), StateDataset(c.states, "L0H1")),
     CorruptFileError, r"shard_00001.safetensors is corrupt: it has \d+ bytes.*writesae extract. again .* shard 1 anew"),
    ("shard truncated, no record (older manifest)", lambda c: (_legacy(c), _truncate(c.shard), StateDataset(c.states, "L0H1")),
     CorruptFileError, r"shard_00001.safetensors is corrupt: L1H2.write ends at byte \d+ but the file has \d+ bytes \(truncated\)"),
    ("shard cut to its first bytes", lambda c: (_legacy(c), c.shard.write_bytes(c.shard.read_bytes()[:20]),
                                                StateDataset(c.states, "L0H1")),
     CorruptFileError, r"shard_00001.safetensors is corrupt: its safetensors header cannot be read"),
    ("shard with a NaN written over it", lambda c: (_nan_shard(c), StateDataset(c.states, "L0H1")),
     CorruptFileError, r"shard_00001.safetensors is corrupt"),
    ("shard deleted", lambda c: (c.shard.unlink(), StateDataset(c.states, "L0H1")),
     FileNotFoundError, r"shard_00001.safetensors is missing; run `writesae extract` again"),
    ("mean file overwritten",
     lambda c: (save_file({k: torch.zeros(DK, DV) for k in CELLS}, str(c.states / "mean.safetensors")),
                StateDataset(c.states, "L0H1").mean),
     CorruptFileError, r"mean.safetensors is corrupt.*recompute it"),
    ("manifest not JSON", lambda c: ((c.states / "manifest.json").write_text("{"), StateDataset(c.states, "L0H1")),
     CorruptFileError, r"manifest.json is corrupt: it is not valid JSON.*run `writesae extract` again"),
    ("manifest of something else", lambda c: ((c.states / "manifest.json").write_text('{"cells": []}'),
                                              StateDataset(c.states, "L0H1")),
     CorruptFileError, r"manifest.json is corrupt: it is not a writesae-states manifest"),
    ("cell not in the dataset", lambda c: StateDataset(c.states, "L4H3"),
     ValueError, r"cell L4H3 is not in .*cells present: L0H1, L1H2 \(extract L4H3 with `writesae extract --cells L4H3`"),
    ("dataset directory missing", lambda c: StateDataset(c.dir / "nope", "L0H1"),
     FileNotFoundError, r"does not exist; run `writesae extract` first"),
    ("dataset incomplete", lambda c: (_edit_json(c.states / "manifest.json", complete=False), StateDataset(c.states, "L0H1")),
     ValueError, r"is incomplete .*rerun `writesae extract` to resume it"),
    ("val_frac out of range", lambda c: StateDataset(c.states, "L0H1", val_frac=1.0),
     ValueError, r"val_frac=1.0 must be in \[0, 1\)"),
    ("batch_size 0", lambda c: next(StateDataset(c.states, "L0H1").iter_batches(0)),
     ValueError, r"batch_size=0 must be a positive integer"),
    ("writing an Inf state", lambda c: ShardWriter(c.states, {"params": {"model": "planted"}}, CELLS, DK, DV).write(
        3, {**_shard(3), "L1H2.state": torch.full((32, DK, DV), float("inf"))}),
     ValueError, r"shard 3: NaN/Inf in L1H2.state; refusing to write it"),
    ("writer over another run", lambda c: ShardWriter(c.states, {"params": {"model": "other"}}, CELLS, DK, DV),
     ValueError, r"params.model: existing 'planted' != new 'other'[\s\S]*Use another directory"),
    # -- training ----------------------------------------------------------------------------------------
    ("train_on_tensors: states of another shape", lambda c: train_on_tensors(T.mT, SAEConfig("bilinear", DK, DV, n_feat=32, k=4), **FAST),
     ValueError, r"the train states are \(d_k, d_v\) = \(8, 16\) but the SAE config has \(16, 8\); build SAEConfig"),
    ("train_on_tensors: NaN states", lambda c: train_on_tensors(torch.where(torch.arange(64)[:, None, None] == 5, torch.nan, T),
                                                                SAEConfig("bilinear", DK, DV, n_feat=32, k=4), **FAST),
     ValueError, r"states hold NaN/Inf in 1 of 64 rows \(first: row 5\); drop those rows"),
    ("train_on_tensors: Inf states", lambda c: train_on_tensors(T * torch.inf, SAEConfig("bilinear", DK, DV, n_feat=32, k=4), **FAST),
     ValueError, r"states hold NaN/Inf in 64 of 64 rows"),
    ("train_on_tensors: 2-D states", lambda c: train_on_tensors(T.flatten(1), SAEConfig("bilinear", DK, DV, n_feat=32, k=4), **FAST),
     ValueError, r"states must be a float \(N, d_k, d_v\) tensor, got torch.float32 of shape \(64, 128\)"),
    ("train_on_tensors: no states", lambda c: train_on_tensors(T[:0], SAEConfig("bilinear", DK, DV, n_feat=32, k=4), **FAST),
     ValueError, r"the training split is empty"),
    ("bad training parameters", lambda c: train_on_tensors(T, SAEConfig("bilinear", DK, DV, n_feat=32, k=4),
                                                           **{**FAST, "batch_size": 0, "epochs": 0}),
     ValueError, r"bad training parameters: batch_size=0 \(must be >= 1\), epochs=0 \(must be >= 1\)"),
    ("training diverges (a non-finite loss stops it at once; nan or inf by the CPU's overflow order)",
     lambda c: train_on_tensors(T, SAEConfig("bilinear", DK, DV, n_feat=32, k=4), **FAST, lr=1e10, warmup=0),
     ValueError, r"training diverged at step 1: the loss is (nan|inf) \(lr 10000000000.0\); lower lr"),
    ("train_sae: cfg of another shape", lambda c: train_sae(c.states, "L0H1", SAEConfig("bilinear", DV, DK, n_feat=32, k=4),
                                                            c.dir / "out", **FAST),
     ValueError, r"the train states of .*states cell L0H1 are \(d_k, d_v\) = \(16, 8\) but the SAE config has \(8, 16\)"),
    ("resume from a truncated checkpoint",
     lambda c: (train_on_tensors(T, SAEConfig("bilinear", DK, DV, n_feat=32, k=4), c.dir / "run", **FAST, max_steps=1),
                _truncate(c.dir / "run" / "last" / "model.safetensors", 10),
                train_on_tensors(T, SAEConfig("bilinear", DK, DV, n_feat=32, k=4), c.dir / "run", **FAST)),
     CorruptFileError, r"last/model.safetensors is corrupt: it has .*; delete .*last to train from the start"),
    # -- extraction --------------------------------------------------------------------------------------
    ("extract: 1-D windows", lambda c: extract(c.host, torch.arange(32), ["L0H1"], c.dir / "x", progress=False),
     ValueError, r"windows must be a non-empty \(N, T\) tensor of token ids, got torch.int64 of shape \(32,\)"),
    ("extract: token ids beyond the vocabulary", lambda c: extract(c.host, torch.full((2, 32), 500), ["L0H1"], c.dir / "x", progress=False),
     ValueError, r"token ids span 500..500, but tiny has a vocabulary of 101"),
    ("extract: too few positions", lambda c: extract(c.host, torch.zeros(2, 16, dtype=torch.long), ["L0H1"], c.dir / "x",
                                                     positions_per_seq=32, progress=False),
     ValueError, r"positions_per_seq=32 > 8 available positions per window \(window 16 - min_pos 8\)"),
    ("extract: batch_size 0", lambda c: extract(c.host, torch.zeros(2, 16, dtype=torch.long), ["L0H1"], c.dir / "x",
                                                positions_per_seq=4, batch_size=0, progress=False),
     ValueError, r"batch_size=0 and positions_per_seq=4 must be >= 1"),
    ("extract: attention layer", lambda c: extract(c.host, torch.zeros(2, 16, dtype=torch.long), ["L3H0"], c.dir / "x",
                                                   positions_per_seq=4, progress=False),
     ValueError, r"layer 3 is a full_attention layer, which has no matrix state; recurrent .* layers are \[0, 1, 2\]"),
    ("text file missing", lambda c: pipeline.windows(SimpleNamespace(tokenizer=object()), "nope.txt"),
     FileNotFoundError, r"text 'nope.txt' is neither 'train' / 'heldout' .* nor an existing .txt file"),
    # -- the host's own checks (writesae/hosts) ----------------------------------------------------------
    ("edit matrix of the wrong shape", lambda c: c.host.run_edits(torch.zeros(1, 16, dtype=torch.long),
                                                                  [Edit(0, 0, 1, 4, "replace", torch.zeros(DV, DK))]),
     ValueError, r"edit matrix has shape \(8, 16\), but cell L0H1 .*transpose it"),
    ("edit position out of range", lambda c: c.host.run_edits(torch.zeros(1, 16, dtype=torch.long), [Edit(0, 0, 1, 16, "delete")]),
     ValueError, r"edit pos=16 outside an input of 16 tokens: use 0..15"),
    ("edit of an unknown kind", lambda c: c.host.run_edits(torch.zeros(1, 16, dtype=torch.long), [Edit(0, 0, 1, 4, "erase")]),
     ValueError, r"edit kind 'erase' is not one of"),
    ("head out of range", lambda c: c.host.cell(0, 9),
     ValueError, r"head 9 out of range: layer 0 has value heads 0..3"),
]


@pytest.mark.parametrize("fn, exc, words", [pytest.param(f, e, w, id=i) for i, f, e, w in CASES])
def test_bad_input(c, fn, exc, words):
    with pytest.raises(exc, match=words) as err:
        fn(c)
    assert type(err.value) is exc  # the fitting type itself, not merely a parent of it


CLI_CASES = [
    ("--model a missing path", ["cells", "--model", "/tmp/writesae-nope"], r"model directory '/tmp/writesae-nope' does not exist"),
    ("--model a typo", ["cells", "--model", "embeded"], r"model 'embeded' is not 'embedded', .*a hub name 'org/name'"),
    ("--model a hub name not in the cache", ["cells", "--model", "writesae-test/not-there"],
     r"not in the local Hugging Face cache .*pass a local directory"),
    ("--cells with a dash", ["extract", "--model", "tiny", "--cells", "L1-H2", "--out", "{dir}/x"], r"bad cell 'L1-H2'"),
    ("--n-windows 0", ["extract", "--model", "tiny", "--n-windows", "0", "--out", "{dir}/x"], r"windows must be a non-empty"),
    ("train-sae --cell absent", ["train-sae", "--data", "{states}", "--cell", "L4H3", "--out", "{dir}/o"],
     r"cell L4H3 is not in .*cells present: L0H1, L1H2"),
    ("train-sae --data missing", ["train-sae", "--data", "{dir}/nope", "--cell", "L0H1", "--out", "{dir}/o"],
     r"state dataset .*nope does not exist; run `writesae extract` first"),
    ("train-sae on a truncated shard", ["train-sae", "--data", "{states}", "--cell", "L0H1", "--out", "{dir}/o"],
     r"shard_00001.safetensors is corrupt", lambda c: _truncate(c.shard)),
    ("train-sae --batch-size 0", ["train-sae", "--data", "{states}", "--cell", "l0h1", "--batch-size", "0", "--n-feat", "32",
                                  "--k", "4", "--out", "{dir}/o"], r"bad training parameters: batch_size=0"),
]


@pytest.mark.parametrize("argv, words, damage", [pytest.param(*case[1:3], case[3] if len(case) > 3 else None, id=case[0])
                                                 for case in CLI_CASES])
def test_cli_one_line(c, capsys, argv, words, damage):
    if damage:
        damage(c)
    rc = main([a.format(dir=c.dir, states=c.states) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"writesae {argv[0]}: ")
    assert re.search(words, err), err


def test_cli_no_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["cells", "--model", "tiny", "--device", "cuda"]) == 2
    assert "no CUDA device is available here; leave --device out" in capsys.readouterr().err


def test_cli_ctrl_c(monkeypatch, capsys):
    import writesae.cli as cli

    def ctrl_c(a):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_cells", ctrl_c)
    assert main(["cells"]) == 130
    assert "interrupted; run the same command again to resume" in capsys.readouterr().err


# -- faults: nothing lost, nothing duplicated -------------------------------------------------------------
@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 101, (24, 24), generator=torch.Generator().manual_seed(5))


EX = dict(positions_per_seq=4, batch_size=8, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "nan"])
def test_extract_redoes_a_damaged_shard(host, ids, tmp_path, monkeypatch, damage):
    ref = extract(host, ids, [(1, 0)], tmp_path / "ref", **EX)
    out = extract(host, ids, [(1, 0)], tmp_path / "run", **EX)
    shard = out / "shard_00001.safetensors"
    if damage == "truncate":
        _truncate(shard)
    else:
        t = load_file(str(shard))
        t["L1H0.state"][0, 0, 0] = float("nan")
        save_file(t, str(shard))
    with pytest.raises(CorruptFileError, match="shard_00001"):
        StateDataset(out, "L1H0")
    calls, orig = [], host.trace
    monkeypatch.setattr(host, "trace", lambda *a, **k: calls.append(1) or orig(*a, **k))
    with pytest.warns(UserWarning, match="shard 1 will be extracted again: .*shard_00001.safetensors is corrupt"):
        extract(host, ids, [(1, 0)], out, **EX)
    assert len(calls) == 1  # that shard only
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] and [s["idx"] for s in man["shards"]] == [0, 1, 2]
    a, b = StateDataset(ref, "L1H0", "all"), StateDataset(out, "L1H0", "all")
    assert torch.equal(a.states(range(len(a))), b.states(range(len(b)))) and torch.equal(a.mean, b.mean)
    assert torch.isfinite(b.mean).all()


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing a shard, an SAE or a manifest: the old files stay whole, no temp file stays."""
    import writesae.cache as cache

    w = ShardWriter(tmp_path / "s", {"params": {"model": "m"}}, CELLS, DK, DV)
    w.write(0, _shard(0))
    sae = WriteSAE(SAEConfig("bilinear", DK, DV, n_feat=32, k=4), seed=0)
    sae.save(tmp_path / "sae", cell="L0H1")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def half_then_ctrl_c(tensors, path, metadata=None):
        open(path, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "save_file", half_then_ctrl_c)
    for write in (lambda: w.write(1, _shard(1)), lambda: w.write(0, _shard(5)),
                  lambda: WriteSAE(sae.cfg, seed=1).save(tmp_path / "sae", cell="L0H1")):
        with pytest.raises(KeyboardInterrupt):
            write()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    monkeypatch.undo()
    WriteSAE.load(tmp_path / "sae", expect_cell="L0H1")
    assert ShardWriter(tmp_path / "s", {"params": {"model": "m"}}, CELLS, DK, DV).done_shards() == {0}


def test_training_resumes_after_a_crash_between_renames(tmp_path):
    """A crash inside the checkpoint swap (last/ renamed to last.old/, the new one not yet in place) loses
    nothing: the run resumes from last.old and ends bit-identical to an uninterrupted one."""
    S = torch.randn(320, 6, 6, generator=torch.Generator().manual_seed(0))
    cfg = SAEConfig("bilinear", 6, 6, n_feat=24, k=2, k_aux=4)
    kw = dict(epochs=2, batch_size=32, lr=3e-3, warmup=2, resample_every=5, dead_after=2, ckpt_every=4, progress=False)
    straight = train_on_tensors(S, cfg, tmp_path / "a", **kw)
    part = train_on_tensors(S, cfg, tmp_path / "b", max_steps=6, **kw)
    assert part.step == 6
    (tmp_path / "b" / "last").rename(tmp_path / "b" / "last.old")
    resumed = train_on_tensors(S, cfg, tmp_path / "b", **kw)
    assert resumed.step == straight.step and not (tmp_path / "b" / "last.old").exists()
    for k, t in straight.sae.state_dict().items():
        assert torch.equal(t, resumed.sae.state_dict()[k]), k
    a, b = (load_file(str(tmp_path / d / "last" / "model.safetensors")) for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(straight.fire_rates, resumed.fire_rates)


def test_sae_options_are_checked_and_keyed(tmp_path):
    """pipeline.sae's SAEConfig options: a typo is refused naming the fix; a given option trains (and caches) its own SAE."""
    from writesae import pipeline

    host = pipeline.host("tiny", "cpu")
    data = dict(cells=[[1, 1]], window=16, n_windows=8, positions_per_seq=8)
    with pytest.raises(ValueError, match="SAEConfig"):
        pipeline.sae(host, (1, 1), n_feat=16, k=2, epochs=1, data=data, root=tmp_path, progress=False, l0_coef=0.5)
    kw = dict(n_feat=16, k=2, epochs=1, activation="jumprelu", data=data, root=tmp_path, progress=False)
    plain = pipeline.sae(host, (1, 1), **kw)
    tuned = pipeline.sae(host, (1, 1), l0_coeff=0.5, jumprelu_init_threshold=2.0, **kw)
    assert plain.path != tuned.path and tuned.cfg.l0_coeff == 0.5 and plain.cfg.l0_coeff == 1e-3
