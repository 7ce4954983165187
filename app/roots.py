"""Where the app looks for runs when it is given no ``--root``: light (no Streamlit), shared by the app and
``cppo-diag app``. The app is installed as ``cppo_diag.app``, so nothing here assumes a source checkout."""

from __future__ import annotations

from pathlib import Path

ROOTS_ENV = "CPPO_DIAG_ROOTS"  # os.pathsep-separated run roots: set by `cppo-diag app`, read by cppo_diag.app.data


def default_root_candidates() -> list[Path]:
    """The bundled ``sample_logs/`` of a source checkout (the folder beside ``app/``, present in an editable
    install), then ``./sample_logs`` in the working directory."""
    checkout = Path(__file__).resolve().parents[1] / "sample_logs"
    return [checkout, Path.cwd() / "sample_logs"]


def default_root() -> Path | None:
    """The first existing default root, or None (then pass ``--root DIR``)."""
    for candidate in default_root_candidates():
        if candidate.is_dir():
            return candidate.resolve()
    return None
