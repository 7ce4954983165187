"""cppo-diag browser app (Streamlit): see docs/app.md. Start it with `cppo-diag app`."""
