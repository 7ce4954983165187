"""Compare runs: masked fraction by step and by position for each run's applied rule and for rules
recomputed on every run, reward and accuracy curves, and a table of summary numbers."""

from __future__ import annotations

import polars as pl
import streamlit as st

from cppo_diag import metric_names as M
from cppo_diag.analyses import plots_plotly as pp
from cppo_diag.analyses import run_summary
from cppo_diag.app import controls, data, ui

N_REL_BINS = 20  # bins of t / T in (0, 1] when the position is relative (as on Divergence by position)
DEFAULT_RUNS = 4  # runs shown when none is selected (one panel each)
DEFAULT_RULES = ("cppo",)  # recomputed by default beside each run's applied mask: two lines a panel
PANEL_TOP = 70  # px above the panels: the figure's title, then the panels' titles

pos_slot, step_slot, curves_slot, settings = ui.figure_first(
    "Compare runs", "Where each run's trust region masks tokens: the masked fraction by position and by step, one "
    "panel per run with each rule in its own colour, then the runs' reward and accuracy curves.", n_slots=3)
runs = ui.runs_or_stop()
with settings:
    if "cmp_runs" not in st.session_state:
        st.session_state["cmp_runs"] = data.selected() or runs[:DEFAULT_RUNS]
    st.session_state["cmp_runs"] = [p for p in st.session_state["cmp_runs"] if p in runs]
    chosen = st.multiselect("Runs to compare", runs, format_func=data.label, key="cmp_runs")
    if not chosen:
        pos_slot.info("Pick at least one run (two or more to compare).")
        st.stop()

    c1, c2, c3 = st.columns([3, 1, 1])
    rules = c1.multiselect("Rules recomputed on every run", controls.recompute_rules(),
                           default=[r for r in DEFAULT_RULES if r in controls.recompute_rules()], key="cmp_rules",
                           help="Each run's applied mask is drawn too (in black) when the run logged it.")
    window = c2.radio("Steps of each run", ["latest", "all"], horizontal=True, key="cmp_window",
                      help=f"latest: each run's latest steps up to {controls.RECOMPUTE_TOKENS:,} tokens (fast on big "
                      "runs); all: every step (recomputing rules on a 50M-token run takes minutes, once)")
    position = c3.radio("Position", ["absolute", "relative"], horizontal=True, key="cmp_pos",
                        help="relative: the masked fraction over t / T (t = pos + 1, T = the response length) in "
                        f"{N_REL_BINS} equal bins, so responses of different lengths line up")
    relative = position != "absolute"
    profiles = st.multiselect(
        "CPPO parameter sets recomputed on every run", controls.cppo_profiles(), default=[], key="cmp_profiles",
        help="Named parameter sets of implementations in the field (docs/rules.md): paper = the defaults, unirl = the "
             "authors' code, verl-pr6731 = T in w_t is the run's maximum response length and the budget cap 5. Each "
             "is drawn as cppo[<name>], so you see how far the variants' masks differ on these runs.")
    for name in profiles:
        st.caption(controls.profile_caption(chosen[0], name))
    updates = controls.updates_widget(chosen, key="cmp_updates")
    params = controls.rule_params_widget(chosen[0], key="cmp_params")
    bin_width = 64 if relative else controls.bin_width(max(controls.default_bin_width(p) for p in chosen),
                                                        key="cmp_bw")


def _range(path: str) -> tuple[int, int] | None:
    steps = data.completed_steps(path) or data.token_steps(path)
    if not steps:
        return None
    if window == "latest":
        return data.recent_window(path, controls.RECOMPUTE_TOKENS)
    return (steps[0], steps[-1])


summaries, by_pos, by_step = [], [], []
progress = pos_slot.progress(0.0, text="Recomputing rules on the runs (cached afterwards)")
rule_params = {r: controls.params_for(r, params) for r in rules}
for i, path in enumerate(chosen):
    rng = _range(path)
    if rng is not None:
        res = data.compare_one(path, rules=tuple(rules), params=rule_params, step_range=rng,
                               bin_width=int(bin_width), include_applied=True, relative=relative,
                               n_rel_bins=N_REL_BINS, updates=updates, profiles=tuple(profiles))
        summaries.append(res.summary.with_columns(steps=pl.lit(f"{rng[0]}-{rng[1]}")))
        by_pos.append(res.by_position)
        by_step.append(res.by_step)
    progress.progress((i + 1) / len(chosen))
progress.empty()
if not summaries:
    pos_slot.info("The chosen runs have no tokens yet.")
    st.stop()

runs_shown = [data.label(p) for p in chosen]  # panels in this order
rule_labels = [*rules, *(f"cppo[{p}]" for p in profiles)]  # one colour per rule
pos = pl.concat(by_pos, how="diagonal_relaxed")
with pos_slot:
    if pos.height:
        ui.plot(pp.fig_runs_by_rule_panels(
            pos, x="bin_start", y="masked_frac", title="Masked fraction by position",
            x_title="relative position t / T (bin start)" if relative else "position (bin start)",
            runs=runs_shown, rules=rule_labels), key="cmp_by_pos", top=PANEL_TOP)
with step_slot:
    if by_step:
        ui.plot(pp.fig_runs_by_rule_panels(pl.concat(by_step, how="diagonal_relaxed"), x="step", y="masked_frac",
                                           title="Masked fraction by step", x_title="step", runs=runs_shown,
                                           rules=rule_labels), key="cmp_by_step", top=PANEL_TOP)

curves = []
for path in chosen:
    logged = run_summary.reward_curves(data.steps(path))
    if logged is not None:
        curves.append(logged.with_columns(run=pl.lit(data.label(path))))
if curves:
    cur = pl.concat(curves, how="diagonal_relaxed")
    names = [c for c in cur.columns if c not in ("step", "run")]
    default = [n for n in names if n in (M.REWARD_MEAN, M.ACC_MEAN)] or names[:2]  # the trainer's names
    with settings:
        picked = st.multiselect("Curves", names, default=default, key="cmp_curves")
    with curves_slot:
        ui.plot(pp.fig_run_curves(cur, picked, runs=runs_shown), key="cmp_curves_fig")
else:
    curves_slot.caption("No reward or accuracy scalars logged by these runs.")

st.subheader("Summary")
st.dataframe(pl.concat(summaries, how="diagonal_relaxed"), hide_index=True)
