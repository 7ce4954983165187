"""Compare runs x rules: every rule recomputed on the same logged tokens, plus each run's applied mask.

One pass over each run evaluates all rules (``cppo_diag.analyses.recomputation.recompute_many``). When a run logged
``keep_applied``, a row labelled ``applied:<meta rule>`` summarises the mask the trainer actually used, from
the run's mergeable partial aggregates (``cppo_diag.analyses.aggregate.applied_mask``: cached beside the run, so a
growing run is only aggregated for its new steps).
``profiles`` adds CPPO under named parameter sets of implementations in the field (``cppo[verl-pr6731]``,
resolved on each run: see ``cppo_diag.analyses.profiles``); ``updates`` selects which optimiser updates are pooled
(``cppo_diag.analyses.updates``; None: each run's default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import polars as pl

from cppo_diag.analyses.aggregate import applied_mask
from cppo_diag.analyses.recomputation import recompute_cached, recompute_many
from cppo_diag.analyses.profiles import profile_specs
from cppo_diag.analyses.tokens import columns_of, load_tokens, run_meta, run_name
from cppo_diag.analyses.updates import resolve_updates, select_updates

SUMMARY_KEYS = ("n_valid", "n_masked", "masked_frac", "budget_share", "away_frac", "masked_frac_pos_adv",
                "masked_frac_neg_adv")


@dataclass
class CompareResult:
    summary: pl.DataFrame  # run, rule, applied (bool), updates, n_valid, n_masked, masked_frac, budget_share, ...
    by_position: pl.DataFrame  # run, rule, bin, bin_start, bin_end, n_valid, masked_frac
    by_step: pl.DataFrame  # run, rule, step, masked_frac, budget_share


def _is_run(source: Any) -> bool:
    """A run directory (path or opened run), whose steps' shard files can key cached partials."""
    from pathlib import Path

    if isinstance(source, (str, Path)):
        return (Path(source) / "tokens").is_dir()
    return hasattr(source, "token_files") and hasattr(source, "path")


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
        if _is_run(source):  # per-step partials kept per (run files, rule, params, updates): a revisit reads nothing
            results = recompute_cached(source, run_specs, step_range=step_range, updates=upd, bin_width=bin_width,
                                       progress=progress, relative=relative, n_rel_bins=n_rel_bins)
        else:
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
            got = applied_mask(source, run, f"applied:{meta_rule}", bin_width=bin_width, relative=relative,
                               n_rel_bins=n_rel_bins, step_range=step_range, updates=upd)
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
