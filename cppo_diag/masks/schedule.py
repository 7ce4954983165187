"""CPPO's position weights, threshold schedule and slack (CPPO Eq. 9-10, Algorithm 1): the one definition.

    w_t = 1 - (1 - w_min) (t - 1) / max(T - 1, 1)            (Eq. 9; w_1 = 1, w_T = w_min)
    delta / w_t                                               the per-position threshold on D_t (paper Fig. 2)
    c_t = min(delta, delta + delta_b W_{t-1} - S_{t-1})       (Eq. 10, the slack left by the prefix budget)

The formulas are written once with plain arithmetic, so the same function serves the rule (torch tensors in
the batch dtype), the analyses' polars expressions (``pl.col("pos")``, ``pl.col("_T")``) and numpy arrays;
only ``max(., 1)`` and ``min(., delta)`` are dispatched on the engine. No torch import: the polars analyses
use this module without loading torch.
"""

from __future__ import annotations

__all__ = ["position_weight", "threshold_schedule", "slack"]


def _at_least_one(x):
    """max(x, 1) elementwise for a python number, numpy array, torch tensor or polars expression."""
    if isinstance(x, (int, float)):
        return max(x, 1)
    if type(x).__module__.startswith("polars"):
        return x.clip(lower_bound=1.0)
    if type(x).__module__.startswith("torch"):
        return x.clamp(min=1)
    import numpy as np

    return np.maximum(x, 1)


def position_weight(rank, length, w_min: float):
    """w_t = 1 - (1 - w_min) (t - 1) / max(T - 1, 1) (CPPO Eq. 9, "sequence" mode).

    rank    t - 1, the 0-based position among the response's valid tokens (number, array, tensor or expression)
    length  T, the response's valid length (the rule's "horizon" mode passes H), broadcastable against rank
    Evaluated in the inputs' dtype, in this operation order: ((1 - w_min) (t - 1)) / max(T - 1, 1), then 1 - x.
    """
    return 1.0 - (1.0 - w_min) * rank / _at_least_one(length - 1.0)


def threshold_schedule(positions, *, delta: float, w_min: float, length):
    """delta / w_t: CPPO's per-position threshold on D_t (Eq. 9; the paper's Fig. 2 overlay).

    ``positions``: 0-based positions t - 1 (a list or array is taken as float64; a tensor or polars expression
    as it is); ``length``: T (a number, or per token like ``positions``).
    """
    if isinstance(positions, (list, tuple, range)) or type(positions).__module__ == "numpy":
        import numpy as np

        positions = np.asarray(positions, dtype=np.float64)
    return delta / position_weight(positions, length, w_min)


def slack(delta: float, allowance, s_prev, *, overwrite: bool = False):
    """(B, T) c_t = min(delta, delta + delta_b W_{t-1} - S_{t-1}) (CPPO Eq. 10), torch.

    allowance  (B, T) delta_b_seq * W_{t-1}: the prefix budget earned before t (delta_b_seq per response)
    s_prev     (B, T) S_{t-1}: the weighted divergence spent before t
    ``overwrite=True``: ``allowance`` is a buffer the caller no longer needs; c is computed in it.
    c_t can be negative: then every ``away`` token is masked until the slack regrows.
    """
    c = allowance.add_(delta) if overwrite else allowance + delta  # delta + delta_b W_{t-1}
    c = c.sub_(s_prev)  # ... - S_{t-1}
    return c.clamp_(max=delta)
