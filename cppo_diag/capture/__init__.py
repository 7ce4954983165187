"""Capture: record per-token trust-region data from a trainer into a run directory.

``RunRecorder`` (recorder.py) is the public entry point; ``NullRecorder`` (null.py) is the disabled one.
staging.py turns tensors into Arrow tables, writer.py is the background thread, sampling.py picks
sequences. The on-disk format is ``cppo_diag.storage.schema`` / docs/run-format.md.
"""

from cppo_diag.capture.null import NullRecorder
from cppo_diag.capture.recorder import RecorderError, RecorderWarning, RunRecorder
from cppo_diag.capture.staging import CaptureInputError, NonFiniteError

__all__ = ["RunRecorder", "NullRecorder", "RecorderError", "RecorderWarning", "CaptureInputError", "NonFiniteError"]
