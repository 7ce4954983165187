"""Divergence by token position and its tails (reproduces CPPO paper Fig. 2).

Statistic definitions (tested against numpy in ``tests/test_analyses_position.py``), per (metric, bin),
over the n tokens D_1..D_n that fall in the bin:

* ``count`` = n; ``mean`` = arithmetic mean.
* ``p50``, ``p90``, ``p99``: quantiles with **linear interpolation between order statistics** (numpy's
  default ``method="linear"``: the q-quantile of sorted x_0..x_{n-1} is x_f + (h - f)(x_{f+1} - x_f) with
  h = q (n - 1), f = floor(h)).
* ``top10_mean``: mean of the tokens with D >= p90 (the "top decile" of the bin; with ties at p90 every
  tied token is included).
* ``surv_<x>`` = P(D > x) = fraction of the bin's tokens strictly above the threshold x.
* ``hill_alpha``: Hill tail-index estimate with the threshold at the bin's p90:
  u = p90, the k tokens with D > u, xi = (1/k) sum log(D_i / u), ``hill_alpha`` = 1 / xi (heavier tail ->
  smaller alpha). ``hill_k`` = k. Null when k < ``hill_min_k``, u <= 0 or xi == 0.
* ``threshold_mean`` (only when ``delta`` is given): mean over the bin's tokens of CPPO's per-token
  threshold on D, delta / w_t, w_t = 1 - (1 - w_min)(t - 1) / max(T - 1, 1) with t = pos + 1 and T the
  response's valid length (SPEC CPPO step 1, "sequence" mode): the paper's Fig. 2 overlay.

Binning: absolute position ``bin = pos // bin_width`` (``bin_start = bin * bin_width`` inclusive,
``bin_end`` exclusive, in 0-based positions), or relative position ``t / T`` in ``n_rel_bins`` equal bins
of (0, 1] when ``relative=True`` (``bin_start``/``bin_end`` are then fractions).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import polars as pl

from analyses.tokens import divergence_exprs, filter_tokens, load_tokens, require_columns
from cppo_diag.storage.schema import SEQUENCE_KEY

METRICS = ("tv", "abs_logratio", "k3")
METRIC_LABELS = {
    "tv": "|π − μ| (probability)",
    "abs_logratio": "|log π − log μ| (nats)",
    "k3": "k3 = ρ − 1 − log ρ (nats)",
    "k1": "log π − log μ (nats)",
    "mismatch_tv": "|π_old − μ| (probability)",
    "mismatch_abs_logratio": "|log π_old − log μ| (nats)",
}
DEFAULT_THRESHOLDS = (0.05, 0.1, 0.2, 0.5)
STAT_COLUMNS = ("count", "mean", "p50", "p90", "p99", "top10_mean", "hill_alpha", "hill_k")


def surv_name(x: float) -> str:
    return f"surv_{x:g}"


def threshold_schedule(positions, *, delta: float, w_min: float, length: int) -> np.ndarray:
    """delta / w_t for 0-based ``positions`` of a response of valid length ``length`` (SPEC CPPO step 1)."""
    t = np.asarray(positions, dtype=np.float64) + 1.0
    w = 1.0 - (1.0 - w_min) * (t - 1.0) / max(length - 1, 1)
    return delta / w


def _bin_exprs(relative: bool, bin_width: int, n_rel_bins: int) -> tuple[pl.Expr, pl.Expr, pl.Expr]:
    if not relative:
        if bin_width < 1:
            raise ValueError(f"bin_width: expected an integer >= 1, found {bin_width}")
        b = (pl.col("pos") // bin_width).cast(pl.Int64)
        return b, (pl.col("bin") * bin_width), ((pl.col("bin") + 1) * bin_width)
    if n_rel_bins < 1:
        raise ValueError(f"n_rel_bins: expected an integer >= 1, found {n_rel_bins}")
    rel = (pl.col("pos") + 1) / pl.col("_T")  # t / T in (0, 1]
    b = (rel * n_rel_bins).ceil().cast(pl.Int64).clip(1, n_rel_bins) - 1
    return b, pl.col("bin") / n_rel_bins, (pl.col("bin") + 1) / n_rel_bins


def _aggs(name: str, d: pl.Expr, thresholds: Sequence[float], hill_min_k: int) -> list[pl.Expr]:
    p90 = d.quantile(0.9, interpolation="linear")
    tail = d.filter(d > p90)
    hill_k = tail.len()
    xi = tail.log().mean() - p90.log()
    aggs = [
        d.len().alias(f"{name}|count"),
        d.mean().alias(f"{name}|mean"),
        d.quantile(0.5, interpolation="linear").alias(f"{name}|p50"),
        p90.alias(f"{name}|p90"),
        d.quantile(0.99, interpolation="linear").alias(f"{name}|p99"),
        d.filter(d >= p90).mean().alias(f"{name}|top10_mean"),
        pl.when((hill_k >= hill_min_k) & (p90 > 0) & (xi > 0)).then(1.0 / xi).otherwise(None).alias(f"{name}|hill_alpha"),
        hill_k.alias(f"{name}|hill_k"),
    ]
    aggs += [(d > x).mean().alias(f"{name}|{surv_name(x)}") for x in thresholds]
    return aggs


def position_stats_lazy(
    lf: pl.LazyFrame,
    *,
    metric_exprs: dict[str, pl.Expr],
    bin_width: int = 64,
    relative: bool = False,
    n_rel_bins: int = 20,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    delta: float | None = None,
    w_min: float = 0.8,
    hill_min_k: int = 5,
) -> pl.LazyFrame:
    """The wide lazy aggregation behind :func:`position_stats` (one row per bin, ``metric|stat`` columns)."""
    need_len = relative or delta is not None
    if need_len:
        lf = lf.with_columns(_T=(pl.col("pos").max().over(list(SEQUENCE_KEY)) + 1).cast(pl.Float64))
    b, _, _ = _bin_exprs(relative, bin_width, n_rel_bins)
    cols = [b.alias("bin"), *(e.cast(pl.Float64).alias(n) for n, e in metric_exprs.items())]
    if delta is not None:
        t = pl.col("pos").cast(pl.Float64) + 1.0
        w = 1.0 - (1.0 - w_min) * (t - 1.0) / (pl.col("_T") - 1.0).clip(lower_bound=1.0)
        cols.append((delta / w).alias("_thr"))
    lf = lf.select(cols)
    aggs = []
    for name in metric_exprs:
        aggs += _aggs(name, pl.col(name), thresholds, hill_min_k)
    if delta is not None:
        aggs.append(pl.col("_thr").mean().alias("_thr"))
    return lf.group_by("bin").agg(aggs).sort("bin")


def _to_long(
    wide: pl.DataFrame, metrics: Sequence[str], thresholds: Sequence[float], relative: bool, bin_width: int,
    n_rel_bins: int, with_thr: bool,
) -> pl.DataFrame:
    _, start, end = _bin_exprs(relative, bin_width, n_rel_bins)
    stats = [*STAT_COLUMNS, *(surv_name(x) for x in thresholds)]
    frames = []
    for m in metrics:
        sel = [pl.lit(m).alias("metric"), pl.col("bin"), start.cast(pl.Float64).alias("bin_start"),
               end.cast(pl.Float64).alias("bin_end")]
        sel += [pl.col(f"{m}|{s}").alias(s) for s in stats]
        if with_thr:
            sel.append(pl.col("_thr").alias("threshold_mean"))
        frames.append(wide.select(sel))
    out = pl.concat(frames, how="vertical_relaxed")
    casts = {"count": pl.Int64, "hill_k": pl.Int64}
    floats = [c for c in out.columns if c not in ("metric", "bin", *casts)]
    return out.with_columns(
        *(pl.col(c).cast(t) for c, t in casts.items()), *(pl.col(c).cast(pl.Float64) for c in floats)
    )


def position_stats(
    source: Any,
    *,
    metrics: Sequence[str] = METRICS,
    bin_width: int = 64,
    relative: bool = False,
    n_rel_bins: int = 20,
    step_range: tuple[int | None, int | None] | None = None,
    adv_sign: str | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    delta: float | None = None,
    w_min: float = 0.8,
    hill_min_k: int = 5,
    engine: str = "streaming",
) -> pl.DataFrame:
    """Per-position-bin statistics of per-token divergences (definitions in the module docstring).

    ``metrics`` from {"tv", "abs_logratio", "k3", "k1"} (SPEC "Per-token divergence"); ``step_range`` an
    inclusive (lo, hi) with None for open ends; ``adv_sign`` None/"all", "pos", "neg" or "zero".
    Returns a long table, one row per (metric, bin), sorted by metric then bin; empty (with the same
    columns) when no token passes the filters.
    """
    exprs = divergence_exprs()
    unknown = [m for m in metrics if m not in exprs]
    if unknown:
        raise ValueError(f"metrics: expected names from {sorted(exprs)}, found {unknown}")
    lf = load_tokens(source)
    require_columns(lf, ["step", "pos", "logp", "logp_rollout", "advantage"], "position_stats")
    lf = filter_tokens(lf, step_range=step_range, adv_sign=adv_sign)
    return aggregate_positions(
        lf, {m: exprs[m] for m in metrics}, bin_width=bin_width, relative=relative, n_rel_bins=n_rel_bins,
        thresholds=thresholds, delta=delta, w_min=w_min, hill_min_k=hill_min_k, engine=engine,
    )


def aggregate_positions(
    lf: pl.LazyFrame, metric_exprs: dict[str, pl.Expr], *, bin_width: int = 64, relative: bool = False,
    n_rel_bins: int = 20, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, delta: float | None = None,
    w_min: float = 0.8, hill_min_k: int = 5, engine: str = "streaming",
) -> pl.DataFrame:
    """Collect :func:`position_stats_lazy` and reshape it to the long table (shared with mismatch)."""
    wide = position_stats_lazy(
        lf, metric_exprs=metric_exprs, bin_width=bin_width, relative=relative, n_rel_bins=n_rel_bins,
        thresholds=thresholds, delta=delta, w_min=w_min, hill_min_k=hill_min_k,
    ).collect(engine=engine)
    return _to_long(wide, list(metric_exprs), thresholds, relative, bin_width, n_rel_bins, delta is not None)
