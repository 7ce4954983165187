"""The doctor's per-step series, one row per training step, cached beside the run and written by the recorder.

``cppo-diag doctor`` (``cppo_diag.analyses.doctor``) tests per-step series: token counts, the top-decile mean of
|log pi - log mu| (the runaway test), the divergence before a batch's updates (mismatch drift), the entropy and
the applied mask's fraction. Every value of a step depends on that step's tokens only, so:

* :func:`step_rows` computes the rows of any token frame in one pass (a polars ``group_by("step")``): exact
  order statistics (numpy's linear-interpolation P90, as ``cppo_diag.analyses.position``), means of float64
  values;
* :func:`doctor_rows` gives a run directory's rows from blocks of steps cached beside it
  (``cppo_diag.analyses.step_cache``: a changed shard makes its block stale, a growing run computes only its
  new steps);
* the recorder's background writer saves each completed step's row as its block
  (``cppo_diag.analyses.step_cache.StepTables``), so the first doctor view of a recorded run reads no token
  for these series.

Both variants of the subsets the doctor chooses between are kept per step (updates after the first and all
updates; ``pi_old`` and ``pi`` against ``mu``), and :func:`series` picks them for the whole run as
``doctor.step_series`` always did.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from cppo_diag.masks.logratio import kl_k3, log_ratio

VERSION = 1  # bump when a row's definition changes: the cache key changes with it
STORE_KEY = f"doctor-steps-v{VERSION}"
# the row columns; a "_all" / "_after" pair is one subset of updates, "_old" / "_pi" the pair against mu
ROW_SCHEMA = {
    "step": pl.Int64, "n": pl.Int64, "n_after": pl.Int64, "n_mu": pl.Int64, "n_old": pl.Int64,
    "identical": pl.Boolean,
    "n_tail_all": pl.Int64, "tail_top10_all": pl.Float64, "abs_lr_mean_all": pl.Float64,
    "masked_frac_all": pl.Float64,
    "n_tail_after": pl.Int64, "tail_top10_after": pl.Float64, "abs_lr_mean_after": pl.Float64,
    "masked_frac_after": pl.Float64,
    "n_mm_old": pl.Int64, "k3_old": pl.Float64, "abs_lr_mean_old": pl.Float64,
    "n_mm_pi": pl.Int64, "k3_pi": pl.Float64, "abs_lr_mean_pi": pl.Float64,
    "n_entropy": pl.Int64, "entropy": pl.Float64,
    "columns": pl.String,
}


def _top_decile_mean(d: pl.Expr) -> pl.Expr:
    """Mean of the values >= their P90 (linear interpolation): ``analyses.position``'s ``top10_mean``."""
    return d.filter(d >= d.quantile(0.9, interpolation="linear")).mean()


def _lr(x: str) -> pl.Expr:
    return log_ratio(pl.col(x).cast(pl.Float64), pl.col("logp_rollout").cast(pl.Float64))


def step_rows(lf: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """One row per step of a token frame (``ROW_SCHEMA``, with the frame's column names), in step order.
    Raises ``ValueError`` naming the column when ``step``, ``pos``, ``logp`` or ``advantage`` is missing."""
    lf = lf.lazy()
    names = lf.collect_schema().names()
    for c in ("step", "pos", "logp", "advantage"):
        if c not in names:
            raise ValueError(f"doctor: the token table needs column '{c}'; found {sorted(names)}")
    cols = ",".join(sorted(names))
    null = pl.lit(None)
    mu = pl.col("logp_rollout") if "logp_rollout" in names else null.cast(pl.Float32)
    upd = pl.col("update") if "update" in names else pl.lit(0)
    lf = lf.with_columns(mu.alias("logp_rollout"), upd.alias("update"))
    has_mu = pl.col("logp_rollout").is_not_null()
    after = pl.col("update") > 0
    d = _lr("logp").abs()
    aggs = [pl.len().alias("n"), after.sum().alias("n_after"), has_mu.sum().alias("n_mu"),
            (pl.col("logp_old").is_not_null().sum() if "logp_old" in names else pl.lit(0)).alias("n_old"),
            ((pl.col("logp") == pl.col("logp_rollout")) | ~has_mu).all().alias("identical")]
    masked = ((~pl.col("keep_applied")).cast(pl.Float64) if "keep_applied" in names else null.cast(pl.Float64))
    for name, cond in (("all", has_mu), ("after", has_mu & after)):
        aggs += [cond.sum().alias(f"n_tail_{name}"), _top_decile_mean(d.filter(cond)).alias(f"tail_top10_{name}"),
                 d.filter(cond).mean().alias(f"abs_lr_mean_{name}"), masked.filter(cond).mean().alias(f"masked_frac_{name}")]
    first = (pl.col("update") == 0) & has_mu
    for name, col in (("old", "logp_old"), ("pi", "logp")):
        if col not in names:
            aggs += [pl.lit(0).alias(f"n_mm_{name}"), null.alias(f"k3_{name}"), null.alias(f"abs_lr_mean_{name}")]
            continue
        cond = first & pl.col(col).is_not_null()
        lr = _lr(col)
        aggs += [cond.sum().alias(f"n_mm_{name}"), kl_k3(lr).filter(cond).mean().alias(f"k3_{name}"),
                 lr.abs().filter(cond).mean().alias(f"abs_lr_mean_{name}")]
    if "entropy" in names:
        cond = (pl.col("update") == 0) & pl.col("entropy").is_not_null()
        aggs += [cond.sum().alias("n_entropy"), pl.col("entropy").cast(pl.Float64).filter(cond).mean().alias("entropy")]
    else:
        aggs += [pl.lit(0).alias("n_entropy"), null.alias("entropy")]
    out = lf.group_by("step").agg(aggs).with_columns(pl.lit(cols).alias("columns")).sort("step").collect()
    return out.select([pl.col(c).cast(t) for c, t in ROW_SCHEMA.items()])


def doctor_rows(source: Any, *, cache: bool = True, progress: bool = False) -> pl.DataFrame:
    """The rows of every completed step of ``source`` (a run directory, an opened run, or a token frame).
    For a run directory, blocks cached beside it (or written by the recorder) serve the steps they cover and
    only the other steps are read (``cppo_diag.analyses.step_cache``)."""
    from cppo_diag.analyses.step_cache import cached_step_rows

    return cached_step_rows(source, STORE_KEY, step_rows, cache=cache, progress=progress,
                            desc="doctor: per-step series", empty=pl.DataFrame(schema=ROW_SCHEMA))


def series(rows: pl.DataFrame) -> dict:
    """``doctor.step_series``' dict from the rows: the run's columns, counts per step, and (with rollout
    log-probs) the tail, mismatch and entropy tables, choosing each subset for the whole run."""
    cols = sorted({c for s in rows["columns"].unique().to_list() for c in s.split(",") if c})
    info: dict[str, Any] = {"columns": cols}
    info["counts"] = rows.select("step", "n", "n_after").cast({"n": pl.UInt32, "n_after": pl.UInt32})
    info["has_rollout"] = bool(rows["n_mu"].sum())
    if not info["has_rollout"]:
        return info
    sub = "after" if rows["n_after"].sum() else "all"
    info["tail_updates"] = "after_first" if sub == "after" else "all"
    tail = [pl.col(f"n_tail_{sub}").cast(pl.UInt32).alias("n_tokens"),
            pl.col(f"tail_top10_{sub}").alias("tail_top10"), pl.col(f"abs_lr_mean_{sub}").alias("abs_lr_mean")]
    if "keep_applied" in cols:
        tail.append(pl.col(f"masked_frac_{sub}").alias("masked_frac"))
    info["tail"] = rows.filter(pl.col(f"n_tail_{sub}") > 0).select("step", *tail)
    pair = "old" if rows["n_old"].sum() else "pi"
    info["mismatch_pair"] = "pi_old / mu" if pair == "old" else "pi / mu in the first update"
    info["mismatch"] = rows.filter(pl.col(f"n_mm_{pair}") > 0).select(
        "step", pl.col(f"n_mm_{pair}").cast(pl.UInt32).alias("n_tokens"), pl.col(f"k3_{pair}").alias("k3"),
        pl.col(f"abs_lr_mean_{pair}").alias("abs_lr_mean"))
    info["identical_rollout"] = bool(rows["identical"].all())
    if "entropy" in cols:
        info["entropy"] = rows.filter(pl.col("n_entropy") > 0).select("step", "entropy")
    return info
