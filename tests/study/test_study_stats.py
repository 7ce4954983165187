"""Study statistics against scipy and against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from cppo_diag.study.stats import (
    MIN_BOOT_PAIRS,
    bca_mean_ci,
    compare_restricted_means,
    holm_adjust,
    kaplan_meier,
    km_restricted_mean,
    paired_comparison,
    sign_flip_pvalue,
    t_interval,
)

# Hand data: per-seed accuracies of two rules on 6 seeds.
A = np.array([0.62, 0.55, 0.71, 0.48, 0.66, 0.59])
B = np.array([0.58, 0.50, 0.69, 0.49, 0.60, 0.52])


def test_t_interval_matches_scipy_and_hand_value():
    iv = t_interval(A, 0.95)
    lo, hi = stats.t.interval(0.95, df=len(A) - 1, loc=A.mean(), scale=stats.sem(A))
    assert iv.n == 6
    assert iv.mean == pytest.approx(A.mean())
    assert iv.lo == pytest.approx(lo, rel=1e-12)
    assert iv.hi == pytest.approx(hi, rel=1e-12)
    # By hand: t_{0.975, 5} = 2.5705818..., sd(ddof=1), half-width = t * sd / sqrt(n).
    half = 2.5705818366147395 * A.std(ddof=1) / math.sqrt(6)
    assert iv.half_width == pytest.approx(half, rel=1e-9)


def test_t_interval_other_confidence_and_nan_dropped():
    x = np.array([1.0, np.nan, 3.0, 2.0, np.nan])
    iv = t_interval(x, 0.9)
    lo, hi = stats.t.interval(0.9, df=2, loc=2.0, scale=stats.sem([1.0, 3.0, 2.0]))
    assert (iv.n, iv.mean) == (3, 2.0)
    assert (iv.lo, iv.hi) == (pytest.approx(lo), pytest.approx(hi))


def test_t_interval_degenerate_sizes():
    assert t_interval([]).n == 0 and math.isnan(t_interval([]).mean)
    one = t_interval([0.4])
    assert one.n == 1 and one.mean == 0.4 and math.isnan(one.lo)
    assert one.fmt() == "0.400"
    assert t_interval([]).fmt() == "n/a"
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1.0, 2.0], 1.5)
    with pytest.raises(ValueError, match="1-D"):
        t_interval(np.ones((2, 2)))


def test_paired_comparison_matches_scipy_ttest_rel():
    c = paired_comparison(A, B, name_a="cppo", name_b="dppo", metric="best_acc")
    ref = stats.ttest_rel(A, B)
    d = A - B
    assert c.n == 6
    assert c.mean_diff == pytest.approx(d.mean())
    assert c.t_stat == pytest.approx(ref.statistic, rel=1e-10)
    assert c.p_ttest == pytest.approx(ref.pvalue, rel=1e-10)
    lo, hi = stats.t.interval(0.95, df=5, loc=d.mean(), scale=stats.sem(d))
    assert (c.ci_lo, c.ci_hi) == (pytest.approx(lo), pytest.approx(hi))
    # Cohen's d_z by hand: mean / sd of the differences; and t = d_z * sqrt(n).
    assert c.cohens_dz == pytest.approx(d.mean() / d.std(ddof=1))
    assert c.t_stat == pytest.approx(c.cohens_dz * math.sqrt(6))
    assert (c.wins, c.losses) == (5, 1)
    # 6 pairs: below MIN_BOOT_PAIRS, so no bootstrap interval at all (a percentile one would be too narrow).
    assert math.isnan(c.bca_lo) and math.isnan(c.bca_hi)
    assert c.sign_flip_exact


def test_paired_comparison_drops_incomplete_pairs():
    a = np.array([0.5, np.nan, 0.7, 0.6, 0.9])
    b = np.array([0.4, 0.3, np.nan, 0.55, 0.7])
    c = paired_comparison(a, b)
    ref = stats.ttest_rel([0.5, 0.6, 0.9], [0.4, 0.55, 0.7])
    assert c.n == 3
    assert c.mean_a == pytest.approx(2.0 / 3)
    assert c.mean_diff == pytest.approx(0.35 / 3)
    assert c.p_ttest == pytest.approx(ref.pvalue, rel=1e-10)


def test_paired_comparison_constant_and_zero_differences():
    c = paired_comparison([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    assert c.t_stat == math.inf and c.p_ttest == 0.0 and c.cohens_dz == math.inf
    z = paired_comparison([1.0, 2.0], [1.0, 2.0])
    assert math.isnan(z.p_ttest) and math.isnan(z.cohens_dz) and z.p_sign_flip == 1.0
    with pytest.raises(ValueError, match="equal length"):
        paired_comparison([1.0, 2.0], [1.0])


@pytest.mark.parametrize("d", [A - B, np.array([0.1, -0.02, 0.05, 0.03, 0.04]), np.array([0.2, -0.2, 0.1])])
def test_sign_flip_exact_matches_scipy_permutation_test(d):
    res = stats.permutation_test(
        (d, np.zeros_like(d)),
        lambda x, y: np.mean(x - y),
        permutation_type="samples",
        n_resamples=np.inf,
    )
    assert sign_flip_pvalue(d) == pytest.approx(res.pvalue, abs=1e-12)


def test_sign_flip_hand_values():
    # All 5 differences positive: only the identity and the all-flipped assignment reach |mean| -> 2/32.
    assert sign_flip_pvalue([0.1, 0.2, 0.05, 0.3, 0.01]) == pytest.approx(2 / 32)
    # Symmetric around zero: every assignment is as extreme -> 1.
    assert sign_flip_pvalue([0.1, -0.1]) == pytest.approx(1.0)


def test_sign_flip_monte_carlo_close_to_exact():
    rng = np.random.default_rng(3)
    d = rng.normal(0.3, 1.0, size=18)
    exact = sign_flip_pvalue(d, exact_max_n=18)
    mc = sign_flip_pvalue(d, exact_max_n=10, n_resamples=40_000, seed=1)
    assert mc == pytest.approx(exact, abs=0.01)
    assert sign_flip_pvalue(d, exact_max_n=10, seed=1) == sign_flip_pvalue(d, exact_max_n=10, seed=1)


def test_bca_equals_scipy_bootstrap_on_the_same_resamples():
    rng = np.random.default_rng(0)
    x = rng.normal(0.02, 0.05, size=12)
    lo, hi = bca_mean_ci(x, n_resamples=5000, seed=7)
    ref = stats.bootstrap((x,), np.mean, method="BCa", n_resamples=5000, rng=np.random.default_rng(7))
    assert lo == pytest.approx(ref.confidence_interval.low, rel=1e-9)
    assert hi == pytest.approx(ref.confidence_interval.high, rel=1e-9)
    # Skewed data: BCa differs from the percentile interval of the same resamples (it is not a relabelling).
    y = rng.exponential(1.0, size=15)
    means = y[np.random.default_rng(3).integers(0, 15, (4000, 15))].mean(axis=1)
    assert bca_mean_ci(y, n_resamples=4000, seed=3) != pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))


def test_no_bootstrap_below_ten_pairs():
    assert MIN_BOOT_PAIRS == 10
    assert all(math.isnan(v) for v in bca_mean_ci(np.arange(9.0)))
    assert all(math.isfinite(v) for v in bca_mean_ci(np.arange(10.0)))
    c = paired_comparison(np.arange(10.0) + 0.3, np.arange(10.0) + np.linspace(0, 0.5, 10))
    assert c.bca_lo <= c.mean_diff <= c.bca_hi


def test_sign_flip_exact_at_study_sizes():
    """8 and 20 pairs are enumerated exactly (meet in the middle); 8 same-sign pairs give 2 / 2**8."""
    assert sign_flip_pvalue(np.linspace(0.01, 0.08, 8)) == pytest.approx(2 / 256)
    d = np.random.default_rng(4).normal(0.05, 0.1, size=20)
    # By brute force over all 2**20 assignments, in blocks.
    h = np.array(list(__import__("itertools").product((1.0, -1.0), repeat=10)))
    lo, hi = h @ d[:10], h @ d[10:]
    brute = np.mean(np.abs(lo[:, None] + hi[None, :]) >= abs(d.sum()) - 1e-12)
    assert sign_flip_pvalue(d) == pytest.approx(brute, abs=1e-15)
    assert paired_comparison(d, np.zeros(20)).sign_flip_exact


# Hand example for the restricted mean: six seeds, four reach the threshold (steps 2, 4, 4, 6), two never do
# (censored at their last evaluation, step 8). Horizon tau = 8.
KM_T = np.array([2.0, 4.0, 4.0, 6.0, 8.0, 8.0])
KM_E = np.array([True, True, True, True, False, False])


def test_kaplan_meier_hand_values():
    ut, y, d, s = kaplan_meier(KM_T, KM_E)
    np.testing.assert_allclose(ut, [2, 4, 6])
    np.testing.assert_allclose(y, [6, 5, 3])
    np.testing.assert_allclose(d, [1, 2, 1])
    np.testing.assert_allclose(s, [5 / 6, 1 / 2, 1 / 3])


def test_restricted_mean_hand_values():
    r = km_restricted_mean(KM_T, KM_E, tau=8)
    # Area under S on [0, 8]: 1 * 2 + 5/6 * 2 + 1/2 * 2 + 1/3 * 2.
    assert r.rmst == pytest.approx(2 + 5 / 3 + 1 + 2 / 3)
    # Greenwood-type variance: A_j = area after t_j; sum A_j^2 d_j / (Y_j (Y_j - d_j)).
    var = (10 / 3) ** 2 * 1 / (6 * 5) + (5 / 3) ** 2 * 2 / (5 * 3) + (2 / 3) ** 2 * 1 / (3 * 2)
    assert r.se == pytest.approx(math.sqrt(var))
    assert r.lo == pytest.approx(r.rmst - 1.959963984540054 * r.se)
    assert (r.n, r.n_events, r.tau) == (6, 4, 8.0)
    # The seeds that never reached count: the mean over only those that did (4.0) is smaller.
    assert r.rmst > KM_T[KM_E].mean()


def test_restricted_mean_without_censoring_is_the_mean_of_min_t_tau():
    t = np.array([1.0, 3.0, 5.0, 10.0])
    r = km_restricted_mean(t, np.ones(4, bool), tau=6)
    assert r.rmst == pytest.approx(np.minimum(t, 6).mean())
    none = km_restricted_mean([8.0, 8.0, 8.0], [False, False, False], tau=8)
    assert none.rmst == 8.0 and none.se == 0.0 and none.n_events == 0
    with pytest.raises(ValueError, match="tau"):
        km_restricted_mean(t, np.ones(4, bool), tau=0)
    with pytest.raises(ValueError, match="equal length"):
        km_restricted_mean(t, np.ones(3, bool), tau=5)


def test_compare_restricted_means():
    a = km_restricted_mean(KM_T, KM_E, tau=8)
    b = km_restricted_mean([4.0, 6.0, 8.0, 8.0], [True, True, False, False], tau=8)
    c = compare_restricted_means(a, b, name_a="cppo", name_b="dppo")
    assert c.diff == pytest.approx(a.rmst - b.rmst)
    assert c.se == pytest.approx(math.hypot(a.se, b.se))
    assert c.p == pytest.approx(2 * stats.norm.sf(abs(c.diff) / c.se))
    assert c.ci_lo < c.diff < c.ci_hi
    with pytest.raises(ValueError, match="same tau"):
        compare_restricted_means(a, km_restricted_mean(KM_T, KM_E, tau=6))


def test_holm_hand_values():
    # Sorted p: 0.01, 0.02, 0.04, 0.30 with m = 4 -> 0.04, 0.06, 0.08, 0.30 (monotone), back in input order.
    adj = holm_adjust([0.04, 0.01, 0.30, 0.02, np.nan])
    np.testing.assert_allclose(adj[:4], [0.08, 0.04, 0.30, 0.06])
    assert math.isnan(adj[4])
    # Monotonicity: a later raw p cannot get a smaller adjusted p; cap at 1.
    np.testing.assert_allclose(holm_adjust([0.5, 0.6]), [1.0, 1.0])
