"""The across-architectures chapter: writesae.experiments.zoo's functions, and the notebook end to end under
nbval with the tiny parameters (the mechanism of tests/test_notebooks.py, for this notebook alone)."""
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from writesae import book, pipeline, verdicts
from writesae.experiments import substitution as S, zoo
from writesae.experiments.section import TruncatedAtoms, headline_rows
from writesae import Edit
from writesae.hosts import EMBEDDED_DIR

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "08_across_architectures.ipynb"


# ------------------------------------------------------------------------------ cells that keep a state
def test_memory_table_is_the_zoo_exports_formula():
    """One formula: the per-layer measurement equals writesae.embedded_train.memory_table (what metrics.json holds)."""
    from writesae.embedded_train import memory_table as exported

    host = pipeline.host("tiny:gla", "cpu")
    ids = pipeline.windows(host, "heldout", 24, 2, 0)
    mine = zoo.memory_table(host, ids)
    assert mine.to_dict("records") == exported(host, ids)
    assert len(mine) == len(host.cells) and (mine["write_share"] > 0).all()


def test_choose_cells_takes_the_most_influential_cell_that_keeps_a_state():
    mem = pd.DataFrame(dict(cell=["L0H0", "L0H1", "L1H0", "L1H1"], layer=[0, 0, 1, 1], head=[0, 1, 0, 1],
                            write_share=[0.9, 0.2, 0.2, 0.05]))
    assert zoo.choose_cells(mem, 1) == [(1, 1)]  # no influence column: the lowest write share
    assert zoo.choose_cells(mem, 3) == [(1, 1), (0, 1), (1, 0)]  # tie broken by (layer, head)
    assert zoo.choose_cells(mem, 2, fixed=[[3, 2], "L0H0"]) == [(3, 2), (0, 0)]
    mem["influence"] = [1.0, 1e-3, 1e-3, 1e-6]
    # L0H0 matters most but keeps no state (write share 0.9): it comes only when too few cells keep one
    assert zoo.choose_cells(mem, 1) == [(0, 1)]
    assert zoo.choose_cells(mem, 3) == [(0, 1), (1, 0), (1, 1)]
    assert zoo.choose_cells(mem, 4) == [(0, 1), (1, 0), (1, 1), (0, 0)]
    assert zoo.choose_cells(mem, 1, max_write_share=0.1) == [(1, 1)]
    # and each chosen row says why: a head that keeps no state is never passed off as one that does
    four = zoo.choose_cells(mem, 4)
    assert zoo.chosen_by(mem, four) == ["lowest write share (no other head ≤ 0.3)"] + [
        "most influential with write share ≤ 0.3"] * 3
    assert zoo.chosen_by(mem, [(0, 0)], fixed=["L0H0"]) == ["fixed (zoo_cells)", "", "", ""]


def test_influence_is_the_deletion_kl_of_each_cell():
    host = pipeline.host("tiny:gdn", "cpu")
    ids = pipeline.windows(host, "heldout", 24, 1, 0)
    inf = zoo.influence_table(host, ids, positions=[12])
    assert inf["cell"].tolist() == [f"L{c.layer}H{c.head}" for c in host.cells]
    l, h = host.cells[-1].layer, host.cells[-1].head
    run = host.run_edits(ids, [Edit(0, l, h, 12, "delete")], positions=range(12, 24))
    want = S.kl_by_position(run.logits, run.base[0]).mean()
    assert inf["influence"].iloc[-1] == pytest.approx(float(want), rel=1e-5) and (inf["influence"] > 0).all()
    one = zoo.influence_table(host, ids, positions=[12], logits_bytes=1)  # a head per run (a large vocabulary)
    assert np.allclose(one["influence"], inf["influence"], rtol=1e-5, atol=0)


def test_metrics_path_finds_the_zoo_folders(tmp_path):
    assert zoo.metrics_path("embedded:gdn") == EMBEDDED_DIR / "gdn" / "metrics.json"
    assert zoo.metrics_path("embedded:delta_net") == EMBEDDED_DIR / "deltanet" / "metrics.json"
    assert zoo.metrics_path("embedded") == EMBEDDED_DIR / "metrics.json"
    assert zoo.metrics_path(str(tmp_path)) == tmp_path / "metrics.json"
    assert zoo.metrics_path("tiny:gla") is None and zoo.metrics_path("org/name") is None


def test_memory_reads_metrics_json_else_measures(tmp_path, monkeypatch):
    monkeypatch.setenv("WRITESAE_CACHE", str(tmp_path / "artifacts"))
    host = pipeline.host("tiny:mamba2", "cpu")
    measured = zoo.memory(host, window=16, n_windows=1)
    assert measured["source"].str.startswith("measured").all()
    assert list(zip(measured["layer"], measured["head"])) == [(c.layer, c.head) for c in host.cells]
    assert (measured["influence"] > 0).all()  # measured next to it, on the first window

    class Named:  # a host whose source is a model folder with a metrics.json memory table
        name = str(tmp_path / "model")
    (tmp_path / "model").mkdir()
    table = [dict(cell="L3H1", decay=0.9, write_share=0.1), dict(cell="L0H2", decay=0.5, write_share=0.7)]
    (tmp_path / "model" / "metrics.json").write_text(json.dumps(dict(params=1, memory=table)))
    read = zoo.memory(Named(), influence=False)
    assert read[["cell", "layer", "head", "write_share"]].values.tolist() == [["L3H1", 3, 1, 0.1], ["L0H2", 0, 2, 0.7]]
    assert read["source"].str.startswith("metrics.json").all()
    assert zoo.choose_cells(read, 1) == [(3, 1)]


# ------------------------------------------------------------------------------------------- pieces
def test_atoms_for_matches_the_update_rank():
    assert [a.name for a in zoo.atoms_for("rwkv7")] == ["rank-1 write", "rank-2 update"]
    assert zoo.RANK2_UPDATE.rank == 2 and zoo.RANK2_UPDATE.write == "update" and zoo.RANK2_UPDATE.cos == "cos_update"
    for fam in ("gdn", "mamba2", "deltanet", "gla"):
        assert zoo.atoms_for(fam) == (zoo.RANK1,)


def test_truncated_atoms_are_the_best_rank_r_approximation():
    torch.manual_seed(0)
    dense = torch.randn(5, 6, 7)

    class Dense:  # the part of a dense-decoder WriteSAE that TruncatedAtoms reads
        cfg = "cfg"

        def atoms(self, indices=None):
            return dense if indices is None else dense[torch.as_tensor(indices)]

    for r in (1, 2):
        A, T = dense[3], TruncatedAtoms(Dense(), rank=r).atom(3)
        s = torch.linalg.svdvals(A)
        assert torch.linalg.matrix_rank(T) == r
        assert torch.allclose((A - T).norm(), s[r:].norm(), atol=1e-5)  # Eckart-Young: the residual is the tail
    u, v = torch.randn(6), torch.randn(7)
    dense[0] = torch.outer(u, v)
    assert torch.allclose(TruncatedAtoms(Dense()).atom(0), dense[0], atol=1e-5)  # rank 1 stays itself
    batch = TruncatedAtoms(Dense(), rank=2).atoms([1, 3])
    assert torch.allclose(batch[1], TruncatedAtoms(Dense(), rank=2).atom(3), atol=1e-6)
    assert TruncatedAtoms(Dense()).cfg == "cfg"  # everything but the atoms is the wrapped SAE's


def _summary(rows):
    base = dict(atom="rank-1 write", decoder="WriteSAE", scaling="coef", read="mean", direction="patched||base")
    return pd.DataFrame([dict(base, **r) for r in rows])


def test_glue_values_give_every_family_and_the_verdicts_intervals():
    summary = _summary([dict(family="GDN", n=10, win_rate=0.9, wilson_lo=0.6, wilson_hi=0.98),
                        dict(family="Mamba-2", n=10, win_rate=0.2, wilson_lo=0.06, wilson_hi=0.5)])
    flat_summary = _summary([dict(family=f, decoder=d, scaling="norm", n=10, win_rate=w) for f, d, w in (
        ("Mamba-2", "WriteSAE", 0.9), ("Mamba-2", "FlatSAE + top-1 SVD", 0.7))])
    flat = pd.DataFrame([dict(family="Mamba-2", atom="rank-1 write", read="mean", direction="patched||base", layer=0,
                              head=0, seq=i, pos=1, decoder=d, win=w) for i in range(40)
                         for d, w in (("WriteSAE", i % 4 != 0), ("FlatSAE + top-1 SVD", i % 4 == 0))])
    rng = np.random.default_rng(0)
    atoms = pd.DataFrame([dict(family=f, atom="rank-1 write", cls="register", cos=c, register_class=two) for f, mu, two in
                          (("GDN", 0.3, True), ("RWKV-7", 0.2, True), ("Mamba-2", 0.05, False))
                          for c in rng.normal(mu, 0.02, 30)]).rename(columns={"cls": "class"})
    cf = pd.DataFrame(dict(family=["GDN", "Mamba-2"], r2_pred_paper_fit=[0.9, -0.4]))
    cf_atoms = pd.DataFrame(dict(family=["Mamba-2"] * 5, r2_pred_paper_fit=[-0.6, -0.5, -0.4, -0.3, -0.2]))
    sweep = pd.DataFrame(dict(k=[16, 32, 64, 128], n_register=[0, 0, 3, 5], dbic=[5.0, 4.0, -3.0, -19.0],
                              register_cos=[np.nan, np.nan, 0.5, 0.9]))
    reg = {"GDN": 0.3, "RWKV-7": 0.2, "Mamba-2": 0.1}
    values = zoo.glue_values(reg_cos=reg, atoms=atoms, summary=summary, flat_summary=flat_summary, flat=flat,
                             cf_by_family=cf, cf_atoms=cf_atoms, sweep=sweep)
    assert values["flat_matched_mamba2"] == 0.9 and values["flat_svd_mamba2"] == 0.7
    assert values["sub_win_rate_gdn"] == 0.9 and np.isnan(values["sub_win_rate_gla"])  # every family has a key
    assert values["k_reg_cos_128"] == 0.9 and values["k_dbic_128"] == -19.0 and np.isnan(values["reg_cos_gla"])
    assert values["flat_gap_mamba2"] == pytest.approx(0.5) and values["flat_gap_mamba2_lo"] > 0
    assert np.isnan(values["flat_gap_gdn"])
    d = values["reg_cos_diff_gdn_rwkv7"]
    assert 0.08 < d < 0.12 and values["reg_cos_diff_gdn_rwkv7_lo"] > 0.05
    # Mamba-2's "registers" are the upper half of a one-class fit (dBIC not below -10): no register cosine
    assert np.isnan(values["reg_cos_diff_rwkv7_mamba2"]) and set(zoo.family_register_cos(atoms)) == {"GDN", "RWKV-7"}
    assert values["r2_pred_paper_fit_mamba2_hi"] < 0 and np.isnan(values["r2_pred_paper_fit_gdn_lo"])
    # the chapter's verdicts on these numbers: GDN's 90% does not make Mamba-2's 20% a reproduction
    t = verdicts.rows("08_across_architectures", values).set_index("id")
    assert t.loc["11c", "verdict"] == verdicts.DOES_NOT and t.loc["11a", "verdict"] == verdicts.REPRODUCES
    assert t.loc["6b", "verdict"] == verdicts.REPRODUCES and t.loc["11d", "verdict"] == verdicts.REPRODUCES
    assert t.loc["12f", "verdict"] == verdicts.REPRODUCES and t.loc["11e", "verdict"] == verdicts.NOT_TESTABLE
    assert t.loc["11b", "verdict"] == verdicts.NOT_TESTABLE and "no register class" in t.loc["11b", "why"]
    # nothing measured: every value is NaN and the text still renders
    empty = zoo.glue_values(atoms=atoms.iloc[:0], flat=pd.DataFrame(), cf_atoms=pd.DataFrame(), sweep=zoo.k_sweep(None))
    assert np.isnan(empty["reg_cos_diff_rwkv7_mamba2"]) and np.isnan(empty["flat_gap_mamba2"])
    assert set(verdicts.rows("08_across_architectures", empty)["verdict"]) == {verdicts.NOT_TESTABLE}


# ----------------------------------------------------------------------- one family through the chapter
@pytest.fixture(scope="module")
def rwkv7(tmp_path_factory):
    """The tiny RWKV-7 (rank-2 update: two atom rows) through every step, tiny sizes, in a fresh cache."""
    cache = tmp_path_factory.mktemp("artifacts")
    old = os.environ.get("WRITESAE_CACHE")
    os.environ["WRITESAE_CACHE"] = str(cache)
    try:
        fams = zoo.setup({"rwkv7": "tiny:rwkv7"}, device="cpu", window=24, n_windows=16, positions_per_seq=8,
                         eval_windows=4, n_feat=32, k=4, epochs=2, batch_size=64, min_firings=2, max_firings=4,
                         memory_window=24, memory_windows=1)
        cells, atoms = zoo.partitions(fams)
        sub = zoo.substitutions(fams)
        flat = zoo.flat_comparison(fams)
        yield fams, cells, atoms, sub, flat
    finally:
        os.environ.pop("WRITESAE_CACHE") if old is None else os.environ.__setitem__("WRITESAE_CACHE", old)


def test_family_setup_and_partitions(rwkv7):
    fams, cells, atoms, _, _ = rwkv7
    f = fams["rwkv7"]
    assert f.name == "RWKV-7" and len(f.cells) == 1
    assert f.cells == zoo.choose_cells(f.memory, 1) and f.memory["chosen"].sum() == 1
    assert cells["atom"].tolist() == ["rank-1 write", "rank-2 update"]
    assert (cells["n_alive"] == cells["n_register"] + cells["n_bundle"]).all()
    reg = atoms[atoms["class"] == "register"]
    for _, row in cells.iterrows():  # the register median cosine: the median over that row's register atoms, where
        mine = reg[reg["atom"] == row["atom"]]["cos"]  # two components beat one (dBIC < -10); else none
        if mine.empty or not row["dbic"] < -10:
            assert np.isnan(row["register_cos"])
        else:
            assert np.isclose(row["register_cos"], mine.median())
        assert (atoms.loc[atoms["atom"] == row["atom"], "register_class"] == (row["dbic"] < -10)).all()
    assert f.sae(f.cells[0], **zoo.RANK2_UPDATE.sae).cfg.rank == 2


def test_a_head_without_register_firings_says_so(rwkv7):
    sec = rwkv7[0]["rwkv7"]
    classes, _ = sec.partition(sec.cells[0])
    none = classes.assign(**{"class": "bundle"})  # a partition without registers (the paper's DeltaNet at k = 32)
    with pytest.raises(ValueError, match=r"L\d+H\d+ has no register firing to substitute: its partition holds 0 "
                                         r"register atoms.*k = 128"):
        sec.substitution(sec.cells[0], "registers", classes=none)
    assert len(sec.substitution(sec.cells[0], "top1")[0])  # the top-1 pool of the same head runs


def test_chapter_03_runs_the_top1_pool_where_registers_never_fire(rwkv7):
    """Chapter 03's pool = "top1" on a head whose register atoms are never top-1: the headline, the scalings and
    the update all run on the top-1 pool, the register row is left out and the pool gap says why."""
    sec = rwkv7[0]["rwkv7"]
    c = sec.cells[0]
    classes, _ = sec.partition(c)
    none = classes.assign(**{"class": "bundle"})
    table, gap = sec.pool_variants(c, "top1", classes=none)
    assert table["variant"].tolist() == ["top-1, coef, additive", "top-1, norm, additive", "top-1, coef, update"]
    head = headline_rows(S.summarize(sec.substitution(c, "top1")[0])).iloc[0]
    assert table.loc[0, "n"] == head["n"] > 0 and table.loc[0, "win_rate"] == head["win_rate"]
    assert np.isnan(gap["diff"]) and gap["text"] == (
        "no register firing to compare (0 register atoms, none top-1 on the held-out windows)")
    # every alive atom a register: both pools run, and the gap is top-1 minus registers
    every = classes.assign(**{"class": "register"})
    table, gap = sec.pool_variants(c, "registers", classes=every)
    assert table["variant"].tolist() == ["registers, coef, additive", "top-1, coef, additive",
                                         "registers, norm, additive", "registers, coef, update"]
    rate = table.set_index("variant")["win_rate"]
    assert np.isclose(gap["diff"], rate["top-1, coef, additive"] - rate["registers, coef, additive"])
    assert gap["lo"] <= gap["diff"] <= gap["hi"]
    with pytest.raises(ValueError, match="pool 'atoms': chapter 03 compares the string pools 'top1' and 'registers'"):
        sec.pool_variants(c, "atoms", classes=classes)


def test_substitution_rows(rwkv7):
    fams, _, _, sub, _ = rwkv7
    assert set(sub["scaling"]) == {"coef", "norm"} and set(sub["direction"]) == {"patched||base", "base||patched"}
    assert set(sub["read"]) == {"next", "final", "mean"} and set(sub["pool"]) == {"top1"}
    assert {"kl_atom", "kl_delete", "kl_random"} <= set(sub.columns)
    assert set(sub.loc[sub["atom"] == "rank-2 update", "write"]) == {"update"}
    assert set(sub.loc[sub["atom"] == "rank-1 write", "write"]) == {"additive"}
    n = sub[(sub["read"] == "mean") & (sub["direction"] == "patched||base")].groupby(["atom", "scaling"]).size()
    assert (n == 4).all()  # max_firings per cell, atom and scaling
    s = zoo.summarize(sub)
    assert np.allclose(s["win_rate"], s["wins"] / s["n"])


def test_flat_comparison_uses_the_same_firings(rwkv7):
    _, _, _, sub, flat = rwkv7
    assert set(flat["decoder"]) == {"WriteSAE", "FlatSAE + top-1 SVD", "FlatSAE + top-2 SVD"}
    assert set(flat["scaling"]) == {"norm"}
    for atom, g in flat.groupby("atom"):
        sites = {d: set(zip(x["seq"], x["pos"])) for d, x in g.groupby("decoder")}
        assert len(sites) == 2 and len(set(map(frozenset, sites.values()))) == 1
        # matched norm: each substituted atom has the native write's norm
        assert np.allclose(g["atom_scale"], g["native_norm"], rtol=1e-4)
    rows, paper = zoo.win_rate_rows(zoo.summarize(sub), zoo.summarize(flat))
    assert set(rows["decoder"]) == {"WriteSAE, coef", "WriteSAE, norm", "FlatSAE + top-1 SVD, norm"}
    assert paper[("Mamba-2", "FlatSAE + top-1 SVD, norm")] == 0.7630


# ------------------------------------------------------------------------------ the notebook, end to end
def test_chapter_is_in_the_book_and_its_params_apply():
    assert Path("notebooks/08_across_architectures") in [p.with_suffix("") for p in book.toc_documents(REPO)]
    for name in ("tiny.yaml", "embedded_cpu.yaml", "mamba2_370m_gpu.yaml", "rwkv7_1p5b_gpu.yaml",
                 "deltanet_1p3b_gpu.yaml", "gla_1p3b_gpu.yaml"):
        params = book._notebook_params(NOTEBOOK, book.load_params(REPO / "params" / name))  # raises on unknown names
        assert set(params["models"]) <= set(zoo.FAMILIES), name
    tiny = book._notebook_params(NOTEBOOK, book.load_params(REPO / "params" / "tiny.yaml"))
    assert all(v.startswith("tiny:") for v in tiny["models"].values()) and len(tiny["models"]) == 5


def test_shipped_influence_is_the_chapters_measurement():
    """metrics.json's influence column (the export's) is zoo.measure_influence on the shipped model, to float noise:
    the chapter reads it instead of measuring (Mamba-2's 224 cells take minutes)."""
    host = pipeline.host("embedded:gdn", "cpu")
    shipped = zoo.memory(host).set_index("cell")["influence"]
    fresh = zoo.measure_influence(host).set_index("cell")["influence"]
    assert len(shipped) == len(host.cells) and shipped.notna().all()
    # Another CPU sums the float32 forward in another order: its logits differ by about delta (~100 ulp of logits
    # of magnitude ~10 after 8 layers). KL ~ Var(d) / 2 for a logit difference d, so a KL moves by about
    # 2 sqrt(2 KL) delta + delta^2: 3% of a 1e-8 influence, 0.1% of a 1e-3 one.
    delta = 1e-5
    tol = 2 * np.sqrt(2 * fresh.abs()) * delta + delta ** 2
    assert ((shipped.loc[fresh.index] - fresh).abs() <= tol).all()
    assert not ((shipped.loc[fresh.index] * 1.5 - fresh).abs() <= tol).all()  # the bound still tells numbers apart


def test_k_sweep_gives_a_register_cosine_only_where_registers_are_a_class(rwkv7):
    sw = zoo.k_sweep(rwkv7[0]["rwkv7"], ks=(2, 8), n_feat=32)
    assert sw["k"].tolist() == [2, 8] and sw["n_alive"].gt(0).all()
    for _, r in sw.iterrows():
        assert np.isnan(r["register_cos"]) or r["dbic"] < -10
