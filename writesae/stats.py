"""Small statistics used by the experiments.

Every function is a thin, documented wrapper around scipy / scikit-learn so
the notebooks say *what* they compute in one call, and the tests can check
each against an independent reference.

Conventions: confidence intervals are returned as ``CI(low, high)`` (a
NamedTuple, so ``lo, hi = wilson_ci(...)`` works); tests return
``StatTest(statistic, pvalue)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
from scipy import stats as _st
from sklearn.mixture import GaussianMixture

__all__ = [
    "CI", "StatTest", "GMMPartition",
    "wilson_ci", "bootstrap_ci", "cliffs_delta", "paired_wilcoxon",
    "mann_whitney", "median_ratio", "gmm_partition",
]


class CI(NamedTuple):
    low: float
    high: float


class StatTest(NamedTuple):
    statistic: float
    pvalue: float


def wilson_ci(successes: int, n: int, alpha: float = 0.05) -> CI:
    """Wilson score interval for a binomial proportion ``successes / n``.

    Uses ``scipy.stats.binomtest(...).proportion_ci(method="wilson")``.
    The paper's headline: 4482 wins of 4851 firings (92.4%) -> [0.916, 0.931].
    Returns ``CI(nan, nan)`` when ``n == 0``.
    """
    if n == 0:
        return CI(float("nan"), float("nan"))
    ci = _st.binomtest(int(successes), int(n)).proportion_ci(
        confidence_level=1 - alpha, method="wilson")
    return CI(float(ci.low), float(ci.high))


def bootstrap_ci(values, stat: Callable = np.mean, n_boot: int = 2000, seed: int = 0,
                 clusters=None, alpha: float = 0.05) -> CI:
    """Percentile bootstrap confidence interval of ``stat(values)``.

    ``values``: 1-D array (e.g. 0/1 wins for a proportion, or KL values).
    ``clusters``: optional labels, one per value (e.g. the feature or passage
    each firing belongs to). When given, whole clusters are resampled with
    replacement and ``stat`` is applied to the pooled values of the drawn
    clusters (cluster bootstrap): this accounts for firings of one feature
    not being independent, and gives a wider interval when clusters differ.

    Resampling and the percentile interval are ``scipy.stats.bootstrap``
    (``method="percentile"``); in the cluster case scipy resamples cluster
    indices. Deterministic for a given ``seed``.
    """
    values = np.asarray(values, dtype=float).ravel()
    rng = np.random.default_rng(seed)
    common = dict(n_resamples=n_boot, confidence_level=1 - alpha,
                  method="percentile", random_state=rng)
    if clusters is None:
        res = _st.bootstrap((values,), stat, vectorized=False, **common)
    else:
        clusters = np.asarray(clusters).ravel()
        if clusters.shape != values.shape:
            raise ValueError("clusters must have one label per value")
        _, inverse = np.unique(clusters, return_inverse=True)
        groups = [values[inverse == g] for g in range(inverse.max() + 1)]

        def pooled(idx):
            return stat(np.concatenate([groups[int(i)] for i in idx]))

        res = _st.bootstrap((np.arange(len(groups)),), pooled, vectorized=False, **common)
    return CI(float(res.confidence_interval.low), float(res.confidence_interval.high))


def cliffs_delta(x, y, paired: bool = False) -> float:
    """Cliff's delta, the dominance of ``x`` over ``y``, in [-1, 1].

    Unpaired (default): ``P(X > Y) - P(X < Y)`` over all ``len(x) * len(y)``
    pairs, computed from the Mann-Whitney U statistic
    (``delta = 2 U / (n m) - 1``; ties count half, so they cancel).
    Paired (``paired=True``, equal lengths): ``mean(sign(x_i - y_i))``, the
    share of pairs where x wins minus the share where y wins.

    Positive means x tends to be larger: ``cliffs_delta(kl_delete, kl_atom)``
    is positive when the atom substitution disturbs the output less than deletion.
    """
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if paired:
        if x.shape != y.shape:
            raise ValueError("paired Cliff's delta needs equal lengths")
        return float(np.mean(np.sign(x - y)))
    u = _st.mannwhitneyu(x, y, alternative="two-sided").statistic
    return float(2.0 * u / (len(x) * len(y)) - 1.0)


def paired_wilcoxon(x, y, alternative: str = "two-sided") -> StatTest:
    """Wilcoxon signed-rank test on the paired differences ``x - y``.

    Thin wrapper on ``scipy.stats.wilcoxon(x, y, alternative=...)``.
    """
    r = _st.wilcoxon(np.asarray(x, float), np.asarray(y, float), alternative=alternative)
    return StatTest(float(r.statistic), float(r.pvalue))


def mann_whitney(x, y, alternative: str = "two-sided") -> StatTest:
    """Mann-Whitney U test of two independent samples (U of ``x``, p-value).

    Thin wrapper on ``scipy.stats.mannwhitneyu``.
    """
    r = _st.mannwhitneyu(np.asarray(x, float), np.asarray(y, float), alternative=alternative)
    return StatTest(float(r.statistic), float(r.pvalue))


def median_ratio(*samples) -> np.ndarray:
    """Ratio of medians, normalised to the first sample.

    ``median_ratio(kl_atom, kl_delete, kl_random)`` -> ``[1, m_d / m_a, m_r / m_a]``,
    the paper's "median KL ratio atom : delete : random = 1 : 2.70 : 4.90".
    """
    med = np.array([np.median(np.asarray(s, float)) for s in samples])
    return med / med[0]


@dataclass
class GMMPartition:
    """Result of :func:`gmm_partition`.

    ``bic``: {k: BIC of the k-component fit}; ``dbic``: BIC(2) - BIC(1)
    (negative favours two components; the paper reports -296); ``k``: the k
    with the lowest BIC; ``labels``: per value, "register" (the higher-mean
    component of the 2-component fit) or "bundle" (the lower one);
    ``means``: the 2-component means as (bundle, register).
    """
    bic: dict
    dbic: float
    k: int
    labels: np.ndarray
    means: tuple

    @property
    def n_register(self) -> int:
        return int(np.sum(self.labels == "register"))

    @property
    def n_bundle(self) -> int:
        return int(np.sum(self.labels == "bundle"))


def gmm_partition(values, ks: Sequence[int] = (1, 2, 3), seed: int = 0,
                  n_init: int = 5) -> GMMPartition:
    """Fit 1-D Gaussian mixtures (sklearn ``GaussianMixture``) to ``values``.

    Used on the per-atom median cosine between atom and native write: a
    2-component split separates "registers" (high cosine) from "bundles".
    Fits every k in ``ks`` (and always k = 1, 2, which dBIC and the labels
    need) with ``n_init`` restarts and ``random_state=seed``. The labels come
    from the 2-component fit whatever k wins; look at ``k`` / ``dbic`` to
    decide whether the split is supported.
    """
    x = np.asarray(values, dtype=float).reshape(-1, 1)
    fits = {}
    for k in sorted(set(ks) | {1, 2}):
        fits[k] = GaussianMixture(n_components=k, n_init=n_init, random_state=seed).fit(x)
    bic = {k: float(m.bic(x)) for k, m in fits.items()}
    two = fits[2]
    hi = int(np.argmax(two.means_.ravel()))
    labels = np.where(two.predict(x) == hi, "register", "bundle")
    means = tuple(float(m) for m in sorted(two.means_.ravel()))
    best = min(ks, key=lambda k: bic[k]) if ks else min(bic, key=bic.get)
    return GMMPartition(bic=bic, dbic=bic[2] - bic[1], k=int(best), labels=labels, means=means)
