"""Deterministic sequence sampling for large runs.

``keep_sequences(step, seq_ids, fraction)`` keeps a sequence iff a 64-bit hash of ``(step, seq_id)``
falls below ``fraction``. It depends on nothing else (not on the update index, the rank, the batch order
or the process), so every update of a step keeps the same sequences, a resumed run keeps the same ones as
the original, and ``log_sequences`` keeps exactly the sequences whose tokens ``log_tokens`` kept.
"""

from __future__ import annotations

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (a well-mixed, dependency-free integer hash)."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def sequence_hash_unit(step: int, seq_ids: np.ndarray) -> np.ndarray:
    """Map each ``(step, seq_id)`` to a float in [0, 1).  # (B,) -> (B,)"""
    ids = np.asarray(seq_ids).astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        mixed = _splitmix64(ids ^ _splitmix64(np.full(ids.shape, np.uint64(int(step) & 0xFFFFFFFFFFFFFFFF))))
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def keep_sequences(step: int, seq_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean keep-mask over ``seq_ids`` (B,) for a sampling ``fraction`` in (0, 1]."""
    seq_ids = np.asarray(seq_ids)
    if fraction >= 1.0:
        return np.ones(seq_ids.shape, dtype=bool)
    return sequence_hash_unit(step, seq_ids) < fraction


def keep_step(step: int, every_n_steps: int) -> bool:
    """Steps 0, n, 2n, ... are recorded (``every_n_steps=1`` records all)."""
    return int(step) % int(every_n_steps) == 0
