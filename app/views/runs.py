"""Runs: every run under the roots with its metadata; select one or several for the other pages."""

from __future__ import annotations

import polars as pl
import streamlit as st

from cppo_diag.app import data, ui

st.title("Runs")
st.caption("Every run under the roots, with what trained it and how far it got; the rows you select are the runs the "
           "other pages show.")
runs = ui.runs_or_stop()
table = data.runs_table(runs)

selected = data.selected()
rows_selected = [i for i, p in enumerate(runs) if p in selected]


def _on_select() -> None:
    state = st.session_state.get(table_key)
    rows = list(state.selection.rows) if state is not None else []
    st.session_state[data.SELECTED] = [runs[i] for i in rows if i < len(runs)]


# The key follows the selection so that a change made in the sidebar redraws the table with it.
table_key = "runs_table_" + str(abs(hash(tuple(selected))) % 10**8)
shown = table.with_columns(pl.Series("run", [data.label(p) for p in runs])).select(
    [c for c in ("run", "status", "trainer", "rule", "rule_params", "model", "task", "steps", "tokens",
                 "last_reward", "error") if c in table.columns or c == "run"]
)
if "error" in shown.columns and shown["error"].fill_null("").str.len_chars().max() == 0:
    shown = shown.drop("error")
st.dataframe(
    shown,
    key=table_key,
    on_select=_on_select,
    selection_mode="multi-row",
    selection_default={"selection": {"rows": rows_selected}},
    hide_index=True,
    column_config={
        "tokens": st.column_config.NumberColumn("tokens", format="localized"),
        "last_reward": st.column_config.NumberColumn("last reward", format="%.3f"),
        "rule_params": st.column_config.TextColumn("rule params", width="medium"),
    },
)
st.caption(
    f"{len(runs)} run(s); {len(selected)} selected. Select rows here or in the sidebar; the selection is kept "
    "across pages. 'live' = a writer is still appending to the run (use Refresh or Auto in the sidebar)."
)

for path in selected:
    with st.expander(f"{data.label(path)} - metadata and scalars"):
        run = data.get_run(path)
        st.json(run.meta, expanded=False)
        sdf = data.steps(path)
        if sdf.height:
            st.dataframe(sdf.tail(20), hide_index=True)
        else:
            st.caption("No per-step scalars logged.")
