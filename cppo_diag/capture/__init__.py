"""Capture: record per-token trust-region data from a trainer into a run directory.

``RunRecorder`` (recorder.py) is the public entry point; ``NullRecorder`` (null.py) is the disabled one.
staging.py turns tensors into Arrow tables, writer.py is the background thread, sampling.py picks
sequences. The on-disk format is ``cppo_diag.storage.schema`` / docs/run-format.md.
"""

from cppo_diag._lazy import lazy_attributes

_LAZY = {  # imported on first use (PEP 562): importing cppo_diag.capture.hooks must not load torch
    "RunRecorder": "cppo_diag.capture.recorder",
    "RecorderError": "cppo_diag.capture.recorder",
    "RecorderWarning": "cppo_diag.capture.recorder",
    "NullRecorder": "cppo_diag.capture.null",
    "CaptureInputError": "cppo_diag.capture.staging",
    "NonFiniteError": "cppo_diag.capture.staging",
}
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
