"""The protocols of writesae.experiments on the tiny random host with a random (untrained) WriteSAE:
mechanics and numbers, each against an independent computation."""
import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import stats as sst

from writesae import stats
from writesae.experiments import closed_form as C
from writesae.experiments import divergence as D
from writesae.experiments import firings as FI
from writesae.experiments import partition as P
from writesae.experiments import substitution as S
from writesae.hosts import Edit, load_host
from writesae.plots import measurements as M
from writesae.sae import SAEConfig, WriteSAE

CELL = (1, 2)


@pytest.fixture(scope="module")
def host():
    torch.set_num_threads(1)
    return load_host("tiny")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def sae(host, ids):
    sae = WriteSAE(SAEConfig("bilinear", 16, 8, n_feat=24, k=4), seed=0)
    sae.set_mean(host.trace(ids, cells=[CELL])[CELL].state.reshape(-1, 16, 8).mean(0))
    return sae


@pytest.fixture(scope="module")
def firings(host, sae, ids):
    return FI.collect(host, sae, CELL, ids, batch_size=2)


@pytest.fixture(scope="module")
def sites(firings):
    return FI.select(firings, "top1", max_firings=10, seed=1)


def test_firings_against_trace_and_encoder(host, sae, ids, firings):
    tr = host.trace(ids, cells=[CELL])[CELL]
    assert len(firings) == 4 * (32 - 8) * 4  # every position, k = 4 (ReLU of the top-k kept positive here)
    for i in (0, 37, len(firings) - 1):
        r = firings.iloc[i]
        s, p, f = int(r["seq"]), int(r["pos"]), int(r["feature"])
        A, W, St = sae.atom(f).detach(), tr.write[s, p], tr.state[s, p]
        U = St - tr.a[s, p] * tr.prev_state[s, p]
        assert r["cos"] == pytest.approx(float((A * W).sum() / (A.norm() * W.norm())), abs=1e-5)
        assert r["cos_update"] == pytest.approx(float((A * U).sum() / (A.norm() * U.norm())), abs=1e-5)
        assert r["cos"] == pytest.approx(r["cos_v"] * r["cos_w"], abs=1e-5)
        assert r["write_norm"] == pytest.approx(float(W.norm()), rel=1e-5)
        enc = sae.encode(St[None])
        acts = dict(zip(enc.top_indices[0].tolist(), enc.top_acts[0].tolist()))
        assert r["coef"] == pytest.approx(acts[f], rel=1e-5)
        assert (r["rank"] == 0) == (acts[f] == max(acts.values()))
    top = FI.select(firings, "top1")
    assert (top["rank"] == 0).all() and len(top) == 4 * 24 and (top["pool"] == "top1").all()
    capped = FI.select(firings, [3, 5], max_per_atom=2)
    assert set(capped["feature"]) <= {3, 5} and capped.groupby("feature").size().max() == 2
    with pytest.raises(ValueError):
        FI.select(firings, "registers")


def test_firings_hold_large_states_in_bounded_pieces(host, sae, ids, firings, monkeypatch):
    # the windows traced at once and the atoms built at once follow the state's size: with budgets of 3 windows'
    # states and 40 atoms, no call holds more, and the table is the same (GLA-1.3B's recall chapter built 8,192
    # atoms of 256 x 512 and the updates beside them, 13.8 GB, and was killed for memory)
    state = 4 * 16 * 8
    monkeypatch.setattr(FI, "TRACE_BYTES", 3 * 32 * state)
    monkeypatch.setattr(FI, "ATOM_BYTES", 40 * state)
    traced, built = [], []
    real_trace, real_atoms = host.trace, sae.atoms
    monkeypatch.setattr(host, "trace", lambda x, **kw: traced.append(len(x)) or real_trace(x, **kw))
    monkeypatch.setattr(sae, "atoms", lambda f: built.append(len(f)) or real_atoms(f))
    small = FI.collect(host, sae, CELL, ids, batch_size=16)
    assert traced == [3, 1] and max(built) == 40 and sum(built) == len(firings)
    pd.testing.assert_frame_equal(small, firings, check_exact=False, rtol=1e-5, atol=1e-6)


def _kl(p_logits, q_logits):
    p, q = (F.softmax(x.double(), -1).numpy() for x in (p_logits, q_logits))
    return sst.entropy(p, q)


@pytest.mark.parametrize("scale", [1e-3, 0.3, 5.0, 60.0])
def test_kl_both_matches_float64_log_softmax_from_tiny_to_overflowing_differences(scale):
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(6, 4096, generator=g) * 3
    z = z0 + scale * torch.randn(6, 4096, generator=g) + 0.7  # a constant shift changes nothing
    lp, lb = F.log_softmax(z.double(), -1), F.log_softmax(z0.double(), -1)
    ref = {"patched||base": (lp.exp() * (lp - lb)).sum(-1), "base||patched": (lb.exp() * (lb - lp)).sum(-1)}
    got = S.kl_both(z, z0)
    for d in S.DIRECTIONS:
        assert torch.allclose(got[d].double(), ref[d], rtol=2e-3, atol=1e-9), d
    assert S.kl_by_position(z0, z0).abs().max() == 0


def test_substitution_native_is_zero_delete_is_not_and_kl_matches_scipy(host, sae, ids, sites):
    df = S.substitute(host, sae, ids, sites, conditions=S.CONDITIONS, direction=S.DIRECTIONS)
    assert len(df) == len(sites) * 3 * 2
    assert df["kl_native"].abs().max() < 1e-10
    assert (df["kl_delete"] > 1e-12).all()
    # one firing, by hand: the distribution at t, at the end, and the mean after t, both directions
    r = sites.iloc[3]
    s, p = int(r["seq"]), int(r["pos"])
    run = host.run_edits(ids, [Edit(s, *CELL, p, "delete")])
    for direction, (a, b) in (("patched||base", (run.logits[0], run.base[s])), ("base||patched", (run.base[s], run.logits[0]))):
        kls = np.array([_kl(a[t], b[t]) for t in range(p, 32)])
        got = df[(df["firing"] == 3) & (df["direction"] == direction)].set_index("read")["kl_delete"]
        assert got["next"] == pytest.approx(kls[0], rel=1e-4)
        assert got["final"] == pytest.approx(kls[-1], rel=1e-4)
        assert got["mean"] == pytest.approx(kls.mean(), rel=1e-4)
    upd = S.substitute(host, sae, ids, sites.head(3), conditions=("native", "delete"), write="update", reads=("mean",))
    assert upd["kl_native"].abs().max() < 1e-10 and (upd["kl_delete"] > 0).all()


def test_prefix_reuse_gives_the_naive_kls(host, sae, ids, sites):
    fast = S.substitute(host, sae, ids, sites.head(4), reads=("mean",))
    naive = S.substitute(host, sae, ids, sites.head(4), reads=("mean",), reuse_prefix=False)
    for c in ("kl_atom", "kl_delete", "kl_random"):
        assert np.allclose(fast[c], naive[c], rtol=1e-4, atol=1e-12)


def test_kl_in_position_slices_is_the_same_numbers():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(40, 512, generator=g)
    z = z0 + torch.randn(3, 40, 512, generator=g)
    z[1, 7, 3] += 80  # a position in the float64 branch
    whole, sliced = S.kl_both(z, z0), S.kl_both(z, z0, max_bytes=4 * 3 * 512 * 6)  # 6 positions a slice
    for d in S.DIRECTIONS:
        assert sliced[d].shape == (3, 40) and torch.equal(sliced[d], whole[d])


def test_substitution_within_a_small_logits_budget_gives_the_same_kls(host, sae, ids, sites):
    one_window = 4 * ids.shape[1] * host.vocab_size
    wide = S.substitute(host, sae, ids, sites, chunk=4, trace_batch=4)
    narrow = S.substitute(host, sae, ids, sites, chunk=4, trace_batch=4, logits_bytes=one_window)  # 1 window, 1 firing
    assert len(narrow) == len(wide) == len(sites) * 3
    for c in ("kl_atom", "kl_delete", "kl_random"):
        assert np.allclose(narrow[c], wide[c], rtol=1e-5, atol=1e-12)
    assert (narrow["win"] == wide["win"]).all()


def test_geometric_rule_is_the_state_residual(host, sae, ids, sites):
    for scaling in ("coef", "norm"):
        df = S.substitute(host, sae, ids, sites, conditions=("atom", "delete"), scaling=scaling, reads=("next",))
        s, n, cos = df["atom_scale"], df["native_norm"], df["cos_native"]
        assert np.allclose(df["resid_atom"], np.sqrt(s**2 + n**2 - 2 * s * n * cos) / n, rtol=1e-4)
        assert (df["geom_win"] == (s < 2 * n * cos)).all()
        if scaling == "coef":
            assert np.allclose(s, df["coef"] * sae.atoms(df["feature"].tolist()).flatten(1).norm(dim=1).detach().numpy(), rtol=1e-5)
        else:
            assert np.allclose(s, n, rtol=1e-5) and (df["geom_win"] == (cos > 0.5)).all()


def test_summarize_on_a_known_table():
    rng = np.random.default_rng(0)
    n = 40
    kd = rng.uniform(1, 2, n)
    ka = np.where(np.arange(n) < 30, kd * 0.5, kd * 1.5)  # 30 wins of 40
    df = pd.DataFrame(dict(read="next", direction="patched||base", feature=np.arange(n) % 5, seq=np.arange(n) % 7,
                           kl_atom=ka, kl_delete=kd, kl_random=kd * 3, cos_native=np.linspace(-0.2, 0.6, n),
                           geom_win=np.arange(n) < 20))
    df["win"] = df["kl_atom"] < df["kl_delete"]
    df["chain"] = df["win"] & (df["kl_delete"] < df["kl_random"])
    row = S.summarize(df, n_boot=200).iloc[0]
    assert row["wins"] == 30 and row["win_rate"] == 0.75
    assert (row["wilson_lo"], row["wilson_hi"]) == tuple(stats.wilson_ci(30, 40))
    assert row["median_kl_delete"] == np.median(kd)
    assert row["ratio_random"] == pytest.approx(np.median(kd * 3) / np.median(ka))
    assert row["chain_rate"] == 0.75
    assert row["geom_agree"] == 0.75 and row["wins_unexplained"] == pytest.approx(10 / 30)
    assert row["wilcoxon_p"] == pytest.approx(sst.wilcoxon(ka, kd).pvalue)
    assert row["cliffs_delta"] == pytest.approx(stats.cliffs_delta(kd, ka))
    hi = df["cos_native"] > 0.1
    assert row["n_cos_gt_0_1"] == hi.sum() and row["win_rate_cos_gt_0_1"] == pytest.approx(df.loc[hi, "win"].mean())
    assert row["boot_feature_lo"] <= 0.75 <= row["boot_feature_hi"]
    bins = S.binned(df, bins=(-1, 0.1, 1))
    assert bins["n"].tolist() == [int((~hi).sum()), int(hi.sum())]


def test_population_per_atom_rates():
    df = pd.DataFrame(dict(read="mean", direction="patched||base", feature=np.repeat([1, 2, 3, 4], 6),
                           win=np.array([1, 1, 1, 1, 1, 0] + [1, 0] * 3 + [1] * 6 + [0, 0, 0, 0, 1, 1], bool),
                           cos_native=0.2))
    classes = pd.DataFrame(dict(feature=[1, 2, 3, 4], cos=[0.3, 0.1, 0.4, 0.0], **{"class": ["register", "bundle", "register", "bundle"]}))
    per, summ = S.population(df, classes, min_firings=5)
    assert per.set_index("feature")["win_rate"].round(4).tolist() == [0.8333, 0.5, 1.0, 0.3333]
    assert summ["register_win_rate"] == pytest.approx((5 / 6 + 1) / 2)
    assert summ["mann_whitney_p"] == pytest.approx(sst.mannwhitneyu([5 / 6, 1], [0.5, 1 / 3]).pvalue)


def test_partition_two_components_on_bimodal_one_on_unimodal():
    rng = np.random.default_rng(0)

    def atoms(cos):
        return pd.DataFrame(dict(feature=np.arange(len(cos)), n_firings=10, cos=cos))

    bi = np.concatenate([rng.normal(0.03, 0.02, 120), rng.normal(0.3, 0.03, 80)])
    table, summ = P.partition(atoms(bi))
    assert summ["k"] == 2 and summ["dbic"] < -50
    assert summ["n_register"] == 80 and (table.loc[table["class"] == "register", "feature"] >= 120).all()
    table, summ = P.partition(atoms(rng.normal(0.1, 0.05, 200)))
    assert summ["k"] == 1 and summ["dbic"] > 0
    # a broad high component also claims the far low tail: those atoms stay bundles
    broad = np.concatenate([rng.normal(0.1, 0.01, 300), rng.normal(0.3, 0.1, 100), [-0.1, -0.05]])
    table, summ = P.partition(atoms(broad))
    reg = table.loc[table["class"] == "register", "cos"]
    assert summ["n_register_gmm"] > summ["n_register"] and reg.min() > summ["means"][0]
    assert summ["threshold"] == reg.min() and (table.loc[table["class"] == "bundle", "cos"] < reg.min()).all()


def test_atom_table_and_exemplars(host, sae, ids, firings):
    at = P.atom_table(firings)
    f = int(at["feature"].iloc[0])
    mine = firings[firings["feature"] == f]
    assert at["n_firings"].iloc[0] == len(mine) and at["cos"].iloc[0] == pytest.approx(mine["cos"].median())
    assert at["fire_rate"].iloc[0] == pytest.approx(len(mine) / (4 * 24))
    table, summ = P.partition(at)
    ex = P.exemplars(host, sae, CELL, ids, firings, table, n_per_class=1, n_sites=2)
    assert sorted(ex["class"]) == ["bundle", "register"]
    assert set(ex["reader"]) <= {f"L2H{h}" for h in range(4)}  # the only later recurrent layer
    rd = P.reader_heads(host, sae, CELL, ids, firings, [f], n_sites=2)
    assert len(rd) == 4 and (rd["response"] > 0).all()


@pytest.mark.parametrize("per_row", [False, True])
def test_propagate_is_the_matrix_product(per_row):
    """P^T q for the Gated DeltaNet transport (scalar decay) and an RWKV-7-like one (per-row decay)."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    k = F.normalize(torch.randn(4, 5, generator=g), dim=1)
    a = torch.rand(4, 5, generator=g) if per_row else torch.rand(4, generator=g)
    b, q = torch.rand(4, generator=g), torch.randn(5, generator=g)
    e, f = -b[:, None] * k, (a if per_row else a[:, None]) * k
    P_ = torch.eye(5)
    for s in range(1, 4):  # P = prod_{s=t0+1..t} (D_s + e_s f_s^T), later steps on the left
        M = (torch.diag(a[s]) if per_row else a[s] * torch.eye(5)) + torch.outer(e[s], f[s])
        if not per_row:  # Gated DeltaNet: a_s (I - b_s k_s k_s^T)
            assert torch.allclose(M, a[s] * (torch.eye(5) - b[s] * torch.outer(k[s], k[s])), atol=1e-6)
        P_ = M @ P_
    y, G = C.propagate(SimpleNamespace(a=a, e=e, f=f), 0, 3, q)
    assert torch.allclose(y, P_.T @ q, atol=1e-6) and G == pytest.approx(float(a[1:].prod(0).mean()))


def test_closed_form_exact_at_head_first_order_at_layer(host, sae, ids, sites):
    el = C.edited_layer(host, sae, ids, sites.head(2), eps=(1e-4, 1e-3, 1e-2, 1.0), lags=(0, 1))
    assert el["r2_head"].min() > 0.9999  # exact at the head output, every eps and lag
    lag0 = el[el["lag"] == 0].groupby("eps")[["r2_layer", "rel_err_layer"]].median()
    assert lag0.loc[1e-4, "r2_layer"] > 0.99999 and lag0.loc[1.0, "r2_layer"] < 0.9  # states are ~5e-3 here
    assert lag0.loc[1e-3, "rel_err_layer"] < 0.2 * lag0.loc[1e-2, "rel_err_layer"]  # first-order error ~ eps


def test_closed_form_table_and_r2(host, sae, ids, firings):
    sites = FI.select(firings, [0, 1], max_per_atom=4, seed=0)
    df = C.closed_form(host, sae, ids, sites, eps=(1e-2, 3e-2), relative_to="state", lags=(0,), ranks=(1, 3))
    assert len(df) == len(sites) * 2 * 2 and set(df["split"]) == {"fit", "eval"}
    for f, g in df.groupby("feature"):  # an atom's fit and eval prompts are disjoint
        assert not set(g.loc[g["split"] == "fit", "seq"]) & set(g.loc[g["split"] == "eval", "seq"])
    for e, g in df.groupby("eps"):  # the norms are linear at this scale; the norm of the edit is eps ||S_t0||
        assert C._r2(g["direct_nonlinear"].to_numpy(), g["pred_direct"].to_numpy()) > 0.9999
        assert np.allclose(g["norm"], e * sites.set_index(["seq", "pos"]).loc[list(zip(g["seq"], g["pos"])), "state_norm"], rtol=1e-5)
    tab = C.r2(df, by=("feature",))
    g = df[(df["feature"] == 0)]
    fit, ev = g[g["split"] == "fit"], g[g["split"] == "eval"]
    c = (fit["measured"] * fit["pred_paper"]).sum() / (fit["pred_paper"] ** 2).sum()
    want = 1 - ((ev["measured"] - c * ev["pred_paper"]) ** 2).sum() / ((ev["measured"] - ev["measured"].mean()) ** 2).sum()
    assert tab.set_index("feature").loc[0, "r2_pred_paper_fit"] == pytest.approx(want)
    assert tab.set_index("feature").loc[0, "c_pred_paper"] == pytest.approx(c)


def test_selectivity_controls(host, sae, ids, sites):
    A = sae.atom(3).detach()
    O = C._orthogonal_rank1(A, torch.Generator().manual_seed(0))
    assert float((A * O).sum()) == pytest.approx(0, abs=1e-6) and float(O.norm()) == pytest.approx(1, abs=1e-6)
    sel = C.selectivity(host, sae, ids, sites.head(4), eps=1e-3, top=5)
    assert len(sel) == 8 and sel["selectivity"].between(0, 1).all()
    assert np.allclose(sel["selectivity"], 1 - sel["overlap"]) and (sel["overlap"] * 5).round(6).isin(range(6)).all()


def test_divergence_delete_and_native(host, sae, ids, sites):
    df = D.divergence(host, sae, ids, sites.head(3), horizon=4, conditions=("delete", "native"))
    d0 = df[(df["cond"] == "delete") & (df["lag"] == 0)].reset_index(drop=True)
    want = (sites.head(3)["write_norm"] / sites.head(3)["state_norm"]).to_numpy()
    assert np.allclose(d0["state_rel"], want, rtol=1e-3)
    nat = df[df["cond"] == "native"]
    assert nat["kl"].abs().max() < 1e-10 and nat["state_rel"].max() < 1e-5
    cur = D.curves(df)
    assert len(cur) == 2 * 5 and (cur["n"] == 3).all()


def test_passage_nll(host, ids, firings):
    nll = S.passage_nll(host, ids, firings, [])
    ce = F.cross_entropy(host.logits(ids)[:, :-1].reshape(-1, 101), ids[:, 1:].reshape(-1), reduction="none")
    assert np.allclose(nll["bits_base"], ce.reshape(4, 31).mean(1).numpy() / np.log(2), rtol=1e-5)
    assert (nll["d_delete"] == 0).all() and (nll["n_edited"] == 0).all()
    feats = firings.loc[firings["rank"] == 0, "feature"].unique()[:3]
    nll = S.passage_nll(host, ids, firings, feats)
    n_pos = firings[firings["feature"].isin(feats)].groupby("seq")["pos"].nunique()
    assert nll.set_index("seq")["n_edited"].equals(n_pos.reindex(range(4), fill_value=0).rename("n_edited"))
    assert (nll.loc[nll["n_edited"] > 0, "d_delete"] != 0).all()


def test_figures(host, sae, ids, sites, firings):
    df = S.substitute(host, sae, ids, sites, reads=("mean",))
    fig = M.substitution_kl(df, read="mean")
    assert len(fig.axes[0].collections[0].get_offsets()) == len(sites)
    table, summ = P.partition(P.atom_table(firings))
    fig = M.partition_histogram(table, summ)
    assert sum(p.get_height() for p in fig.axes[0].patches) == len(table)
    sm = S.summarize(df.assign(layer=1), by=("layer", "head", "read", "direction"), n_boot=50)
    fig = M.win_rate_strip(sm, chosen=CELL)
    assert len(fig.axes[0].texts) == len(sm)  # one labelled point per head


def test_divergence_plot_of_the_last_recurrent_layer():
    """The last recurrent layer has no later heads: that panel is all zeros and is left out of the figure."""
    import pandas as pd

    from writesae.plots.measurements import divergence_curves

    rows = [dict(cond=c, lag=lag, **{f"{col}_{q}": (0.0 if col == "state_rel_later" else 10.0 ** -lag)
                                     for col in ("kl", "state_rel", "state_rel_later") for q in ("median", "q25", "q75")})
            for c in ("atom", "delete") for lag in range(4)]
    fig = divergence_curves(pd.DataFrame(rows))
    assert len(fig.axes) == 2 and fig.axes[1].get_yscale() == "log"
    assert fig.axes[1].get_ylabel() == "relative state change, edited head"


def test_interrupted_substitution_resumes_without_redoing_or_losing_work(host, sae, ids, sites, tmp_path, monkeypatch):
    straight = S.substitute(host, sae, ids, sites, trace_batch=2)
    assert sites["seq"].nunique() > 2  # two batches at least
    calls = []
    orig = host.prefix

    def dies_on_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return orig(*a, **kw)

    monkeypatch.setattr(host, "prefix", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        S.substitute(host, sae, ids, sites, trace_batch=2, resume=tmp_path)
    assert len(list(tmp_path.glob("batch_*.json"))) == 1  # the finished batch is kept, nothing half-written
    calls.clear()
    monkeypatch.setattr(host, "prefix", lambda *a, **kw: (calls.append(1), orig(*a, **kw))[1])
    resumed = S.substitute(host, sae, ids, sites, trace_batch=2, resume=tmp_path)
    n_batches = -(-sites["seq"].nunique() // 2)
    assert len(calls) == n_batches - 1  # only the unfinished batches ran
    pd.testing.assert_frame_equal(resumed, straight)
