"""Attribution: why pi moved away from mu (engine, lag, update) and where (position, or just uncertain tokens).

**The three terms.** Per token, in log space, exactly (docs/analyses.md "Attribution")::

    log pi - log mu = engine + lag + update
    engine = logp_behavior - logp_rollout    the sampler's numerics against the trainer's, same weights
    lag    = logp_old - logp_behavior        the weights that sampled the batch against those at its first update
    update = logp - logp_old                 this batch's own optimiser updates so far

``logp_behavior`` and ``logp_old`` are optional run-format columns (the bundled trainer writes both with
``--log.behavior_logp true``). A run missing one reports the terms it cannot separate as one combined term,
named by joining them with ``+``: without ``logp_behavior``, ``engine+lag = logp_old - logp_rollout``; without
``logp_old``, ``lag+update = logp - logp_behavior``; with neither, the total alone. On-policy TRL or verl runs
log ``logp_old`` from the trainer's recompute, which there *is* the behaviour policy under trainer numerics, so
their ``engine+lag`` is all engine (their lag is 0 by construction; docs/integrations.md).

**Shares.** ``<term>_share = mean(term * sign(total)) / mean|total|``: the part of the mean absolute log-ratio
each term carries. The shares sum to 1 exactly (the terms sum to the total token by token), and a term that
pulls against the total gets a negative share. ``<term>_abs`` (mean |term|) is the size of a term whatever its
sign.

**Position or uncertainty.** :func:`position_strata` splits the rise of |pi - mu| along the answer into
*composition* (later positions hold more uncertain tokens) and *within-stratum growth* (tokens of the same
uncertainty diverge more later), by direct standardisation: each position's curve is re-weighted to the run's
overall stratum mix; what the re-weighted curve still rises is within-stratum growth, the rest composition.
Strata come from mu's probability of the sampled token (default), the policy entropy where logged, or the
task's own oracle (the chain task's ``fork`` column), which checks the other two.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import polars as pl

from cppo_diag.analyses.tokens import columns_of, filter_tokens, load_tokens, require_columns
from cppo_diag.analyses.updates import filter_updates
from cppo_diag.masks.logratio import ATTRIBUTION_TERMS, attribution_term, tv
from cppo_diag.storage.validate import LOGP_MAX

TERMS = ("engine", "lag", "update")
BY = ("step", "position", "lag", "update")
STRATA = ("mu", "entropy", "fork")
MU_EDGES = (0.5, 0.9, 0.99)  # mu's probability of the sampled token: [0, .5) [.5, .9) [.9, .99) [.99, 1]
ENTROPY_EDGES = (0.05, 0.3, 1.0)  # nats


class AttributionInputError(ValueError):
    """The run's columns cannot give the attribution asked for (the message names the column and steps)."""


def _has_values(lf: pl.LazyFrame, column: str) -> tuple[bool, int, int]:
    """(column present, tokens with a value, tokens without) for an optional column."""
    if column not in columns_of(lf):
        return False, 0, 0
    row = lf.select(pl.col(column).is_not_null().sum().alias("v"), pl.col(column).is_null().sum().alias("n")).collect()
    return True, int(row["v"][0]), int(row["n"][0])


def attribution_terms(source: Any) -> list[str]:
    """The terms ``source`` separates, in order: ``["engine", "lag", "update"]`` with both ``logp_behavior``
    and ``logp_old``; otherwise the inseparable ones joined by ``+`` (e.g. ``["engine+lag", "update"]``).

    Raises :class:`AttributionInputError` when a column is logged for some tokens and not others (a mix of
    runs or steps with and without it): pass a step range that has it everywhere or nowhere."""
    lf = load_tokens(source)
    have = {}
    for col in ("logp_behavior", "logp_old"):
        present, with_v, without = _has_values(lf, col)
        if present and with_v and without:
            bad = (lf.filter(pl.col(col).is_null()).select(pl.col("step").min().alias("lo"), pl.col("step").max().alias("hi"))
                   .collect())
            raise AttributionInputError(
                f"{col}: logged for {with_v} tokens but missing for {without} (steps {bad['lo'][0]}..{bad['hi'][0]}); "
                f"attribution needs it on every token or none: select steps that all have it (--steps) or none")
        have[col] = present and with_v > 0
    if have["logp_behavior"] and have["logp_old"]:
        return list(TERMS)
    if have["logp_old"]:
        return ["engine+lag", "update"]
    if have["logp_behavior"]:
        return ["engine", "lag+update"]
    return ["engine+lag+update"]


def term_exprs(terms: Sequence[str]) -> dict[str, pl.Expr]:
    """``total`` and each term of ``terms`` as float64 expressions of the log-prob columns (exact per token:
    they sum to ``total``)."""
    cols = {c: pl.col(c).cast(pl.Float64) for c in ("logp", "logp_rollout", "logp_old", "logp_behavior")}
    unknown = [t for t in terms if t not in ATTRIBUTION_TERMS]
    if unknown:
        raise ValueError(f"terms: expected names from {sorted(ATTRIBUTION_TERMS)}, found {unknown}")
    return {"total": attribution_term("engine+lag+update", cols), **{t: attribution_term(t, cols) for t in terms}}


def _finite(lf: pl.LazyFrame, columns: Sequence[str], what: str) -> pl.LazyFrame:
    """``lf`` without the tokens whose ``columns`` hold NaN/inf or a log-prob above 0 (probability > 1, beyond
    the reader's rounding slack ``storage.validate.LOGP_MAX``), with one warning that counts them (they are never
    averaged in). The reader already drops such rows from a run on disk; frames passed in directly are checked
    here."""
    ok = pl.all_horizontal([pl.col(c).is_finite() & (pl.col(c) <= LOGP_MAX) for c in columns])
    n_bad = int(lf.select((~ok).sum()).collect().item() or 0)
    if n_bad:
        warnings.warn(f"{what}: {n_bad} token(s) with a non-finite or positive log-prob in {list(columns)} were "
                      f"excluded", stacklevel=3)
        lf = lf.filter(ok)
    return lf


def attribution_by(source: Any, by: str = "step", *, bin_width: int = 32, updates: str = "all", step_range=None,
                   adv_sign: str | None = None) -> pl.DataFrame:
    """Per ``by`` key (step, position bin of ``bin_width`` tokens, lag in optimiser steps, or update index):
    ``tokens``, and for ``total`` and each separable term T (:func:`attribution_terms`): ``T_mean`` (signed
    mean log-ratio), ``T_abs`` (mean |T|) and, for the terms, ``T_share`` (the part of mean |total| it
    carries; the shares sum to 1). Tokens with a non-finite or positive log-prob are excluded with a
    warning. ``updates``: which optimiser updates to pool (``cppo_diag.analyses.updates``; default all)."""
    if by not in BY:
        raise ValueError(f"by: expected one of {list(BY)}, found {by!r}")
    if by == "position" and bin_width < 1:
        raise ValueError(f"bin_width: expected an integer >= 1, found {bin_width}")
    if by == "lag":
        require_columns(load_tokens(source), ["lag"], "attribution by lag (the optimiser steps between sampling and logp)")
    if by == "step":
        return _by_step(source, updates=updates, step_range=step_range, adv_sign=adv_sign)
    key = ((pl.col("pos") // bin_width) * bin_width).alias("pos_bin") if by == "position" else pl.col(by)
    table, _ = _aggregate(source, key, updates=updates, step_range=step_range, adv_sign=adv_sign)
    return table


def step_terms(*, updates: str = "all", adv_sign: str | None = None):
    """(cache key, function tokens -> rows) of :func:`attribution_by` by step: a step's row depends on that
    step's tokens only, so rows are cached per block of steps beside a run (``analyses.step_cache``), and the
    recorder writes the default (all updates) as steps complete."""
    from cppo_diag.analyses.step_cache import block_key

    def rows(tokens: pl.LazyFrame) -> pl.DataFrame:
        return _aggregate(tokens, pl.col("step"), updates=updates, step_range=None, adv_sign=adv_sign)[0]

    return block_key("attribution-steps-v1", updates=updates, adv_sign=adv_sign or "all"), rows


def _by_step(source: Any, *, updates: str, step_range, adv_sign) -> pl.DataFrame:
    from cppo_diag.analyses.step_cache import cached_step_rows

    key, rows = step_terms(updates=updates, adv_sign=adv_sign)
    table = cached_step_rows(source, key, rows, step_range=step_range, desc="attribution by step")
    # blocks of steps with and without a column give different terms: the run-wide check's error (attribution_terms)
    names = [c[: -len("_abs")] for c in table.columns if c.endswith("_abs") and c != "total_abs"]
    mixed = [t for t in names if table.filter(pl.col("tokens") > 0)[f"{t}_abs"].null_count()]
    if mixed and table.height:
        attribution_terms(filter_tokens(load_tokens(source), step_range=step_range))  # raises, naming the column
    cols = (["step", "tokens", "total_mean", "total_abs"] + [f"{t}_{x}" for t in names for x in ("mean", "abs")]
            + [f"{t}_share" for t in names])  # _aggregate's order
    return table.select([c for c in cols if c in table.columns]) if table.height else table


def attribution_summary(source: Any, *, updates: str = "all", step_range=None, adv_sign: str | None = None) -> dict:
    """The whole selection in one dict: ``terms``, ``tokens``, and the columns of :func:`attribution_by`.

    Pooled from the per-step rows of :func:`attribution_by` (cached beside a run, written by the recorder):
    each mean is the token-weighted mean of the steps' means, and each share the token-weighted sum of the
    steps' projections over that of mean |total| (the same sums as one pass, added in another order)."""
    table = attribution_by(source, by="step", updates=updates, step_range=step_range, adv_sign=adv_sign)
    terms = [c[: -len("_abs")] for c in table.columns if c.endswith("_abs") and c != "total_abs"]
    table = table.filter(pl.col("tokens") > 0) if table.height else table
    if not table.height:
        return {"terms": terms or attribution_terms(filter_tokens(load_tokens(source), step_range=step_range)),
                "tokens": 0}
    n = pl.col("tokens").cast(pl.Float64)
    weighted = n * pl.col("total_abs")
    row = table.select(
        pl.col("tokens").sum(),
        *[((n * pl.col(f"{t}_{x}")).sum() / n.sum()).alias(f"{t}_{x}") for t in ["total", *terms] for x in ("mean", "abs")],
        *[pl.when(weighted.sum() > 0).then((weighted * pl.col(f"{t}_share").fill_null(0.0)).sum() / weighted.sum())
          .otherwise(None).alias(f"{t}_share") for t in terms],
    ).to_dicts()[0]
    return {"terms": terms, **row}


def _aggregate(source: Any, key: pl.Expr, *, updates: str, step_range, adv_sign) -> tuple[pl.DataFrame, list[str]]:
    """(the attribution table grouped by ``key``, the terms): the selected tokens with finite, possible log-probs
    in every column the terms read, their mean and mean |.| per term, and each term's share of mean |total|."""
    lf = load_tokens(source)
    require_columns(lf, ["step", "pos", "logp", "logp_rollout"], "attribution")
    lf = filter_updates(filter_tokens(lf, step_range=step_range, adv_sign=adv_sign), updates)
    terms = attribution_terms(lf)  # on the selection: a step range can leave out the steps without a column
    ex = term_exprs(terms)
    used = sorted({c for e in ex.values() for c in e.meta.root_names()})
    lf = _finite(lf, used, "attribution")
    sign = ex["total"].sign()
    aggs = [pl.len().alias("tokens")]
    for name, e in ex.items():
        aggs += [e.mean().alias(f"{name}_mean"), e.abs().mean().alias(f"{name}_abs")]
        if name != "total":
            aggs.append((e * sign).mean().alias(f"_{name}_proj"))
    name = key.meta.output_name()
    out = lf.with_columns(key).group_by(name).agg(aggs).sort(name).collect()
    shares = [pl.when(pl.col("total_abs") > 0).then(pl.col(f"_{t}_proj") / pl.col("total_abs")).otherwise(None)
              .alias(f"{t}_share") for t in terms]
    return out.with_columns(shares).drop([f"_{t}_proj" for t in terms]), terms


# -- position or uncertainty ---------------------------------------------------------------------------------
def _stratum_expr(strata: str, edges: Sequence[float] | None) -> tuple[pl.Expr, list[str], list[str]]:
    """(expression giving each token's stratum label, stratum labels in order, columns it needs)."""
    if strata == "fork":
        return (pl.when(pl.col("fork")).then(pl.lit("fork")).otherwise(pl.lit("forced"))), ["forced", "fork"], ["fork"]
    if strata == "mu":
        e = list(edges or MU_EDGES)
        x, col = pl.col("logp_rollout").cast(pl.Float64).exp(), "logp_rollout"
        fmt = "mu in [{lo:g}, {hi:g})"
        last_hi = 1.0
    elif strata == "entropy":
        e = list(edges or ENTROPY_EDGES)
        x, col = pl.col("entropy").cast(pl.Float64), "entropy"
        fmt = "H in [{lo:g}, {hi:g})"
        last_hi = float("inf")
    else:
        raise ValueError(f"strata: expected one of {list(STRATA)}, found {strata!r}")
    if sorted(e) != e or len(set(e)) != len(e):
        raise ValueError(f"edges: expected strictly increasing stratum edges, found {e}")
    bounds = [0.0, *e, last_hi]
    labels = [fmt.format(lo=lo, hi=hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    if strata == "mu":
        labels[-1] = f"mu in [{bounds[-2]:g}, 1]"
    expr = pl.lit(labels[-1])
    for hi, lab in reversed(list(zip(e, labels[:-1]))):
        expr = pl.when(x < hi).then(pl.lit(lab)).otherwise(expr)
    return expr, labels, [col]


def strata_table(*, strata: str = "mu", edges: Sequence[float] | None = None, bin_width: int = 32,
                 updates: str = "all", adv_sign: str | None = None):
    """(cache key, function tokens -> rows) of :func:`position_strata` per step: per step, the token count and
    the sum of |pi - mu| of each (position bin, stratum) cell and each (third of the response, stratum), as rows
    ``step, kind ("cell" / "third"), key, stratum, tokens, tv_sum``. A response never spans steps, so the
    steps' rows add up to one pass's; they are cached beside a run (``analyses.step_cache``) and the recorder
    writes the Attribution page's default (mu strata, 32-token bins, all updates)."""
    from cppo_diag.analyses.position import sequence_key
    from cppo_diag.analyses.step_cache import block_key

    expr, _, need = _stratum_expr(strata, edges)

    def rows(tokens: pl.LazyFrame) -> pl.DataFrame:
        lf = load_tokens(tokens)
        require_columns(lf, ["step", "pos", "logp", "logp_rollout", *need], f"position_strata (strata={strata})")
        lf = filter_updates(filter_tokens(lf, adv_sign=adv_sign), updates)
        lf = _finite(lf, ["logp", "logp_rollout"], "position_strata")
        if strata == "fork":
            lf = lf.filter(pl.col("fork").is_not_null())
        seq = sequence_key(lf)
        lf = lf.with_columns(expr.alias("stratum"),
                             tv(pl.col("logp").cast(pl.Float64), pl.col("logp_rollout").cast(pl.Float64)).alias("tv"),
                             ((pl.col("pos") // bin_width) * bin_width).alias("pos_bin"),
                             (pl.col("pos").max().over(seq) + 1).alias("_len"))
        # thirds of each response by relative position t/T (so answers of any length compare)
        lf = lf.with_columns(((pl.col("pos") * 3) // pl.col("_len")).clip(0, 2).alias("third"))
        agg = [pl.len().alias("tokens"), pl.col("tv").sum().alias("tv_sum")]
        out = [lf.group_by("step", pl.col(k).cast(pl.Int64).alias("key"), "stratum").agg(agg)
               .with_columns(pl.lit(kind).alias("kind")) for kind, k in (("cell", "pos_bin"), ("third", "third"))]
        return (pl.concat(out, how="vertical_relaxed").collect()
                .select("step", "kind", "key", "stratum", pl.col("tokens").cast(pl.Int64), "tv_sum"))

    return block_key("strata-steps-v1", strata=strata, edges=list(edges) if edges else None, bin_width=bin_width,
                     updates=updates, adv_sign=adv_sign or "all"), rows


def position_strata(source: Any, *, strata: str = "mu", edges: Sequence[float] | None = None, bin_width: int = 32,
                    updates: str = "all", step_range=None, adv_sign: str | None = None) -> tuple[pl.DataFrame, dict]:
    """|pi - mu| by position bin and stratum, and the split of its rise along the answer.

    Returns ``(curves, summary)``. ``curves``: one row per (``pos_bin``, ``stratum``) with ``tokens``,
    ``share`` (the stratum's share of the bin's tokens) and ``tv_mean``, plus rows with ``stratum`` = ``"all"``
    (the raw curve) and ``"reweighted"`` (each bin re-weighted to the run's overall stratum mix).

    ``summary``: ``first``/``last`` (the first and last third of each response by relative position t/T),
    ``rise`` (raw mean |pi - mu| in the last third minus the first), ``rise_within`` (the same for the
    re-weighted curve), ``composition_share`` = 1 - rise_within / rise (the part of the rise that the changing
    stratum mix explains), the overall ``mix``, and per stratum its first/last-third means (``by_stratum``)."""
    _, labels, _ = _stratum_expr(strata, edges)  # a bad strata or edges is an error before any read
    from cppo_diag.analyses.step_cache import cached_step_rows

    key, fn = strata_table(strata=strata, edges=edges, bin_width=bin_width, updates=updates, adv_sign=adv_sign)
    rows = cached_step_rows(source, key, fn, step_range=step_range, desc="position strata by step")
    if not rows.height or "kind" not in rows.columns:
        raise AttributionInputError("position_strata: no tokens left after the filters (steps, updates, advantage sign)")

    def pooled(kind: str, name: str) -> pl.DataFrame:  # the steps' counts and sums added: one pass's mean
        return (rows.filter(pl.col("kind") == kind).group_by("key", "stratum")
                .agg(pl.col("tokens").sum(), pl.col("tv_sum").sum()).sort("key", "stratum")
                .select(pl.col("key").alias(name), "stratum", "tokens",
                        (pl.col("tv_sum") / pl.col("tokens")).alias("tv_mean")))

    cells, thirds = pooled("cell", "pos_bin"), pooled("third", "third")
    total = cells["tokens"].sum()
    if total == 0:
        raise AttributionInputError("position_strata: no tokens left after the filters (steps, updates, advantage sign)")
    mix = (cells.group_by("stratum").agg(pl.col("tokens").sum()).with_columns((pl.col("tokens") / total).alias("w")))
    w = dict(zip(mix["stratum"].to_list(), mix["w"].to_list()))

    def reweight(frame: pl.DataFrame, key: str) -> pl.DataFrame:
        g = frame.with_columns(pl.col("stratum").replace_strict(w, default=0.0).alias("w"))
        raw = g.group_by(key).agg(pl.col("tokens").sum(), ((pl.col("tv_mean") * pl.col("tokens")).sum()
                                                           / pl.col("tokens").sum()).alias("tv_mean"))
        # a stratum absent from a cell contributes nothing and the weights of those present are renormalised
        rw = g.group_by(key).agg(pl.col("tokens").sum(), ((pl.col("tv_mean") * pl.col("w")).sum()
                                                          / pl.col("w").sum()).alias("tv_mean"))
        return pl.concat([raw.with_columns(pl.lit("all").alias("stratum")),
                          rw.with_columns(pl.lit("reweighted").alias("stratum"))], how="diagonal_relaxed")

    bin_tokens = cells.group_by("pos_bin").agg(pl.col("tokens").sum().alias("_bin"))
    curves = (cells.join(bin_tokens, on="pos_bin").with_columns((pl.col("tokens") / pl.col("_bin")).alias("share"))
              .drop("_bin"))
    curves = pl.concat([curves, reweight(cells, "pos_bin")], how="diagonal_relaxed").sort("pos_bin", "stratum")
    th = reweight(thirds, "third")

    def at(frame, stratum, third):
        r = frame.filter((pl.col("stratum") == stratum) & (pl.col("third") == third))["tv_mean"]
        return float(r[0]) if len(r) else float("nan")

    rise = at(th, "all", 2) - at(th, "all", 0)
    rise_within = at(th, "reweighted", 2) - at(th, "reweighted", 0)
    by_stratum = {s: {"first": at(thirds, s, 0), "last": at(thirds, s, 2),
                      "tokens": int(thirds.filter(pl.col("stratum") == s)["tokens"].sum())} for s in labels}
    summary = {
        "strata": strata, "labels": labels, "mix": {s: w.get(s, 0.0) for s in labels}, "tokens": int(total),
        "first": at(th, "all", 0), "last": at(th, "all", 2), "rise": rise,
        "first_within": at(th, "reweighted", 0), "last_within": at(th, "reweighted", 2), "rise_within": rise_within,
        "composition_share": (1.0 - rise_within / rise) if rise and np.isfinite(rise) and rise != 0 else None,
        "by_stratum": by_stratum,
    }
    return curves, summary
