"""Matplotlib figures: every static figure of cppo-diag, one builder per figure.

Every builder takes the tables (``pl.DataFrame``) an analysis produces and returns a
``matplotlib.figure.Figure`` (no pyplot global state: safe in Streamlit and threads). Sizes suit a paper
column (6.4 x 4.0 in); ``save_png(fig, path)`` writes 200 dpi PNGs. Users: the HTML report
(``cppo_diag.analyses.report``), the doctor's finding figures (``cppo_diag.analyses.doctor``) and the study's results page
(``cppo_diag.study.analysis``). The app's interactive figures are ``cppo_diag.analyses.plots_plotly``, where the
Budget and What-if twins of the report's figures keep these names and arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from cppo_diag.analyses.position import BOUNDED_METRICS, METRIC_LABELS

FIGSIZE = (6.4, 4.0)
TAIL_LABELS = {"top10_mean": "top-10% mean (mean of D ≥ P90)", "p90": "P90", "p99": "P99"}
# CPPO's threshold delta / w_t bounds D = |pi - mu|: it shares an axis with the probability metrics only.
PROBABILITY_METRICS = frozenset({"tv", "mismatch_tv"})


def hill_message(df: pl.DataFrame, metric: str, hill_min_k: int = 5) -> str | None:
    """Why a Hill figure of ``metric`` has nothing to draw (None when it has): a bounded metric has no
    tail index, and a bin needs at least ``hill_min_k`` tokens above its P90."""
    label = METRIC_LABELS.get(metric, metric)
    if metric in BOUNDED_METRICS:
        return (f"No Hill tail index for {label}: it is bounded in [0, 1], so it has no power-law tail. "
                "Choose |log π − log μ| or k3.")
    if df.is_empty():
        return f"no tokens for metric {metric!r}"
    if df["hill_alpha"].null_count() == df.height:
        return (f"Too few tokens above each bin's P90 for a Hill estimate of {label} (at least {hill_min_k} "
                "exceedances per bin are needed): widen the bins or the step range.")
    return None


def threshold_drawn(df: pl.DataFrame, metric: str) -> bool:
    """Whether Fig. 2 draws delta / w_t: the table has it and the metric is a probability like it."""
    return (metric in PROBABILITY_METRICS and "threshold_mean" in df.columns
            and df["threshold_mean"].null_count() < df.height)


def _fig(figsize=FIGSIZE) -> tuple[Figure, object]:
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3, linewidth=0.6)
    return fig, ax


def _empty(fig: Figure, ax, msg: str) -> Figure:
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def _centres(df: pl.DataFrame) -> np.ndarray:
    return ((df["bin_start"] + df["bin_end"]) / 2).to_numpy()


def _pos_xlabel(df: pl.DataFrame) -> str:
    if df.height and float(df["bin_end"].max()) <= 1.0 + 1e-9:
        return "relative position t / T (bin centre)"
    return "token position in response (0-based, bin centre)"


def _metric_rows(table: pl.DataFrame, metric: str) -> pl.DataFrame:
    if "metric" in table.columns:
        table = table.filter(pl.col("metric") == metric)
    return table.filter(pl.col("count") > 0).sort("bin")


def _legend(ax, *more_axes):
    """One legend for the axis and its twins, below the plot (never over the data)."""
    handles, labels = ax.get_legend_handles_labels()
    for a in more_axes:
        h, lab = a.get_legend_handles_labels()
        handles += h
        labels += lab
    if handles:
        ncol = 2 if max(len(lab) for lab in labels) > 28 else min(len(labels), 3)
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, frameon=False)


def fig_position_divergence(table: pl.DataFrame, *, metric: str = "tv", tail: str = "top10_mean",
                            title: str | None = None) -> Figure:
    """Paper Fig. 2: bin mean and tail (``tail`` = "top10_mean", "p90" or "p99", named in the legend) of
    ``metric`` against position, with CPPO's threshold delta / w_t (``threshold_mean``) on the **same** axis
    when the table has it and ``metric`` is a probability (|pi - mu|): both are probabilities, and a second
    axis would make the curves seem to cross where they do not. For other metrics the threshold is not drawn."""
    fig, ax = _fig()
    df = _metric_rows(table, metric)
    if df.is_empty():
        return _empty(fig, ax, f"no tokens for metric {metric!r}")
    x = _centres(df)
    ax.plot(x, df["mean"].to_numpy(), marker="o", ms=3, lw=1.5, color="C0", label=f"bin mean of {metric}")
    ax.plot(x, df[tail].to_numpy(), marker="s", ms=3, lw=1.5, color="C3", label=f"{TAIL_LABELS.get(tail, tail)}")
    ax.set_xlabel(_pos_xlabel(df))
    ylabel = METRIC_LABELS.get(metric, metric)
    if threshold_drawn(df, metric):
        ax.plot(x, df["threshold_mean"].to_numpy(), ls="--", lw=1.2, color="0.3", label=r"CPPO threshold $\delta / w_t$")
        ax.set_ylim(bottom=0)
        ylabel = f"{ylabel}; threshold δ / w_t"
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"Divergence by position ({metric}; tail = {TAIL_LABELS.get(tail, tail)})")
    _legend(ax)
    return fig


def fig_position_survival(table: pl.DataFrame, *, metric: str = "tv", title: str | None = None) -> Figure:
    """P(D > x) against position, one line per threshold x (log scale)."""
    fig, ax = _fig()
    df = _metric_rows(table, metric)
    cols = [c for c in df.columns if c.startswith("surv_")]
    if df.is_empty() or not cols:
        return _empty(fig, ax, f"no tokens for metric {metric!r}")
    x = _centres(df)
    for i, c in enumerate(cols):
        y = df[c].to_numpy().astype(float)
        y = np.where(y > 0, y, np.nan)
        ax.plot(x, y, marker="o", ms=3, lw=1.3, color=f"C{i}", label=f"P(D > {c[5:]})")
    ax.set_yscale("log")
    ax.set_xlabel(_pos_xlabel(df))
    ax.set_ylabel(f"P(D > x), D = {METRIC_LABELS.get(metric, metric)}")
    ax.set_title(title or f"Tail survival by position ({metric})")
    _legend(ax)
    return fig


def fig_position_hill(table: pl.DataFrame, *, metric: str = "abs_logratio", title: str | None = None) -> Figure:
    """Hill tail index (threshold at the bin's P90) against position; smaller = heavier tail. Unbounded
    metrics only; a message instead of a blank plot when no bin has enough exceedances."""
    fig, ax = _fig()
    df = _metric_rows(table, metric)
    msg = hill_message(df, metric)
    if msg is not None:
        return _empty(fig, ax, msg)
    x = _centres(df)
    y = df["hill_alpha"].cast(pl.Float64).to_numpy()
    ax.plot(x, y, marker="o", ms=3, lw=1.5, color="C2", label="Hill α̂ (exceedances over P90)")
    ax.set_xlabel(_pos_xlabel(df))
    ax.set_ylabel("tail index α̂ (dimensionless)")
    ax.set_title(title or f"Tail heaviness by position ({metric}; smaller α̂ = heavier tail)")
    _legend(ax)
    return fig


def _series_keys(df: pl.DataFrame) -> list[tuple]:
    keys = [c for c in ("run", "rule") if c in df.columns]
    if not keys:
        return [((), df)]
    out = []
    for key, part in df.group_by(keys, maintain_order=True):
        out.append((key if isinstance(key, tuple) else (key,), part))
    return out


def _label(key: tuple) -> str:
    return " / ".join(str(k) for k in key) if key else "recomputed"


def fig_masked_by_position(by_position: pl.DataFrame, *, title: str | None = None) -> Figure:
    """Masked fraction against position; one line per (run, rule) when those columns exist."""
    fig, ax = _fig()
    df = by_position.filter(pl.col("n_valid") > 0) if "n_valid" in by_position.columns else by_position
    if df.is_empty():
        return _empty(fig, ax, "no tokens")
    for i, (key, part) in enumerate(_series_keys(df)):
        part = part.sort("bin")
        ls = ":" if key and str(key[-1]).startswith("applied:") else "-"
        ax.plot(_centres(part), 100 * part["masked_frac"].to_numpy(), marker="o", ms=3, lw=1.4, ls=ls,
                color=f"C{i % 10}", label=_label(key))
    ax.set_xlabel(_pos_xlabel(df))
    ax.set_ylabel("masked tokens (% of valid)")
    ax.set_title(title or "Masked fraction by position")
    _legend(ax)
    return fig


def fig_masked_by_step(by_step: pl.DataFrame, *, title: str | None = None) -> Figure:
    """Masked fraction per training step; one line per (run, rule) when those columns exist."""
    fig, ax = _fig()
    if by_step.is_empty():
        return _empty(fig, ax, "no steps")
    for i, (key, part) in enumerate(_series_keys(by_step)):
        part = part.sort("step")
        ax.plot(part["step"].to_numpy(), 100 * part["masked_frac"].to_numpy(), marker="o", ms=2.5, lw=1.3,
                color=f"C{i % 10}", label=_label(key))
    ax.set_xlabel("training step")
    ax.set_ylabel("masked tokens (% of valid)")
    ax.set_title(title or "Masked fraction by step")
    _legend(ax)
    return fig


def fig_budget_by_step(by_step: pl.DataFrame, *, title: str | None = None) -> Figure:
    """Paper Fig. 7: mean realised delta_b per response (left) and budget-mask share (right) per step."""
    fig, ax = _fig()
    if by_step.is_empty():
        return _empty(fig, ax, "no steps")
    x = by_step["step"].to_numpy()
    ax.plot(x, by_step["delta_b_mean"].to_numpy(), marker="o", ms=2.5, lw=1.4, color="C0",
            label=r"mean realised $\delta_b$ per response")
    ax.set_xlabel("training step")
    ax.set_ylabel(r"$\delta_b$ (probability per unit weight)")
    ax.set_ylim(bottom=0, top=max(1e-9, float(np.nanmax(by_step["delta_b_mean"].to_numpy()))) * 1.15)
    ax2 = ax.twinx()
    share = by_step["budget_share"].cast(pl.Float64).to_numpy()
    ax2.plot(x, 100 * share, marker="s", ms=2.5, lw=1.4, color="C1", label="budget-mask share")
    ax2.set_ylabel("budget-masked / masked tokens (%)")
    ax2.set_ylim(0, 100)
    ax.set_title(title or "Prefix budget per step (CPPO Fig. 7)")
    _legend(ax, ax2)
    return fig


def fig_first_reject(first_reject: pl.DataFrame, *, title: str | None = None) -> Figure:
    """Kaplan-Meier survival of the first budget rejection of an away token over position."""
    fig, ax = _fig()
    if first_reject.is_empty():
        return _empty(fig, ax, "no responses")
    ax.step(first_reject["pos"].to_numpy(), first_reject["survival"].to_numpy(), where="post", lw=1.5,
            color="C4", label="P(no budget rejection up to position p)")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("token position p in response (0-based)")
    ax.set_ylabel("survival probability")
    ax.set_title(title or "When does the prefix budget first reject an away token?")
    _legend(ax)
    return fig


def fig_slack(slack: pl.DataFrame, *, delta: float | None = None, title: str | None = None) -> Figure:
    """Slack by position: bin mean and minimum (left), share of tokens with c_t < 0 (right)."""
    fig, ax = _fig()
    if slack.is_empty():
        return _empty(fig, ax, "no tokens")
    x = _centres(slack)
    ax.plot(x, slack["c_mean"].to_numpy(), marker="o", ms=3, lw=1.4, color="C0", label=r"mean slack $c_t$")
    ax.plot(x, slack["c_min"].to_numpy(), marker="v", ms=3, lw=1.0, color="C0", ls=":", label=r"min slack $c_t$")
    ax.plot(x, slack["z_mean"].to_numpy(), lw=1.0, color="C2", ls="--", label=r"mean $Z_t = w_t D_t$")
    ax.axhline(0, color="0.2", lw=0.8)
    if delta is not None:
        ax.axhline(delta, color="0.5", lw=0.8, ls="--", label=r"$\delta$ (cap of $c_t$)")
    ax.set_xlabel(_pos_xlabel(slack))
    ax.set_ylabel(r"slack $c_t$ (probability)")
    ax2 = ax.twinx()
    ax2.plot(x, 100 * slack["frac_negative"].to_numpy(), color="C3", lw=1.2, marker="s", ms=2.5,
             label=r"tokens with $c_t < 0$ (%)")
    ax2.set_ylabel(r"tokens with $c_t < 0$ (%)")
    ax2.set_ylim(bottom=0)
    ax.set_title(title or "CPPO prefix-budget slack by position")
    _legend(ax, ax2)
    return fig



def whatif_grid(sweep: pl.DataFrame, value: str, w_min: float | None) -> tuple[np.ndarray, list, list, float]:
    """The what-if surface at one w_min as a (delta_b, delta) grid of percentages (NaN where missing).

    ``w_min`` None picks the swept value closest to 0.8. Returns (grid, deltas, delta_bs, w_min used); shared by
    the matplotlib and plotly heatmaps.
    """
    wm = sorted(set(sweep["w_min"].to_list()))
    w_sel = w_min if w_min is not None else min(wm, key=lambda v: abs(v - 0.8))
    df = sweep.filter((pl.col("w_min") - w_sel).abs() < 1e-12)
    deltas = sorted(set(df["delta"].to_list()))
    dbs = sorted(set(df["delta_b"].to_list()))
    grid = np.full((len(dbs), len(deltas)), np.nan)  # (n_delta_b, n_delta)
    for r in df.iter_rows(named=True):
        v = r[value]
        grid[dbs.index(r["delta_b"]), deltas.index(r["delta"])] = np.nan if v is None else 100 * v
    return grid, deltas, dbs, w_sel

def fig_whatif(sweep: pl.DataFrame, *, value: str = "masked_frac", w_min: float | None = None,
               title: str | None = None) -> Figure:
    """Heatmap of ``value`` ("masked_frac" or "budget_share", in %) over (delta, delta_b) at one w_min
    (default: the one closest to 0.8)."""
    fig, ax = _fig(figsize=(5.6, 4.2))
    ax.grid(False)
    if sweep.is_empty():
        return _empty(fig, ax, "empty sweep")
    grid, deltas, dbs, w_sel = whatif_grid(sweep, value, w_min)
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(deltas)), [f"{d:g}" for d in deltas])
    ax.set_yticks(range(len(dbs)), [f"{d:g}" for d in dbs])
    for i in range(len(dbs)):
        for j in range(len(deltas)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < np.nanmean(grid) else "black")
    label = {"masked_frac": "masked tokens (%)", "budget_share": "budget-masked / masked (%)"}.get(value, value)
    fig.colorbar(im, ax=ax, label=label)
    ax.set_xlabel(r"$\delta$ (token threshold, probability)")
    ax.set_ylabel(r"$\delta_b$ (budget per unit weight)")
    ax.set_title(title or f"What-if: {label} at w_min = {w_sel:g}")
    return fig


def fig_mismatch(table: pl.DataFrame, *, metric: str = "mismatch_tv", title: str | None = None) -> Figure:
    """Train/rollout mismatch |pi_old - mu| by position: bin mean, P90 and top-10% mean."""
    fig, ax = _fig()
    df = _metric_rows(table, metric)
    if df.is_empty():
        return _empty(fig, ax, "no tokens with logp_old")
    x = _centres(df)
    ax.plot(x, df["mean"].to_numpy(), marker="o", ms=3, lw=1.5, color="C0", label="bin mean")
    ax.plot(x, df["p90"].to_numpy(), marker="^", ms=3, lw=1.2, color="C1", label="P90")
    ax.plot(x, df["top10_mean"].to_numpy(), marker="s", ms=3, lw=1.2, color="C3", label=TAIL_LABELS["top10_mean"])
    ax.set_xlabel(_pos_xlabel(df))
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(title or "Train/rollout mismatch by position")
    _legend(ax)
    return fig


def fig_compare(summary: pl.DataFrame, *, value: str = "masked_frac", title: str | None = None) -> Figure:
    """Grouped bars: ``value`` (in %) per rule, one bar group per run."""
    fig, ax = _fig()
    if summary.is_empty():
        return _empty(fig, ax, "nothing to compare")
    runs = list(dict.fromkeys(summary["run"].to_list()))
    rules = list(dict.fromkeys(summary["rule"].to_list()))
    width = 0.8 / max(len(rules), 1)
    for i, rule in enumerate(rules):
        vals = []
        for run in runs:
            v = summary.filter((pl.col("run") == run) & (pl.col("rule") == rule))[value]
            vals.append(100 * float(v[0]) if len(v) and v[0] is not None else np.nan)
        xs = np.arange(len(runs)) + (i - (len(rules) - 1) / 2) * width
        bars = ax.bar(xs, vals, width=width * 0.95, color=f"C{i % 10}", label=rule,
                      hatch="//" if rule.startswith("applied:") else None)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    ax.set_xticks(range(len(runs)), runs)
    ax.set_xlabel("run")
    ax.set_ylabel({"masked_frac": "masked tokens (% of valid)"}.get(value, f"{value} (%)"))
    ax.set_title(title or "Masked fraction: runs × rules (same logged tokens)")
    _legend(ax)
    return fig


# -- doctor figures (analyses.doctor) ---------------------------------------------------------------------------


def fig_step_series(steps, values, *, ylabel: str, title: str, alarm_step: int | None = None,
                    start_step: int | None = None, log: bool = False, collapse: int | None = None,
                    extra: tuple | None = None, span_label: str = "steps the test used",
                    level: float | None = None, level_label: str = "threshold") -> Figure:
    """A per-step series behind a doctor finding: the values, an optional second series ``extra`` = (steps,
    values, label) dashed, the steps a change-point test used (``start_step``..``alarm_step``, shaded), the
    alarm and a reward collapse as vertical lines, a threshold ``level`` as a horizontal one; log scale when
    ``log`` and every value is positive."""
    fig, ax = _fig()
    ax.plot(steps, values, marker="o", ms=3, lw=1.2, color="C0", label=ylabel)
    if extra is not None:
        ax.plot(extra[0], extra[1], lw=1.2, ls="--", color="C2", label=extra[2])
    if start_step is not None and alarm_step is not None:
        ax.axvspan(start_step, alarm_step, color="C1", alpha=0.15, label=span_label)
    if alarm_step is not None:
        ax.axvline(alarm_step, color="C1", lw=1.5, label=f"alarm at step {alarm_step}")
    if collapse is not None:
        ax.axvline(collapse, color="C3", lw=1.5, ls=":", label=f"reward collapse at step {collapse}")
    if level is not None:
        ax.axhline(level, color="C3", lw=1.0, ls="--", label=level_label)
    if log and np.all(np.asarray(values, dtype=float)[np.isfinite(values)] > 0):
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend(ax)
    return fig


def fig_divergence_along_response(table: pl.DataFrame) -> Figure:
    """|pi - mu| along the response in position bins (a ``position_stats`` table of metric tv, absolute or
    ``relative=True``): bin mean and top-10% mean."""
    fig, ax = _fig()
    x = _centres(table)
    ax.plot(x, table["mean"].to_numpy(), marker="o", ms=3, label="bin mean")
    ax.plot(x, table["top10_mean"].to_numpy().astype(np.float64), marker="o", ms=3, label=TAIL_LABELS["top10_mean"])
    ax.set_xlabel(_pos_xlabel(table))
    ax.set_ylabel("|π − μ| (probability)")
    ax.set_title("Divergence along the response")
    _legend(ax)
    return fig


def fig_mismatch_by_update(series: Mapping[str, pl.DataFrame]) -> Figure:
    """Mean k3 per step (log scale) for each update filter (``"first"``, ``"after_first"`` ->
    ``mismatch_metrics(..., by="step", updates=...)``): the first update measures the engine mismatch plus any
    policy lag of stale rollouts, later ones add this batch's own updates (``analyses.attribution`` separates the
    three)."""
    fig, ax = _fig()
    for u, df in series.items():
        if df.height:
            ax.plot(df["step"], df["kl_k3"].clip(lower_bound=1e-12), marker="o", ms=3,
                    label=f"k3 KL(μ‖π), {u.replace('_', ' ')} update(s)")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("mean k3 (nats, log scale)")
    ax.set_title("Mismatch per step: first update of each batch vs later updates")
    _legend(ax)
    return fig


# -- study figures (cppo_diag.study.analysis): learning curves over seeds, the ablation, paired effects ---------


def _draw_curve_bands(ax, bands: pl.DataFrame, labels: Sequence[str], threshold: float | None) -> None:
    """Per label: the mean accuracy over seeds per evaluation (legend: the most seeds at any step) and its
    interval as a band clipped to [0, 1] (accuracies); ``threshold`` as a dotted line."""
    for label in labels:
        band = bands.filter(pl.col("label") == label).sort("step")
        if band.height == 0:
            continue
        steps, mean, lo, hi = (band[c].cast(pl.Float64).to_numpy() for c in ("step", "mean", "lo", "hi"))
        (line,) = ax.plot(steps, mean, marker="o", ms=3, label=f"{label} (n={int(band['n'].max())})", lw=1.6)
        ok = np.isfinite(lo)
        ax.fill_between(steps[ok], np.clip(lo[ok], 0, 1), np.clip(hi[ok], 0, 1), color=line.get_color(),
                        alpha=0.15, lw=0)
    if threshold is not None:
        ax.axhline(threshold, color="0.5", ls=":", lw=1)
    ax.set_xlabel("RL iterations completed")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def fig_learning_curves(bands: pl.DataFrame, labels: Sequence[str], *, threshold: float | None = None,
                        title: str | None = None) -> Figure:
    """Held-out accuracy of several rules in one panel: mean over seeds with its interval as a band.
    ``bands``: label, step, mean, lo, hi, n (``cppo_diag.study.analysis.curve_bands``)."""
    fig = Figure(figsize=(8, 4.8))
    ax = fig.add_subplot()
    _draw_curve_bands(ax, bands, labels, threshold)
    ax.set_title(title or "Held-out accuracy, mean over seeds")
    fig.tight_layout()
    return fig


def fig_curves_by_rule(curves: pl.DataFrame, bands: pl.DataFrame, labels: Sequence[str], *, confidence: float,
                       threshold: float | None = None) -> Figure:
    """One panel per rule (shared axes): every seed's accuracy curve as a thin grey line (``curves``: label,
    seed, step, accuracy), the mean and its ``confidence`` interval (``bands``) on top."""
    ncol = min(3, max(1, len(labels)))
    nrow = -(-len(labels) // ncol)
    fig = Figure(figsize=(4.2 * ncol, 3.2 * nrow))
    axes = fig.subplots(nrow, ncol, sharex=True, sharey=True, squeeze=False)
    for ax, label in zip(axes.flat, labels):
        sub = curves.filter(pl.col("label") == label)
        for (seed,), g in sub.group_by("seed", maintain_order=True):
            g = g.sort("step")
            ax.plot(g["step"].to_numpy(), g["accuracy"].to_numpy(), lw=0.8, color="0.6", alpha=0.8)
        band = bands.filter(pl.col("label") == label).sort("step")
        if sub.height and band.height:
            steps, mean, lo, hi = (band[c].cast(pl.Float64).to_numpy() for c in ("step", "mean", "lo", "hi"))
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


def fig_ablation(bands: pl.DataFrame, labels: Sequence[str], per_seed: Mapping[str, np.ndarray],
                 intervals: Mapping[str, Any], *, metric_label: str, confidence: float,
                 threshold: float | None = None) -> Figure:
    """CPPO paper Fig. 5 style: the accuracy curves of CPPO and its ablations (left) and one metric per seed
    with its mean and ``confidence`` interval (right). ``per_seed``: label -> the seeds' values;
    ``intervals``: label -> an object with mean, lo, hi, n (``cppo_diag.study.stats.t_interval``)."""
    fig = Figure(figsize=(11, 4.5))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    _draw_curve_bands(ax1, bands, labels, threshold)
    ax1.set_title("CPPO ablations (paper Fig. 5 style)")
    for i, lab in enumerate(labels):
        vals = np.asarray(per_seed[lab], dtype=float)
        iv = intervals[lab]
        ok = ~np.isnan(vals)
        ax2.scatter(np.full(ok.sum(), i) + np.linspace(-0.12, 0.12, max(ok.sum(), 1))[: ok.sum()], vals[ok],
                    s=14, color="0.4", zorder=3)
        if iv.n:
            err = None if iv.n < 2 else [[iv.mean - iv.lo], [iv.hi - iv.mean]]
            ax2.errorbar([i], [iv.mean], yerr=err, fmt="o", ms=8, capsize=6, lw=2, zorder=4)
    ax2.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax2.set_xlim(-0.6, len(labels) - 0.4)
    ax2.set_ylabel(f"{metric_label} held-out accuracy")
    ax2.set_title(f"{metric_label} accuracy per seed, mean and {confidence:.0%} CI")
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def fig_effects(panels: Sequence[Mapping[str, Any]], *, confidence: float) -> Figure:
    """Forest plot of paired differences, one panel per metric (shared rows). Each panel: ``title``,
    ``xlabel`` and ``rows``, each row a mapping with label, mean, lo, hi (the interval; NaN: none) and note
    (text beside the row, e.g. the adjusted p). Green: interval above 0, red: below, grey: across or none."""
    n = max(len(p["rows"]) for p in panels)
    fig = Figure(figsize=(5.2 * len(panels), 0.55 * n + 1.6))
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        rows = panel["rows"]
        y = np.arange(len(rows))[::-1]
        for yi, r in zip(y, rows):
            ok = np.isfinite(r["lo"])
            color = "C2" if ok and r["lo"] > 0 else ("C3" if ok and r["hi"] < 0 else "0.35")
            if ok:
                ax.plot([r["lo"], r["hi"]], [yi, yi], color=color, lw=2)
            ax.plot([r["mean"]], [yi], "o", color=color, ms=6)
            ax.annotate(r["note"], (1.0, yi), xycoords=("axes fraction", "data"), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=7)
        ax.axvline(0, color="0.5", lw=1, ls=":")
        ax.set_yticks(y, [r["label"] for r in rows], fontsize=8)
        ax.set_xlabel(panel["xlabel"])
        ax.set_title(panel["title"], fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"Paired differences, mean and {confidence:.0%} t interval over seeds", fontsize=11)
    fig.tight_layout()
    return fig


def save_png(fig: Figure, path, dpi: int = 200) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


__all__: Sequence[str] = [n for n in dir() if n.startswith("fig_")] + ["save_png"]


def live_position_table(data) -> pl.DataFrame:
    """``position_stats`` of a live step's tokens (``cppo_diag.capture.position_live.PositionFigure``): |pi - mu|
    by relative position in ``FIGURE_BINS`` bins, with CPPO's delta / w_t."""
    from cppo_diag.analyses.position import position_stats
    from cppo_diag.capture.position_live import FIGURE_BINS

    seq = np.cumsum(data.pos == 0) - 1  # (N,) a response starts where pos restarts at 0
    frame = pl.DataFrame({"step": np.full(len(data.pos), data.step, np.int64), "seq_id": seq.astype(np.int64),
                          "pos": data.pos.astype(np.int32), "logp": data.logp, "logp_rollout": data.logp_rollout,
                          "advantage": np.ones(len(data.pos), np.float32)})
    return position_stats(frame, metrics=["tv"], relative=True, n_rel_bins=FIGURE_BINS, delta=data.delta,
                          w_min=data.w_min)


def fig_live_position(data) -> Figure:
    """The live divergence-by-position figure (TensorBoard / W&B, every ``log.position_figure_every`` steps) of a
    ``PositionFigure``: the top-decile |pi - mu| by relative position with delta / w_t."""
    title = data.title or (f"|π − μ| by position, step {data.step} (δ = {data.delta:g}, w_min = {data.w_min:g})")
    return fig_position_divergence(live_position_table(data), metric="tv", tail="top10_mean", title=title)
