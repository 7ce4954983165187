"""Statistics for a multi-seed study: t-intervals over seeds, paired rule-vs-rule comparisons, Holm over the
whole table, and Kaplan-Meier restricted mean times for "steps to reach a threshold".

Everything here works on small 1-D arrays (one value per seed) and returns plain dataclasses, so the
analysis, the CLI and the tests share one implementation. Conventions:

* NaN values are dropped (a seed whose run failed or never evaluated); ``n`` always reports how many
  values were actually used.
* Confidence intervals are two-sided, Student-t based (``mean +- t_{1-a/2, n-1} * sd / sqrt(n)``) with the
  sample standard deviation (``ddof=1``). With fewer than two values the interval is undefined (NaN).
* The paired comparison pairs the two rules on the *same seeds* (same initial model, same prompts),
  so seed-to-seed variance cancels in the differences ``d_s = a_s - b_s``. It reports the mean difference,
  its t-interval, the paired t-test p-value (two-sided), Cohen's ``d_z = mean(d) / sd(d)`` and the exact
  sign-flip (paired permutation) p-value, which does not assume normality.
* No percentile bootstrap: at a handful of pairs it is too narrow (it excludes zero where the t interval
  does not). A BCa bootstrap interval is given from :data:`MIN_BOOT_PAIRS` pairs on, labelled as such.
* :func:`holm_adjust` is applied by the caller over every row of a comparison table (all comparisons and
  all metrics at once), not per metric.
* :func:`km_restricted_mean` handles runs that never reach a threshold as right-censored at their last
  evaluation, so they count (a mean over only the runs that got there would favour a rule whose slow seeds
  never did).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _st

__all__ = [
    "MIN_BOOT_PAIRS",
    "Interval",
    "PairedComparison",
    "RestrictedMean",
    "RestrictedMeanComparison",
    "t_interval",
    "paired_comparison",
    "sign_flip_pvalue",
    "bca_mean_ci",
    "holm_adjust",
    "kaplan_meier",
    "km_restricted_mean",
    "compare_restricted_means",
]

MIN_BOOT_PAIRS = 10  # below this many values no bootstrap interval is given (NaN)


def _clean(x, field: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{field}: expected a 1-D array of per-seed values, found shape {arr.shape}")
    return arr[~np.isnan(arr)]


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a value in (0, 1), found {confidence}")


@dataclass(frozen=True)
class Interval:
    """Mean of per-seed values with a two-sided Student-t confidence interval."""

    mean: float
    lo: float
    hi: float
    sd: float
    n: int
    confidence: float

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2.0

    def fmt(self, digits: int = 3, scale: float = 1.0) -> str:
        """``"0.512 [0.480, 0.544]"``; ``"n/a"`` without data, the mean alone with one value."""
        if self.n == 0:
            return "n/a"
        m = self.mean * scale
        if self.n < 2 or not math.isfinite(self.lo):
            return f"{m:.{digits}f}"
        return f"{m:.{digits}f} [{self.lo * scale:.{digits}f}, {self.hi * scale:.{digits}f}]"

    def as_dict(self) -> dict:
        return asdict(self)


def t_interval(x, confidence: float = 0.95) -> Interval:
    """Mean and ``confidence`` t-interval of ``x`` (NaNs dropped), matching ``scipy.stats.t.interval``."""
    _check_confidence(confidence)
    v = _clean(x, "x")
    n = int(v.size)
    nan = float("nan")
    if n == 0:
        return Interval(nan, nan, nan, nan, 0, confidence)
    mean = float(v.mean())
    if n < 2:
        return Interval(mean, nan, nan, nan, 1, confidence)
    sd = float(v.std(ddof=1))
    half = float(_st.t.ppf(0.5 + confidence / 2.0, df=n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, sd, n, confidence)


def _all_sign_sums(v: np.ndarray) -> np.ndarray:
    """``sum_i s_i v_i`` for every sign vector ``s`` in {+1, -1}^len(v) (2**len(v) values)."""
    if v.size == 0:
        return np.zeros(1)
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=v.size)))
    return signs @ v


def sign_flip_pvalue(d, *, exact_max_n: int = 22, n_resamples: int = 20_000, seed: int = 0) -> float:
    """Two-sided sign-flip (paired permutation) test of ``mean(d) == 0``.

    Under the null each paired difference is equally likely to carry either sign. The p-value is the
    fraction of the ``2**n`` sign assignments whose |sum| is at least the observed |sum| (the observed one
    included). Exact, by enumeration, for ``n <= exact_max_n`` (meet in the middle: the sums of the two
    halves' assignments are added as an outer sum, so 20 pairs is 2**10 x 2**10 values). The smallest
    attainable p is ``2 / 2**n`` for a non-zero mean: 0.0625 with 5 seeds, 0.0078 with 8. Above
    ``exact_max_n``, a seeded Monte Carlo over ``n_resamples`` assignments with the ``(k + 1) / (R + 1)``
    correction. Equals ``scipy.stats.permutation_test(..., permutation_type='samples')`` on the mean.
    """
    v = _clean(d, "d")
    n = v.size
    if n == 0:
        return float("nan")
    observed = abs(v.sum())
    # Relative tolerance so that assignments equal to the observed statistic up to rounding count.
    tol = 1e-12 * max(1.0, float(np.abs(v).sum()))
    if n <= exact_max_n:
        h = n // 2
        lo_sums, hi_sums = _all_sign_sums(v[:h]), _all_sign_sums(v[h:])
        count = 0
        for chunk in np.array_split(lo_sums, max(1, lo_sums.size // 1024)):
            count += int(np.sum(np.abs(chunk[:, None] + hi_sums[None, :]) >= observed - tol))
        return count / 2.0**n
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([1.0, -1.0]), size=(n_resamples, n))
    k = int(np.sum(np.abs(signs @ v) >= observed - tol))
    return float((k + 1) / (n_resamples + 1))


def bca_mean_ci(x, *, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0,
                min_n: int = MIN_BOOT_PAIRS) -> tuple[float, float]:
    """Bias-corrected and accelerated (BCa) bootstrap interval ``(lo, hi)`` of the mean of ``x``.

    NaN below ``min_n`` values: with few seeds every bootstrap interval is too narrow. Resamples are
    ``default_rng(seed).integers(0, n, (n_resamples, n))``, as ``scipy.stats.bootstrap(method="BCa")`` draws
    them, so both give the same interval for the same generator. Bias correction
    ``z0 = Phi^-1(share of resampled means below the mean, ties half)``; acceleration from the jackknife
    ``a = sum(u^3) / (6 sum(u^2)^1.5)`` with ``u_i = mean(jackknife) - jackknife_i``; the interval is the
    resampled means' quantiles at ``Phi(z0 + (z0 + z) / (1 - a (z0 + z)))`` for
    ``z = Phi^-1(alpha/2), Phi^-1(1 - alpha/2)`` (Efron & Tibshirani 1993, ch. 14).
    """
    _check_confidence(confidence)
    v = _clean(x, "x")
    n = v.size
    nan = float("nan")
    if n < max(2, min_n):
        return nan, nan
    theta = v.mean()
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, n, (n_resamples, n))].mean(axis=1)
    below = (np.sum(means < theta) + np.sum(means <= theta)) / (2.0 * n_resamples)
    z0 = _st.norm.ppf(below)
    jack = (v.sum() - v) / (n - 1)
    u = jack.mean() - jack
    den = 6.0 * np.sum(u**2) ** 1.5
    a = float(np.sum(u**3) / den) if den > 0 else 0.0
    alpha = (1.0 - confidence) / 2.0
    z = _st.norm.ppf([alpha, 1.0 - alpha])
    probs = _st.norm.cdf(z0 + (z0 + z) / (1.0 - a * (z0 + z)))
    if not np.all(np.isfinite(probs)):
        return nan, nan
    lo, hi = np.percentile(means, 100.0 * probs)
    return float(lo), float(hi)


@dataclass(frozen=True)
class PairedComparison:
    """``a`` minus ``b`` over the seeds both have. Positive ``mean_diff``: ``a`` is higher."""

    a: str
    b: str
    metric: str
    n: int  # number of complete pairs
    mean_a: float
    mean_b: float
    mean_diff: float
    ci_lo: float
    ci_hi: float
    sd_diff: float
    t_stat: float
    p_ttest: float
    cohens_dz: float
    p_sign_flip: float
    sign_flip_exact: bool  # True: all 2**n sign assignments enumerated
    bca_lo: float  # BCa bootstrap interval of the mean difference; NaN below MIN_BOOT_PAIRS pairs
    bca_hi: float
    wins: int  # pairs with a > b
    losses: int  # pairs with a < b
    confidence: float
    p_holm: float = float("nan")  # Holm-adjusted p_ttest, filled by the caller over the whole table
    p_holm_sign_flip: float = float("nan")  # Holm-adjusted p_sign_flip over the same family

    def as_dict(self) -> dict:
        return asdict(self)


def paired_comparison(
    a,
    b,
    *,
    name_a: str = "a",
    name_b: str = "b",
    metric: str = "",
    confidence: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
    exact_max_n: int = 22,
) -> PairedComparison:
    """Paired comparison of per-seed values ``a[i]`` vs ``b[i]`` (same seed at the same index).

    Pairs where either value is NaN are dropped. ``p_ttest`` equals ``scipy.stats.ttest_rel(a, b).pvalue``;
    ``cohens_dz`` is the standardised mean difference of paired data (mean(d) / sd(d), ddof=1);
    ``p_sign_flip`` is :func:`sign_flip_pvalue`; ``bca_lo/hi`` is :func:`bca_mean_ci` of ``d`` (NaN below
    :data:`MIN_BOOT_PAIRS` pairs).
    """
    xa = np.asarray(a, dtype=np.float64)
    xb = np.asarray(b, dtype=np.float64)
    if xa.shape != xb.shape or xa.ndim != 1:
        raise ValueError(
            f"paired_comparison({name_a!r}, {name_b!r}): expected two 1-D arrays of equal length "
            f"(one value per seed), found shapes {xa.shape} and {xb.shape}"
        )
    ok = ~(np.isnan(xa) | np.isnan(xb))
    xa, xb = xa[ok], xb[ok]
    d = xa - xb
    n = int(d.size)
    ci = t_interval(d, confidence)
    nan = float("nan")
    if n >= 2:
        sd = float(d.std(ddof=1))
        mean = float(d.mean())
        if sd > 0:
            t_stat = mean / (sd / math.sqrt(n))
            p = float(2.0 * _st.t.sf(abs(t_stat), df=n - 1))
            dz = mean / sd
        elif mean != 0:  # constant non-zero difference: infinitely significant, as scipy reports
            t_stat, p, dz = math.copysign(math.inf, mean), 0.0, math.copysign(math.inf, mean)
        else:
            t_stat, p, dz = nan, nan, nan
    else:
        sd, t_stat, p, dz = nan, nan, nan, nan
    bca_lo, bca_hi = bca_mean_ci(d, confidence=confidence, n_resamples=n_boot, seed=seed)
    return PairedComparison(
        a=name_a,
        b=name_b,
        metric=metric,
        n=n,
        mean_a=float(xa.mean()) if n else nan,
        mean_b=float(xb.mean()) if n else nan,
        mean_diff=ci.mean,
        ci_lo=ci.lo,
        ci_hi=ci.hi,
        sd_diff=sd,
        t_stat=t_stat,
        p_ttest=p,
        cohens_dz=dz,
        p_sign_flip=sign_flip_pvalue(d, seed=seed, exact_max_n=exact_max_n) if n else nan,
        sign_flip_exact=n <= exact_max_n,
        bca_lo=bca_lo,
        bca_hi=bca_hi,
        wins=int(np.sum(d > 0)),
        losses=int(np.sum(d < 0)),
        confidence=confidence,
    )


def holm_adjust(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1; NaNs stay NaN and do not count
    towards the family size). The caller passes the whole family: every comparison and metric of a table."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = idx.size
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


# -- time to a threshold: Kaplan-Meier and the restricted mean ----------------------------------------------


def _check_times(times, events) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(times, dtype=np.float64)
    e = np.asarray(events, dtype=bool)
    if t.ndim != 1 or t.shape != e.shape:
        raise ValueError(f"times/events: expected two 1-D arrays of equal length, found shapes {t.shape} and {e.shape}")
    ok = ~np.isnan(t)
    t, e = t[ok], e[ok]
    if np.any(t < 0):
        raise ValueError(f"times: expected non-negative times, found {t[t < 0].tolist()}")
    return t, e


def kaplan_meier(times, events) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Kaplan-Meier estimate: ``(event_times, at_risk, n_events, survival)``, survival just after each
    distinct event time. ``events[i]`` False: run ``i`` was censored at ``times[i]`` (never reached the
    threshold by then); at a tie, events come before censorings (a run censored at t was at risk at t)."""
    t, e = _check_times(times, events)
    ut = np.unique(t[e])
    at_risk = np.array([np.sum(t >= u) for u in ut], dtype=np.float64)
    n_ev = np.array([np.sum((t == u) & e) for u in ut], dtype=np.float64)
    surv = np.cumprod(1.0 - n_ev / at_risk) if ut.size else np.empty(0)
    return ut, at_risk, n_ev, surv


@dataclass(frozen=True)
class RestrictedMean:
    """Restricted mean time to the event up to ``tau``: the area under the Kaplan-Meier curve on [0, tau]."""

    rmst: float
    se: float  # Greenwood-type standard error
    lo: float
    hi: float
    tau: float
    n: int
    n_events: int
    confidence: float

    def fmt(self, digits: int = 1) -> str:
        if self.n == 0:
            return "n/a"
        if not math.isfinite(self.lo):
            return f"{self.rmst:.{digits}f}"
        return f"{self.rmst:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def km_restricted_mean(times, events, tau: float, confidence: float = 0.95) -> RestrictedMean:
    """Restricted mean time ``int_0^tau S(t) dt`` from the Kaplan-Meier curve, with a normal interval.

    Runs that never reached the threshold are censored at their last evaluation (``events`` False) and
    still count: they are at risk until then. With no censoring before ``tau`` this equals
    ``mean(min(times, tau))``. Variance (Klein & Moeschberger, sec. 4.5):
    ``sum_j A_j**2 d_j / (Y_j (Y_j - d_j))`` over event times ``t_j <= tau``, ``A_j = int_{t_j}^tau S(t) dt``,
    ``Y_j`` at risk and ``d_j`` events at ``t_j`` (terms with ``Y_j == d_j`` are 0: ``A_j`` is 0 there).
    """
    _check_confidence(confidence)
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau: expected a positive horizon, found {tau!r}")
    t, e = _check_times(times, events)
    n = int(t.size)
    nan = float("nan")
    if n == 0:
        return RestrictedMean(nan, nan, nan, nan, float(tau), 0, 0, confidence)
    ut, y, d, surv = kaplan_meier(t, e)
    keep = ut <= tau
    ut, y, d, surv = ut[keep], y[keep], d[keep], surv[keep]
    # S is 1 on [0, t_1), surv[j] on [t_j, t_{j+1}), the last value up to tau.
    knots = np.concatenate([[0.0], ut, [float(tau)]])
    levels = np.concatenate([[1.0], surv])
    pieces = levels * np.diff(knots)
    rmst = float(pieces.sum())
    # A_j = area from t_j to tau = the pieces after knot j (pieces[j + 1:]).
    tail = np.cumsum(pieces[::-1])[::-1]  # tail[k] = sum(pieces[k:])
    var = 0.0
    for j in range(ut.size):
        if y[j] > d[j]:
            var += tail[j + 1] ** 2 * d[j] / (y[j] * (y[j] - d[j]))
    se = math.sqrt(var)
    zq = float(_st.norm.ppf(0.5 + confidence / 2.0))
    return RestrictedMean(rmst, se, rmst - zq * se, rmst + zq * se, float(tau), n, int(e[t <= tau].sum()), confidence)


@dataclass(frozen=True)
class RestrictedMeanComparison:
    """``a`` minus ``b`` in restricted mean time (independent Kaplan-Meier curves, normal interval, z-test).
    Negative ``diff``: ``a`` reaches the threshold sooner."""

    a: str
    b: str
    metric: str
    tau: float
    rmst_a: float
    rmst_b: float
    diff: float
    se: float
    ci_lo: float
    ci_hi: float
    p: float
    n_a: int
    n_b: int
    confidence: float
    p_holm: float = float("nan")  # filled by the caller over the whole table


def compare_restricted_means(ra: RestrictedMean, rb: RestrictedMean, *, name_a: str = "a", name_b: str = "b",
                             metric: str = "steps_to_threshold") -> RestrictedMeanComparison:
    """Difference of two restricted means at the same horizon, ``se = sqrt(se_a**2 + se_b**2)``."""
    if ra.tau != rb.tau:
        raise ValueError(f"compare_restricted_means: expected the same tau, found {ra.tau} and {rb.tau}")
    nan = float("nan")
    diff = ra.rmst - rb.rmst
    se = math.sqrt(ra.se**2 + rb.se**2) if ra.n and rb.n else nan
    zq = float(_st.norm.ppf(0.5 + ra.confidence / 2.0))
    if not math.isfinite(se):
        p, lo, hi = nan, nan, nan
    elif se > 0:
        p = float(2.0 * _st.norm.sf(abs(diff) / se))
        lo, hi = diff - zq * se, diff + zq * se
    else:  # both curves without variance (e.g. no seed of either rule reached the threshold)
        p = nan if diff == 0 else 0.0
        lo = hi = diff
    return RestrictedMeanComparison(
        a=name_a, b=name_b, metric=metric, tau=ra.tau, rmst_a=ra.rmst, rmst_b=rb.rmst, diff=diff, se=se,
        ci_lo=lo, ci_hi=hi, p=p, n_a=ra.n, n_b=rb.n, confidence=ra.confidence,
    )
