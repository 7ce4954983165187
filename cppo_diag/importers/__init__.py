"""Importers: convert other trainers' per-token dumps into the cppo-diag run format.

``import_run(source, src, dst, ...)`` dispatches on ``source`` (see ``IMPORTERS``); each importer module's
docstring names the upstream files it follows, the field mapping, the alignment convention and which policy
each log-prob column holds. ``cppo-diag import --from SOURCE SRC DST`` is the command-line front end.
"""

from __future__ import annotations

from pathlib import Path

from cppo_diag.importers.common import ImportedSequence, ImportFormatError, ImportStats

__all__ = ["IMPORTERS", "import_run", "ImportFormatError", "ImportedSequence", "ImportStats"]

# source name -> (module, function)
IMPORTERS = {
    "prime-rl": ("cppo_diag.importers.prime_rl", "import_prime_rl"),
    "slime": ("cppo_diag.importers.slime", "import_slime"),
    "nemo-rl": ("cppo_diag.importers.nemo_rl", "import_nemo_rl"),
}


def import_run(source: str, src, dst, *, name: str | None = None, group_size: int | None = None,
               model: str | None = None, task: str | None = None, overwrite: bool = False,
               progress: bool = True) -> tuple[Path, ImportStats]:
    """Convert ``src`` (a dump of trainer ``source``) into a run at ``dst`` (``dst/name`` with ``name``).

    Returns the run directory and counts of what was converted.
    """
    import importlib

    if source not in IMPORTERS:
        raise ValueError(f"source: expected one of {sorted(IMPORTERS)}, found {source!r}")
    if group_size is not None and int(group_size) < 1:
        raise ValueError(f"group_size: expected an integer >= 1, found {group_size!r}")
    module, fn = IMPORTERS[source]
    func = getattr(importlib.import_module(module), fn)
    return func(src, dst, name=name, group_size=group_size, model=model, task=task, overwrite=overwrite,
                progress=progress)
