"""Budget (CPPO paper Fig. 7): realised delta_b and the budget-mask share per step, when the prefix budget
first rejects a token (survival over position), and the slack c_t by position."""

from __future__ import annotations

import streamlit as st

from cppo_diag.analyses import plots_plotly as pp
from cppo_diag.analyses import run_summary
from cppo_diag.app import controls, data, ui
from cppo_diag.masks import rules_with

top_slot, settings = ui.figure_first(
    "Budget", "How often CPPO's prefix budget (SPEC CPPO steps 3-6), rather than the per-token threshold, is what "
    "masks a token: the budget-mask share per step (#tokens masked only by the budget / #masked), where along the "
    "answer the budget first rejects a token, and the slack c_t by position.")
with settings:
    path = ui.focus_run()
    defaults = controls.rule_defaults(path)
    budget_rules = set(rules_with(prefix_budget=True))  # the rule facts (cppo_diag/masks/registry.py)
    cppo_rules = [r for r in controls.recompute_rules() if r in budget_rules]
    c1, c2, c3, c4, c5 = st.columns(5)
    rule = c1.selectbox("Rule", cppo_rules, index=cppo_rules.index("cppo") if "cppo" in cppo_rules else 0,
                        key="bud_rule")
    delta = c2.number_input("δ", min_value=0.001, max_value=1.0, value=float(defaults["delta"]), step=0.01,
                            format="%.3f", key="bud_delta")
    delta_b = c3.number_input("δ_b (min / fixed)", min_value=0.0, max_value=0.5, value=float(defaults["delta_b"]),
                              step=0.005, format="%.3f", key="bud_delta_b")
    w_min = c4.slider("w_min", 0.0, 1.0, float(defaults["w_min"]), 0.05, key="bud_wmin")
    mode = c5.radio("δ_b mode", ["adaptive", "fixed"], horizontal=True, key="bud_mode",
                    index=0 if defaults.get("delta_b_mode", "adaptive") == "adaptive" else 1)
    c1, c2 = st.columns([1, 3])
    bin_width = controls.bin_width(controls.default_bin_width(path), key="bud_bw", container=c1)
    with c2:
        step_range = controls.step_range(path, key="bud_steps", default_tokens=controls.RECOMPUTE_TOKENS,
                                         what="CPPO recomputed")
        updates = controls.updates_widget(path, key="bud_updates")
params = {"delta": float(delta), "delta_b": float(delta_b), "w_min": float(w_min), "delta_b_mode": mode}

res = data.analysis("budget_exhaustion", path, params=params, rule=rule, step_range=step_range,
                    bin_width=int(bin_width), updates=updates, engine="local", workers=1)  # cached per step group

if res.by_step.height == 0:
    top_slot.info("No tokens in the selected steps.")
    st.stop()
with top_slot:
    left, right = st.columns(2)
    with left:
        ui.plot(pp.fig_budget_by_step(res.by_step), key="bud_by_step", tight=False)
    with right:
        ui.plot(pp.fig_first_reject(res.first_reject), key="bud_first_reject", tight=False)
ui.plot(pp.fig_slack(res.slack), key="bud_slack", tight=False)
with st.expander("Per-step table"):
    st.dataframe(res.by_step, hide_index=True)

# The trainer's own per-step metrics cover every step at no cost (no recompute): show them when logged.
applied = controls.applied_rule(path)
fig7 = run_summary.logged_budget_by_step(data.steps(path), applied)
if fig7 is not None:
    ui.plot(pp.fig_budget_by_step(fig7, title=f"As logged by the trainer ({applied}, every step)"),
            key="bud_logged", tight=False)
    if updates != "all":
        st.caption("The trainer's step scalars cover every update of the step, the first included; the figures "
                   "above recompute the chosen updates only.")
