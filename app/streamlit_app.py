"""cppo-diag browser app: a router (``st.navigation``) over the UI-only pages in ``app/views/``.

The pages folder is deliberately not named ``pages/``: Streamlit 1.67 still switches to its legacy
multipage mode when a ``pages/`` folder sits next to the main script, and then runs a page file directly
(without this router and its sidebar) when a session starts on that page's URL (details in docs/app.md).

Run it with ``cppo-diag app [--root DIR ...]`` (or ``streamlit run app/streamlit_app.py -- --root DIR``).
The sidebar built here is shared by every page: the run roots, the selected runs (kept in session state
across pages), and the refresh controls for runs still being written. A path that ``app/data.py`` refuses
(outside the roots and the runs linked into them) is shown as its one-sentence message, not a traceback.
"""

from __future__ import annotations

import streamlit as st

from cppo_diag.app import ui

st.set_page_config(page_title="cppo-diag", layout="wide")

# No page icons: Streamlit fetches a page's material icon from fonts.gstatic.com to use as the favicon, and
# the app must load nothing from outside 127.0.0.1 (tests/app/test_browser.py checks it).
PAGES = [
    st.Page("views/runs.py", title="Runs", url_path="home", default=True),
    st.Page("views/divergence.py", title="Divergence by position", url_path="divergence"),
    st.Page("views/attribution.py", title="Attribution", url_path="attribution"),
    st.Page("views/budget.py", title="Budget", url_path="budget"),
    st.Page("views/compare.py", title="Compare runs", url_path="compare"),
    st.Page("views/inspector.py", title="Token inspector", url_path="inspector"),
    st.Page("views/whatif.py", title="What-if", url_path="whatif"),
    st.Page("views/doctor.py", title="Doctor", url_path="doctor"),
    # The default page is served at "/" only (its url_path just reserves a name), so /runs, the Runs page by
    # its own name, would be "Page not found": this hidden twin serves the same script there.
    st.Page("views/runs.py", title="Runs", url_path="runs", visibility="hidden"),
]

ui.keep_persistent_state()
ui.sidebar()
page = st.navigation(PAGES)
try:
    page.run()
except PermissionError as exc:  # a path app/data.py refused (see its "Security"): one sentence, no traceback
    st.error(str(exc))
except Exception as exc:  # noqa: BLE001 - an unreadable run: one line naming the file and field, no traceback
    st.error(f"This page could not be shown: {type(exc).__name__}: {' '.join(str(exc).split())}")
