"""Interventions (claims 8, 9, 10, 13) on the tiny host: effects go the predicted way, magnitude 0 is a no-op."""
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from writesae.experiments import closed_form, firings, interventions as iv
from writesae.hosts import load_host
from writesae.plots import interventions as plots
from writesae.sae import SAEConfig, WriteSAE

torch.set_num_threads(1)  # tiny models: extra threads only spin against the shared cores
CELL = (2, 3)


@pytest.fixture(scope="module")
def host():
    h = load_host("tiny")
    for l in h.recurrent_layers:  # slow forgetting (a_t ~ 0.98) as in trained models; the random init forgets at once
        h.layers[l].linear_attn.A_log.data.fill_(-4.0)
    return h


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 101, (6, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def sae(host, ids):
    s = WriteSAE(SAEConfig("bilinear", host.d_k, host.d_v, n_feat=64, k=4), seed=0)
    s.set_mean(host.trace(ids, cells=[CELL])[CELL].state.flatten(0, 1).mean(0))
    return s


@pytest.fixture(scope="module")
def fired(host, sae, ids):
    return firings.collect(host, sae, CELL, ids)


def test_token_readout_is_the_analytic_direct_path_gradient(host, ids):
    """u_T = J_g(o, z)^T W_O[h]^T J_f(r)^T W_U[T], against the RMSNorm Jacobians written out by hand."""
    _, (z,), o, r, _ = closed_form.readout(host, CELL, ids)
    o, z, r = o[:, 31], z[:, 31], r[:, 31]
    tokens = torch.tensor([3, 50, 7, 99, 0, 12])
    u = iv.token_readout(host, CELL, o, (z,), r, tokens)

    def rms_vjp(x, y):  # d/dx of x / rms(x) (eps as in the model), applied to y
        d = x.shape[-1]
        ms = x.pow(2).mean(-1, keepdim=True) + 1e-6
        return y / ms.sqrt() - x * (x * y).sum(-1, keepdim=True) / (d * ms.pow(1.5))

    with torch.no_grad():
        y = rms_vjp(r, (1 + host.decoder.norm.weight) * host.lm_head.weight[tokens])
        y = y @ host.layers[CELL[0]].linear_attn.out_proj.weight[:, CELL[1] * 8:(CELL[1] + 1) * 8]
        gn = host.layers[CELL[0]].linear_attn.norm
        expect = rms_vjp(o, gn.weight * torch.nn.functional.silu(z) * y)
    assert (u - expect).abs().max() < 1e-4 * expect.abs().max()
    assert expect.abs().max() > 1e-3


@pytest.mark.parametrize("lag,key,output,acc", [(0, "q", "direct", 0.95), (2, "q", "direct", 0.9),
                                                (0, "mean_q", "direct", 0.9), (0, "q", "paper", 0.85)])
def test_sign_prediction_moves_the_logit_as_predicted(host, ids, lag, key, output, acc):
    df = iv.sign_prediction(host, CELL, ids, tokens_per_window=6, m=0.3, lag=lag, key=key, output=output)
    s = iv.sign_summary(df).iloc[0]
    assert s["n"] == 36 and set(df["sign"]) == {-1, 1}
    assert s["accuracy"] >= acc
    assert s["pearson_r"] > 0.9
    assert 0.7 < s["median_ratio"] < 1.3
    assert df.loc[df["predicted"] > 0, "measured"].mean() > 0 > df.loc[df["predicted"] < 0, "measured"].mean()
    if (lag, key, output) == (0, "q", "direct"):  # k = q_t, w = u_T: a positive install raises the target
        assert (np.sign(df["predicted"]) == df["sign"]).all()
    fig = plots.sign_figure(df)
    assert f"{s['accuracy']:.1%}" in fig.axes[0].get_title() and len(fig.axes[0].collections) == 2
    plt.close(fig)


def test_target_direction_is_a_unit_rank1_matrix(host, ids):
    D = iv.target_direction(host, CELL, ids[0], 5)
    assert D.shape == (16, 8)
    assert abs(float(D.norm()) - 1) < 1e-5
    assert torch.linalg.matrix_rank(D) == 1


def test_zero_magnitude_is_a_noop(host, ids, sae, fired):
    df = iv.sign_prediction(host, CELL, ids, tokens_per_window=3, m=0.0)
    assert df["measured"].abs().max() < 1e-5 and df["predicted"].abs().max() == 0
    er = iv.erasure(host, sae, CELL, ids, firings=fired, n_features=2, per_feature=6, doses=(0.0,))
    assert er.loc[er["split"] == "eval", "dlogp"].abs().max() < 1e-5
    prompts = ids[:3, :20]
    tg = iv.target_strata(host, prompts, corpus=ids, n_per_stratum=1, mid=(10, 50), n_pool=10)
    gi = iv.generation_install(host, CELL, prompts, tg, ms=(0.0,), n_new=8)
    assert gi["lift"].abs().max() < 1e-5 and (gi["rank_shift"] == 0).all()
    assert (gi["included_native"] == gi["included_edited"]).all()
    out, edits = iv.steer(host, sae, CELL, prompts, [0, 1, 2], 1.0, n_new=6)
    assert edits == [] and torch.equal(out, host.generate(prompts, 6))


def test_erasure_without_a_frequent_atom_says_what_to_give(host, ids, sae, fired):
    most = int(fired["feature"].value_counts().max())
    with pytest.raises(ValueError, match=rf"no atom fires {most + 1} times or more .* \(the most: {most}\): give more "
                                         r"held-out passages \(eval_windows\)"):
        iv.erasure(host, sae, CELL, ids, firings=fired, per_feature=most + 1)


def test_erasure_follows_the_first_order_prediction(host, ids, sae, fired):
    er = iv.erasure(host, sae, CELL, ids, firings=fired, n_features=3, per_feature=12, doses=(1.0, 2.0))
    assert set(er["where"]) == {"firing", "non-firing"} and er["feature"].nunique() == 3
    ev = er[er["split"] == "eval"]
    one = ev[ev["dose"] == 1.0]
    assert np.corrcoef(one["dlogit"], one["predicted"])[0, 1] > 0.9
    # doubling the dose doubles the (small) change
    two = ev[ev["dose"] == 2.0]
    ratio = two["dlogit"].to_numpy() / one["dlogit"].to_numpy()
    assert abs(np.median(ratio) - 2) < 0.1
    # the chosen token is the one the select half lowered most
    sel = er[er["split"] == "select"]
    assert (sel.groupby("feature")["dlogp"].mean() < 0).all()
    # matched controls: same windows and coefficients, positions where the feature does not fire
    nf = ev[ev["where"] == "non-firing"]
    busy = set(zip(fired["seq"], fired["pos"], fired["feature"]))
    assert not any((s, p, f) in busy for s, p, f in zip(nf["seq"], nf["pos"], nf["feature"]))
    summ = iv.erasure_summary(er)
    assert list(summ["where"]) == ["firing", "firing", "non-firing", "non-firing"]
    assert (summ["n"] > 0).all() and summ["p_zero"].between(0, 1).all()
    fig = plots.erasure_figure(er)
    assert len(fig.axes) == 2 and len(fig.axes[1].lines) == 3  # two curves over doses and the zero line
    plt.close(fig)


def test_generation_install_raises_the_target(host, ids):
    prompts = ids[:4, :20]
    tg = iv.target_strata(host, prompts, corpus=ids, n_per_stratum=2, mid=(10, 50), n_pool=10, semantic=[5, 7])
    assert set(tg["stratum"]) == {"frequent", "mid", "rare", "semantic"}
    mid = tg[tg["stratum"] == "mid"]
    assert mid["native_rank"].between(10, 49).all()
    gi = iv.generation_install(host, CELL, prompts, tg, ms=(1.0, 3.0), n_new=10)
    assert len(gi) == 2 * len(tg)
    at3 = gi[gi["m"] == 3.0]
    assert (at3["lift"] > 0).mean() >= 0.9 and (at3["rank_shift"] >= 0).mean() >= 0.9
    assert at3["lift"].mean() > gi.loc[gi["m"] == 1.0, "lift"].mean() > 0
    native = host.generate(prompts, 10)[:, 20:]
    expect = [int(t) in native[s].tolist() for s, t in zip(at3["seq"], at3["token"])]
    assert at3["included_native"].tolist() == expect
    summ = iv.install_summary(gi)
    assert set(summ["stratum"]) == {"frequent", "mid", "rare", "semantic", "all"}
    assert summ.loc[summ["stratum"] == "all", "n"].tolist() == [len(tg), len(tg)]
    fig = plots.install_figure(gi)
    assert len(fig.axes[0].patches) == 4 * 3  # native + two m per stratum
    plt.close(fig)


def test_steering_adds_the_amplified_features(host, ids, sae, fired):
    prompts = ids[:3, :16]
    bf = iv.boundary_features(fired, ids, boundary=range(10))
    assert bf["score"].is_monotonic_decreasing and len(bf) == fired["feature"].nunique()
    feats = bf["feature"][:12].tolist()
    out, edits = iv.steer(host, sae, CELL, prompts, feats, 5.0, n_new=4)
    assert out.shape == (3, 20) and edits
    # the first edit: (alpha - 1) * sum of the chosen features' coefficients times their atoms at S_p
    e = edits[0]
    S = host.trace(prompts, cells=[CELL], positions=[15])[CELL].state[e.seq, 0]
    with torch.no_grad():
        enc = sae.encode(S[None])
    expect = sum(4.0 * float(a) * sae.atom(int(i)).detach() for a, i in zip(enc.top_acts[0], enc.top_indices[0]) if int(i) in feats)
    assert e.pos == 15 and torch.allclose(e.matrix, expect, atol=1e-7)
    df = iv.steering_probe(host, sae, CELL, prompts, feats, count={"low": range(30), "even": range(0, 101, 2)},
                           alphas=(5.0,), n_new=6, per=100)
    base = host.generate(prompts, 6)[:, 16:]
    b = df[df["condition"] == "baseline"]
    assert b.loc[b["counted"] == "low", "count"].tolist() == (base < 30).sum(1).tolist()
    assert b.loc[b["counted"] == "even", "rate"].tolist() == pytest.approx(((base % 2 == 0).sum(1) * 100 / 6).tolist())
    summ = iv.steering_summary(df)
    assert list(summ["condition"]) == ["baseline", "boundary", "random"] * 2 and list(summ["counted"][:3]) == ["low"] * 3
    fig = plots.steering_figure(summ)
    assert [p.get_height() for ax in fig.axes for p in ax.patches] == pytest.approx(summ["mean_rate"].tolist())
    plt.close(fig)
