"""Train/rollout mismatch: |pi_old - mu| by position (``mismatch_by_position``, when the trainer logged its
recomputed old policy) and the mismatch metric family of the large trainers - k1/k2/k3 KL, chi-square, ESS,
IS-weight tails, log-perplexity difference, toward-mu and masked fractions - by step or position, with an update
filter (``mismatch_metrics``).

The gap between the trainer's pi_old and the sampler's mu (different kernels, precision, batch shapes) is
there before any optimisation step; a rule anchored to mu counts it against the trust region. Uses the
statistics of :mod:`cppo_diag.analyses.position` (same bins, quantile definitions and tail estimates).
"""

from __future__ import annotations

from typing import Any, Sequence

import polars as pl

from cppo_diag.analyses.position import DEFAULT_THRESHOLDS, aggregate_positions, length_parts
from cppo_diag.analyses.tokens import LOGRATIO_CLAMP, direction_expr, filter_tokens, load_tokens, require_columns
from cppo_diag.analyses.updates import filter_updates
from cppo_diag.masks import logratio

MISMATCH_METRICS = ("mismatch_tv", "mismatch_abs_logratio")


def mismatch_exprs() -> dict[str, pl.Expr]:
    """mismatch_tv = |pi_old - mu|, mismatch_abs_logratio = |clamp(log pi_old - log mu, -20, 20)|."""
    lo, lr = pl.col("logp_old").cast(pl.Float64), pl.col("logp_rollout").cast(pl.Float64)
    return {
        "mismatch_tv": logratio.tv(lo, lr),
        "mismatch_abs_logratio": logratio.log_ratio(lo, lr).abs(),
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
    :func:`cppo_diag.analyses.position.position_stats`). Raises :class:`cppo_diag.analyses.tokens.MissingColumnError` when the
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


# -- the mismatch metric family (what verl, TRL, slime, NeMo-RL and AReaL log as scalars) -----------------------
#
# One token t with log-ratio lr_t = clamp(log x_t - log mu_t, -20, 20) (x = pi by default, pi_old with
# pair="old"), rho_t = exp(lr_t), samples drawn from mu. Definitions and the trainers' names: docs/analyses.md,
# "Mismatch metric family". Every reduction below is a plain mean over the group's tokens (or sequences).

PAIRS = ("pi", "old")
IS_HIGH = (1.2, 2.0, 5.0)  # fraction of IS weights rho > x
IS_LOW = (0.8, 0.5, 0.2)  # fraction of IS weights rho < x
TOKEN_FAMILY = ("kl_k1", "kl_k2", "kl_k3", "chi2_token", "ess_token", "toward_mu_frac", "away_frac")
SEQUENCE_FAMILY = ("chi2_seq", "ess_seq", "log_ppl_diff")
MASK_FAMILY = ("masked_frac", "masked_frac_pos_adv", "masked_frac_neg_adv")


def is_gt_name(x: float) -> str:
    return f"is_frac_gt_{x:g}"


def is_lt_name(x: float) -> str:
    return f"is_frac_lt_{x:g}"


def _family_tokens(source: Any, *, pair: str, updates: str | None, step_range, adv_sign) -> pl.LazyFrame:
    if pair not in PAIRS:
        raise ValueError(f"pair: expected one of {list(PAIRS)} (pi / mu or pi_old / mu), found {pair!r}")
    lf = load_tokens(source)
    what = "mismatch_metrics"
    require_columns(lf, ["step", "pos", "seq_id", "logp", "logp_rollout", "advantage"], what)
    x = "logp"
    if pair == "old":
        require_columns(lf, ["logp_old"], f"{what}(pair='old')")
        x = "logp_old"
    lf = filter_updates(filter_tokens(lf, step_range=step_range, adv_sign=adv_sign), updates or "all")
    lf = lf.filter(pl.col(x).is_not_null() & pl.col("logp_rollout").is_not_null())
    lr = logratio.log_ratio(pl.col(x).cast(pl.Float64), pl.col("logp_rollout").cast(pl.Float64))
    cols = [lr.alias("_lr"), pl.col("advantage").cast(pl.Float64).alias("_adv"),
            direction_expr(x, "logp_rollout").alias("_dir")]
    has_keep = "keep_applied" in lf.collect_schema().names()
    cols.append((~pl.col("keep_applied")).alias("_masked") if has_keep else pl.lit(None, pl.Boolean).alias("_masked"))
    return lf.with_columns(cols)


def _token_aggs(is_high: Sequence[float], is_low: Sequence[float]) -> list[pl.Expr]:
    lr = pl.col("_lr")
    rho = lr.exp()
    adv_dir = pl.col("_dir")  # sign of A (rho - 1): > 0 moves away from mu, < 0 back toward it (rule library)
    masked = pl.col("_masked").cast(pl.Float64)
    return [
        pl.len().alias("n_tokens"),
        logratio.kl_k1(lr).mean().alias("kl_k1"),
        logratio.kl_k2(lr).mean().alias("kl_k2"),
        logratio.kl_k3(lr).mean().alias("kl_k3"),
        ((rho * rho).mean() - 1.0).alias("chi2_token"),
        (rho.sum() ** 2 / (pl.len() * (rho * rho).sum())).alias("ess_token"),
        *[(rho > x).mean().alias(is_gt_name(x)) for x in is_high],
        *[(rho < x).mean().alias(is_lt_name(x)) for x in is_low],
        (adv_dir < 0).mean().alias("toward_mu_frac"),
        (adv_dir > 0).mean().alias("away_frac"),
        masked.mean().alias("masked_frac"),
        masked.filter(pl.col("_adv") > 0).mean().alias("masked_frac_pos_adv"),
        masked.filter(pl.col("_adv") < 0).mean().alias("masked_frac_neg_adv"),
    ]


def mismatch_metrics(
    source: Any,
    *,
    by: str = "step",
    updates: str | None = "all",
    pair: str = "pi",
    bin_width: int = 64,
    step_range=None,
    adv_sign: str | None = None,
    is_high: Sequence[float] = IS_HIGH,
    is_low: Sequence[float] = IS_LOW,
) -> pl.DataFrame:
    """The mismatch metric family per training step (``by="step"``) or per absolute position bin
    (``by="position"``, ``bin = pos // bin_width``), over the tokens of the chosen updates.

    Columns (formulas in docs/analyses.md; lr = clamp(log x - log mu, -20, 20), rho = exp(lr), x = pi or
    pi_old): ``n_tokens``, ``kl_k1`` = mean(-lr), ``kl_k2`` = mean(lr^2 / 2), ``kl_k3`` = mean(rho - 1 - lr)
    (Schulman's estimators of KL(mu || x)), ``chi2_token`` = mean(rho^2) - 1, ``ess_token`` =
    (sum rho)^2 / (n sum rho^2), ``is_frac_gt_<x>`` / ``is_frac_lt_<x>`` = P(rho > x) / P(rho < x),
    ``toward_mu_frac`` = P(A (rho - 1) < 0), ``away_frac`` = P(A (rho - 1) > 0) (SPEC's away test, evaluated by
    the rule library on the float32 columns as the rules evaluate it), ``masked_frac`` and
    ``masked_frac_pos_adv`` / ``masked_frac_neg_adv`` (from ``keep_applied``; null when not logged). By step
    also the sequence-level ones, a sequence being one (step, update, rank, seq_id) with L = sum_t lr_t:
    ``n_seqs``, ``chi2_seq`` = mean(exp(2 clamp(L, -20, 20))) - 1, ``ess_seq`` over w = exp(clamp(L, -20, 20)),
    ``log_ppl_diff`` = mean over sequences of mean_t(log mu - log x) (> 0: the trainer finds the sampled text
    less likely than the sampler did).
    ``updates``: "all", "first" (update 0: the engine mismatch plus any policy lag of stale rollouts),
    "after_first" or "lagged" (``cppo_diag.analyses.updates``). ``pair="old"`` uses the logged ``logp_old`` instead of ``logp`` (raises
    :class:`MissingColumnError` when the run has none).
    """
    if by not in ("step", "position"):
        raise ValueError(f"by: expected 'step' or 'position', found {by!r}")
    if by == "position":
        aggs = _token_aggs(is_high, is_low)
        lf = _family_tokens(source, pair=pair, updates=updates, step_range=step_range, adv_sign=adv_sign)
        if bin_width < 1:
            raise ValueError(f"bin_width: expected an integer >= 1, found {bin_width}")
        out = (lf.with_columns((pl.col("pos") // bin_width).cast(pl.Int64).alias("bin"))
               .group_by("bin").agg(aggs).sort("bin")
               .with_columns((pl.col("bin") * bin_width).alias("bin_start"),
                             ((pl.col("bin") + 1) * bin_width).alias("bin_end")))
        first = ("bin", "bin_start", "bin_end")
        return out.collect(engine="streaming").select(*first, pl.exclude(*first))
    from cppo_diag.analyses.step_cache import cached_step_rows

    key, by_step = step_family(pair=pair, updates=updates, adv_sign=adv_sign, is_high=is_high, is_low=is_low)
    return cached_step_rows(source, key, by_step, step_range=step_range, desc="mismatch family by step")


def step_family(*, pair: str = "pi", updates: str | None = "all", adv_sign: str | None = None,
                is_high: Sequence[float] = IS_HIGH, is_low: Sequence[float] = IS_LOW):
    """(cache key, function tokens -> rows) of :func:`mismatch_metrics` by step: one step's row depends on that
    step's tokens only, so rows are cached per block of steps (``analyses.step_cache``) and the recorder writes
    the Doctor page's defaults (pi / mu; the updates after the first, and all updates) as steps complete."""
    from cppo_diag.analyses.step_cache import block_key

    aggs = _token_aggs(is_high, is_low)

    def by_step(tokens: pl.LazyFrame) -> pl.DataFrame:
        return _step_rows(_family_tokens(tokens, pair=pair, updates=updates, step_range=None, adv_sign=adv_sign), aggs)

    key = block_key("mismatch-steps-v1", pair=pair, updates=updates or "all", adv_sign=adv_sign or "all",
                    is_high=[float(x) for x in is_high], is_low=[float(x) for x in is_low])
    return key, by_step


def _step_rows(lf: pl.LazyFrame, aggs: list[pl.Expr]) -> pl.DataFrame:
    tokens = lf.group_by("step").agg(aggs)
    w = pl.col("_L").clip(-LOGRATIO_CLAMP, LOGRATIO_CLAMP).exp()
    seqs = (lf.group_by("step", "update", "rank", "seq_id")
            .agg(pl.col("_lr").sum().alias("_L"), (-pl.col("_lr")).mean().alias("_dlppl"))
            .group_by("step")
            .agg(pl.len().alias("n_seqs"),
                 ((2.0 * pl.col("_L").clip(-LOGRATIO_CLAMP, LOGRATIO_CLAMP)).exp().mean() - 1.0).alias("chi2_seq"),
                 (w.sum() ** 2 / (pl.len() * (w * w).sum())).alias("ess_seq"),
                 pl.col("_dlppl").mean().alias("log_ppl_diff")))
    return tokens.join(seqs, on="step", how="left").sort("step").collect(engine="streaming")
