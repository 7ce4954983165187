"""Doctor: the findings of ``cppo-diag doctor`` for each selected run, each naming the page and step range
that shows it, and the mismatch metric family (k1/k2/k3 KL, chi-square, ESS, ...) by step or position."""

from __future__ import annotations

import streamlit as st

from cppo_diag.analyses import plots_plotly as pp
from cppo_diag.app import data, ui

# Finding.page -> the page file of this app (app/streamlit_app.py).
PAGE_FILES = {
    "Divergence by position": "views/divergence.py",
    "Budget": "views/budget.py",
    "Runs": "views/runs.py",
    "Compare runs": "views/compare.py",
    "Doctor": "views/doctor.py",
    "Attribution": "views/attribution.py",
}
# Streamlit's own badges and Material icons (its bundled font): emoji squares render as empty boxes in a browser
# without an emoji font.
BADGE = {"critical": ":red-badge[:material/error: critical]", "warning": ":orange-badge[:material/warning: warning]",
         "info": ":blue-badge[:material/info: info]"}

st.title("Doctor")
st.caption("Plain-language findings about each run, with the numbers behind them (the same checks as "
           "`cppo-diag doctor`; statistics in docs/analyses.md, \"Doctor\"). The early warning is the divergence "
           "running away (its top decile past 0.75 nats); after it, a falling reward makes the collapse imminent "
           "(critical: where the live guard halts).")
runs = ui.runs_or_stop()
paths = data.selected() or runs[:1]
findings_slot = st.container()  # the findings first, the option that changes them under them
budget = st.toggle("Include the CPPO prefix-budget check (recomputes CPPO over the run: slower)", value=False,
                   key="doc_budget")


def _live_findings(path: str) -> None:
    """RUN/findings.jsonl: what the live doctor (``--doctor.live true``) found while training, as it fired."""
    from pathlib import Path

    from cppo_diag.storage.layout import findings_path, read_json_lines

    rows = read_json_lines(findings_path(Path(path)))
    status = _status(path)
    if not rows:
        if status == "running":
            st.caption("Live doctor: no finding so far (if the run trains with --doctor.live true).")
        return
    head = "Live doctor (findings as they fired while training)"
    if status == "halted":
        head += ": **the run was halted** at its first critical finding"
    st.markdown(head)
    for r in rows:
        at = f" from step {r.get('first_step')}" if r.get("first_step") is not None else ""
        st.markdown(f"- step {r.get('step')}: **{BADGE.get(r.get('severity'), r.get('severity'))} · "
                    f"`{r.get('id')}`**{at}: {r.get('message')}")


def _status(path: str) -> str | None:
    """The run's meta.json status through the app's cached reader (re-read when the run's files change)."""
    return data.get_run(path).meta.status


def _live_section(path: str) -> None:
    if _status(path) == "running":  # refresh while the run trains
        st.fragment(run_every=5)(_live_findings)(path)
    else:
        _live_findings(path)


with findings_slot:  # drawn above the toggle that changes them
    for path in paths:
        st.subheader(data.label(path))
        _live_section(path)
        try:
            findings = data.analysis("diagnose", path, budget=bool(budget))
        except ValueError as exc:
            st.error(str(exc))
            continue
        if not findings:
            st.success("No finding: nothing looks wrong in what this run logged.")
        for i, f in enumerate(findings):
            at = f" from step {f.first_step}" if f.first_step is not None else ""
            st.markdown(f"**{BADGE.get(f.severity, f.severity)} · `{f.id}`**{at}: {f.message}")
            where = f"{f.page}" + (f", steps {f.steps[0]}–{f.steps[1]}" if f.steps else "")
            target = PAGE_FILES.get(f.page)
            if target and target != "views/doctor.py":
                st.page_link(target, label=f"Shown on: {where}")
            else:
                st.caption(f"Shown on: {where}")
            with st.expander("Evidence", expanded=False):
                st.json(f.to_json()["evidence"], expanded=True)

st.divider()
st.subheader("Mismatch metric family")
st.caption("Per training step or position bin, from the logged log-probs: lr = log x − log μ (x = π), ρ = exp(lr). "
           "π already differs from μ in a batch's first update: that divergence includes the engine mismatch (the "
           "sampler's numerics against the trainer's) and, when rollouts are stale, the policy lag (μ is the policy "
           "of some iterations before); later updates add the policy's own movement on the batch. Names in verl, "
           "TRL, slime, NeMo-RL and AReaL: docs/analyses.md.")
mm_slot = st.container()  # the chart first, its controls under it
path = ui.focus_run()
c1, c2, c3 = st.columns(3)
by = c1.radio("By", ["step", "position"], horizontal=True, key="doc_mm_by")
# after the first update where the run has several per batch (the recorder writes that table); else all of them
several = bool(data.analysis("doctor_rows", path)["n_after"].sum())
updates = c2.radio("Updates", ["after_first", "first", "all"], index=0 if several else 2, horizontal=True,
                   key="doc_mm_updates",
                   format_func={"after_first": "after the first", "first": "first of each batch", "all": "all"}.get)
bin_width = c3.number_input("Bin width (tokens)", min_value=1, max_value=4096, value=16, key="doc_mm_bin",
                            disabled=by != "position")
table = data.analysis("mismatch_metrics", path, by=by, updates=updates, bin_width=int(bin_width))
if table.height == 0:
    mm_slot.info("No tokens for this update filter (a run with one update per batch has none after the first).")
    st.stop()
metrics = [c for c in table.columns if c not in ("step", "bin", "bin_start", "bin_end", "n_tokens", "n_seqs")]
chosen = st.multiselect("Metrics", metrics, default=["kl_k3", "chi2_token"], key="doc_mm_metrics")
with mm_slot:
    ui.plot(pp.fig_metric_family(table, chosen, by=by), key="doc_mm_fig")
with st.expander("Table"):
    st.dataframe(table, hide_index=True)
