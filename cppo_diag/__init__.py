"""cppo-diag: see where in a sequence an LLM-RL trust region bites.

Public entry points (imported lazily so that ``import cppo_diag`` stays cheap):

- ``compute_mask`` / ``policy_loss``      trust-region rules (``cppo_diag.masks``, ``cppo_diag.loss``)
- ``RunRecorder``                          per-token capture hooks (``cppo_diag.capture``)
- ``open_run`` / ``list_runs``             the run reader (``cppo_diag.storage``)
"""

from __future__ import annotations

from pathlib import Path

from cppo_diag import _checkout
from cppo_diag._lazy import lazy_attributes

_checkout.install(Path(__file__).resolve().parent)  # cppo_diag.analyses / .app from an uninstalled checkout

__version__ = "0.1.0"

_LAZY = {
    "compute_mask": "cppo_diag.masks",
    "list_rules": "cppo_diag.masks",
    "MaskResult": "cppo_diag.masks",
    "policy_loss": "cppo_diag.loss",
    "RunRecorder": "cppo_diag.capture",
    "open_run": "cppo_diag.storage",
    "list_runs": "cppo_diag.storage",
}

__all__ = sorted(_LAZY) + ["__version__"]
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
