"""Compare runs x rules: every rule recomputed on the same logged tokens, plus each run's applied mask.

One pass over each run evaluates all rules (``analyses.recompute.recompute_many``). When a run logged
``keep_applied``, a row labelled ``applied:<meta rule>`` summarises the mask the trainer actually used.
``profiles`` adds CPPO under named parameter sets of implementations in the field (``cppo[verl-pr6731]``,
resolved on each run: see ``analyses.profiles``); ``updates`` selects which optimiser updates are pooled
(``analyses.updates``; None: each run's default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import polars as pl

from analyses.position import _bin_exprs
from analyses.recompute import recompute_many
from analyses.profiles import profile_specs
from analyses.tokens import columns_of, filter_tokens, load_tokens, run_meta, run_name
from analyses.updates import filter_updates, resolve_updates, select_updates

SUMMARY_KEYS = ("n_valid", "n_masked", "masked_frac", "budget_share", "away_frac", "masked_frac_pos_adv",
                "masked_frac_neg_adv")


@dataclass
class CompareResult:
    summary: pl.DataFrame  # run, rule, applied (bool), updates, n_valid, n_masked, masked_frac, budget_share, ...
    by_position: pl.DataFrame  # run, rule, bin, bin_start, bin_end, n_valid, masked_frac
    by_step: pl.DataFrame  # run, rule, step, masked_frac, budget_share


def _applied_tables(lf: pl.LazyFrame, run: str, label: str, bin_width: int, relative: bool = False,
                    n_rel_bins: int = 20):
    if relative:  # T = max(pos) + 1 of each response, over all its logged tokens (before the null filter)
        lf = lf.with_columns(_T=(pl.col("pos").max() + 1).over(["step", "update", "rank", "seq_id"]))
    lf = lf.filter(pl.col("keep_applied").is_not_null())
    masked = (~pl.col("keep_applied")).cast(pl.Int64)
    budget = (pl.col("reason_applied") == 2).cast(pl.Int64) if "reason_applied" in columns_of(lf) else pl.lit(None)
    # SPEC away test A (rho - 1) > 0 in float32, as the rule library evaluates it (a tiny log-ratio gives rho == 1)
    lp, lr = pl.col("logp").cast(pl.Float32), pl.col("logp_rollout").cast(pl.Float32)
    rho = (lp - lr).clip(-20.0, 20.0).exp()
    pos_bin, bin_start, bin_end = _bin_exprs(relative, bin_width, n_rel_bins)
    base = lf.select("step", pos_bin.alias("bin"), masked.alias("m"), budget.alias("b"),
                     (pl.col("advantage").cast(pl.Float32) * (rho - 1.0) > 0).cast(pl.Int64).alias("away"),
                     (pl.col("advantage") > 0).alias("ap"), (pl.col("advantage") < 0).alias("an"))
    tot = base.select(
        n_valid=pl.len(), n_masked=pl.col("m").sum(), n_budget=pl.col("b").sum(), n_away=pl.col("away").sum(),
        mp=pl.col("m").filter(pl.col("ap")).mean(), mn=pl.col("m").filter(pl.col("an")).mean(),
    ).collect(engine="streaming").row(0, named=True)
    if not tot["n_valid"]:
        return None
    summary = {
        "run": run, "rule": label, "applied": True, "n_valid": tot["n_valid"], "n_masked": tot["n_masked"],
        "masked_frac": tot["n_masked"] / tot["n_valid"],
        "budget_share": (tot["n_budget"] / tot["n_masked"]) if tot["n_masked"] and tot["n_budget"] is not None else None,
        "away_frac": tot["n_away"] / tot["n_valid"],
        "masked_frac_pos_adv": tot["mp"], "masked_frac_neg_adv": tot["mn"],
    }
    by_pos = (base.group_by("bin")
              .agg(n_valid=pl.len(), masked_frac=pl.col("m").mean()).sort("bin").collect(engine="streaming")
              .with_columns(bin_start=bin_start.cast(pl.Float64), bin_end=bin_end.cast(pl.Float64)))
    by_step = (base.group_by("step").agg(masked_frac=pl.col("m").mean(),
                                          budget_share=pl.col("b").sum() / pl.col("m").sum())
               .sort("step").collect(engine="streaming"))
    return summary, by_pos, by_step


def compare_runs(
    sources: Sequence[Any],
    rules: Sequence[str] | dict = ("grpo_clip", "dppo", "cppo"),
    *,
    params: dict | None = None,
    names: Sequence[str] | None = None,
    step_range=None,
    bin_width: int = 64,
    include_applied: bool = True,
    progress: bool = True,
    relative: bool = False,
    n_rel_bins: int = 20,
    updates: str | None = "all",
    profiles: Sequence[str] = (),
) -> CompareResult:
    """Masked fraction (overall, by position bin, by step) of each rule on each run.

    ``relative=True``: ``by_position`` over the relative position t / T in ``n_rel_bins`` equal bins of
    (0, 1], as ``position_stats(relative=True)`` (``bin_start``/``bin_end`` are then fractions).
    ``rules``: rule names, or a dict label -> (rule name, params) to compare parameterisations of one rule.
    ``params``: rule name -> keyword parameters, applied to the rules given by name.
    ``names``: display names of the runs (default the run directory names).
    ``updates``: "all", "first", "after_first" or None (each run's ``default_updates``); the summary's
    ``updates`` column says which. ``profiles``: names of CPPO profiles (``cppo-diag rules``; e.g. "paper",
    "unirl", "verl-pr6731"), each recomputed as the rule ``cppo[<profile>]``.
    """
    params = dict(params or {})
    if isinstance(rules, dict):
        specs = {label: (r, dict(p or {})) for label, (r, p) in rules.items()}
    else:
        specs = {r: (r, dict(params.get(r) or {})) for r in rules}
    rows, pos_frames, step_frames = [], [], []
    for i, source in enumerate(sources):
        run = names[i] if names else run_name(source, f"run{i}")
        upd = resolve_updates(source, updates)
        run_specs = {**specs, **profile_specs(source, "cppo", profiles)}
        results = recompute_many(select_updates(source, upd, step_range=step_range), run_specs,
                                 step_range=step_range, bin_width=bin_width, progress=progress, relative=relative,
                                 n_rel_bins=n_rel_bins)
        for label, res in results.items():
            rows.append({"run": run, "rule": label, "applied": False, "updates": upd,
                         **{k: res.overall.get(k) for k in SUMMARY_KEYS}})
            pos_frames.append(res.by_position.select(
                pl.lit(run).alias("run"), pl.lit(label).alias("rule"), "bin", "bin_start", "bin_end",
                "n_valid", "masked_frac"))
            step_frames.append(res.by_step.select(
                pl.lit(run).alias("run"), pl.lit(label).alias("rule"), "step", "masked_frac", "budget_share"))
        lf = load_tokens(source)
        if include_applied and "keep_applied" in columns_of(lf):
            meta_rule = run_meta(source).get("rule") or "?"
            got = _applied_tables(filter_updates(filter_tokens(lf, step_range=step_range), upd), run,
                                  f"applied:{meta_rule}", bin_width, relative, n_rel_bins)
            if got is not None:
                summary, by_pos, by_step = got
                rows.append({**summary, "updates": upd})
                pos_frames.append(by_pos.select(pl.lit(run).alias("run"), pl.lit(summary["rule"]).alias("rule"),
                                                "bin", "bin_start", "bin_end", "n_valid", "masked_frac"))
                step_frames.append(by_step.select(pl.lit(run).alias("run"), pl.lit(summary["rule"]).alias("rule"),
                                                  "step", "masked_frac", "budget_share"))
    summary_schema = {"run": pl.Utf8, "rule": pl.Utf8, "applied": pl.Boolean, "updates": pl.Utf8, "n_valid": pl.Int64,
                      "n_masked": pl.Int64, **{k: pl.Float64 for k in SUMMARY_KEYS[2:]}}
    summary = pl.DataFrame(rows, schema=summary_schema) if rows else pl.DataFrame(schema=summary_schema)
    pos_schema = {"run": pl.Utf8, "rule": pl.Utf8, "bin": pl.Int64, "bin_start": pl.Float64, "bin_end": pl.Float64,
                  "n_valid": pl.Int64, "masked_frac": pl.Float64}
    step_schema = {"run": pl.Utf8, "rule": pl.Utf8, "step": pl.Int64, "masked_frac": pl.Float64,
                   "budget_share": pl.Float64}
    by_pos = (pl.concat([f.cast(pos_schema) for f in pos_frames]) if pos_frames else pl.DataFrame(schema=pos_schema))
    by_step = (pl.concat([f.cast(step_schema) for f in step_frames]) if step_frames
               else pl.DataFrame(schema=step_schema))
    return CompareResult(summary=summary, by_position=by_pos, by_step=by_step)
