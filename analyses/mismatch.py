"""Train/rollout mismatch by position: |pi_old - mu| when the trainer logged its recomputed old policy.

The gap between the trainer's pi_old and the sampler's mu (different kernels, precision, batch shapes) is
there before any optimisation step; a rule anchored to mu counts it against the trust region. Uses the
statistics of :mod:`analyses.position` (same bins, quantile definitions and tail estimates).
"""

from __future__ import annotations

from typing import Any, Sequence

import polars as pl

from analyses.position import DEFAULT_THRESHOLDS, aggregate_positions, length_parts
from analyses.tokens import LOGRATIO_CLAMP, filter_tokens, load_tokens, require_columns

MISMATCH_METRICS = ("mismatch_tv", "mismatch_abs_logratio")


def mismatch_exprs() -> dict[str, pl.Expr]:
    """mismatch_tv = |pi_old - mu|, mismatch_abs_logratio = |clamp(log pi_old - log mu, -20, 20)|."""
    lo, lr = pl.col("logp_old").cast(pl.Float64), pl.col("logp_rollout").cast(pl.Float64)
    k1 = (lo - lr).clip(-LOGRATIO_CLAMP, LOGRATIO_CLAMP)
    return {
        "mismatch_tv": (lo.exp() - lr.exp()).abs(),
        "mismatch_abs_logratio": k1.abs(),
    }


def mismatch_by_position(
    source: Any,
    *,
    bin_width: int = 64,
    step_range=None,
    adv_sign: str | None = None,
    relative: bool = False,
    n_rel_bins: int = 20,
    metrics: Sequence[str] = MISMATCH_METRICS,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    progress: bool = False,
) -> pl.DataFrame:
    """Per-position-bin statistics of |pi_old - mu| and |log pi_old - log mu| (long table, as
    :func:`analyses.position.position_stats`). Raises :class:`analyses.tokens.MissingColumnError` when the
    run has no ``logp_old`` column; tokens with a null ``logp_old`` are skipped."""
    lf = load_tokens(source)
    require_columns(lf, ["logp_old"], "mismatch_by_position (train/rollout mismatch |pi_old - mu|)")
    require_columns(lf, ["step", "pos", "logp_rollout", "advantage"], "mismatch_by_position")
    parts = None
    if relative:  # response lengths: one step at a time
        parts = length_parts(source, step_range=step_range, adv_sign=adv_sign,
                             extra_filter=pl.col("logp_old").is_not_null())
    lf = filter_tokens(lf, step_range=step_range, adv_sign=adv_sign).filter(pl.col("logp_old").is_not_null())
    exprs = mismatch_exprs()
    unknown = [m for m in metrics if m not in exprs]
    if unknown:
        raise ValueError(f"metrics: expected names from {sorted(exprs)}, found {unknown}")
    return aggregate_positions(lf, {m: exprs[m] for m in metrics}, bin_width=bin_width, relative=relative,
                               n_rel_bins=n_rel_bins, thresholds=thresholds, progress=progress, parts=parts)
