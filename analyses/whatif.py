"""What-if sweeps: CPPO's masked fraction and budget share over a grid of (delta, delta_b, w_min).

Each batch goes through the rule library's what-if entry point, ``cppo_diag.masks.rule_grid``: it reuses
what does not depend on the grid (one ``compute_mask("cppo", ..., return_internals=True)`` call per w_min gives
D_t, the away test, w_t (Eq. 9), Z_t and the prefix sums; Eq. 22's budget is redone per delta_b, Eq. 10's
slack and the masks per delta) through the rule's own functions, so every grid point equals a
``compute_mask`` call at that point (``tests/analyses/test_analyses_whatif.py`` checks each one).
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np
import polars as pl
import torch

from cppo_diag.analyses.recomputation import iter_batches
from cppo_diag.analyses.updates import resolve_updates, select_updates

SWEEP_PARAMS = ("delta_b_mode", "delta_b_quantile", "delta_b_cap", "delta_b_scale", "weight_length", "horizon",
                "divergence")


def _base_params(base_params: dict | None) -> dict:
    from cppo_diag.masks import rule_defaults

    defaults = rule_defaults("cppo")
    base = dict(base_params or {})
    bad = sorted(set(base) - set(SWEEP_PARAMS) - {"delta", "delta_b", "w_min"})
    if bad:
        raise ValueError(f"base_params: expected names from {sorted(SWEEP_PARAMS)}, found {bad}")
    return {k: base.get(k, defaults[k]) for k in SWEEP_PARAMS}


def sweep_batch(batch, grid: list[tuple[float, float, float]], base: dict, *, anchor: str = "rollout") -> np.ndarray:
    """(len(grid), 4) int64 counts (n_valid, n_masked, n_budget, n_token) of one batch at every grid point
    (delta, delta_b, w_min), by ``cppo_diag.masks.rule_grid``."""
    from cppo_diag.masks import GRID_COUNTS, rule_grid

    topk = batch.topk if batch.topk is not None and str(base["divergence"]).startswith("topk") else None
    points = [{"delta": a, "delta_b": b, "w_min": c} for a, b, c in grid]
    counts = rule_grid("cppo", points, logp=batch.logp, logp_rollout=batch.logp_rollout, advantages=batch.advantages,
                       response_mask=batch.response_mask, logp_old=batch.logp_old, topk=topk, anchor=anchor,
                       seq_ids=torch.from_numpy(np.asarray(batch.seq_ids, dtype=np.int64)), step=int(batch.step),
                       **base)
    cols = [GRID_COUNTS.index(c) for c in ("n_valid", "n_masked", "n_budget", "n_token")]
    return counts[:, cols].numpy()


def whatif_sweep(
    source: Any,
    *,
    deltas: Sequence[float] = (0.1, 0.15, 0.2, 0.25),
    delta_bs: Sequence[float] = (0.01, 0.015, 0.02, 0.03),
    w_mins: Sequence[float] = (0.6, 0.8, 1.0),
    base_params: dict | None = None,
    step_range=None,
    anchor: str = "rollout",
    updates: str | None = "all",
    progress: bool = True,
) -> pl.DataFrame:
    """CPPO over the grid deltas x delta_bs x w_mins on a run (or a step range of it).

    ``base_params``: the other CPPO parameters (delta_b_mode, delta_b_quantile, delta_b_cap, delta_b_scale,
    weight_length, horizon, divergence; default the rule's defaults). ``updates``: "all", "first" or
    "after_first" (``cppo_diag.analyses.updates``). Returns one row per grid point:
    delta, delta_b, w_min, n_valid, n_masked, n_budget, n_token, masked_frac = n_masked / n_valid,
    budget_share = n_budget / n_masked (null when nothing is masked).
    """
    base = _base_params(base_params)
    grid = list(dict.fromkeys((float(a), float(b), float(c)) for a, b, c in itertools.product(deltas, delta_bs, w_mins)))
    if not grid:
        raise ValueError("whatif_sweep: expected at least one value in each of deltas, delta_bs, w_mins")
    total = np.zeros((len(grid), 4), dtype=np.int64)
    updates = resolve_updates(source, updates)
    source = select_updates(source, updates, step_range=step_range)
    for batch in iter_batches(source, step_range=step_range, progress=progress):
        total += sweep_batch(batch, grid, base, anchor=anchor)
    g = np.asarray(grid)
    df = pl.DataFrame({
        "delta": g[:, 0], "delta_b": g[:, 1], "w_min": g[:, 2],
        "n_valid": total[:, 0], "n_masked": total[:, 1], "n_budget": total[:, 2], "n_token": total[:, 3],
    })
    return df.with_columns(
        masked_frac=pl.when(pl.col("n_valid") > 0).then(pl.col("n_masked") / pl.col("n_valid")),
        budget_share=pl.when(pl.col("n_masked") > 0).then(pl.col("n_budget") / pl.col("n_masked")),
    ).sort("w_min", "delta_b", "delta")
