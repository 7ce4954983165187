"""The app's pages (one Streamlit page per module, UI only); routed by app/streamlit_app.py."""
