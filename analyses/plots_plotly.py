"""Plotly figures for the app, built from the same aggregated tables as ``analyses.plots_mpl``.

Same builder names and arguments as the matplotlib module; each returns a ``plotly.graph_objects.Figure``.
"""

from __future__ import annotations

import html
import textwrap

import numpy as np
import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from analyses.plots_mpl import (TAIL_LABELS, _centres, _label, _metric_rows, _pos_xlabel, _series_keys,
                                hill_message, threshold_drawn, whatif_grid)
from analyses.position import METRIC_LABELS

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


def fig_position_divergence(table: pl.DataFrame, *, metric: str = "tv", tail: str = "top10_mean",
                            title: str | None = None) -> go.Figure:
    df = _metric_rows(table, metric)
    if df.is_empty():
        return _empty(f"no tokens for metric {metric!r}")
    x = _centres(df)
    fig = go.Figure()  # one y-axis: delta / w_t and |pi - mu| are both probabilities (see plots_mpl)
    fig.add_trace(go.Scatter(x=x, y=df["mean"].to_numpy(), mode="lines+markers", name=f"bin mean of {metric}"))
    fig.add_trace(go.Scatter(x=x, y=df[tail].to_numpy(), mode="lines+markers", name=TAIL_LABELS.get(tail, tail)))
    ylabel = METRIC_LABELS.get(metric, metric)
    if threshold_drawn(df, metric):
        fig.add_trace(go.Scatter(x=x, y=df["threshold_mean"].to_numpy(), mode="lines", name="CPPO threshold δ / w_t",
                                 line=dict(dash="dash", color="gray")))
        ylabel = f"{ylabel}; threshold δ / w_t"
        fig.update_yaxes(rangemode="tozero")
    fig.update_yaxes(title_text=ylabel)
    fig.update_layout(**LAYOUT, title=title or f"Divergence by position ({metric}; tail = {TAIL_LABELS.get(tail, tail)})",
                      xaxis_title=_pos_xlabel(df))
    return fig


def fig_position_survival(table: pl.DataFrame, *, metric: str = "tv", title: str | None = None) -> go.Figure:
    df = _metric_rows(table, metric)
    cols = [c for c in df.columns if c.startswith("surv_")]
    if df.is_empty() or not cols:
        return _empty(f"no tokens for metric {metric!r}")
    fig = go.Figure()
    for c in cols:
        y = df[c].to_numpy().astype(float)
        fig.add_trace(go.Scatter(x=_centres(df), y=np.where(y > 0, y, np.nan), mode="lines+markers",
                                 name=f"P(D > {c[5:]})"))
    fig.update_layout(**LAYOUT, title=title or f"Tail survival by position ({metric})", xaxis_title=_pos_xlabel(df),
                      yaxis_title=f"P(D > x), D = {METRIC_LABELS.get(metric, metric)}", yaxis_type="log")
    return fig


def fig_position_hill(table: pl.DataFrame, *, metric: str = "abs_logratio", title: str | None = None) -> go.Figure:
    df = _metric_rows(table, metric)
    msg = hill_message(df, metric)
    if msg is not None:
        return _empty(msg)
    fig = go.Figure(go.Scatter(x=_centres(df), y=df["hill_alpha"].cast(pl.Float64).to_numpy(), mode="lines+markers",
                               name="Hill α̂ (exceedances over P90)"))
    fig.update_layout(**LAYOUT, title=title or f"Tail heaviness by position ({metric}; smaller α̂ = heavier tail)",
                      xaxis_title=_pos_xlabel(df), yaxis_title="tail index α̂ (dimensionless)", showlegend=True)
    return fig


def fig_masked_by_position(by_position: pl.DataFrame, *, title: str | None = None) -> go.Figure:
    df = by_position.filter(pl.col("n_valid") > 0) if "n_valid" in by_position.columns else by_position
    if df.is_empty():
        return _empty("no tokens")
    fig = go.Figure()
    for key, part in _series_keys(df):
        part = part.sort("bin")
        dash = "dot" if key and str(key[-1]).startswith("applied:") else "solid"
        fig.add_trace(go.Scatter(x=_centres(part), y=100 * part["masked_frac"].to_numpy(), mode="lines+markers",
                                 name=_label(key), line=dict(dash=dash)))
    fig.update_layout(**LAYOUT, title=title or "Masked fraction by position", xaxis_title=_pos_xlabel(df),
                      yaxis_title="masked tokens (% of valid)")
    return fig


def fig_masked_by_step(by_step: pl.DataFrame, *, title: str | None = None) -> go.Figure:
    if by_step.is_empty():
        return _empty("no steps")
    fig = go.Figure()
    for key, part in _series_keys(by_step):
        part = part.sort("step")
        fig.add_trace(go.Scatter(x=part["step"].to_numpy(), y=100 * part["masked_frac"].to_numpy(),
                                 mode="lines+markers", name=_label(key)))
    fig.update_layout(**LAYOUT, title=title or "Masked fraction by step", xaxis_title="training step",
                      yaxis_title="masked tokens (% of valid)")
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


def fig_mismatch(table: pl.DataFrame, *, metric: str = "mismatch_tv", title: str | None = None) -> go.Figure:
    df = _metric_rows(table, metric)
    if df.is_empty():
        return _empty("no tokens with logp_old")
    x = _centres(df)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=df["mean"].to_numpy(), mode="lines+markers", name="bin mean"))
    fig.add_trace(go.Scatter(x=x, y=df["p90"].to_numpy(), mode="lines+markers", name="P90"))
    fig.add_trace(go.Scatter(x=x, y=df["top10_mean"].to_numpy(), mode="lines+markers", name=TAIL_LABELS["top10_mean"]))
    fig.update_layout(**LAYOUT, title=title or "Train/rollout mismatch by position", xaxis_title=_pos_xlabel(df),
                      yaxis_title=METRIC_LABELS.get(metric, metric))
    return fig


def fig_compare(summary: pl.DataFrame, *, value: str = "masked_frac", title: str | None = None) -> go.Figure:
    if summary.is_empty():
        return _empty("nothing to compare")
    fig = go.Figure()
    runs = list(dict.fromkeys(summary["run"].to_list()))
    for rule in dict.fromkeys(summary["rule"].to_list()):
        part = summary.filter(pl.col("rule") == rule)
        vals = {r: v for r, v in zip(part["run"].to_list(), part[value].to_list())}
        ys = [100 * vals[r] if vals.get(r) is not None else None for r in runs]
        fig.add_trace(go.Bar(x=runs, y=ys, name=rule, texttemplate="%{y:.2f}",
                             marker_pattern_shape="/" if rule.startswith("applied:") else ""))
    fig.update_layout(**LAYOUT, barmode="group", title=title or "Masked fraction: runs × rules (same logged tokens)",
                      xaxis_title="run", yaxis_title="masked tokens (% of valid)")
    return fig
