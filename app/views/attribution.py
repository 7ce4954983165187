"""Attribution: why pi moved away from mu (engine mismatch, policy lag, this batch's updates) by step, position
or lag, and whether the rise of |pi - mu| along the answer is the position or just more uncertain tokens later
(``cppo_diag.analyses.attribution``)."""

from __future__ import annotations

import streamlit as st

from cppo_diag.analyses import plots_plotly as pp
from cppo_diag.analyses.attribution import AttributionInputError
from cppo_diag.app import data, ui

fig_slot, controls_box = ui.figure_first(
    "Attribution", "Why π left μ, term by term: log π − log μ = engine (the sampler's numerics against the "
    "trainer's, same weights) + lag (the weights that sampled the batch against those at its first update) + update "
    "(this batch's own updates). Runs without logp_behavior or logp_old show the terms they cannot separate "
    "combined, named so.")
with controls_box:
    path = ui.focus_run()
    cols = data.token_columns(path)
    c1, c2 = st.columns(2)
    by = c1.radio("By", ["step", "position", "lag", "update"] if "lag" in cols else ["step", "position", "update"],
                  horizontal=True, key="attr_by")
    value = c2.radio("Value", ["abs", "mean", "share"], horizontal=True, key="attr_value",
                     format_func={"abs": "mean |term|", "mean": "signed mean", "share": "share of mean |total|"}.get)
with fig_slot:
    try:
        table = data.analysis("attribution_by", path, by=by, bin_width=32)
    except (AttributionInputError, KeyError, ValueError) as exc:
        st.error(str(exc))
        st.stop()
    ui.need(table.height > 0, "No tokens in this run.")
    ui.plot(pp.fig_attribution(table, by=by, value=value), key="attr_fig")
    summary = data.analysis("attribution_summary", path)
    shares = ", ".join(f"{t} {summary[f'{t}_share']:.0%}" for t in summary["terms"]
                       if summary[f"{t}_share"] is not None)
    st.markdown(f"Over the run's {summary['tokens']:,} tokens, mean |log π − log μ| = {summary['total_abs']:.4f}; "
                f"shares of it: {shares}.")

st.divider()
st.subheader("Position or uncertainty?")
st.caption("|π − μ| by position within strata of similar uncertainty. The dashed curve re-weights every position to "
           "the run's overall stratum mix: what it still rises is growth within strata; the gap to the thick curve is "
           "composition (later positions holding more uncertain tokens).")
strata_fig = st.container()
options = ["mu", *(["entropy"] if "entropy" in cols else []), *(["fork"] if "fork" in cols else [])]
strata = st.radio("Strata", options, horizontal=True, key="attr_strata",
                  format_func={"mu": "μ's probability of the token", "entropy": "policy entropy",
                               "fork": "the task's fork oracle"}.get)
with strata_fig:
    curves, s = data.analysis("position_strata", path, strata=strata, bin_width=32)
    ui.plot(pp.fig_position_strata(curves, summary=s), key="attr_strata_fig")
    share = s["composition_share"]
    st.markdown(f"First third of the answer → last third: {s['first']:.4f} → {s['last']:.4f} (raw), "
                f"{s['first_within']:.4f} → {s['last_within']:.4f} re-weighted; composition explains "
                f"**{'n/a' if share is None else f'{share:.0%}'}** of the rise.")
