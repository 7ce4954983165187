"""What-if: recompute a rule with other parameters (delta, delta_b, w_min) on the selected steps and set
its masked fraction and budget share against the rule the run applied.

Speed: the sliders and everything they drive live in one ``st.fragment``, so a slider move reruns only that
part of the page (not the sidebar, the run discovery or the step range), and ``data.recompute_steps`` keeps
the chosen steps' batches in memory, so a new value only re-runs the rule on them (docs/benchmarks.md, "App")."""

from __future__ import annotations

import polars as pl
import streamlit as st

from cppo_diag.analyses import plots_plotly as pp
from cppo_diag.app import controls, data, ui

whatif_slot, settings = ui.figure_first(  # the fragment (figures, then its sliders) is drawn into the slot
    "What-if", "What a rule with other parameters (δ, δ_b, w_min) would have masked on this run's steps, by position "
    "and by step, against the rule the run applied.")
with settings:
    path = ui.focus_run()
    step_range = controls.step_range(path, key="wi_steps", default_tokens=controls.RECOMPUTE_TOKENS,
                                     label="Steps recomputed", what="Rules recomputed")
    ui.need(step_range is not None, "This run has no token rows yet.")
    updates = controls.updates_widget(path, key="wi_updates")
applied = controls.applied_rule(path)
base_rule = applied or "cppo"
base = controls.rule_defaults(path, base_rule)
cppo = controls.rule_defaults(path, "cppo")
rules = controls.recompute_rules()
bin_width = controls.default_bin_width(path)
ref_name = f"applied: {applied}" if applied else "reference: cppo (defaults)"


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


@st.fragment
def whatif() -> None:
    """The parameter widgets and everything they drive: a widget change reruns this function only. The
    figures are drawn above the widgets (into ``figures``, filled once the widgets are read)."""
    figures = st.container()
    c1, c2, c3, c4 = st.columns(4)
    rule = c1.selectbox("Rule", rules, index=rules.index("cppo") if "cppo" in rules else 0, key="wi_rule")
    delta = c2.slider("δ", 0.01, 0.5, float(cppo["delta"]), 0.005, key="wi_delta")
    delta_b = c3.slider("δ_b", 0.0, 0.1, float(cppo["delta_b"]), 0.001, format="%.3f", key="wi_delta_b")
    w_min = c4.slider("w_min", 0.0, 1.0, float(cppo["w_min"]), 0.05, key="wi_wmin")
    spec = controls.rule_specs()[rule]
    profile = None
    if rule == "cppo":
        names = controls.cppo_profiles()
        profile = st.selectbox("CPPO parameter set", names, index=names.index("paper"), key="wi_profile",
                               help="Implementations in the field as named parameter sets (docs/rules.md); the "
                                    "sliders above set δ, δ_b and w_min on top of it.")
        st.caption(controls.profile_caption(path, profile))
    base_set = controls.profile_params(path, profile) if profile else {}
    params = {**base_set, **{k: v for k, v in {"delta": delta, "delta_b": delta_b, "w_min": w_min}.items()
                             if k in spec.params}}
    if "eps_high" in spec.params or "eps_low" in spec.params:
        e1, e2 = st.columns(2)
        params["eps_low"] = e1.slider("eps_low", 0.0, 1.0, float(spec.params.get("eps_low") or 0.2), 0.01,
                                      key="wi_eps_low")
        params["eps_high"] = e2.slider("eps_high", 0.0, 5.0, float(spec.params.get("eps_high") or 0.28), 0.01,
                                       key="wi_eps_high")

    new = controls.recompute_steps(path, rule=rule, params=params, step_range=step_range, bin_width=bin_width,
                                   updates=updates)
    base_params = {k: v for k, v in base.items() if k in controls.rule_specs()[base_rule].params}
    ref = controls.recompute_steps(path, rule=base_rule, params=base_params, step_range=step_range,
                                   bin_width=bin_width, updates=updates)

    m1, m2, m3, m4 = figures.columns(4)
    nf, rf = new.overall.get("masked_frac"), ref.overall.get("masked_frac")
    nb, rb = new.overall.get("budget_share"), ref.overall.get("budget_share")
    m1.metric(f"masked fraction ({rule})", _pct(nf),
              delta=None if nf is None or rf is None else f"{100 * (nf - rf):+.2f} pp vs {ref_name}",
              delta_color="off")
    m2.metric(f"budget share ({rule})", _pct(nb),
              delta=None if nb is None or rb is None else f"{100 * (nb - rb):+.2f} pp", delta_color="off")
    m3.metric(f"masked fraction ({ref_name})", _pct(rf))
    m4.metric("tokens recomputed", f"{new.overall.get('n_valid', 0):,}")
    if ref.agreement:
        figures.caption(f"The reference recompute agrees with the logged mask on {100 * ref.agreement['agreement']:.3f}% "
                   "of tokens.")

    results = {f"{rule} (what-if)": new, ref_name: ref}
    with figures:
        ui.plot(pp.fig_whatif_by_position(results), key="wi_by_pos")
    ui.plot(pp.fig_whatif_by_step(results), key="wi_by_step")

    if rule == "cppo" and st.toggle("Every CPPO parameter set at these δ, δ_b, w_min", key="wi_profiles"):
        rows = []
        for name in controls.cppo_profiles():
            pp_params = {**controls.profile_params(path, name), "delta": delta, "delta_b": delta_b, "w_min": w_min}
            r = controls.recompute_steps(path, rule="cppo", params=pp_params, step_range=step_range,
                                         bin_width=bin_width, updates=updates)
            rows.append({"parameter set": name, "masked fraction": r.overall.get("masked_frac"),
                         "budget share": r.overall.get("budget_share"), "tokens": r.overall.get("n_valid")})
        st.dataframe(pl.DataFrame(rows), hide_index=True,
                     column_config={"masked fraction": st.column_config.NumberColumn(format="percent"),
                                    "budget share": st.column_config.NumberColumn(format="percent")})

    if st.toggle("Sweep a δ × δ_b grid around these values (CPPO)", key="wi_sweep"):
        deltas = tuple(sorted({round(delta * f, 4) for f in (0.5, 0.75, 1.0, 1.5, 2.0)}))
        delta_bs = tuple(sorted({round(delta_b * f, 4) for f in (0.0, 0.5, 1.0, 2.0, 4.0)}))
        sweep = data.analysis("whatif_sweep", path, deltas=deltas, delta_bs=delta_bs, w_mins=(float(w_min),),
                              base_params={k: v for k, v in {**cppo, **base_set}.items()
                                           if k in controls.rule_specs()["cppo"].params},
                              step_range=step_range, updates=updates)
        ui.plot(pp.fig_whatif(sweep, value="masked_frac", w_min=float(w_min)), key="wi_sweep_fig", tight=False)


with whatif_slot:
    whatif()
