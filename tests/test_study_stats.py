"""Study statistics against scipy and against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from cppo_diag.study.stats import (
    bootstrap_mean_ci,
    holm_adjust,
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
    assert c.boot_lo < c.mean_diff < c.boot_hi


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


def test_bootstrap_close_to_scipy_percentile_and_seeded():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=40)
    lo, hi = bootstrap_mean_ci(x, n_resamples=40_000, seed=5)
    ref = stats.bootstrap((x,), np.mean, method="percentile", n_resamples=40_000, rng=np.random.default_rng(7))
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.05)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.05)
    assert bootstrap_mean_ci(x, seed=2) == bootstrap_mean_ci(x, seed=2)
    assert all(math.isnan(v) for v in bootstrap_mean_ci([1.0]))


def test_holm_hand_values():
    # Sorted p: 0.01, 0.02, 0.04, 0.30 with m = 4 -> 0.04, 0.06, 0.08, 0.30 (monotone), back in input order.
    adj = holm_adjust([0.04, 0.01, 0.30, 0.02, np.nan])
    np.testing.assert_allclose(adj[:4], [0.08, 0.04, 0.30, 0.06])
    assert math.isnan(adj[4])
    # Monotonicity: a later raw p cannot get a smaller adjusted p; cap at 1.
    np.testing.assert_allclose(holm_adjust([0.5, 0.6]), [1.0, 1.0])
