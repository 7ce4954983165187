"""Small UI helpers shared by the pages: the sidebar, the run picker, charts, messages.

Pages stay UI-only: data comes from :mod:`cppo_diag.app.data` (which calls the reader and ``analyses``), figures from
the builders of ``cppo_diag.analyses.plots_plotly``, drawn with :func:`plot`.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import streamlit as st

from cppo_diag.app import data

# Widget keys whose values survive page switches (Streamlit drops the state of widgets that a page does not
# draw; re-assigning the key at the top of every script run keeps it).
PERSISTENT_KEYS = (data.SELECTED, data.FOCUS, "auto_refresh", "refresh_every_s")

PLOT_CONFIG = {"displaylogo": False, "scrollZoom": False}


def keep_persistent_state() -> None:
    for key in PERSISTENT_KEYS:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


def sidebar() -> None:
    """Roots, the global run selection, and refresh controls (drawn on every page)."""
    rs = data.roots()
    runs = data.all_runs()
    with st.sidebar:
        st.caption("Roots: " + ", ".join(f"`{r}`" for r in rs))
        # Drop selections that no longer exist before drawing the widget (Streamlit rejects unknown values).
        if data.SELECTED in st.session_state:
            st.session_state[data.SELECTED] = [p for p in st.session_state[data.SELECTED] if p in runs]
        st.multiselect(
            "Selected runs",
            options=runs,
            format_func=data.label,
            key=data.SELECTED,
            help="Runs the pages work on. Compare shows all of them; the other pages show one at a time.",
        )
        c1, c2 = st.columns(2)
        if c1.button("Refresh", icon=":material/refresh:", help="Re-scan the roots and re-read runs that changed"):
            data.discover.clear()
            st.rerun()
        live = [p for p in runs if _safe_live(p)]
        c2.toggle("Auto", key="auto_refresh", help="Re-read live runs on a timer", disabled=not live)
        if st.session_state.get("auto_refresh") and live:
            every = st.number_input("every (s)", min_value=2, max_value=600, value=10, key="refresh_every_s")
            _watch_live(live, float(every))
        if live:
            st.caption(f"{len(live)} live run(s): " + ", ".join(data.label(p) for p in live))


def _safe_live(path: str) -> bool:
    try:
        return data.is_live(path)
    except Exception:  # an unreadable run is reported on the Runs page, not here
        return False


def _watch_live(live: Sequence[str], every: float) -> None:
    """A fragment that re-runs on a timer and triggers a full rerun when a live run changed on disk."""

    @st.fragment(run_every=every)
    def _poll() -> None:
        versions = tuple(data.run_version(p) for p in live)
        prev = st.session_state.get("_live_versions")
        st.session_state["_live_versions"] = versions
        if prev is not None and prev != versions:
            data.discover.clear()
            st.rerun(scope="app")

    _poll()


def figure_first(title: str, what: str, n_slots: int = 1) -> tuple[Any, ...]:
    """The head every page shares (issue 24): the title, one sentence saying what the page shows, then
    ``n_slots`` empty containers for its figures and a bordered container for its controls, in that order on
    the page. The page reads its controls in the last container, then fills the slots above it, so the figure
    is on the first screen and the controls under it."""
    st.title(title)
    st.caption(what)
    return (*(st.container() for _ in range(n_slots)), st.container(border=True))


def runs_or_stop() -> list[str]:
    runs = data.all_runs()
    if not runs:
        st.info(
            "No runs found under " + ", ".join(f"`{r}`" for r in data.roots())
            + ". Record one with `cppo_diag.RunRecorder` or train with `cppo-diag train`, then press Refresh."
        )
        st.stop()
    return runs


def focus_run(label: str = "Run") -> str:
    """Pick the one run a single-run page shows: among the selected runs, or all runs if none is selected."""
    runs = runs_or_stop()
    options = data.selected() or runs
    if st.session_state.get(data.FOCUS) not in options:
        st.session_state[data.FOCUS] = options[0]
    return st.selectbox(label, options=options, format_func=data.label, key=data.FOCUS)


def plot(fig: Any, key: str, *, tight: bool = True, top: int = 40) -> None:
    """Draw a plotly figure of ``cppo_diag.analyses.plots_plotly``. ``tight=False`` keeps the figure's own margins and
    template (the report twins, which set ``plots_plotly.LAYOUT``); the pages' own figures are drawn tight in
    the Streamlit theme, with ``top`` pixels above the plot for the title (more for panels with titles)."""
    if tight:
        fig.update_layout(margin=dict(l=10, r=10, t=top, b=10))
    st.plotly_chart(fig, key=key, config=PLOT_CONFIG, theme="streamlit" if tight else None)


def need(condition: bool, message: str) -> None:
    """Show an info box and stop the page when ``condition`` is false (e.g. a column the run lacks)."""
    if not condition:
        st.info(message)
        st.stop()


def token_span(text: str, *, title: str, css_class: str, style: str) -> str:
    """One token of the inspector as an HTML ``<span>``: ``text`` (the raw token string) and ``title`` are
    HTML-escaped exactly once here, so the browser shows the token as written ('&' as '&', '<b>' as text);
    a newline is shown as '↵' and breaks the line. ``css_class`` and ``style`` are the app's own markup."""
    shown = html.escape(text, quote=True).replace("\n", "↵<br>")
    return f'<span class="{css_class}" title="{html.escape(title, quote=True)}" style="{style}">{shown}</span>'
