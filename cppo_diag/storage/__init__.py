"""Storage: the run format (schema.py, layout.py), run metadata (meta.py), the reader (reader.py) and the batch
convention (batches.py).

``open_run(path) -> Run`` and ``list_runs(root)`` are the public entry points; ``Run.batches()`` rebuilds the
padded (step, update, rank) batches a rule saw, ``batch_from_frame`` does it for token rows in memory.
Every file of a run directory is written through ``layout``'s atomic helpers.
"""

from cppo_diag.storage.batches import Batch, batch_from_frame, batches_from_frame
from cppo_diag.storage.layout import RunLockedError
from cppo_diag.storage.meta import RunMeta, is_run_dir, read_meta, update_meta
from cppo_diag.storage.reader import Run, RunFormatError, RunWarning, list_runs, open_run

__all__ = ["Batch", "Run", "RunFormatError", "RunLockedError", "RunMeta", "RunWarning", "batch_from_frame",
           "batches_from_frame", "is_run_dir", "list_runs", "open_run", "read_meta", "update_meta"]
