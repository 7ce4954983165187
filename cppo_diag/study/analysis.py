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
* ``final_acc``: at the last evaluated step. ``best_acc``: the maximum over evaluated steps (what the
  paper's Table 1 reports; note it is biased upward by evaluation noise, equally for every rule).
* ``steps_to_threshold``: first evaluated step with accuracy >= threshold; NaN (censored) if never.
  The table gives how many seeds reached it and the mean over those that did.
* ``masked_frac``: masked / valid tokens (``keep_applied``).
* ``budget_share``: budget-masked / masked (``reason_applied == 2``), NaN when nothing was masked.
* ``mean_tv``: mean |pi - mu| over the logged tokens.

The token metrics and the Fig. 2 / Fig. 7 diagnostics pool the updates ``analyses.updates.default_updates``
selects: for runs with several updates per batch only the updates after the first (in the first, pi = mu, and
pooling it would halve mean |pi - mu| and the masked fraction), else every update. The results page says
which. Pooled token frames carry a ``run`` column, so responses of different seeds never merge.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cppo_diag.study.config import AnalysisConfig
from cppo_diag.study.runner import read_manifest
from cppo_diag.study.stats import Interval, PairedComparison, holm_adjust, paired_comparison, t_interval

__all__ = [
    "StudyData",
    "collect_study",
    "token_summary",
    "per_seed_metrics",
    "results_table",
    "paired_comparisons",
    "write_figures",
    "pool_budget_by_step",
    "write_results",
    "analyse_study",
]

METRICS = ("initial_acc", "final_acc", "best_acc", "steps_to_threshold", "masked_frac", "budget_share", "mean_tv")
REASON_BUDGET = 2  # cppo_diag.storage.schema.REASONS
CPPO_DEFAULTS = {"delta": 0.15, "w_min": 0.8}  # SPEC.md CPPO defaults, for the Fig. 2 overlay
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
    from analyses import load_tokens, with_divergences
    from analyses.updates import filter_updates, resolve_updates

    updates = resolve_updates(source, updates)
    lf = with_divergences(filter_updates(load_tokens(source), updates))
    cols = lf.collect_schema().names()
    aggs = [pl.len().alias("n_tokens"), pl.col("tv").mean().alias("mean_tv")]
    if "keep_applied" in cols:
        aggs.append((~pl.col("keep_applied")).sum().alias("n_masked"))
    if "reason_applied" in cols:
        aggs.append((pl.col("reason_applied") == REASON_BUDGET).sum().alias("n_budget"))
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
    meta = run.meta or {}
    cfg = meta.get("config") or {}
    every = (cfg.get("log") or {}).get("eval_every")
    total = cfg.get("steps")
    if meta.get("trainer") != "cppo-diag" or every is None or total is None:
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
    before = f"summary/{scalar.split('/', 1)[-1]}_before"
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
                e.status = str(e.run.meta.get("status", "unknown"))
                e.curve = _accuracy_curve(e.run, analysis.accuracy)
                steps = e.run.steps()
                if "time/step_s" in steps.columns:
                    e.train_seconds = float(steps["time/step_s"].drop_nulls().sum())
                e.tokens = token_summary(e.run)
        entries.append(e)
    return StudyData(root=root, manifest=manifest, analysis=analysis, entries=entries)


def per_seed_metrics(data: StudyData) -> pl.DataFrame:
    """One row per grid cell: label, rule, setting, seed, status and the metrics of ``METRICS``."""
    thr = data.analysis.threshold
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
            row.update(
                initial_acc=float(acc[0]), final_acc=float(acc[-1]), best_acc=float(acc.max()),
                steps_to_threshold=float(steps[hit[0]]) if hit.size else nan, last_step=int(steps[-1]),
            )
        else:
            row.update(initial_acc=nan, final_acc=nan, best_acc=nan, steps_to_threshold=nan, last_step=None)
        tok = e.tokens if e.status == "finished" else {}
        row.update(
            updates=tok.get("updates"),
            masked_frac=tok.get("masked_frac", nan),
            budget_share=tok.get("budget_share", nan),
            mean_tv=tok.get("mean_tv", nan),
        )
        rows.append(row)
    return pl.DataFrame(rows, schema_overrides={m: pl.Float64 for m in METRICS} | {"last_step": pl.Int64,
                                                                                   "updates": pl.Utf8})


def results_table(per_seed: pl.DataFrame, confidence: float = 0.95) -> list[dict[str, Any]]:
    """Per label: n runs with data, a t-interval per metric, and seeds reaching the threshold."""
    out = []
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
        row["reached"] = int(sub["steps_to_threshold"].is_not_nan().sum())
        out.append(row)
    return out


def paired_comparisons(
    per_seed: pl.DataFrame, *, reference: str, metric: str, confidence: float = 0.95, n_boot: int = 10_000
) -> list[PairedComparison]:
    """``reference`` vs every other rule of the same setting on ``metric``, paired by seed, Holm-adjusted
    over the family of comparisons of that setting."""
    out: list[PairedComparison] = []
    for setting in per_seed["setting"].unique(maintain_order=True):
        sub = per_seed.filter(pl.col("setting") == setting)
        ref = sub.filter(pl.col("rule") == reference)
        if ref.height == 0:
            continue
        family = []
        for rule in sub["rule"].unique(maintain_order=True):
            if rule == reference:
                continue
            other = sub.filter(pl.col("rule") == rule)
            joined = ref.select("seed", pl.col(metric).alias("a")).join(
                other.select("seed", pl.col(metric).alias("b")), on="seed", how="inner"
            ).sort("seed")
            ref_label = f"{reference}@{setting}" if setting else reference
            other_label = f"{rule}@{setting}" if setting else rule
            family.append(
                paired_comparison(
                    joined["a"].to_numpy(), joined["b"].to_numpy(), name_a=ref_label, name_b=other_label,
                    metric=metric, confidence=confidence, n_boot=n_boot,
                )
            )
        adj = holm_adjust([c.p_ttest for c in family])
        out += [PairedComparison(**{**c.as_dict(), "p_holm": float(p)}) for c, p in zip(family, adj)]
    return out


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


def _curve_band(curves: pl.DataFrame, label: str, confidence: float):
    sub = curves.filter(pl.col("label") == label)
    steps, mean, lo, hi, n = [], [], [], [], []
    for (step,), g in sub.group_by("step", maintain_order=True):
        iv = t_interval(g["accuracy"].to_numpy(), confidence)
        steps.append(step), mean.append(iv.mean), lo.append(iv.lo), hi.append(iv.hi), n.append(iv.n)
    order = np.argsort(steps)
    return tuple(np.asarray(v, dtype=float)[order] for v in (steps, mean, lo, hi, n))


def _plot_curves(ax, curves: pl.DataFrame, labels, confidence: float, threshold: float | None = None):
    """Mean over seeds per evaluation with its t-interval as a band (clipped to [0, 1]: accuracies)."""
    for label in labels:
        if curves.filter(pl.col("label") == label).height == 0:
            continue
        steps, mean, lo, hi, n = _curve_band(curves, label, confidence)
        (line,) = ax.plot(steps, mean, marker="o", ms=3, label=f"{label} (n={int(n.max()) if n.size else 0})", lw=1.6)
        ok = np.isfinite(lo)
        ax.fill_between(steps[ok], np.clip(lo[ok], 0, 1), np.clip(hi[ok], 0, 1), color=line.get_color(),
                        alpha=0.15, lw=0)
    if threshold is not None:
        ax.axhline(threshold, color="0.5", ls=":", lw=1)
    ax.set_xlabel("RL iterations completed")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_small_multiples(curves: pl.DataFrame, labels, confidence: float, threshold: float | None):
    """One panel per rule: every seed as a thin line, the mean and its band on top; shared axes."""
    import matplotlib.pyplot as plt

    ncol = min(3, max(1, len(labels)))
    nrow = -(-len(labels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), sharex=True, sharey=True, squeeze=False)
    for ax, label in zip(axes.flat, labels):
        sub = curves.filter(pl.col("label") == label)
        for (seed,), g in sub.group_by("seed", maintain_order=True):
            g = g.sort("step")
            ax.plot(g["step"].to_numpy(), g["accuracy"].to_numpy(), lw=0.8, color="0.6", alpha=0.8)
        if sub.height:
            steps, mean, lo, hi, n = _curve_band(curves, label, confidence)
            ax.plot(steps, mean, lw=2, color="C0")
            ok = np.isfinite(lo)
            ax.fill_between(steps[ok], np.clip(lo[ok], 0, 1), np.clip(hi[ok], 0, 1), color="C0", alpha=0.2, lw=0)
        if threshold is not None:
            ax.axhline(threshold, color="0.5", ls=":", lw=1)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(labels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("RL iterations completed")
    for ax in axes[:, 0]:
        ax.set_ylabel("held-out accuracy")
    fig.suptitle(f"Per rule: each seed (grey), mean and {confidence:.0%} CI (blue)", fontsize=11)
    fig.tight_layout()
    return fig


def _pooled_tokens(entries: list[RunEntry]):
    """The token rows of several runs (seeds) in one LazyFrame, keyed by run: a ``run`` column (the run
    name) tells apart responses that share (step, update, rank, seq_id), so each keeps its own length T in
    the delta / w_t overlay (``analyses.position.sequence_key``)."""
    from analyses import load_tokens
    from analyses.position import RUN_KEY

    frames = [load_tokens(e.run).with_columns(pl.lit(e.run_name).alias(RUN_KEY)) for e in entries if e.run is not None]
    if not frames:
        return None
    return pl.concat(frames, how="diagonal_relaxed")


def write_figures(data: StudyData, per_seed: pl.DataFrame, fig_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Write every figure as PNG under ``fig_dir``; returns {"curves": path, "ablation": path,
    "position": {label: path}, "budget": {label: path}, "notes": [...]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    fig_dir.mkdir(parents=True, exist_ok=True)
    an = data.analysis
    labels = data.labels()
    curves = _curves_long(data)
    out: dict[str, Any] = {"position": {}, "budget": {}, "notes": []}

    # Learning curves with seed bands: the main rules in one panel (the ablations get their own figure),
    # and every rule in small multiples with its seeds.
    main = [lab for lab in labels if lab.split("@")[0] not in an.ablation_rules or lab.split("@")[0] == an.reference]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    _plot_curves(ax, curves, main or labels, an.confidence, an.threshold)
    ax.set_title(f"Held-out accuracy, mean and {an.confidence:.0%} CI over seeds")
    fig.tight_layout()
    out["curves"] = fig_dir / "learning_curves.png"
    fig.savefig(out["curves"], dpi=120)
    plt.close(fig)
    fig = _plot_small_multiples(curves, labels, an.confidence, an.threshold)
    out["curves_by_rule"] = fig_dir / "learning_curves_by_rule.png"
    fig.savefig(out["curves_by_rule"], dpi=110)
    plt.close(fig)

    # Fig. 5-style ablation: curves of CPPO and its ablations, plus the primary metric per seed.
    abl = [lab for lab in labels if lab.split("@")[0] in an.ablation_rules]
    if abl:
        metric = f"{an.primary}_acc"
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
        _plot_curves(ax1, curves, abl, an.confidence, an.threshold)
        ax1.set_title("CPPO ablations (paper Fig. 5 style)")
        for i, lab in enumerate(abl):
            vals = per_seed.filter(pl.col("label") == lab)[metric].to_numpy()
            iv = t_interval(vals, an.confidence)
            ok = ~np.isnan(vals)
            ax2.scatter(np.full(ok.sum(), i) + np.linspace(-0.12, 0.12, max(ok.sum(), 1))[: ok.sum()], vals[ok],
                        s=14, color="0.4", zorder=3)
            if iv.n:
                err = None if iv.n < 2 else [[iv.mean - iv.lo], [iv.hi - iv.mean]]
                ax2.errorbar([i], [iv.mean], yerr=err, fmt="o", ms=8, capsize=6, lw=2, zorder=4)
        ax2.set_xticks(range(len(abl)), abl, rotation=20, fontsize=8)
        ax2.set_xlim(-0.6, len(abl) - 0.4)
        ax2.set_ylabel(f"{an.primary} held-out accuracy")
        ax2.set_title(f"{an.primary} accuracy per seed, mean and {an.confidence:.0%} CI")
        ax2.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        out["ablation"] = fig_dir / "ablation.png"
        fig.savefig(out["ablation"], dpi=120)
        plt.close(fig)

    # Per rule: Fig. 2 (pooled over seeds) and Fig. 7 (mean over seeds of the per-step table).
    from analyses import budget_exhaustion, position_stats
    from analyses import plots_mpl
    from analyses.updates import UPDATE_LABELS, default_updates

    ref_params = {**CPPO_DEFAULTS, **_params_of(data, "cppo")}
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
        params = {**CPPO_DEFAULTS, **entries[0].rule_params} if rule.startswith("cppo") else ref_params
        if rule == "cppo_no_weight":
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
        out["position"][label] = fig_dir / f"position_{slug}.png"
        fig.savefig(out["position"][label], dpi=120)
        plt.close(fig)

        budget_rule = rule if rule in BUDGET_RULES else "cppo"
        budget_params = dict(entries[0].rule_params if rule in BUDGET_RULES else _params_of(data, "cppo"))
        by_step = []
        for e in entries:
            by_step.append(budget_exhaustion(e.run, params=budget_params or None, rule=budget_rule,
                                             updates=updates, progress=False).by_step)
            bar.update(1)
        fig = plots_mpl.fig_budget_by_step(
            pool_budget_by_step(by_step),
            title=(f"{label}: prefix budget (Fig. 7 style)\n"
                   + ("as the trainer applied it" if rule in BUDGET_RULES else "CPPO recomputed offline on these rollouts")
                   + f", {len(entries)} seeds pooled, {UPDATE_LABELS[updates]}"),
        )
        out["budget"][label] = fig_dir / f"budget_{slug}.png"
        fig.savefig(out["budget"][label], dpi=120)
        plt.close(fig)
    bar.close()
    return out


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
    from analyses.updates import UPDATE_LABELS

    used = sorted({e.tokens.get("updates") for e in data.entries if e.tokens.get("updates")})
    if not used:
        return ""
    if used == ["after_first"]:
        return ("These token metrics and the Fig. 2 / Fig. 7 panels pool the updates after the first of each "
                "batch: the runs take several updates per batch, and in the first one pi = mu (nothing to mask), "
                "so pooling it would dilute both.")
    return ("These token metrics and the Fig. 2 / Fig. 7 panels pool: "
            + "; ".join(f"{u}: {UPDATE_LABELS[u]}" for u in used) + ".")


def _verdict(c: PairedComparison, higher_is_better: bool = True) -> str:
    if c.n < 2 or math.isnan(c.ci_lo):
        return f"{c.a} vs {c.b}: too few paired seeds ({c.n}) to say anything."
    diff = c.mean_diff if higher_is_better else -c.mean_diff
    direction = "higher" if diff > 0 else "lower"
    base = (
        f"{c.a} vs {c.b} ({c.metric}): {c.a} is {_f(abs(c.mean_diff))} {direction} on average over {c.n} seeds "
        f"(95% CI {_f(c.ci_lo)} to {_f(c.ci_hi)}; {c.wins} wins, {c.losses} losses; d_z = {_f(c.cohens_dz, 2)})"
    )
    tests = f"paired t-test p = {_p(c.p_ttest)}, Holm {_p(c.p_holm)}, sign-flip p = {_p(c.p_sign_flip)}"
    if c.ci_lo > 0 or c.ci_hi < 0:
        strength = f"the interval excludes zero ({tests})"
        if not math.isnan(c.p_holm) and c.p_holm >= 0.05:
            strength += ", but the difference does not survive the Holm correction over the family"
        return base + f": {strength}."
    return base + f": the interval includes zero ({tests}), so this study cannot tell the two apart at this scale."


_SETTINGS_KEYS = ("steps", "model.kind", "model.init", "model.path", "task.kind", "task.reward", "task.min_terms",
                  "task.max_terms", "task.eval_size", "rollout.prompts_per_step", "rollout.n",
                  "rollout.max_new_tokens", "rollout.temperature", "optim.lr", "optim.epochs",
                  "optim.updates_per_batch", "optim.adv_std_norm", "optim.agg", "log.eval_every", "log.eval_k")


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


def _summary_lines(table: list[dict], comps: list[PairedComparison], an: AnalysisConfig) -> list[str]:
    """The plain-words summary: ranking, and for each paired comparison whether it agrees with the paper."""
    metric = f"{an.primary}_acc"
    L = ["## Summary\n"]
    ranked = sorted((r for r in table if r[metric].n), key=lambda r: -r[metric].mean)
    if ranked:
        L.append(
            f"Ranking by mean {an.primary} held-out accuracy: "
            + ", ".join(f"`{r['label']}` {r[metric].mean:.3f}" for r in ranked)
            + ". Differences between these means are only meaningful where the paired comparisons below "
            "exclude zero.\n"
        )
    if an.reference == "cppo" and comps:
        L.append(f"Against the paper, on the {an.primary} accuracy (CPPO minus each rule, paired by seed):\n")
        for c in comps:
            rule = c.b.split("@")[0]
            claim = PAPER_DIRECTION.get(rule)
            if claim is None:
                continue
            if c.n < 2 or math.isnan(c.ci_lo):
                verdict = f"too few paired seeds ({c.n}) to compare"
            elif c.ci_lo > 0:
                verdict = f"**agrees**: CPPO higher by {_f(c.mean_diff)} (95% CI {_f(c.ci_lo)} to {_f(c.ci_hi)})"
            elif c.ci_hi < 0:
                verdict = (f"**contradicts**: CPPO lower by {_f(-c.mean_diff)} "
                           f"(95% CI {_f(c.ci_lo)} to {_f(c.ci_hi)})")
            else:
                verdict = (f"**inconclusive**: difference {_f(c.mean_diff)}, 95% CI {_f(c.ci_lo)} to {_f(c.ci_hi)} "
                           "includes zero")
            L.append(f"- vs `{c.b}` ({claim}): {verdict}.")
        L.append(
            "\nThe paper's runs are Qwen3 models (1.7B-30B) with 8k-16k-token answers on competition math; a result "
            "from another model, task or scale (see the settings above) neither confirms nor refutes the paper in "
            "its own setting. It says what these rules did here.\n"
        )
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
    comps = {
        m: paired_comparisons(per_seed, reference=an.reference, metric=m, confidence=an.confidence, n_boot=an.n_boot)
        for m in (f"{an.primary}_acc", "final_acc" if an.primary == "best" else "best_acc")
    }
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
    L.append(
        "Generated by `cppo-diag study` from the runs under "
        f"`{data.root}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Every number below comes "
        "from those runs; nothing is typed in by hand.\n"
        + (f"\nReproduce with:\n\n```bash\n{command}\n```\n" if command else "")
    )
    if m.get("description"):
        L.append(f"{m['description']}\n")
    L.append(
        f"Grid: rules {', '.join(f'`{r}`' for r in m['rules'])} x seeds {m['seeds']} "
        f"({len(m['cells'])} runs, {m['steps']} steps each). Runs found: {n_present}/{len(m['cells'])} "
        f"(status: {', '.join(f'{k} {v}' for k, v in sorted(statuses.items()))}). Held-out accuracy is the "
        f"scalar `{an.accuracy}`; threshold for 'steps to reach' = {an.threshold}. Intervals are {conf} "
        "Student-t intervals over seeds.\n"
    )

    cfg = next((e.run.meta.get("config") for e in data.entries if e.run is not None and e.run.meta.get("config")), None)
    if cfg:
        L.append("Trainer settings shared by the runs (from the first run's `meta.json`; the full resolved config "
                 "of every run is in its `meta.json`):\n")
        L.append("```\n" + _settings_summary(cfg) + "\n```\n")
    secs = [e.train_seconds for e in data.entries if not math.isnan(e.train_seconds)]
    if secs:
        L.append(f"Training time: {sum(secs) / 60:.1f} min summed over {len(secs)} runs "
                 f"(median {float(np.median(secs)) / 60:.1f} min per run; trainer's `time/step_s`).\n")
    L += _summary_lines(table, comps[f"{an.primary}_acc"], an)
    L.append("## Results per rule\n")
    L.append(
        f"| rule | seeds | initial acc | final acc ({conf} CI) | best acc ({conf} CI) | steps to {an.threshold} "
        "(reached; mean over those) | masked frac | budget share | mean abs(pi - mu) |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        st = r["steps_to_threshold"]
        L.append(
            f"| `{r['label']}` | {r['n_with_data']}/{r['n_runs']} | {r['initial_acc'].fmt()} | {r['final_acc'].fmt()} | "
            f"{r['best_acc'].fmt()} | {r['reached']}/{r['n_with_data']}; {st.fmt(1) if st.n else 'never'} | "
            f"{r['masked_frac'].fmt(4)} | {r['budget_share'].fmt(3)} | {r['mean_tv'].fmt(4)} |"
        )
    L.append(
        "\n*masked frac*: tokens the trainer masked / valid tokens (`keep_applied`). "
        "*budget share*: of the masked tokens, those masked by the prefix budget only (`reason_applied` = "
        "budget; CPPO paper Fig. 7). *mean abs(pi - mu)*: mean over the logged tokens of the current-vs-rollout "
        f"probability gap. {_updates_sentence(data)} "
        f"Per-seed values: [`{rel(fig_dir / 'per_seed.csv')}`]({rel(fig_dir / 'per_seed.csv')}).\n"
    )

    for metric, cs in comps.items():
        L.append(f"## Paired comparison: `{an.reference}` vs each rule, {metric}\n")
        L.append(
            "Same seeds, so each pair shares its initial model and prompts. diff = reference minus other "
            f"(positive: `{an.reference}` higher). t-test: paired, two-sided; Holm: adjusted over this table's "
            "family; sign-flip: exact permutation test on the paired differences, free of the normality "
            f"assumption (with {max((c.n for c in cs), default=0)} pairs its smallest possible p is "
            f"{_p(2.0 / 2 ** max((c.n for c in cs), default=1))}); bootstrap: percentile interval of the mean "
            "difference; d_z = mean(diff) / sd(diff).\n"
        )
        L.append(f"| vs | pairs | mean diff ({conf} t CI) | bootstrap CI | p (t) | p (Holm) | p (sign-flip) | d_z | wins/losses |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for c in cs:
            L.append(
                f"| `{c.b}` | {c.n} | {_f(c.mean_diff)} [{_f(c.ci_lo)}, {_f(c.ci_hi)}] | [{_f(c.boot_lo)}, "
                f"{_f(c.boot_hi)}] | {_p(c.p_ttest)} | {_p(c.p_holm)} | {_p(c.p_sign_flip)} | {_f(c.cohens_dz, 2)} | "
                f"{c.wins}/{c.losses} |"
            )
        L.append("")
        for c in cs:
            L.append(f"- {_verdict(c)}")
        L.append("")

    L.append("## Figures\n")
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
        "over seeds and all steps), beside CPPO's per-position threshold delta / w_t; and paper Fig. 7 style: "
        "per step, the realised delta_b and the budget-mask share (mean over seeds). For rules without a prefix "
        "budget the Fig. 7 panel shows what CPPO's budget would have done on that rule's own rollouts "
        "(offline recompute), not something the trainer applied.\n"
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
        "- *best* accuracy is a maximum over noisy evaluations and is biased upward for every rule alike; "
        "*final* is unbiased but noisier.\n"
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
