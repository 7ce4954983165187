"""Storage: the run format (schema.py, layout.py) and the reader (reader.py).

``open_run(path) -> Run`` and ``list_runs(root)`` are the public entry points.
"""

from cppo_diag.storage.reader import Run, RunFormatError, RunWarning, list_runs, open_run

__all__ = ["Run", "RunFormatError", "RunWarning", "list_runs", "open_run"]
