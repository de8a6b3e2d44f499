import numpy as np
import pytest

from writesae import stats


def wilson_formula(k, n, z=1.959963984540054):
    """Textbook Wilson score interval (independent of scipy)."""
    p = k / n
    den = 1 + z * z / n
    center = (p + z * z / (2 * n)) / den
    half = z / den * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return center - half, center + half


def test_wilson_paper_headline():
    # 92.4% of 4,851 firings -> Wilson 95% CI [91.6, 93.1] (paper, Sec. 3.2)
    lo, hi = stats.wilson_ci(4482, 4851)
    assert round(100 * lo, 1) == 91.6
    assert round(100 * hi, 1) == 93.1


@pytest.mark.parametrize("k,n", [(4482, 4851), (3, 17), (50, 100), (99, 100)])
def test_wilson_matches_formula(k, n):
    assert stats.wilson_ci(k, n) == pytest.approx(wilson_formula(k, n), abs=1e-12)


def test_wilson_zero_successes_closed_form():
    # k = 0: interval is [0, z^2 / (n + z^2)] = [0, 0.27753] for n = 10
    lo, hi = stats.wilson_ci(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12)
    assert hi == pytest.approx(1.959963984540054 ** 2 / (10 + 1.959963984540054 ** 2))
    assert round(hi, 4) == 0.2775


def test_wilson_alpha_and_empty():
    lo90, hi90 = stats.wilson_ci(30, 100, alpha=0.10)
    assert (lo90, hi90) == pytest.approx(wilson_formula(30, 100, z=1.6448536269514722))
    assert np.isnan(stats.wilson_ci(0, 0)).all()


def brute_cliff(x, y):
    gt = sum(a > b for a in x for b in y)
    lt = sum(a < b for a in x for b in y)
    return (gt - lt) / (len(x) * len(y))


def test_cliffs_delta_brute_force():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 6, 40)  # integers: many ties
    y = rng.integers(1, 7, 33)
    assert stats.cliffs_delta(x, y) == pytest.approx(brute_cliff(x, y), abs=1e-12)
    assert stats.cliffs_delta(y, x) == pytest.approx(-brute_cliff(x, y), abs=1e-12)
    assert stats.cliffs_delta([3, 4, 5], [0, 1, 2]) == 1.0


def test_cliffs_delta_paired():
    x = np.array([1.0, 2, 3, 4, 5])
    y = np.array([0.0, 3, 3, 1, 1])
    # signs: +, -, 0, +, +  -> (3 - 1) / 5
    assert stats.cliffs_delta(x, y, paired=True) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        stats.cliffs_delta(x, y[:3], paired=True)


def test_paired_wilcoxon_exact():
    # all 5 differences positive: W- = 0, exact two-sided p = 2 / 2^5
    r = stats.paired_wilcoxon([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])
    assert r.statistic == 0.0
    assert r.pvalue == pytest.approx(2 / 32)


def test_mann_whitney_exact():
    # complete separation of 3 vs 3: U = 0, exact two-sided p = 2 / C(6, 3)
    r = stats.mann_whitney([1, 2, 3], [4, 5, 6])
    assert r.statistic == 0.0
    assert r.pvalue == pytest.approx(2 / 20)


def test_median_ratio():
    r = stats.median_ratio([1, 2, 3], [2, 5, 9], [10, 10, 10])
    assert r == pytest.approx([1.0, 5 / 2, 10 / 2])


def test_bootstrap_matches_wilson_for_a_proportion():
    rng = np.random.default_rng(0)
    wins = rng.random(2000) < 0.9
    lo, hi = stats.bootstrap_ci(wins, n_boot=4000, seed=1)
    wlo, whi = stats.wilson_ci(int(wins.sum()), len(wins))
    assert lo == pytest.approx(wlo, abs=0.004)
    assert hi == pytest.approx(whi, abs=0.004)
    # deterministic for a seed
    assert stats.bootstrap_ci(wins, n_boot=500, seed=3) == stats.bootstrap_ci(wins, n_boot=500, seed=3)


def test_bootstrap_coverage():
    rng = np.random.default_rng(2)
    truth, hits, reps = 0.3, 0, 200
    for i in range(reps):
        x = rng.random(150) < truth
        lo, hi = stats.bootstrap_ci(x, n_boot=400, seed=i)
        hits += lo <= truth <= hi
    assert 0.88 <= hits / reps <= 0.99


def test_cluster_bootstrap_is_wider_and_matches_cluster_se():
    rng = np.random.default_rng(3)
    n_clusters, size = 40, 25
    p_c = rng.uniform(0.55, 1.0, n_clusters)  # features differ in win rate
    wins = (rng.random((n_clusters, size)) < p_c[:, None]).ravel().astype(float)
    labels = np.repeat(np.arange(n_clusters), size)
    iid = stats.bootstrap_ci(wins, n_boot=2000, seed=0)
    clu = stats.bootstrap_ci(wins, n_boot=2000, seed=0, clusters=labels)
    mean = wins.mean()
    assert clu.low < mean < clu.high
    assert (clu.high - clu.low) > 1.5 * (iid.high - iid.low)
    # equal cluster sizes: pooled mean = mean of cluster means, SE = sd / sqrt(C)
    se = wins.reshape(n_clusters, size).mean(1).std(ddof=1) / np.sqrt(n_clusters)
    assert (clu.high - clu.low) == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_cluster_bootstrap_singletons_equal_iid_width():
    rng = np.random.default_rng(4)
    x = rng.normal(size=300)
    iid = stats.bootstrap_ci(x, n_boot=2000, seed=0)
    one = stats.bootstrap_ci(x, n_boot=2000, seed=0, clusters=np.arange(300))
    assert (one.high - one.low) == pytest.approx(iid.high - iid.low, rel=0.1)
    with pytest.raises(ValueError):
        stats.bootstrap_ci(x, clusters=np.arange(10))


def test_gmm_bimodal_finds_two():
    rng = np.random.default_rng(5)
    bundles = rng.normal(0.05, 0.02, 94)
    registers = rng.normal(0.26, 0.05, 222)
    res = stats.gmm_partition(np.concatenate([bundles, registers]))
    assert res.k == 2
    assert res.dbic < -50
    assert set(res.bic) == {1, 2, 3}
    assert res.dbic == pytest.approx(res.bic[2] - res.bic[1])
    assert res.means[0] == pytest.approx(0.05, abs=0.02)
    assert res.means[1] == pytest.approx(0.26, abs=0.02)
    assert res.n_register == pytest.approx(222, abs=8)
    assert res.n_bundle + res.n_register == 316
    # the high-cosine points are the registers
    assert (res.labels[94:] == "register").mean() > 0.95


def test_gmm_unimodal_finds_one():
    rng = np.random.default_rng(6)
    res = stats.gmm_partition(rng.normal(0.2, 0.05, 300))
    assert res.k == 1
    assert res.dbic > 0
