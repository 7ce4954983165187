"""Statistics for a multi-seed study: t-intervals over seeds and paired rule-vs-rule comparisons.

Everything here works on small 1-D arrays (one value per seed) and returns plain dataclasses, so the
analysis, the CLI and the tests share one implementation. Conventions:

* NaN values are dropped (a seed whose run failed or never evaluated); ``n`` always reports how many
  values were actually used.
* Confidence intervals are two-sided, Student-t based (``mean +- t_{1-a/2, n-1} * sd / sqrt(n)``) with the
  sample standard deviation (``ddof=1``). With fewer than two values the interval is undefined (NaN).
* The paired comparison pairs the two rules on the *same seeds* (same initial model, same prompts),
  so seed-to-seed variance cancels in the differences ``d_s = a_s - b_s``. It reports the mean difference,
  its t-interval, the paired t-test p-value (two-sided), Cohen's ``d_z = mean(d) / sd(d)``, an exact
  sign-flip permutation p-value (Monte Carlo above ``exact_max_n`` pairs) that does not assume normality,
  and a percentile bootstrap interval of the mean difference.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _st

__all__ = [
    "Interval",
    "PairedComparison",
    "t_interval",
    "paired_comparison",
    "sign_flip_pvalue",
    "bootstrap_mean_ci",
    "holm_adjust",
]


def _clean(x, field: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{field}: expected a 1-D array of per-seed values, found shape {arr.shape}")
    return arr[~np.isnan(arr)]


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
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a value in (0, 1), found {confidence}")
    v = _clean(x, "x")
    n = int(v.size)
    if n == 0:
        nan = float("nan")
        return Interval(nan, nan, nan, nan, 0, confidence)
    mean = float(v.mean())
    if n < 2:
        nan = float("nan")
        return Interval(mean, nan, nan, nan, 1, confidence)
    sd = float(v.std(ddof=1))
    half = float(_st.t.ppf(0.5 + confidence / 2.0, df=n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, sd, n, confidence)


def sign_flip_pvalue(d, *, exact_max_n: int = 16, n_resamples: int = 20_000, seed: int = 0) -> float:
    """Two-sided sign-flip (paired permutation) test of ``mean(d) == 0``.

    Under the null each paired difference is equally likely to carry either sign. The p-value is the
    fraction of sign assignments whose |mean| is at least the observed |mean|. With ``n <= exact_max_n``
    all ``2**n`` assignments are enumerated (the smallest attainable p is ``2 / 2**n`` for a non-zero
    mean: with 5 seeds, 0.0625, so five seeds can never reach p < 0.05 on this test). Above that, a
    seeded Monte Carlo over ``n_resamples`` assignments with the ``(k + 1) / (R + 1)`` correction.
    Matches ``scipy.stats.permutation_test(..., permutation_type='samples')`` on the mean difference.
    """
    v = _clean(d, "d")
    n = v.size
    if n == 0:
        return float("nan")
    observed = abs(v.mean())
    # Relative tolerance so that assignments equal to the observed statistic up to rounding count.
    tol = 1e-12 * max(1.0, float(np.abs(v).max()))
    if n <= exact_max_n:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))  # (2**n, n)
        null = np.abs(signs @ v / n)
        return float(np.mean(null >= observed - tol))
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([1.0, -1.0]), size=(n_resamples, n))
    null = np.abs(signs @ v / n)
    k = int(np.sum(null >= observed - tol))
    return float((k + 1) / (n_resamples + 1))


def bootstrap_mean_ci(x, *, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0):
    """Percentile bootstrap interval ``(lo, hi)`` of the mean of ``x`` (NaNs dropped; seeded)."""
    v = _clean(x, "x")
    n = v.size
    if n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    means = v[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
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
    boot_lo: float
    boot_hi: float
    wins: int  # pairs with a > b
    losses: int  # pairs with a < b
    confidence: float
    p_holm: float = float("nan")  # filled by the caller over a family of comparisons

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
) -> PairedComparison:
    """Paired comparison of per-seed values ``a[i]`` vs ``b[i]`` (same seed at the same index).

    Pairs where either value is NaN are dropped. ``p_ttest`` equals ``scipy.stats.ttest_rel(a, b).pvalue``;
    ``cohens_dz`` is the standardised mean difference of paired data (mean(d) / sd(d), ddof=1);
    ``p_sign_flip`` is :func:`sign_flip_pvalue`; ``boot_lo/hi`` is :func:`bootstrap_mean_ci` of ``d``.
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
    boot_lo, boot_hi = bootstrap_mean_ci(d, confidence=confidence, n_resamples=n_boot, seed=seed)
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
        p_sign_flip=sign_flip_pvalue(d, seed=seed) if n else nan,
        boot_lo=boot_lo,
        boot_hi=boot_hi,
        wins=int(np.sum(d > 0)),
        losses=int(np.sum(d < 0)),
        confidence=confidence,
    )


def holm_adjust(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1; NaNs stay NaN).

    Used over the family "reference rule vs every other rule", so that five comparisons on five seeds do
    not hand out a spurious "significant" by multiplicity alone.
    """
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
