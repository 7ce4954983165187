"""Plotly figures: every interactive figure of the app, one builder per figure.

Each builder takes the tables an analysis returns (``pl.DataFrame``; ``cppo_diag.analyses.*`` results) and plain
arguments, and returns a ``plotly.graph_objects.Figure``; pages draw it with ``cppo_diag.app.ui.plot``. The static
figures (report PNGs, doctor and study figures) are the matplotlib builders of ``cppo_diag.analyses.plots_mpl``, which
share the table helpers (bin centres, the what-if grid) used here.

Builders
    fig_budget_by_step(budget.by_step)            fig_first_reject(budget.first_reject)
    fig_slack(budget.slack)                       fig_whatif(sweep, *, value="masked_frac", w_min=None)
    fig_position_statistic(position table, *, column, label, title, relative)   Divergence page (Fig. 2)
    fig_masked_by_rule(compare.by_position, *, relative)                         Divergence page
    fig_runs_by_rule(compare frame, *, x, y, runs, rules)  Compare page (colour: run, dash: rule)
    fig_runs_by_rule_panels(compare frame, *, x, y, runs, rules)  Compare page (one panel per run, colour: rule)
    fig_run_curves(scalars, names, *, runs)                Compare page (reward / accuracy curves)
    fig_metric_family(mismatch_metrics table, metrics, *, by)                    Doctor page
    fig_whatif_by_position(results) / fig_whatif_by_step(results)                What-if page
    fig_sequence_internals(response, *, delta)      Token inspector (|pi - mu|, Z_t, c_t, w_t, S_t)
"""

from __future__ import annotations

import html
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from cppo_diag.analyses.plots_mpl import _centres, _pos_xlabel, whatif_grid

# The legend goes under the plot (below the x-axis title), in the bottom margin: above the plot it collides
# with the title as soon as it wraps onto a second row.
LAYOUT = dict(template="plotly_white", height=460, margin=dict(l=60, r=60, t=50, b=120),
              legend=dict(orientation="h", yanchor="top", y=-0.2, x=0))

# Right-hand axes get their own round ticks (plotly.js otherwise syncs them to the left axis' gridlines, which
# gives ticks like 14.5, 29, 43.5 %) and no gridlines of their own (the left axis' grid stays the only one).
RIGHT_AXIS = dict(tickmode="auto", showgrid=False)


def _value_range(values, *, floor: float = 0.0, pad: float = 0.15) -> list[float] | None:
    """[floor, max + pad * span] over the finite values (None when there are none): plotly's autorange pads
    a single point by +-0.5 or so, which squeezes values of a few hundredths into one pixel row."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    lo, hi = min(floor, float(v.min())), float(v.max())
    span = hi - lo if hi > lo else max(abs(hi), 1e-6)
    return [lo, hi + pad * span]


def _empty(msg: str) -> go.Figure:
    fig = go.Figure()
    text = "<br>".join(textwrap.wrap(html.escape(msg), 80))  # plotly does not wrap annotations
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False)
    fig.update_layout(**LAYOUT, xaxis_visible=False, yaxis_visible=False)
    return fig


def fig_budget_by_step(by_step: pl.DataFrame, *, title: str | None = None) -> go.Figure:
    if by_step.is_empty():
        return _empty("no steps")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    x = by_step["step"].to_numpy()
    fig.add_trace(go.Scatter(x=x, y=by_step["delta_b_mean"].to_numpy(), mode="lines+markers",
                             name="mean realised δ_b per response"))
    fig.add_trace(go.Scatter(x=x, y=100 * by_step["budget_share"].cast(pl.Float64).to_numpy(), mode="lines+markers",
                             name="budget-mask share"), secondary_y=True)
    fig.update_yaxes(title_text="δ_b (probability per unit weight)", secondary_y=False,
                     range=_value_range(by_step["delta_b_mean"].cast(pl.Float64).to_numpy()))
    fig.update_yaxes(title_text="budget-masked / masked tokens (%)", range=[0, 100], secondary_y=True, **RIGHT_AXIS)
    fig.update_layout(**LAYOUT, title=title or "Prefix budget per step (CPPO Fig. 7)", xaxis_title="training step")
    return fig


def fig_first_reject(first_reject: pl.DataFrame, *, title: str | None = None) -> go.Figure:
    if first_reject.is_empty():
        return _empty("no responses")
    fig = go.Figure(go.Scatter(x=first_reject["pos"].to_numpy(), y=first_reject["survival"].to_numpy(),
                               mode="lines", line_shape="hv", name="P(no budget rejection up to position p)"))
    fig.update_layout(**LAYOUT, title=title or "When does the prefix budget first reject an away token?",
                      xaxis_title="token position p in response (0-based)", yaxis_title="survival probability",
                      yaxis_range=[0, 1.02], showlegend=True)
    return fig


def fig_slack(slack: pl.DataFrame, *, delta: float | None = None, title: str | None = None) -> go.Figure:
    if slack.is_empty():
        return _empty("no tokens")
    x = _centres(slack)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=x, y=slack["c_mean"].to_numpy(), mode="lines+markers", name="mean slack c_t"))
    fig.add_trace(go.Scatter(x=x, y=slack["c_min"].to_numpy(), mode="lines", name="min slack c_t",
                             line=dict(dash="dot")))
    fig.add_trace(go.Scatter(x=x, y=slack["z_mean"].to_numpy(), mode="lines", name="mean Z_t = w_t D_t",
                             line=dict(dash="dash")))
    fig.add_trace(go.Scatter(x=x, y=100 * slack["frac_negative"].to_numpy(), mode="lines+markers",
                             name="tokens with c_t < 0 (%)"), secondary_y=True)
    fig.add_hline(y=0, line_color="black", line_width=1)
    if delta is not None:
        fig.add_hline(y=delta, line_dash="dash", line_color="gray", annotation_text="δ")
    fig.update_yaxes(title_text="slack c_t (probability)", secondary_y=False)
    fig.update_yaxes(title_text="tokens with c_t < 0 (%)", secondary_y=True, rangemode="tozero", **RIGHT_AXIS)
    fig.update_layout(**LAYOUT, title=title or "CPPO prefix-budget slack by position", xaxis_title=_pos_xlabel(slack))
    return fig


def fig_whatif(sweep: pl.DataFrame, *, value: str = "masked_frac", w_min: float | None = None,
               title: str | None = None) -> go.Figure:
    if sweep.is_empty():
        return _empty("empty sweep")
    grid, deltas, dbs, w_sel = whatif_grid(sweep, value, w_min)
    label = {"masked_frac": "masked tokens (%)", "budget_share": "budget-masked / masked (%)"}.get(value, value)
    fig = go.Figure(go.Heatmap(z=grid, x=[f"{d:g}" for d in deltas], y=[f"{d:g}" for d in dbs], colorscale="Viridis",
                               colorbar=dict(title=label), texttemplate="%{z:.2f}"))
    fig.update_layout(**LAYOUT, title=title or f"What-if: {label} at w_min = {w_sel:g}",
                      xaxis_title="δ (token threshold, probability)", yaxis_title="δ_b (budget per unit weight)")
    return fig


# -- app page figures (drawn with app.ui.plot, which sets tight margins and the Streamlit theme) ---------------

# Compare runs: one colour per run, one dash per rule (solid = the mask the run applied).
DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
RUN_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
PAGE_LEGEND = dict(orientation="h", y=-0.2)


def run_colors(runs: Sequence[str]) -> dict[str, str]:
    """Run label -> colour, in the order the runs were chosen (cycling through ``RUN_COLORS``)."""
    return {str(r): RUN_COLORS[i % len(RUN_COLORS)] for i, r in enumerate(runs)}


def _bin_x(table: pl.DataFrame, relative: bool):
    """x of each position bin: its start (absolute positions) or its centre (relative positions t / T)."""
    return (table["bin_start"] + table["bin_end"]) / 2 if relative else table["bin_start"]


def _bin_x_title(relative: bool) -> str:
    return "relative position t / T (bin centre)" if relative else "position (token index, bin start)"


def fig_position_statistic(table: pl.DataFrame, *, column: str, label: str, title: str, relative: bool,
                           show_mean: bool = False, threshold_name: str | None = None) -> go.Figure:
    """Divergence by position (CPPO Fig. 2, interactive): ``column`` of a ``position_summary`` table per bin
    (hover: the bin's span and token count), the bin mean dotted when ``show_mean``, and CPPO's threshold
    delta / w_t (``threshold_mean``, already scaled by delta) dashed under the name ``threshold_name``."""
    x = _bin_x(table, relative)
    fig = go.Figure()
    fig.add_scatter(x=x, y=table[column], mode="lines+markers", name=label,
                    customdata=table.select("count", "bin_end").to_numpy(),
                    hovertemplate="bin %{x}–%{customdata[1]}<br>value %{y:.4g}<br>tokens %{customdata[0]}<extra></extra>")
    if show_mean:
        fig.add_scatter(x=x, y=table["mean"], mode="lines", name="mean", line=dict(dash="dot"))
    if threshold_name is not None:
        fig.add_scatter(x=x, y=table["threshold_mean"], mode="lines", name=threshold_name,
                        line=dict(dash="dash", color="firebrick"))
    fig.update_layout(title=title, xaxis_title=_bin_x_title(relative), yaxis_title=label, hovermode="x unified",
                      legend=PAGE_LEGEND)
    return fig


def fig_masked_by_rule(by_position: pl.DataFrame, *, relative: bool) -> go.Figure:
    """Masked fraction by position bin of one run, one line per rule (``compare_runs(...).by_position``)."""
    fig = go.Figure()
    for (rule,), part in by_position.sort("bin_start").group_by("rule", maintain_order=True):
        fig.add_scatter(x=_bin_x(part, relative), y=part["masked_frac"], mode="lines+markers", name=str(rule))
    fig.update_layout(xaxis_title=_bin_x_title(relative), yaxis_title="masked fraction", yaxis_tickformat=".1%",
                      hovermode="x unified", legend=PAGE_LEGEND)
    return fig


def fig_runs_by_rule(frame: pl.DataFrame, *, x: str, y: str, title: str, x_title: str, runs: Sequence[str],
                     rules: Sequence[str], y_format: str = ".1%") -> go.Figure:
    """``y`` against ``x``, one line per (run, rule) of a ``compare_runs`` table: colour = run (``runs``
    order), dash = rule (solid for the applied mask, one dash per entry of ``rules``, dotted otherwise)."""
    colors = run_colors(runs)
    fig = go.Figure()
    for (run, rule), part in frame.sort(x).group_by("run", "rule", maintain_order=True):
        if str(rule).startswith("applied"):
            dash = "solid"
        else:
            dash = DASHES[1 + list(rules).index(rule) % 5] if rule in rules else "dot"
        fig.add_scatter(x=part[x], y=part[y], mode="lines+markers", marker=dict(size=4), name=f"{run} · {rule}",
                        line=dict(dash=dash, color=colors.get(str(run))), legendgroup=str(run))
    fig.update_layout(title=f"{title} (colour: run; dash: rule, solid = applied mask)", xaxis_title=x_title,
                      yaxis_title=y, yaxis_tickformat=y_format, hovermode="x unified",
                      legend=dict(orientation="h", y=-0.25))
    return fig


def fig_runs_by_rule_panels(frame: pl.DataFrame, *, x: str, y: str, title: str, x_title: str, runs: Sequence[str],
                            rules: Sequence[str], y_format: str = ".1%", per_row: int = 3,
                            panel_height: int = 240) -> go.Figure:
    """Small multiples of a ``compare_runs`` table: one panel per run (``runs`` order, ``per_row`` to a row,
    titled with the rule the run applied), one line per rule in it, the same colour for a rule in every panel
    (the run's applied mask in black, named "applied mask") and a shared y axis, so runs compare by panel and
    rules by colour. Each trace's ``meta`` is its run; the legend lists each rule once."""
    names = set(frame["run"].cast(pl.String).to_list())
    present = [str(r) for r in runs if str(r) in names] or sorted(names)
    n_cols = min(per_row, max(1, len(present)))
    n_rows = max(1, -(-len(present) // n_cols))
    applied = {}
    for run, rule in frame.select(pl.col("run").cast(pl.String), pl.col("rule").cast(pl.String)).unique().iter_rows():
        if rule.startswith("applied"):
            applied[run] = rule.split(":", 1)[-1]
    titles = [f"{r} (applied: {applied[r]})" if r in applied else r for r in present]
    fig = make_subplots(rows=n_rows, cols=n_cols, shared_yaxes=True, shared_xaxes=True, subplot_titles=titles,
                        horizontal_spacing=0.03, vertical_spacing=min(0.5 / n_rows, 0.12))
    recomputed = sorted({str(r) for r in frame["rule"].to_list() if not str(r).startswith("applied")},
                        key=lambda r: (list(rules).index(r) if r in rules else len(rules), r))
    colors = {r: RUN_COLORS[i % len(RUN_COLORS)] for i, r in enumerate(recomputed)}
    shown: set[str] = set()
    for i, run in enumerate(present):
        part_run = frame.filter(pl.col("run").cast(pl.String) == run).sort(x)
        for (rule,), part in part_run.group_by(pl.col("rule").cast(pl.String), maintain_order=True):
            label = "applied mask" if rule.startswith("applied") else rule
            fig.add_scatter(x=part[x], y=part[y], mode="lines+markers", marker=dict(size=3), name=label, meta=run,
                            legendgroup=label, showlegend=label not in shown,
                            hovertemplate=f"{html.escape(run)} · {html.escape(rule)}: %{{y:{y_format}}}<extra></extra>",
                            line=dict(color=colors.get(rule, "#222222"), width=2.5 if label == "applied mask" else 1.5),
                            row=i // n_cols + 1, col=i % n_cols + 1)
            shown.add(label)
    fig.update_yaxes(tickformat=y_format)
    fig.update_yaxes(title_text=y.replace("_frac", " fraction").replace("_", " "), col=1)
    fig.update_xaxes(title_text=x_title, row=n_rows)
    fig.update_layout(title=dict(text=f"{title}: one panel per run, colour = rule (black: the mask the run applied)",
                                 y=1.0, yref="container", yanchor="top"),
                      hovermode="x unified", height=110 + panel_height * n_rows,
                      legend=dict(orientation="v", x=1.01, y=1, yanchor="top"))
    return fig


def fig_run_curves(curves: pl.DataFrame, names: Sequence[str], *, runs: Sequence[str]) -> go.Figure:
    """Logged per-step scalars ``names`` of several runs (``curves``: step, run, one column per scalar):
    colour = run (``runs`` order), dash = scalar."""
    colors = run_colors(runs)
    fig = go.Figure()
    for j, name in enumerate(names):
        for (run,), part in (curves.select("step", "run", name).drop_nulls().sort("step")
                             .group_by("run", maintain_order=True)):
            fig.add_scatter(x=part["step"], y=part[name], mode="lines", name=f"{run} · {name}",
                            line=dict(color=colors.get(str(run)), dash=DASHES[j % len(DASHES)]))
    fig.update_layout(title="Reward and accuracy (colour: run; dash: curve)", xaxis_title="step",
                      hovermode="x unified", legend=dict(orientation="h", y=-0.25))
    return fig


def fig_metric_family(table: pl.DataFrame, metrics: Sequence[str], *, by: str) -> go.Figure:
    """Columns ``metrics`` of a ``mismatch_metrics`` table per training step (``by="step"``) or per position
    bin (``by="position"``), one line each."""
    x = table["step"] if by == "step" else table["bin_start"]
    fig = go.Figure()
    for m in metrics:
        fig.add_scatter(x=x, y=table[m], mode="lines+markers", name=m)
    fig.update_layout(xaxis_title="training step" if by == "step" else "position (token index, bin start)",
                      yaxis_title="value", hovermode="x unified", legend=PAGE_LEGEND)
    return fig


def fig_whatif_by_position(results: Mapping[str, Any]) -> go.Figure:
    """Masked fraction by position of several recomputes (name -> ``RecomputeResult``), one line each."""
    fig = go.Figure()
    for name, res in results.items():
        bp = res.by_position.sort("bin_start") if "bin_start" in res.by_position.columns else res.by_position
        x = bp["bin_start"] if "bin_start" in bp.columns else bp["bin"] * res.bin_width
        fig.add_scatter(x=x, y=bp["masked_frac"], mode="lines+markers", name=name)
    fig.update_layout(title="Masked fraction by position", xaxis_title="position (bin start)",
                      yaxis_tickformat=".1%", hovermode="x unified", legend=PAGE_LEGEND)
    return fig


def fig_whatif_by_step(results: Mapping[str, Any]) -> go.Figure:
    """Masked fraction per step of several recomputes (name -> ``RecomputeResult``), grouped bars."""
    steps = pl.concat([res.by_step.select("step", "masked_frac", "budget_share").with_columns(rule=pl.lit(name))
                       for name, res in results.items()])
    fig = go.Figure()
    for (name,), part in steps.sort("step").group_by("rule", maintain_order=True):
        fig.add_bar(x=part["step"], y=part["masked_frac"], name=str(name))
    fig.update_layout(title="Masked fraction by step", xaxis_title="step", yaxis_tickformat=".1%",
                      barmode="group", legend=PAGE_LEGEND)
    return fig


def fig_sequence_internals(seq: pl.DataFrame, *, delta: float) -> go.Figure:
    """One response under the token inspector (CPPO Eq. 8-10): |pi - mu| and Z_t = w_t |pi - mu| with the
    masked tokens crossed and delta as a line; the slack c_t; the weight w_t (and the logged ``loss_weight``);
    the prefix sum S_t. ``seq``: one row per token, in ``pos`` order, with ``tv`` and ``m_keep`` and, when
    known, ``Z``, ``c``, ``w``, ``S``, ``loss_weight``.

    c_t gets its own panel: once the budget is spent it falls far below zero (it is unbounded below), which
    would squeeze Z_t into a flat line if both shared an axis.
    """
    pos = seq["pos"].to_numpy()
    tv = seq["tv"].to_numpy()
    masked = seq["m_keep"].fill_null(True).not_().to_numpy()
    fig = make_subplots(rows=4, cols=1, shared_xaxes=True, vertical_spacing=0.06, row_heights=[0.34, 0.28, 0.19, 0.19],
                        subplot_titles=("|π−μ| and Z_t = w_t·|π−μ| (× = masked)",
                                        "slack c_t (budget left; < 0: every away token is masked)",
                                        "weight w_t" + (" and the loss weight applied" if "loss_weight" in seq.columns
                                                        else ""),
                                        "S_t (cumulative Z)"))
    fig.add_scatter(x=pos, y=tv, mode="lines", name="|π−μ|", line=dict(color="#1f77b4", width=1), row=1, col=1)
    if "Z" in seq.columns:
        fig.add_scatter(x=pos, y=seq["Z"], mode="lines", name="Z_t", line=dict(color="#2ca02c"), row=1, col=1)
    if masked.any():
        fig.add_scatter(x=pos[masked], y=tv[masked], mode="markers", name="masked",
                        marker=dict(color="#d62728", size=7, symbol="x"), row=1, col=1)
    fig.add_hline(y=float(delta), line=dict(color="#7f7f7f", dash="dot", width=1), row=1, col=1,
                  annotation_text="δ", annotation_position="top right")
    if "c" in seq.columns:
        fig.add_scatter(x=pos, y=seq["c"], mode="lines", name="c_t", line=dict(color="#ff7f0e"), row=2, col=1)
        fig.add_hline(y=0.0, line=dict(color="black", width=1), row=2, col=1)
    if "w" in seq.columns:
        fig.add_scatter(x=pos, y=seq["w"], mode="lines", name="w_t", line=dict(color="#9467bd"), row=3, col=1)
    if "loss_weight" in seq.columns:  # what the loss multiplied each token by (gate / IS weight), as logged
        fig.add_scatter(x=pos, y=seq["loss_weight"], mode="lines+markers", name="loss weight",
                        line=dict(color="#e377c2"), marker=dict(size=4), row=3, col=1)
    if "S" in seq.columns:
        fig.add_scatter(x=pos, y=seq["S"], mode="lines", name="S_t", line=dict(color="#8c564b"), row=4, col=1)
    fig.update_layout(height=640, hovermode="x unified", legend=dict(orientation="h", yanchor="top", y=-0.08))
    fig.update_yaxes(title_text="probability", range=[0, max(float(tv.max()), float(delta)) * 1.15], row=1, col=1)
    fig.update_yaxes(title_text="c_t", zeroline=True, row=2, col=1)  # full range: negative values stay visible
    fig.update_yaxes(title_text="w_t", row=3, col=1)
    fig.update_yaxes(title_text="S_t", row=4, col=1)
    fig.update_xaxes(title_text="position", row=4, col=1)
    return fig


def fig_attribution(table: pl.DataFrame, *, by: str, value: str = "abs") -> go.Figure:
    """The attribution terms of ``cppo_diag.analyses.attribution_by(...)`` per key: mean |term| (``value="abs"``),
    the signed mean (``"mean"``) or the share of mean |total| (``"share"``), one line per term, and the total
    dotted (not for shares, which sum to 1)."""
    key = "pos_bin" if by == "position" else by
    terms = [c[: -len("_share")] for c in table.columns if c.endswith("_share")]
    fig = go.Figure()
    for t in terms:
        fig.add_scatter(x=table[key], y=table[f"{t}_{value}"], mode="lines+markers", name=t)
    if value != "share":
        fig.add_scatter(x=table[key], y=table[f"total_{value}"], mode="lines", name="total (log π − log μ)",
                        line=dict(dash="dot", color="black"))
    ylabel = {"abs": "mean |term| (log-prob)", "mean": "mean term (log-prob)", "share": "share of mean |total|"}[value]
    xlabel = {"step": "training step", "position": "position (token index, bin start)",
              "lag": "lag (optimiser steps since sampling)", "update": "update within the batch"}[by]
    fig.update_layout(xaxis_title=xlabel, yaxis_title=ylabel, hovermode="x unified", legend=PAGE_LEGEND)
    return fig


def fig_position_strata(curves: pl.DataFrame, *, summary: Mapping[str, Any]) -> go.Figure:
    """|pi - mu| by position per stratum (``position_strata`` curves), the raw curve thick and black, the curve
    re-weighted to the run's stratum mix dashed: the gap between the two is composition."""
    fig = go.Figure()
    for s in summary["labels"]:
        part = curves.filter(pl.col("stratum") == s).sort("pos_bin")
        if part.height:
            fig.add_scatter(x=part["pos_bin"], y=part["tv_mean"], mode="lines+markers", name=str(s),
                            customdata=part.select("tokens").to_numpy(),
                            hovertemplate="%{y:.4g} (%{customdata[0]} tokens)")
    for s, style in (("all", dict(color="black", width=3)), ("reweighted", dict(color="black", dash="dash"))):
        part = curves.filter(pl.col("stratum") == s).sort("pos_bin")
        name = "all tokens" if s == "all" else "all, re-weighted to the run's stratum mix"
        fig.add_scatter(x=part["pos_bin"], y=part["tv_mean"], mode="lines", name=name, line=style)
    fig.update_layout(xaxis_title="position (token index, bin start)", yaxis_title="mean |π − μ|",
                      hovermode="x unified", legend=PAGE_LEGEND)
    return fig
