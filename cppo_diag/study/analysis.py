"""The study analysis: per-rule results with confidence intervals over seeds, paired comparisons against
the reference rule (CPPO by default), learning curves, the Fig. 5-style ablation figure and, per rule, the
paper's Fig. 2 (divergence by position) and Fig. 7 (realised delta_b and budget-mask share) diagnostics.

Inputs are only what the runs recorded: held-out accuracy from each run's per-step scalars
(``run.steps()``, the scalar named by ``[analysis] accuracy``), and masked fraction, budget share and
mean |pi - mu| from the per-token table (``keep_applied``, ``reason_applied``, ``logp``, ``logp_rollout``).
The diagnostics call the ``analyses`` package (``position_stats``, ``budget_exhaustion`` and its figure
builders); nothing here re-implements them.

Per-seed metrics (one value per run):

* ``initial_acc``: held-out accuracy at the first evaluated step (before or at the start of RL).
* ``final_acc`` (the primary metric): the mean of the last ``[analysis] final_window`` (3) evaluations
  after the initial one. ``last_acc``: the last evaluation alone.
* ``best_acc`` (secondary, biased): the maximum over evaluated steps, what the paper's Table 1 reports; a
  maximum over noisy evaluations is biased upward and hides a late decline.
* ``steps_to_threshold``: first evaluated step with accuracy >= threshold; NaN if never, and then the run
  is right-censored at its last evaluation (``followup``). The table gives a Kaplan-Meier restricted mean
  up to the common horizon, so the seeds that never reach the threshold count.
* ``masked_frac``: masked / valid tokens (``keep_applied``).
* ``budget_share``: budget-masked / masked (``reason_applied == Reason.BUDGET``), NaN when nothing was masked.
* ``mean_tv``: mean |pi - mu| over the logged tokens.

The token metrics and the Fig. 2 / Fig. 7 diagnostics pool the updates ``cppo_diag.analyses.updates.default_updates``
selects: the tokens with recorded lag > 0 for runs that record lag (every update of a stale-rollout run), else
for runs with several updates per batch the updates after the first, else every update. The results page says
which. Pooled token frames carry a ``run`` column, so responses of different seeds never merge.

Comparisons (:func:`comparison_table`): the reference rule against every other rule, paired by seed (t interval,
paired t-test, exact sign-flip test, d_z, BCa bootstrap from 10 pairs on) on ``final_acc`` and ``best_acc``, and
the restricted mean steps to the threshold; Holm adjusts every row of that table as one family.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cppo_diag import metric_names as M
from cppo_diag.masks.reasons import Reason
from cppo_diag.study.config import AnalysisConfig
from cppo_diag.study.runner import read_manifest
from cppo_diag.study.stats import (
    MIN_BOOT_PAIRS,
    PairedComparison,
    RestrictedMean,
    RestrictedMeanComparison,
    compare_restricted_means,
    holm_adjust,
    km_restricted_mean,
    paired_comparison,
    t_interval,
)

__all__ = [
    "StudyData",
    "collect_study",
    "token_summary",
    "per_seed_metrics",
    "results_table",
    "paired_comparisons",
    "comparison_table",
    "ComparisonTable",
    "threshold_horizon",
    "headline",
    "write_figures",
    "write_effects_figure",
    "curve_bands",
    "pool_budget_by_step",
    "write_results",
    "analyse_study",
]

METRICS = ("initial_acc", "final_acc", "last_acc", "best_acc", "steps_to_threshold", "masked_frac", "budget_share",
           "mean_tv")
BUDGET_RULES = ("cppo", "cppo_no_weight")  # rules whose mask has a prefix budget (Fig. 7 of their own run)

# Paper Table 1 (best AIME24/25/26 Avg@16 mean), quoted for context only (SPEC.md).
PAPER_TABLE1 = [
    ("Qwen3-1.7B", 27.91, 28.19, 31.88),
    ("Qwen3-1.7B-Base", 8.89, 10.90, 12.78),
    ("Qwen3-8B-Base", 23.96, 28.89, 31.11),
    ("Qwen3-30B-A3B-Base", 38.19, 49.23, 54.79),
]


@dataclass
class RunEntry:
    run_name: str
    rule: str
    seed: int
    setting: str
    label: str
    rule_params: dict
    path: Path
    run: Any = None  # cppo_diag.storage Run, None when the run is missing / unreadable
    status: str = "missing"
    curve: pl.DataFrame | None = None  # (step, accuracy)
    train_seconds: float = float("nan")  # sum of the trainer's time/step_s scalar, when logged
    tokens: dict = field(default_factory=dict)  # token_summary


@dataclass
class StudyData:
    root: Path
    manifest: dict
    analysis: AnalysisConfig
    entries: list[RunEntry]

    def labels(self) -> list[str]:
        seen: dict[str, None] = {}
        for e in self.entries:
            seen.setdefault(e.label, None)
        return list(seen)


def token_summary(source, updates: str | None = None) -> dict[str, Any]:
    """Masked fraction, budget share and mean |pi - mu| of one run's token table (one lazy query) over the
    updates ``updates`` selects (None: the run's ``default_updates``); ``updates`` in the result says which."""
    from cppo_diag.analyses import load_tokens, with_divergences
    from cppo_diag.analyses.updates import filter_updates, resolve_updates

    updates = resolve_updates(source, updates)
    lf = with_divergences(filter_updates(load_tokens(source), updates))
    cols = lf.collect_schema().names()
    aggs = [pl.len().alias("n_tokens"), pl.col("tv").mean().alias("mean_tv")]
    if "keep_applied" in cols:
        aggs.append((~pl.col("keep_applied")).sum().alias("n_masked"))
    if "reason_applied" in cols:
        aggs.append((pl.col("reason_applied") == Reason.BUDGET).sum().alias("n_budget"))
    row = lf.select(aggs).collect().row(0, named=True)
    n = row["n_tokens"] or 0
    n_masked = row.get("n_masked")
    n_budget = row.get("n_budget")
    nan = float("nan")
    return {
        "updates": updates,
        "n_tokens": float(n),
        "mean_tv": float(row["mean_tv"]) if row["mean_tv"] is not None else nan,
        "masked_frac": (n_masked / n) if (n_masked is not None and n) else nan,
        "budget_share": (n_budget / n_masked) if (n_budget is not None and n_masked) else nan,
    }


def _accuracy_curve(run, scalar: str) -> pl.DataFrame:
    """(step, accuracy): held-out accuracy against the number of RL iterations completed when it was measured.

    The bundled trainer (meta ``trainer == "cppo-diag"``) logs the evaluation that follows iteration s on
    step s's scalar row (so it measured the policy after s + 1 iterations) and the initial evaluation, before
    any update, on step 0's row when step 0 is not itself an evaluation step; its ``summary/<name>_before``
    scalar keeps the initial value in every case. This maps both onto "iterations completed". For any other
    trainer the logged step is used as is.
    """
    steps = run.steps()
    if scalar not in steps.columns:
        raise KeyError(
            f"run {run.path}: analysis.accuracy expected scalar '{scalar}' among the logged scalars, "
            f"found {sorted(c for c in steps.columns if c != 'step')}"
        )
    curve = (
        steps.select(pl.col("step").cast(pl.Int64), pl.col(scalar).cast(pl.Float64).alias("accuracy"))
        .drop_nulls()
        .filter(pl.col("accuracy").is_not_nan())
        .sort("step")
    )
    cfg = run.meta.config
    every = (cfg.get("log") or {}).get("eval_every")
    total = cfg.get("steps")
    if run.meta.trainer != "cppo-diag" or every is None or total is None:
        return curve
    every, total = int(every), int(total)
    is_eval_step = ((pl.col("step") + 1) % every == 0) if every > 0 else pl.lit(False)
    is_eval_step = is_eval_step | (pl.col("step") + 1 == total)
    curve = (
        curve.with_columns(is_eval_step.alias("_eval"))
        .filter(pl.col("_eval") | (pl.col("step") == 0))
        .with_columns(pl.when(pl.col("_eval")).then(pl.col("step") + 1).otherwise(pl.col("step")).alias("step"))
        .drop("_eval")
    )
    before = M.summary_name(scalar, "before")
    if before in steps.columns and not (curve["step"] == 0).any():
        value = steps[before].drop_nulls()
        if value.len():
            curve = pl.concat([pl.DataFrame({"step": [0], "accuracy": [float(value[-1])]}), curve])
    return curve.sort("step")


def collect_study(root: str | Path, analysis: AnalysisConfig | None = None) -> StudyData:
    """Read every run of the study at ``root`` (its manifest names them); missing runs stay as NaN."""
    from cppo_diag.storage import open_run

    root = Path(root)
    manifest = read_manifest(root)
    if analysis is None:
        raw = dict(manifest.get("analysis") or {})
        if "ablation_rules" in raw:
            raw["ablation_rules"] = tuple(raw["ablation_rules"])
        analysis = AnalysisConfig(**raw)
    entries = []
    for c in manifest["cells"]:
        e = RunEntry(
            run_name=c["run_name"], rule=c["rule"], seed=int(c["seed"]), setting=c.get("setting", ""),
            label=c.get("label", c["rule"]), rule_params=c.get("rule_params", {}), path=root / c["run_name"],
        )
        if e.path.is_dir():
            try:
                e.run = open_run(e.path)
            except Exception as exc:  # noqa: BLE001 - a broken run is reported, not fatal to the study
                e.status = f"unreadable: {exc}"
            else:
                e.status = str(e.run.meta.status or "unknown")
                e.curve = _accuracy_curve(e.run, analysis.accuracy)
                steps = e.run.steps()
                if M.TIME_STEP_S in steps.columns:
                    e.train_seconds = float(steps[M.TIME_STEP_S].drop_nulls().sum())
                e.tokens = token_summary(e.run)
        entries.append(e)
    return StudyData(root=root, manifest=manifest, analysis=analysis, entries=entries)


def per_seed_metrics(data: StudyData) -> pl.DataFrame:
    """One row per grid cell: label, rule, setting, seed, status and the metrics of ``METRICS``, plus
    ``reached`` (the threshold was reached), ``followup`` (last evaluated step, where an unreached run is
    censored) and ``final_steps`` (the evaluations averaged into ``final_acc``)."""
    thr = data.analysis.threshold
    window = data.analysis.final_window
    rows = []
    nan = float("nan")
    for e in data.entries:
        row = {"label": e.label, "rule": e.rule, "setting": e.setting, "seed": e.seed, "run": e.run_name,
               "status": e.status}
        c = e.curve if e.status == "finished" else None  # a killed or running run is not comparable yet
        if c is not None and c.height:
            acc = c["accuracy"].to_numpy()
            steps = c["step"].to_numpy()
            hit = np.flatnonzero(acc >= thr)
            # final: the last `window` evaluations after the initial one (the initial one only if it is all).
            later = np.flatnonzero(steps > steps[0])
            tail = later[-window:] if later.size else np.arange(acc.size)[-1:]
            row.update(
                initial_acc=float(acc[0]), final_acc=float(acc[tail].mean()), last_acc=float(acc[-1]),
                best_acc=float(acc.max()), steps_to_threshold=float(steps[hit[0]]) if hit.size else nan,
                reached=bool(hit.size), followup=int(steps[-1]),
                final_steps=",".join(str(int(x)) for x in steps[tail]),
            )
        else:
            row.update(initial_acc=nan, final_acc=nan, last_acc=nan, best_acc=nan, steps_to_threshold=nan,
                       reached=None, followup=None, final_steps=None)
        tok = e.tokens if e.status == "finished" else {}
        row.update(
            updates=tok.get("updates"),
            masked_frac=tok.get("masked_frac", nan),
            budget_share=tok.get("budget_share", nan),
            mean_tv=tok.get("mean_tv", nan),
        )
        rows.append(row)
    return pl.DataFrame(rows, schema_overrides={m: pl.Float64 for m in METRICS} | {
        "followup": pl.Int64, "reached": pl.Boolean, "updates": pl.Utf8, "final_steps": pl.Utf8})


def threshold_horizon(per_seed: pl.DataFrame) -> float:
    """The restricted-mean horizon tau: the last step every finished run was evaluated at (so each run is
    observed up to tau), NaN without finished runs."""
    f = per_seed["followup"].drop_nulls()
    return float(f.min()) if f.len() else float("nan")


def _restricted_mean(sub: pl.DataFrame, tau: float, confidence: float) -> RestrictedMean:
    """Kaplan-Meier restricted mean steps-to-threshold of one label's seeds: unreached seeds censored at
    their last evaluation."""
    ok = sub.filter(pl.col("reached").is_not_null())
    times = np.where(ok["reached"].to_numpy(), ok["steps_to_threshold"].to_numpy(),
                     ok["followup"].to_numpy().astype(float))
    if not math.isfinite(tau) or tau <= 0:
        nan = float("nan")
        return RestrictedMean(nan, nan, nan, nan, tau, 0, 0, confidence)
    return km_restricted_mean(times.astype(float), ok["reached"].to_numpy().astype(bool), tau, confidence)


def results_table(per_seed: pl.DataFrame, confidence: float = 0.95) -> list[dict[str, Any]]:
    """Per label: n runs with data, a t-interval per metric, seeds reaching the threshold and the
    restricted mean steps to it (``rmst``, Kaplan-Meier, up to :func:`threshold_horizon`)."""
    out = []
    tau = threshold_horizon(per_seed)
    for label in per_seed["label"].unique(maintain_order=True):
        sub = per_seed.filter(pl.col("label") == label)
        row: dict[str, Any] = {
            "label": label,
            "rule": sub["rule"][0],
            "setting": sub["setting"][0],
            "n_runs": sub.height,
            "n_with_data": int(sub["final_acc"].is_not_nan().sum()),
        }
        for m in METRICS:
            row[m] = t_interval(sub[m].to_numpy(), confidence)
        row["reached"] = int(sub["reached"].fill_null(False).sum())
        row["rmst"] = _restricted_mean(sub, tau, confidence)
        out.append(row)
    return out


@dataclass
class ComparisonTable:
    """Every comparison of the results page, Holm-adjusted as one family: the paired comparisons of each
    accuracy metric and the restricted-mean steps-to-threshold comparisons."""

    paired: list[PairedComparison]
    steps: list[RestrictedMeanComparison]
    metrics: tuple[str, ...]

    @property
    def family_size(self) -> int:
        return sum(not math.isnan(c.p_ttest) for c in self.paired) + sum(not math.isnan(c.p) for c in self.steps)

    def by_metric(self, metric: str) -> list[PairedComparison]:
        return [c for c in self.paired if c.metric == metric]


def _pairs(per_seed: pl.DataFrame, reference: str):
    """(setting, reference label, other rule, other label, ref rows, other rows) for each comparison."""
    for setting in per_seed["setting"].unique(maintain_order=True):
        sub = per_seed.filter(pl.col("setting") == setting)
        ref = sub.filter(pl.col("rule") == reference)
        if ref.height == 0:
            continue
        for rule in sub["rule"].unique(maintain_order=True):
            if rule == reference:
                continue
            ref_label = f"{reference}@{setting}" if setting else reference
            other_label = f"{rule}@{setting}" if setting else rule
            yield ref_label, other_label, ref, sub.filter(pl.col("rule") == rule)


def comparison_table(
    per_seed: pl.DataFrame,
    *,
    reference: str,
    metrics: tuple[str, ...] = ("final_acc", "best_acc"),
    steps: bool = True,
    confidence: float = 0.95,
    n_boot: int = 10_000,
) -> ComparisonTable:
    """``reference`` vs every other rule of the same setting: paired by seed on each of ``metrics``, and (with
    ``steps``) restricted mean steps to the threshold. Holm adjusts every row of the table together."""
    paired: list[PairedComparison] = []
    rm: list[RestrictedMeanComparison] = []
    tau = threshold_horizon(per_seed)
    for metric in metrics:
        for ref_label, other_label, ref, other in _pairs(per_seed, reference):
            joined = ref.select("seed", pl.col(metric).alias("a")).join(
                other.select("seed", pl.col(metric).alias("b")), on="seed", how="inner"
            ).sort("seed")
            paired.append(paired_comparison(
                joined["a"].to_numpy(), joined["b"].to_numpy(), name_a=ref_label, name_b=other_label,
                metric=metric, confidence=confidence, n_boot=n_boot,
            ))
    if steps and math.isfinite(tau) and tau > 0:
        for ref_label, other_label, ref, other in _pairs(per_seed, reference):
            ra, rb = _restricted_mean(ref, tau, confidence), _restricted_mean(other, tau, confidence)
            if ra.n and rb.n:
                rm.append(compare_restricted_means(ra, rb, name_a=ref_label, name_b=other_label))
    # One family: the t-test (z-test for the restricted means) p of every row; the sign-flip column gets the
    # same family with the restricted-mean rows' z-test p standing in (they have no permutation test).
    p_t = [c.p_ttest for c in paired] + [c.p for c in rm]
    p_sf = [c.p_sign_flip for c in paired] + [c.p for c in rm]
    adj_t, adj_sf = holm_adjust(p_t), holm_adjust(p_sf)
    k = len(paired)
    paired = [dataclasses.replace(c, p_holm=float(adj_t[i]), p_holm_sign_flip=float(adj_sf[i]))
              for i, c in enumerate(paired)]
    rm = [dataclasses.replace(c, p_holm=float(adj_t[k + i])) for i, c in enumerate(rm)]
    return ComparisonTable(paired=paired, steps=rm, metrics=tuple(metrics))


def paired_comparisons(
    per_seed: pl.DataFrame, *, reference: str, metric: str, confidence: float = 0.95, n_boot: int = 10_000
) -> list[PairedComparison]:
    """``reference`` vs every other rule on one ``metric``, paired by seed, Holm-adjusted over that metric's
    comparisons only. The results page uses :func:`comparison_table` (Holm over the whole table)."""
    return comparison_table(per_seed, reference=reference, metrics=(metric,), steps=False, confidence=confidence,
                            n_boot=n_boot).paired


# -- figures ------------------------------------------------------------------------------------------


def _curves_long(data: StudyData) -> pl.DataFrame:
    frames = [
        e.curve.with_columns(pl.lit(e.label).alias("label"), pl.lit(e.seed).alias("seed"))
        for e in data.entries
        if e.status == "finished" and e.curve is not None and e.curve.height
    ]
    if not frames:
        return pl.DataFrame(schema={"step": pl.Int64, "accuracy": pl.Float64, "label": pl.Utf8, "seed": pl.Int64})
    return pl.concat(frames)


def curve_bands(curves: pl.DataFrame, confidence: float) -> pl.DataFrame:
    """Per label and evaluated step: the mean accuracy over seeds with its ``confidence`` t interval
    (label, step, mean, lo, hi, n), for the learning-curve figures (``cppo_diag.analyses.plots_mpl``)."""
    rows = []
    for (label, step), g in curves.group_by("label", "step", maintain_order=True):
        iv = t_interval(g["accuracy"].to_numpy(), confidence)
        rows.append({"label": label, "step": float(step), "mean": iv.mean, "lo": iv.lo, "hi": iv.hi, "n": iv.n})
    schema = {"label": pl.Utf8, "step": pl.Float64, "mean": pl.Float64, "lo": pl.Float64, "hi": pl.Float64,
              "n": pl.Int64}
    return pl.DataFrame(rows, schema=schema).sort("label", "step", maintain_order=True)


def _pooled_tokens(entries: list[RunEntry]):
    """The token rows of several runs (seeds) in one LazyFrame, keyed by run: a ``run`` column (the run
    name) tells apart responses that share (step, update, rank, seq_id), so each keeps its own length T in
    the delta / w_t overlay (``cppo_diag.analyses.position.sequence_key``)."""
    from cppo_diag.analyses import load_tokens
    from cppo_diag.analyses.position import RUN_KEY

    frames = [load_tokens(e.run).with_columns(pl.lit(e.run_name).alias(RUN_KEY)) for e in entries if e.run is not None]
    if not frames:
        return None
    return pl.concat(frames, how="diagonal_relaxed")


def write_figures(data: StudyData, per_seed: pl.DataFrame, fig_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Write every figure as PNG under ``fig_dir``; returns {"curves": path, "ablation": path,
    "position": {label: path}, "budget": {label: path}, "notes": [...]}."""
    from tqdm.auto import tqdm

    from cppo_diag.analyses import plots_mpl

    fig_dir.mkdir(parents=True, exist_ok=True)
    an = data.analysis
    labels = data.labels()
    curves = _curves_long(data)
    bands = curve_bands(curves, an.confidence)
    out: dict[str, Any] = {"position": {}, "budget": {}, "notes": []}

    # Learning curves with seed bands: the main rules in one panel (the ablations get their own figure),
    # and every rule in small multiples with its seeds.
    main = [lab for lab in labels if lab.split("@")[0] not in an.ablation_rules or lab.split("@")[0] == an.reference]
    fig = plots_mpl.fig_learning_curves(bands, main or labels, threshold=an.threshold,
                                        title=f"Held-out accuracy, mean and {an.confidence:.0%} CI over seeds")
    out["curves"] = plots_mpl.save_png(fig, fig_dir / "learning_curves.png", dpi=120)
    fig = plots_mpl.fig_curves_by_rule(curves, bands, labels, confidence=an.confidence, threshold=an.threshold)
    out["curves_by_rule"] = plots_mpl.save_png(fig, fig_dir / "learning_curves_by_rule.png", dpi=110)

    # Fig. 5-style ablation: curves of CPPO and its ablations, plus the primary metric per seed.
    abl = [lab for lab in labels if lab.split("@")[0] in an.ablation_rules]
    if abl:
        metric = f"{an.primary}_acc"
        values = {lab: per_seed.filter(pl.col("label") == lab)[metric].to_numpy() for lab in abl}
        fig = plots_mpl.fig_ablation(bands, abl, values, {lab: t_interval(v, an.confidence) for lab, v in values.items()},
                                     metric_label=an.primary, confidence=an.confidence, threshold=an.threshold)
        out["ablation"] = plots_mpl.save_png(fig, fig_dir / "ablation.png", dpi=120)

    # Per rule: Fig. 2 (pooled over seeds) and Fig. 7 (mean over seeds of the per-step table).
    from cppo_diag.analyses import budget_exhaustion, position_stats
    from cppo_diag.analyses.updates import UPDATE_LABELS, default_updates
    from cppo_diag.masks import get_rule, rule_defaults

    cppo_defaults = rule_defaults("cppo")  # for the Fig. 2 overlay delta / w_t
    ref_params = {**cppo_defaults, **_params_of(data, "cppo")}
    n_runs = sum(e.run is not None and e.status == "finished" for e in data.entries)
    bar = tqdm(total=n_runs, desc="study figures (Fig. 2 / Fig. 7 per run)", unit="run", disable=not progress)
    for label in labels:
        entries = [e for e in data.entries if e.label == label and e.run is not None and e.status == "finished"]
        if not entries:
            continue
        rule = entries[0].rule
        slug = label.replace("@", "-")
        # Threshold overlay delta / w_t: the rule's own for CPPO variants with position weights, w = 1 for
        # no_weight, CPPO's reference schedule for every other rule (drawn for comparison only).
        # which overlay: the rule facts (cppo_diag/masks/registry.py), not the rule's name
        facts = get_rule(rule).facts
        own = facts.threshold in ("position", "shuffled") or (facts.prefix_budget and facts.threshold == "constant")
        params = {**cppo_defaults, **entries[0].rule_params} if own else ref_params
        if own and facts.threshold == "constant":  # a budget rule without position weights: w = 1
            params["w_min"] = 1.0
        pooled = _pooled_tokens(entries)
        updates = default_updates(pooled)
        table = position_stats(pooled, metrics=("tv",), bin_width=an.position_bin_width,
                               delta=params["delta"], w_min=params["w_min"], updates=updates)
        fig = plots_mpl.fig_position_divergence(
            table, metric="tv", tail="top10_mean",
            title=(f"{label}: |pi - mu| by position (Fig. 2 style)\n{len(entries)} seeds pooled, all steps, "
                   f"{UPDATE_LABELS[updates]}"),
        )
        out["position"][label] = plots_mpl.save_png(fig, fig_dir / f"position_{slug}.png", dpi=120)

        budget_rule = rule if rule in BUDGET_RULES else "cppo"
        budget_params = dict(entries[0].rule_params if rule in BUDGET_RULES else _params_of(data, "cppo"))
        by_step = []
        for e in entries:
            by_step.append(budget_exhaustion(e.run, params=budget_params or None, rule=budget_rule,
                                             updates=updates, progress=False).by_step)
            bar.update(1)
        fig = plots_mpl.fig_budget_by_step(
            pool_budget_by_step(by_step),
            title=(f"{label}: prefix budget (Fig. 7 style), {len(entries)} seeds pooled\n"
                   + ("as the trainer applied it" if rule in BUDGET_RULES else "CPPO recomputed offline on these rollouts")
                   + f"; {_SHORT_UPDATES[updates]}"),
        )
        out["budget"][label] = plots_mpl.save_png(fig, fig_dir / f"budget_{slug}.png", dpi=120)
    bar.close()
    return out


def write_effects_figure(ctab: ComparisonTable, an: AnalysisConfig, path: Path) -> Path | None:
    """Forest plot of the accuracy comparisons: reference minus each rule with its t interval, one panel per
    metric (primary first), the Holm p (whole table) beside each row. None when there is nothing to draw."""
    from cppo_diag.analyses import plots_mpl

    metrics = [m for m in ctab.metrics if ctab.by_metric(m)]
    if not metrics:
        return None
    panels = [{"title": _METRIC_NAMES.get(metric, metric), "xlabel": f"{an.reference} minus rule, {metric}",
               "rows": [{"label": f"vs {c.b} (n={c.n})", "mean": c.mean_diff, "lo": c.ci_lo, "hi": c.ci_hi,
                         "note": f"Holm p {_p(c.p_holm)}"} for c in ctab.by_metric(metric)]}
              for metric in metrics]
    return plots_mpl.save_png(plots_mpl.fig_effects(panels, confidence=an.confidence), path, dpi=120)


_SHORT_UPDATES = {"all": "all updates", "first": "first updates only", "after_first": "updates after the first",
                  "lagged": "tokens with lag > 0"}


def pool_budget_by_step(tables: list[pl.DataFrame]) -> pl.DataFrame:
    """Pool ``budget_exhaustion(...).by_step`` tables of several seeds per step: shares and fractions from
    the summed counts, delta_b_mean weighted by the number of responses."""
    if not tables:
        return pl.DataFrame(schema={"step": pl.Int64, "delta_b_mean": pl.Float64, "budget_share": pl.Float64})
    return (
        pl.concat(tables, how="diagonal_relaxed")
        .group_by("step")
        .agg(
            pl.col("n_valid", "n_masked", "n_budget", "n_resp").sum(),
            delta_b_sum=(pl.col("delta_b_mean") * pl.col("n_resp")).sum(),
        )
        .with_columns(
            masked_frac=pl.col("n_masked") / pl.col("n_valid"),
            budget_share=pl.when(pl.col("n_masked") > 0).then(pl.col("n_budget") / pl.col("n_masked")),
            delta_b_mean=pl.when(pl.col("n_resp") > 0).then(pl.col("delta_b_sum") / pl.col("n_resp")),
        )
        .drop("delta_b_sum")
        .sort("step")
    )


def _params_of(data: StudyData, rule: str) -> dict:
    for e in data.entries:
        if e.rule == rule:
            return dict(e.rule_params)
    return {}


# -- the results page ------------------------------------------------------------------------------------


def _f(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}"


def _p(x: float) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return "<0.001" if x < 0.001 else f"{x:.3f}"


def _updates_sentence(data: StudyData) -> str:
    """Which optimiser updates the token metrics and the Fig. 2 / Fig. 7 panels pool (per run's default)."""
    from cppo_diag.analyses.updates import UPDATE_LABELS

    used = sorted({e.tokens.get("updates") for e in data.entries if e.tokens.get("updates")})
    if not used:
        return ""
    if used == ["after_first"]:
        return ("These token metrics and the Fig. 2 / Fig. 7 panels pool the updates after the first of each "
                "batch (the runs record no lag, so this assumes on-policy sampling, where the first update "
                "holds only the engine mismatch).")
    if used == ["lagged"]:
        return ("These token metrics and the Fig. 2 / Fig. 7 panels pool the tokens the policy had moved on since "
                "sampling (recorded lag > 0): with stale rollouts, every update of a batch.")
    return ("These token metrics and the Fig. 2 / Fig. 7 panels pool "
            + "; ".join(f"{UPDATE_LABELS[u]} (`{u}`)" for u in used) + ".")


def _significant(c, holm: float) -> bool:
    return not math.isnan(holm) and holm < 0.05


def _verdict(c: PairedComparison) -> str:
    if c.n < 2 or math.isnan(c.ci_lo):
        return f"{c.a} vs {c.b}: too few paired seeds ({c.n}) to say anything."
    direction = "higher" if c.mean_diff > 0 else "lower"
    base = (
        f"{c.a} vs {c.b} ({c.metric}): {c.a} is {_f(abs(c.mean_diff))} {direction} on average over {c.n} seeds "
        f"({c.confidence:.0%} CI {_f(c.ci_lo)} to {_f(c.ci_hi)}; {c.wins} wins, {c.losses} losses; "
        f"d_z = {_f(c.cohens_dz, 2)})"
    )
    tests = (f"paired t-test p = {_p(c.p_ttest)}, Holm {_p(c.p_holm)}; sign-flip p = {_p(c.p_sign_flip)}, "
             f"Holm {_p(c.p_holm_sign_flip)}")
    if c.ci_lo > 0 or c.ci_hi < 0:
        strength = f"the interval excludes zero ({tests})"
        if not _significant(c, c.p_holm):
            strength += ", but the difference does not survive the Holm correction over the whole table"
        return base + f": {strength}."
    return base + f": the interval includes zero ({tests}), so this study cannot tell the two apart at this scale."


_SETTINGS_KEYS = ("steps", "threads", "model.kind", "model.init", "model.path", "task.kind", "task.reward",
                  "task.min_terms", "task.max_terms", "task.forks", "task.detour_credit", "task.eval_size",
                  "rollout.prompts_per_step", "rollout.n", "rollout.max_new_tokens", "rollout.temperature",
                  "rollout.staleness", "rollout.precision", "optim.lr", "optim.warmup_steps", "optim.schedule",
                  "optim.epochs", "optim.updates_per_batch", "optim.adv_std_norm", "optim.agg", "log.eval_every",
                  "log.eval_k")


def _settings_summary(cfg: dict) -> str:
    """``key = value`` lines for the bundled trainer's main settings present in a resolved config."""
    lines = []
    for key in _SETTINGS_KEYS:
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and node != "":
            lines.append(f"{key} = {node!r}")
    return "\n".join(lines) if lines else "(no recognised settings)"


# What the CPPO paper reports for "CPPO minus X" (Table 1: CPPO > DPPO > GRPO on every model; Fig. 5: each
# ablation below full CPPO). Used only to say whether this study agrees, not as a target.
PAPER_DIRECTION = {
    "grpo_clip": "Table 1: CPPO above GRPO on all four models",
    "dppo": "Table 1: CPPO above DPPO on all four models",
    "cppo_no_weight": "Fig. 5: removing the position weight hurts",
    "cppo_no_budget": "Fig. 5: removing the prefix budget hurts",
    "cppo_shuffled": "Fig. 5: shuffling the position weights hurts",
}


def _ordering_status(c: PairedComparison) -> str:
    """"agrees" / "reversed" / "inconclusive" / "too few" for one CPPO-minus-X comparison: agreement or
    reversal needs the t interval to exclude zero *and* the Holm-adjusted p (whole table) below 0.05."""
    if c.n < 2 or math.isnan(c.ci_lo):
        return "too few"
    if c.ci_lo > 0 and _significant(c, c.p_holm):
        return "agrees"
    if c.ci_hi < 0 and _significant(c, c.p_holm):
        return "reversed"
    return "inconclusive"


def _primary_label(per_seed: pl.DataFrame, an: AnalysisConfig) -> str:
    if an.primary == "best":
        return "best-so-far held-out accuracy (a maximum over evaluations: biased upward)"
    steps = per_seed["final_steps"].drop_nulls().unique()
    where = f", steps {steps[0].replace(',', ', ')}" if steps.len() == 1 else ""
    n = len(steps[0].split(",")) if steps.len() == 1 else an.final_window
    return f"final held-out accuracy (mean of the last {n} evaluations{where})"


def headline(per_seed: pl.DataFrame, table: list[dict], ctab: ComparisonTable, an: AnalysisConfig) -> str:
    """The page's first paragraph: whether CPPO's ordering (above GRPO-clip and DPPO; each ablation below
    CPPO) holds, the effects with their intervals and Holm p, and each rule's masked fraction and budget share."""
    conf = f"{an.confidence:.0%}"
    primary = f"{an.primary}_acc"
    comps = [c for c in ctab.by_metric(primary) if c.b.split("@")[0] in PAPER_DIRECTION]
    if an.reference != "cppo" or not comps:
        opening = ("This study does not test CPPO's ordering: it needs `cppo` as the reference and at least one of "
                   f"{', '.join(f'`{r}`' for r in PAPER_DIRECTION)}.")
    else:
        status = [_ordering_status(c) for c in comps]
        if "too few" in status:
            verdict = "cannot be assessed (too few paired seeds)"
        elif all(s == "agrees" for s in status):
            verdict = "holds"
        elif "reversed" in status:
            verdict = "does not hold"
        else:
            verdict = "is inconclusive"
        missing = [r for r in PAPER_DIRECTION if r not in {c.b.split("@")[0] for c in comps}]
        scope = ""
        if missing:  # a partial grid tests only part of the ordering: say which part
            if verdict == "holds":
                verdict = "holds for the rules this study ran"
            scope = f" (not run here: {', '.join(f'`{r}`' for r in missing)})"
        effects = "; ".join(
            f"vs `{c.b}` {c.mean_diff:+.3f} [{_f(c.ci_lo)}, {_f(c.ci_hi)}], Holm p {_p(c.p_holm)} ({s})"
            for c, s in zip(comps, status)
        )
        n_pairs = sorted({c.n for c in comps})
        opening = (
            f"**In this regime CPPO's ordering (above GRPO-clip and DPPO; each ablation below CPPO) {verdict}**"
            f"{scope}, on the {_primary_label(per_seed, an)}. CPPO minus each rule, paired over "
            f"{'/'.join(map(str, n_pairs))} seeds, with the {conf} t interval and the Holm-adjusted p over all "
            f"{ctab.family_size} comparisons of the table: {effects}."
        )
    rules = []
    for r in table:
        mf, bs = r["masked_frac"], r["budget_share"]
        if not mf.n:
            continue
        share = f"budget share {bs.mean:.0%}" if bs.n and bs.mean > 0 else "no budget masking"
        rules.append(f"`{r['label']}` {mf.mean:.2%} ({share})")
    upd = sorted({u for u in per_seed["updates"].drop_nulls().unique()})
    pooled = {"after_first": "updates after the first of each batch",
              "lagged": "tokens the policy had moved on since sampling (lag > 0)"}.get(upd[0] if len(upd) == 1 else "",
                                                                                        "all updates")
    doing = (f" What the rules did (masked fraction of the tokens, mean over seeds, {pooled}; of the masked tokens, "
             f"the share masked by the prefix budget alone): {'; '.join(rules)}.") if rules else ""
    return opening + doing + _control_sentence(table, ctab, an)


# Rules with no trust region at all (SPEC "pg_is": keep every token, unclipped ratio): a study's control.
NO_TRUST_REGION = ("pg_is",)


def _control_sentence(table: list[dict], ctab: ComparisonTable, an: AnalysisConfig) -> str:
    """What the no-trust-region control did: its held-out accuracy before -> after, and how far each other rule
    ended above or below it (the reference's paired difference where the table has one)."""
    primary = f"{an.primary}_acc"
    conf = f"{an.confidence:.0%}"
    out = []
    others = [o for o in table if o["rule"] not in NO_TRUST_REGION and o[primary].n]
    for r in table:
        if r["rule"] not in NO_TRUST_REGION or not r[primary].n:
            continue
        ini, fin = r["initial_acc"], r[primary]
        above = sum(o[primary].mean > fin.mean for o in others)
        text = (f" The no-trust-region control `{r['label']}`: held-out accuracy {_f(ini.mean)} at the start, "
                f"{_f(fin.mean)} final ({conf} CI {_f(fin.lo)} to {_f(fin.hi)}, {fin.n} seeds); {above} of the "
                f"{len(others)} other rules ended above it on average")
        vs = next((c for c in ctab.by_metric(primary) if c.b == r["label"]), None)
        if vs is not None:
            text += (f", the reference `{vs.a}` by {vs.mean_diff:+.3f} [{_f(vs.ci_lo)}, {_f(vs.ci_hi)}], "
                     f"Holm p {_p(vs.p_holm)}")
        out.append(text + ".")
    return "".join(out)


def _summary_lines(per_seed: pl.DataFrame, table: list[dict], ctab: ComparisonTable,
                   an: AnalysisConfig) -> list[str]:
    """The plain-words summary: ranking, and for each comparison on the primary metric whether it agrees with
    the paper (interval excluding zero and Holm p < 0.05 over the whole table)."""
    metric = f"{an.primary}_acc"
    L = ["## Summary\n"]
    ranked = sorted((r for r in table if r[metric].n), key=lambda r: -r[metric].mean)
    if ranked:
        L.append(
            f"Ranking by mean {_primary_label(per_seed, an)}: "
            + ", ".join(f"`{r['label']}` {r[metric].mean:.3f}" for r in ranked)
            + ". Differences between these means are only meaningful where the comparisons below exclude zero "
            "and survive the Holm correction.\n"
        )
    comps = ctab.by_metric(metric)
    if an.reference == "cppo" and comps:
        L.append(f"Against the paper, on the primary metric (CPPO minus each rule, paired by seed):\n")
        words = {"agrees": "**agrees**", "reversed": "**contradicts**", "inconclusive": "**inconclusive**"}
        for c in comps:
            claim = PAPER_DIRECTION.get(c.b.split("@")[0])
            if claim is None:
                continue
            s = _ordering_status(c)
            if s == "too few":
                verdict = f"too few paired seeds ({c.n}) to compare"
            else:
                verdict = (f"{words[s]}: difference {c.mean_diff:+.3f} ({c.confidence:.0%} CI {_f(c.ci_lo)} to "
                           f"{_f(c.ci_hi)}; Holm p {_p(c.p_holm)})")
            L.append(f"- vs `{c.b}` ({claim}): {verdict}.")
        L.append(
            "\nThe paper's runs are Qwen3 models (1.7B-30B) with 8k-16k-token answers on competition math; a result "
            "from another model, task or scale (see the settings above) neither confirms nor refutes the paper in "
            "its own setting. It says what these rules did here.\n"
        )
    return L


_METRIC_NAMES = {
    "final_acc": "final acc (primary)",
    "best_acc": "best-so-far acc (secondary, biased upward)",
    "last_acc": "last evaluation acc",
}


def _comparison_lines(ctab: ComparisonTable, an: AnalysisConfig, tau: float) -> list[str]:
    conf = f"{an.confidence:.0%}"
    n_max = max((c.n for c in ctab.paired), default=0)
    m = ctab.family_size
    L = [f"## Comparisons: `{an.reference}` vs each rule\n"]
    floor = 2.0 / 2**n_max if n_max else float("nan")
    sf_note = (
        f" With {n_max} pairs the exact sign-flip test's smallest p is {_p(floor)}; times the {m} comparisons of "
        f"the family that is {_p(min(1.0, m * floor))}"
        + (", so no sign-flip comparison can survive Holm at 0.05 here." if m * floor >= 0.05 else ".")
        if n_max else ""
    )
    L.append(
        "Same seeds, so each pair shares its initial model and prompts. diff = reference minus other "
        f"(positive: `{an.reference}` higher; for steps, negative: `{an.reference}` gets there sooner). "
        f"t CI: {conf} Student-t interval of the paired differences; t: paired two-sided t-test; sign-flip: exact "
        "permutation test of the paired differences (all 2^n sign assignments), free of the normality assumption; "
        f"BCa: bias-corrected and accelerated bootstrap interval, given only from {MIN_BOOT_PAIRS} pairs on (below "
        "that every bootstrap interval is too narrow); d_z = mean(diff) / sd(diff). **Holm adjusts every row of "
        f"this table together** ({m} comparisons: every rule, every metric); the steps rows use a z-test in both "
        f"Holm columns.{sf_note}\n"
    )
    L.append(f"| metric | vs | pairs | mean diff ({conf} t CI) | BCa CI | p (t) | p (sign-flip) | Holm p (t) | "
             "Holm p (sign-flip) | d_z | wins/losses |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in ctab.paired:
        bca = (f"[{_f(c.bca_lo)}, {_f(c.bca_hi)}]" if not math.isnan(c.bca_lo)
               else (f"n/a (< {MIN_BOOT_PAIRS} pairs)" if c.n < MIN_BOOT_PAIRS else "n/a"))
        sf = _p(c.p_sign_flip) + ("" if c.sign_flip_exact else " (Monte Carlo)")
        L.append(
            f"| {_METRIC_NAMES.get(c.metric, c.metric)} | `{c.b}` | {c.n} | {_f(c.mean_diff)} [{_f(c.ci_lo)}, "
            f"{_f(c.ci_hi)}] | {bca} | {_p(c.p_ttest)} | {sf} | {_p(c.p_holm)} | {_p(c.p_holm_sign_flip)} | "
            f"{_f(c.cohens_dz, 2)} | {c.wins}/{c.losses} |"
        )
    for c in ctab.steps:
        L.append(
            f"| steps to {an.threshold} (KM restricted mean to step {tau:g}) | `{c.b}` | {c.n_a}/{c.n_b} seeds | "
            f"{_f(c.diff, 1)} [{_f(c.ci_lo, 1)}, {_f(c.ci_hi, 1)}] (z) | - | {_p(c.p)} (z) | - | {_p(c.p_holm)} | "
            f"{_p(c.p_holm)} | - | - |"
        )
    L.append("")
    for c in ctab.by_metric(f"{an.primary}_acc"):
        L.append(f"- {_verdict(c)}")
    L.append("")
    return L


def write_results(
    data: StudyData,
    out_md: str | Path,
    *,
    per_seed: pl.DataFrame | None = None,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Write the results page ``out_md`` and its figures in ``<out_md without suffix>/`` (``docs/results.md``
    -> ``docs/results/``). Every number comes from the runs under ``data.root``."""
    out_md = Path(out_md)
    fig_dir = out_md.with_suffix("")
    an = data.analysis
    per_seed = per_seed if per_seed is not None else per_seed_metrics(data)
    table = results_table(per_seed, an.confidence)
    figs = write_figures(data, per_seed, fig_dir, progress=progress)
    secondary = "best_acc" if an.primary == "final" else "final_acc"
    ctab = comparison_table(per_seed, reference=an.reference, metrics=(f"{an.primary}_acc", secondary),
                            confidence=an.confidence, n_boot=an.n_boot)
    tau = threshold_horizon(per_seed)
    effects = write_effects_figure(ctab, an, fig_dir / "effects.png")
    per_seed.write_csv(fig_dir / "per_seed.csv")
    rel = lambda p: f"{fig_dir.name}/{Path(p).name}"  # noqa: E731
    m = data.manifest
    n_present = sum(e.run is not None for e in data.entries)
    statuses = {}
    for e in data.entries:
        statuses[e.status] = statuses.get(e.status, 0) + 1
    conf = f"{an.confidence:.0%}"

    L: list[str] = []
    L.append(f"# Study results: `{m['study']}`\n")
    L.append(headline(per_seed, table, ctab, an) + "\n")
    L.append(
        "Generated by `cppo-diag study` from the runs under "
        f"`{data.root}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Every number on this page, the "
        "paragraph above included, comes from those runs; nothing is typed in by hand.\n"
        + (f"\nReproduce with:\n\n```bash\n{command}\n```\n" if command else "")
    )
    if m.get("description"):
        L.append(f"{m['description']}\n")
    L.append(
        f"Grid: rules {', '.join(f'`{r}`' for r in m['rules'])} x seeds {m['seeds']} "
        f"({len(m['cells'])} runs, {m['steps']} steps each). Runs found: {n_present}/{len(m['cells'])} "
        f"(status: {', '.join(f'{k} {v}' for k, v in sorted(statuses.items()))}). Held-out accuracy is the "
        f"scalar `{an.accuracy}`. The primary metric is the {_primary_label(per_seed, an)}; the best-so-far "
        "accuracy is secondary and biased upward (a maximum over noisy evaluations). Steps to "
        f"{an.threshold}: Kaplan-Meier restricted mean up to step {_f(tau, 0)}, a seed that never reaches it "
        f"counted as censored at its last evaluation. Intervals are {conf} Student-t intervals over seeds unless "
        "said otherwise.\n"
    )

    cfg = next((e.run.meta.config for e in data.entries if e.run is not None and e.run.meta.config), None)
    if cfg:
        L.append("Trainer settings shared by the runs (from the first run's `meta.json`; the full resolved config "
                 "of every run is in its `meta.json`):\n")
        L.append("```\n" + _settings_summary(cfg) + "\n```\n")
    secs = [e.train_seconds for e in data.entries if not math.isnan(e.train_seconds)]
    if secs:
        L.append(f"Training time: {sum(secs) / 60:.1f} min summed over {len(secs)} runs "
                 f"(median {float(np.median(secs)) / 60:.1f} min per run; trainer's `time/step_s`).\n")
    L += _summary_lines(per_seed, table, ctab, an)
    L.append("## Results per rule\n")
    L.append(
        f"| rule | seeds | initial acc | final acc, primary ({conf} CI) | best-so-far acc, biased ({conf} CI) | "
        f"steps to {an.threshold}: reached; KM restricted mean ({conf} CI) | masked frac | budget share | "
        "mean abs(pi - mu) |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        L.append(
            f"| `{r['label']}` | {r['n_with_data']}/{r['n_runs']} | {r['initial_acc'].fmt()} | {r['final_acc'].fmt()} | "
            f"{r['best_acc'].fmt()} | {r['reached']}/{r['n_with_data']}; {r['rmst'].fmt(1)} | "
            f"{r['masked_frac'].fmt(4)} | {r['budget_share'].fmt(3)} | {r['mean_tv'].fmt(4)} |"
        )
    L.append(
        "\n*masked frac*: tokens the trainer masked / valid tokens (`keep_applied`). "
        "*budget share*: of the masked tokens, those masked by the prefix budget only (`reason_applied` = "
        "budget; CPPO paper Fig. 7). *mean abs(pi - mu)*: mean over the logged tokens of the current-vs-rollout "
        f"probability gap. {_updates_sentence(data)} *KM restricted mean*: area under the Kaplan-Meier curve of "
        f"'not yet at {an.threshold}' up to step {_f(tau, 0)} (normal interval, Greenwood-type variance); equal "
        "to the mean first step at the threshold when every seed gets there. "
        f"Per-seed values: [`{rel(fig_dir / 'per_seed.csv')}`]({rel(fig_dir / 'per_seed.csv')}).\n"
    )
    L += _comparison_lines(ctab, an, tau)

    L.append("## Figures\n")
    if effects is not None:
        L.append(f"Effect sizes: `{an.reference}` minus each rule, paired by seed, with the {conf} t interval (green: "
                 "above zero, red: below, grey: includes zero) and the Holm p over the whole comparison table:\n\n"
                 f"![effect sizes]({rel(effects)})\n")
    L.append(f"Learning curves (mean and {conf} CI band over seeds, clipped to [0, 1]):\n\n"
             f"![learning curves]({rel(figs['curves'])})\n")
    L.append(f"Every rule with its individual seeds:\n\n![learning curves by rule]({rel(figs['curves_by_rule'])})\n")
    if "ablation" in figs:
        L.append(
            "CPPO ablations, paper Fig. 5 style (left: curves; right: per-seed "
            f"{an.primary} accuracy with mean and CI):\n\n![ablation]({rel(figs['ablation'])})\n"
        )
    L.append(
        "Per rule, paper Fig. 2 style: |pi - mu| by token position, mean and top-decile mean (tokens pooled "
        "over seeds and all steps, keyed by run), with CPPO's per-position threshold delta / w_t on the same axis; "
        "and paper Fig. 7 style: per step, the realised delta_b and the budget-mask share (pooled over seeds). "
        f"{_updates_sentence(data)} For rules without a prefix budget the Fig. 7 panel shows what CPPO's budget "
        "would have done on that rule's own rollouts (offline recompute), not something the trainer applied.\n"
    )
    for label in figs["position"]:
        L.append(f"### `{label}`\n")
        L.append(f"![{label} position]({rel(figs['position'][label])}) ![{label} budget]({rel(figs['budget'][label])})\n")

    L.append("## The paper's numbers, for context\n")
    L.append(
        "CPPO paper Table 1 (best AIME24/25/26 Avg@16, %, Qwen3 models with 8k-16k-token responses). These "
        "are not targets: this study trains a different model on a different task at a far smaller scale, "
        "and says only what its own runs show.\n"
    )
    L.append("| model | GRPO | DPPO | CPPO |")
    L.append("|---|---|---|---|")
    for row in PAPER_TABLE1:
        L.append(f"| {row[0]} | {row[1]:.2f} | {row[2]:.2f} | {row[3]:.2f} |")
    L.append("")
    L.append("## Caveats\n")
    L.append(
        "- Few seeds give wide intervals; an interval that includes zero means *no evidence either way at this "
        "scale*, not *no difference*.\n"
        "- *best-so-far* accuracy is a maximum over noisy evaluations and is biased upward (and hides a late "
        "decline); it is tabled as a secondary metric only. *final* averages the last evaluations.\n"
        "- Holm controls the family-wise error over the whole comparison table; the t intervals themselves are "
        "not widened for multiplicity.\n"
        "- Each rule was run at the study config's parameters; no rule was tuned on these results.\n"
    )
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(L) + "\n")
    return out_md


def analyse_study(root: str | Path, out_md: str | Path, *, analysis: AnalysisConfig | None = None,
                  progress: bool = True, command: str | None = None) -> Path:
    """Collect the runs under ``root`` and write the results page and figures (one call)."""
    data = collect_study(root, analysis)
    return write_results(data, out_md, progress=progress, command=command)
