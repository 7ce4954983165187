"""Divergence by position (CPPO paper Fig. 2, interactive): a statistic of the per-token divergence per
position bin, the CPPO threshold schedule delta / w_t as an overlay, and the masked fraction by position of
the applied rule and of rules recomputed on the run."""

from __future__ import annotations

import polars as pl
import streamlit as st

from cppo_diag.analyses import plots_plotly as pp
from cppo_diag.app import controls, data, ui

# The page exists for the tails: the top-decile mean is what crosses delta / w_t (the mean hides it).
DEFAULT_STAT = "top10_mean"

figure_slot, note_slot, settings = ui.figure_first(
    "Divergence by position", "How far the trained policy π is from the sampling policy μ at each answer position: "
    "by default the top-decile mean of |π − μ| per position bin, the tail a token-level trust region acts on, "
    "against CPPO's per-token threshold δ / w_t.", n_slots=2)
with settings:
    path = ui.focus_run()
    c1, c2, c3, c4 = st.columns(4)
    kind = c1.selectbox("Divergence", list(controls.DIVERGENCES), format_func=controls.DIVERGENCES.get, key="div_kind")
    stat = c2.selectbox("Statistic", list(controls.STATISTICS), index=list(controls.STATISTICS).index(DEFAULT_STAT),
                        format_func=controls.STATISTICS.get, key="div_stat")
    adv = c3.selectbox("Advantage sign", list(controls.ADV_SIGNS), format_func=controls.ADV_SIGNS.get, key="div_adv")
    relative = c4.radio("Position", ["absolute", "relative"], horizontal=True, key="div_pos") == "relative"

    c1, c2, c3, c4 = st.columns(4)
    if relative:
        n_rel_bins = c1.select_slider("Bins over t / T", [5, 10, 20, 40, 50, 100], value=20, key="div_nrel")
        bin_width = 64
    else:
        bin_width = controls.bin_width(controls.default_bin_width(path), key="div_bw", container=c1)
        n_rel_bins = 20
    surv_x = c2.select_slider("Survival at x", controls.SURVIVAL_XS, value=0.1, key="div_x", disabled=stat != "surv",
                              help="P(D > x) per bin when the statistic is 'survival at x'")
    overlay = c3.toggle("Overlay δ / w_t", value=True, key="div_overlay",
                        help="CPPO's per-token threshold schedule (mean over the bin's tokens)")
    defaults = controls.rule_defaults(path)
    delta = c3.number_input("δ", min_value=0.001, value=float(defaults["delta"]), step=0.01, format="%.3f",
                            key="div_delta", disabled=not overlay)
    w_min = c4.slider("w_min", 0.0, 1.0, float(defaults["w_min"]), 0.05, key="div_wmin", disabled=not overlay)
    with st.expander("Steps and updates"):
        step_range = controls.step_range(path, key="div_steps", default_tokens=controls.AGGREGATE_TOKENS,
                                         what="Position statistics")
        updates = controls.updates_widget(path, key="div_updates")

# One query serves every statistic and every survival threshold; the overlay is queried at delta = 1 and
# scaled, since the mean of delta / w_t over a bin is linear in delta. Only the filters, the binning, the
# divergence kind and w_min trigger a new pass over the tokens.
table = data.analysis(  # mergeable partial aggregates, cached beside the run (analyses.aggregate); in-process
    "position_summary", path, workers=1, metrics=(kind,), bin_width=int(bin_width), relative=relative,
    n_rel_bins=int(n_rel_bins),
    step_range=step_range, adv_sign=adv, thresholds=controls.SURVIVAL_XS, updates=updates,
    delta=1.0 if overlay else None, w_min=float(w_min) if overlay else None,
)
if overlay and "threshold_mean" in table.columns:
    table = table.with_columns(pl.col("threshold_mean") * float(delta))
if table.height == 0:
    figure_slot.info("No tokens match these filters (step range / advantage sign).")
    st.stop()
column = controls.stat_column(stat, surv_x)
# delta / w_t is a threshold on |pi - mu|: drawn on the same (probability) axis, and only beside |pi - mu|.
threshold_shown = overlay and "threshold_mean" in table.columns and kind == "tv" and stat != "surv"
fig = pp.fig_position_statistic(
    table, column=column, label=controls.stat_label(stat, surv_x), relative=relative, show_mean=stat != "mean",
    title=f"{controls.DIVERGENCES[kind]}: {controls.stat_label(stat, surv_x)} by position",
    threshold_name=f"δ / w_t (δ={delta:g}, w_min={w_min:g})" if threshold_shown else None)
with figure_slot:
    ui.plot(fig, key="div_fig")
steps_note = "" if step_range is None else f" of steps {step_range[0]}-{step_range[1]}"
note_slot.caption(f"{int(table['count'].sum()):,} tokens{steps_note} in {table.height} bins. "
                  "Top-decile mean = mean of the tokens at or above the bin's p90 (the paper's caption is vague; "
                  "both p90 and the top-decile mean are offered). Quantiles interpolate linearly between order "
                  "statistics, as every p90 in cppo-diag."
                  + (" The δ / w_t overlay is a threshold on |π − μ|: pick that divergence (and a statistic other "
                     "than survival) to see it on the same axis." if overlay and not threshold_shown else ""))

st.subheader("Masked fraction by position")
masked_slot = st.container()  # the chart above its controls, as the divergence chart
rules = st.multiselect("Rules recomputed on this run", controls.recompute_rules(), default=controls.default_rules(path),
                       key="div_rules", help="Recomputed offline with the parameters below; the applied mask "
                       "(keep_applied) is drawn too when the run logged it.")
params = controls.rule_params_widget(path, key="div_params")
mask_range = controls.step_range(path, key="div_mask_steps", default_tokens=controls.RECOMPUTE_TOKENS,
                                 label="Steps for the masked fraction", what="Rules recomputed")
if rules or controls.has_applied(path):
    by_pos = data.compare_one(path, rules=tuple(rules), params={r: controls.params_for(r, params) for r in rules},
                              step_range=mask_range, bin_width=int(bin_width), include_applied=True,
                              relative=relative, n_rel_bins=int(n_rel_bins), updates=updates).by_position
    with masked_slot:
        if by_pos.height:
            ui.plot(pp.fig_masked_by_rule(by_pos, relative=relative), key="div_masked_fig")
        else:
            st.info("No tokens in the step range.")
else:
    masked_slot.caption("Pick a rule to recompute (this run did not log the applied mask).")
