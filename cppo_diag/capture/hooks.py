"""The write-time aggregator hook: the recorder's background writer asks here for the analyses layer's
per-step aggregates (``cppo_diag.analyses.aggregate.WriteTimeAggregates``), which registers itself when it is
imported: capture, below analyses, imports none of it. This module imports nothing heavy, so a reader that
only registers the hook does not load torch.

The bundled trainer and the TRL / verl plug-ins import the analyses layer before recording; a bare
``RunRecorder`` gets the aggregates once ``cppo_diag.analyses.aggregate`` has been imported, and without them a
first view scans the shards instead."""

from __future__ import annotations

_WRITE_AGGREGATOR = None


def register_write_aggregator(factory) -> None:
    """``factory(run_dir, rank)`` -> an object with ``add(step, table)``, ``finish(step)``, ``drop(step)``."""
    global _WRITE_AGGREGATOR
    _WRITE_AGGREGATOR = factory


def write_aggregator():
    """The registered write-time aggregator factory, or None."""
    return _WRITE_AGGREGATOR
