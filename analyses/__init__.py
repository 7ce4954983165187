"""cppo-diag analyses: where in a sequence the policy drifts from the rollout policy, and what each
trust-region rule would do about it, computed from a recorded run without retraining.

Every analysis takes a *token source* - a ``cppo_diag.storage`` run object (anything with ``.tokens()``),
a run directory path, a ``pl.LazyFrame`` or a ``pl.DataFrame`` with the columns of
``cppo_diag.storage.schema.TOKEN_COLUMNS`` - and returns small aggregated tables (``pl.DataFrame``), ready
for the figure builders. Pipelines stay lazy and streaming; the per-step recomputations hold one training
step in memory at a time.

Public API (names are stable; imported lazily so ``import analyses`` is cheap)
-------------------------------------------------------------------------------
Loading and per-token quantities (``cppo_diag.analyses.tokens``)
    load_tokens(source) -> pl.LazyFrame
    with_divergences(lf) -> pl.LazyFrame          adds tv = |pi - mu|, abs_logratio = |log pi - log mu|,
                                                  k1 = log pi - log mu, k3 = rho - 1 - log rho, away
    require_columns(lf, columns, analysis)        raises MissingColumnError naming the column
    MissingColumnError(KeyError)

Divergence by position, paper Fig. 2 (``cppo_diag.analyses.position``)
    position_stats(source, *, metrics=("tv", "abs_logratio", "k3"), bin_width=64, relative=False,
                   n_rel_bins=20, step_range=None, adv_sign=None, updates="all", thresholds=(0.05, 0.1, 0.2, 0.5),
                   delta=None, w_min=None, hill_min_k=5, progress=False) -> pl.DataFrame
        one row per (metric, bin): bin, bin_start, bin_end, count, mean, p50, p90, p99 (linear interpolation,
        the one p90 estimator of cppo-diag), top10_mean, surv_<x> = P(D > x), hill_alpha, hill_k (null for the
        bounded |pi - mu|) [, threshold_mean = mean of delta / w_t when delta given]; a frame pooling several
        runs keys responses by its "run" column
    threshold_schedule(positions, *, delta, w_min, length) -> np.ndarray     delta / w_t (CPPO Eq. 9; cppo_diag.masks)
    position_summary(source, *, ..., exact=False, engine="local", workers=None, ray_address=None, cache=True)
        position_stats from mergeable partial aggregates (analyses.aggregate: log-bucket sketch, cached
        beside the run, only new steps aggregated); aggregate_run(source, AggSpec(...)) -> Partial,
        stats_table(partial, adv_sign=, updates=) -> the same long table

Recompute any rule over a run (``cppo_diag.analyses.recomputation``)
    iter_batches(source, *, step_range=None, columns=None, progress=False) -> Iterator[Batch]
    recompute(source, rule, *, params=None, step_range=None, side_table=None, bin_width=64, anchor=None,
              return_internals=False, on_batch=None, rule_metrics=True, progress=True, relative=False,
              n_rel_bins=20) -> RecomputeResult
    recompute_many(source, {label: (rule, params)}, *, step_range=None, bin_width=64, anchor=None,
                   rule_metrics=False, progress=True, relative=False, n_rel_bins=20)
        -> dict[label, RecomputeResult]   several rules, one pass
    recompute_cached(run, {label: (rule, params)}, *, step_range=None, updates="all", ...)
        -> dict[label, RecomputeResult]   the same from per-step partials kept per (run files, rule, params,
        updates): steps already computed read no token (the app's What-if and Compare)
    load_batches(source, *, step_range=None, progress=False) -> BatchSet   a step range's batches, rebuilt
        once and held in memory; a BatchSet is a token source for recompute / recompute_many (sliders)
    run_rule(batch, rule, params=None, *, anchor="rollout", return_internals=False) -> MaskResult
        RecomputeResult: rule, params, overall (dict), by_step, by_position, by_adv_sign, metrics_by_step
        (pl.DataFrame), agreement (dict or None: fraction of tokens where keep == keep_applied),
        side_table (path or None)

Budget exhaustion, paper Fig. 7 (``cppo_diag.analyses.budget``)
    budget_exhaustion(source, *, params=None, rule="cppo", step_range=None, bin_width=64, anchor=None,
                      updates="all", progress=True) -> BudgetResult
        BudgetResult: by_step (step, delta_b_mean, budget_share, masked_frac, ...),
        first_reject (pos, at_risk, events, survival), slack (bin, c_mean, c_p10, c_p50, frac_negative, ...)

Compare runs x rules (``cppo_diag.analyses.compare``)
    compare_runs(sources, rules=("grpo_clip", "dppo", "cppo"), *, params=None, names=None,
                 step_range=None, bin_width=64, include_applied=True, progress=True, relative=False,
                 n_rel_bins=20, updates="all", profiles=()) -> CompareResult
                                                       relative=True: by_position over t / T bins
        CompareResult: summary (run, rule, updates, masked_frac, budget_share, frac_pos_adv, frac_neg_adv, ...),
        by_position (run, rule, bin, bin_start, masked_frac, count)

What-if sweeps (``cppo_diag.analyses.whatif``)
    whatif_sweep(source, *, deltas, delta_bs, w_mins, base_params=None, step_range=None, anchor="rollout",
                 updates="all", progress=True) -> pl.DataFrame
        one row per (delta, delta_b, w_min): n_valid, n_masked, n_budget, masked_frac, budget_share

Train/rollout mismatch (``cppo_diag.analyses.mismatch``)
    mismatch_by_position(source, *, bin_width=64, step_range=None, adv_sign=None, relative=False,
                         n_rel_bins=20, progress=False) -> pl.DataFrame
        position_stats of |pi_old - mu| ("mismatch_tv") and |log pi_old - log mu| ("mismatch_abs_logratio");
        raises MissingColumnError when the run has no logp_old
    mismatch_metrics(source, *, by="step"|"position", updates="all"|"first"|"after_first", pair="pi"|"old",
                     bin_width=64, step_range=None, adv_sign=None, is_high=(1.2, 2, 5), is_low=(0.8, 0.5, 0.2))
        -> pl.DataFrame   the mismatch metric family (k1/k2/k3 KL, chi2 per token and sequence, ESS, IS-weight
        tail fractions, log-perplexity difference, toward-mu fraction, masked fraction by advantage sign)

Attribution: why pi moved away from mu, and where (``cppo_diag.analyses.attribution``)
    attribution_by(source, by="step"|"position"|"lag"|"update", *, bin_width=32, updates="all", step_range=None,
                adv_sign=None) -> pl.DataFrame   per key: tokens, total_mean/_abs and for each term T (engine =
        logp_behavior - logp_rollout, lag = logp_old - logp_behavior, update = logp - logp_old; inseparable
        terms combined as "engine+lag", ...): T_mean, T_abs, T_share (part of mean |total|; shares sum to 1)
    attribution_terms(source) -> list[str]     attribution_summary(source, ...) -> dict (the whole selection)
    position_strata(source, *, strata="mu"|"entropy"|"fork", edges=None, bin_width=32, updates="all", ...)
        -> (curves, summary)   |pi - mu| by position per uncertainty stratum, the re-weighted curve and the
        share of the rise along the answer that composition (more uncertain tokens later) explains

Doctor (``cppo_diag.analyses.doctor``)
    diagnose(source, *, out_dir=None, name=None, budget=True, progress=False) -> list[Finding]
        Finding: id, severity ("info"|"warning"|"critical"), first_step, message, evidence (dict),
        figure (PNG path or None), page and steps (where the app shows it)
    diagnose_runs(sources, *, out_dir=None, names=None, budget=True) -> {"runs": [{"run", "findings"}]}
    doctor_rows(source, *, cache=True) -> pl.DataFrame    (the doctor's per-step series, one row per step)

Figures: one builder per figure, taking the aggregated tables above (docs/analyses.md, "Figures").
``cppo_diag.analyses.plots_mpl`` (matplotlib Figure; static figures: the report, the doctor, the study):
    fig_position_divergence(table, *, metric="tv", tail="top10_mean", title=None)
    fig_position_survival(table, *, metric="tv")     fig_position_hill(table, *, metric="abs_logratio")
    fig_masked_by_step(result_by_step)               fig_masked_by_position(compare_by_position)
    fig_budget_by_step(budget.by_step)               fig_first_reject(budget.first_reject)
    fig_slack(budget.slack)                          fig_whatif(sweep, *, value="masked_frac", w_min=None)
    fig_mismatch(mismatch_table)                     fig_compare(compare.summary)
    fig_step_series, fig_divergence_along_response, fig_mismatch_by_update           (doctor)
    fig_learning_curves, fig_curves_by_rule, fig_ablation, fig_effects                (study)
``cppo_diag.analyses.plots_plotly`` (plotly go.Figure; the app's pages): fig_budget_by_step, fig_first_reject, fig_slack,
    fig_whatif (same arguments as above), fig_position_statistic, fig_masked_by_rule, fig_runs_by_rule,
    fig_run_curves, fig_metric_family, fig_whatif_by_position, fig_whatif_by_step, fig_sequence_internals

Per-run facts (``cppo_diag.analyses.run_summary``) and one step's responses (``cppo_diag.analyses.responses``), for the app
    run_summary(run) -> dict (the Runs page's row)   tokens_per_step(run)   recent_window(counts, max_tokens)
    reward_curves(steps) / logged_budget_by_step(steps, rule): tables of the trainer's per-step scalars
    marked_tokens(tokens, marks=None), response_table(frame, sequences), find_responses(seqs, ...),
    token_texts(seq, sequences, seq_id): the token inspector's tables

Which updates are pooled (``cppo_diag.analyses.updates``): every position, masked-fraction and budget analysis above
takes ``updates="all" | "first" | "after_first" | "lagged"`` (None: the run's default)
    default_updates(source) -> "lagged" (tokens with recorded lag > 0) for runs that record lag, else
                               "after_first" for runs with several updates per batch, else "all"
    select_updates(source, updates, *, step_range=None) -> a token source of those updates' batches

CPPO's named parameter sets on a run (``cppo_diag.analyses.profiles``; the sets live in ``cppo_diag.masks.registry``)
    run_profile_params(source, rule, profile) -> dict     e.g. ("cppo", "verl-pr6731"): horizon = the run's
                                                          maximum response length
    run_max_response_length(source) -> int | None
    compare_runs(..., profiles=("unirl", "verl-pr6731")) adds rows "cppo[unirl]", "cppo[verl-pr6731]"

Report and synthetic data
    write_report(sources, out_dir, *, rules=("grpo_clip", "dppo", "cppo"), params=None, bin_width=64,
                 step_range=None, whatif=True, progress=True, title=..., updates=None, profiles=())
                 -> pathlib.Path (the HTML file; PNGs beside it); updates None: each run's default
    write_synthetic_run(path, *, n_tokens=100_000, seqs_per_step=64, max_len=512, updates=1, seed=0,
                        noise=0.01, drift=2.0, burst_frac=0.3, burst_scale=4.0, with_logp_old=True,
                        with_keep_applied=None, rule_params=None, progress=False) -> pathlib.Path
"""

from __future__ import annotations

from cppo_diag._lazy import lazy_attributes

_LAZY = {
    "load_tokens": "cppo_diag.analyses.tokens",
    "with_divergences": "cppo_diag.analyses.tokens",
    "require_columns": "cppo_diag.analyses.tokens",
    "MissingColumnError": "cppo_diag.analyses.tokens",
    "position_stats": "cppo_diag.analyses.position",
    "threshold_schedule": "cppo_diag.analyses.position",
    "position_summary": "cppo_diag.analyses.aggregate",
    "aggregate_run": "cppo_diag.analyses.aggregate",
    "stats_table": "cppo_diag.analyses.aggregate",
    "iter_batches": "cppo_diag.analyses.recomputation",
    "recompute": "cppo_diag.analyses.recomputation",
    "recompute_many": "cppo_diag.analyses.recomputation",
    "recompute_cached": "cppo_diag.analyses.recomputation",
    "run_rule": "cppo_diag.analyses.recomputation",
    "load_batches": "cppo_diag.analyses.recomputation",
    "Batch": "cppo_diag.analyses.recomputation",
    "BatchSet": "cppo_diag.analyses.recomputation",
    "RecomputeResult": "cppo_diag.analyses.recomputation",
    "budget_exhaustion": "cppo_diag.analyses.budget",
    "BudgetResult": "cppo_diag.analyses.budget",
    "compare_runs": "cppo_diag.analyses.compare",
    "CompareResult": "cppo_diag.analyses.compare",
    "whatif_sweep": "cppo_diag.analyses.whatif",
    "mismatch_by_position": "cppo_diag.analyses.mismatch",
    "default_updates": "cppo_diag.analyses.updates",
    "select_updates": "cppo_diag.analyses.updates",
    "run_max_response_length": "cppo_diag.analyses.profiles",
    "run_profile_params": "cppo_diag.analyses.profiles",
    "mismatch_metrics": "cppo_diag.analyses.mismatch",
    "attribution_by": "cppo_diag.analyses.attribution",
    "attribution_terms": "cppo_diag.analyses.attribution",
    "attribution_summary": "cppo_diag.analyses.attribution",
    "position_strata": "cppo_diag.analyses.attribution",
    "diagnose": "cppo_diag.analyses.doctor",
    "diagnose_runs": "cppo_diag.analyses.doctor",
    "doctor_rows": "cppo_diag.analyses.doctor_series",
    "Finding": "cppo_diag.analyses.doctor",
    "write_report": "cppo_diag.analyses.report",
    "write_synthetic_run": "cppo_diag.analyses.synthetic",
}

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

