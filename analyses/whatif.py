"""What-if sweeps: CPPO's masked fraction and budget share over a grid of (delta, delta_b, w_min).

Per batch, what does not depend on the grid comes from the rule itself: for each w_min, one
``compute_mask("cppo", ..., return_internals=True)`` call gives D_t, the away test, w_t (Eq. 9),
Z_t = w_t D_t and the exclusive prefix sums S_{t-1}, W_{t-1}. Then, in the rule's own operation order:

* per delta_b: the per-response budget delta_b_seq (Eq. 22: the adaptive clamp, which depends only on D and
  delta_b, or the fixed value);
* per delta: c_t = min(delta, delta + delta_b_seq W_{t-1} - S_{t-1}) and the counts of masked tokens
  (away and Z_t > c_t) and of budget-only masks (Z_t <= delta) - a few elementwise operations.

A grid of n_delta x n_delta_b x n_w_min points thus costs n_w_min rule calls, n_delta_b budget
computations and n_delta x n_delta_b x n_w_min elementwise passes per batch, instead of that many full
``compute_mask`` calls; ``tests/test_analyses_whatif.py`` checks every grid point against ``compute_mask``.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np
import polars as pl
import torch

from analyses.recompute import iter_batches
from analyses.updates import resolve_updates, select_updates

SWEEP_PARAMS = ("delta_b_mode", "delta_b_quantile", "delta_b_cap", "delta_b_scale", "weight_length", "horizon",
                "divergence")


def _base_params(base_params: dict | None) -> dict:
    from cppo_diag.masks import get_rule

    defaults = dict(get_rule("cppo").params)
    base = dict(base_params or {})
    bad = sorted(set(base) - set(SWEEP_PARAMS) - {"delta", "delta_b", "w_min"})
    if bad:
        raise ValueError(f"base_params: expected names from {sorted(SWEEP_PARAMS)}, found {bad}")
    return {k: base.get(k, defaults[k]) for k in SWEEP_PARAMS}


def _np_or_t(v):
    return v if isinstance(v, torch.Tensor) else torch.as_tensor(v)


def sweep_batch(batch, grid: list[tuple[float, float, float]], base: dict, *, anchor: str = "rollout") -> np.ndarray:
    """(len(grid), 4) int64 counts (n_valid, n_masked, n_budget, n_token) of one batch at every grid point
    (delta, delta_b, w_min).

    Per w_min, one ``compute_mask("cppo", ..., return_internals=True)`` call provides w_t, D_t, Z_t, the
    exclusive prefix sums S_{t-1}, W_{t-1} and the away test (none depends on delta or delta_b); the grid
    then only redoes Eq. 22's clamp per delta_b and Eq. 10 per delta, in the rule's own operation order.
    """
    from cppo_diag.masks import compute_mask
    from cppo_diag.masks.quantile import adaptive_delta_b

    kwargs = {k: v for k, v in base.items() if v is not None or k == "horizon"}
    if batch.topk is not None and str(base["divergence"]).startswith("topk"):
        kwargs["topk"] = batch.topk
    out = np.zeros((len(grid), 4), dtype=np.int64)
    valid = batch.response_mask  # (B, T)
    out[:, 0] = int(valid.sum())
    index = {g: i for i, g in enumerate(grid)}
    n = valid.sum(-1)  # (B,)
    for w_min in sorted({g[2] for g in grid}):
        first = next(g for g in grid if g[2] == w_min)
        res = compute_mask("cppo", logp=batch.logp, logp_rollout=batch.logp_rollout, advantages=batch.advantages,
                           response_mask=valid, logp_old=batch.logp_old, anchor=anchor, return_internals=True,
                           **{**kwargs, "delta": first[0], "delta_b": first[1], "w_min": w_min})
        it = res.internals
        z = _np_or_t(it["Z"])  # (B, T)
        s_prev = _np_or_t(it["S"])  # (B, T) S_{t-1}
        w_prev = it.get("W")  # (B, T) W_{t-1}
        if w_prev is None:
            w = _np_or_t(it["w"])
            w_prev = torch.nn.functional.pad(torch.cumsum(w, dim=-1)[:, :-1], (1, 0))
        d = it.get("D")
        if d is None:
            d = torch.where(_np_or_t(it["w"]) > 0, z / _np_or_t(it["w"]), torch.zeros((), dtype=z.dtype))
        away = it.get("away")
        if away is None:
            rho = torch.exp((batch.logp - (batch.logp_old if anchor == "old" else batch.logp_rollout)).clamp(-20, 20))
            away = (batch.advantages * (rho - 1.0) > 0) & valid
        away = away.to(torch.bool)

        def budget_of(delta_b):
            if base["delta_b_mode"] == "adaptive":
                return adaptive_delta_b(d, valid, n, q=base["delta_b_quantile"], scale=base["delta_b_scale"],
                                        delta_b_min=delta_b, cap=base["delta_b_cap"])  # (B,)
            return torch.full((z.shape[0],), delta_b, dtype=z.dtype)  # (B,)

        def slack(delta, budget_w):
            return ((budget_w + delta) - s_prev).clamp_(max=delta)  # (B, T) c_t (Eq. 10)

        # Self-check against the rule: the grid point the rule just computed must give its c_t bit for bit;
        # if the rule library ever changes its operation order, fall back to one rule call per grid point.
        c_rule = it.get("c")
        exact = c_rule is not None and bool(
            (slack(first[0], w_prev * budget_of(first[1])[:, None]) == _np_or_t(c_rule))[valid].all())
        for delta_b in sorted({g[1] for g in grid if g[2] == w_min}):
            budget_w = w_prev * budget_of(delta_b)[:, None] if exact else None  # (B, T) delta_b W_{t-1}
            for delta in sorted({g[0] for g in grid if g[1] == delta_b and g[2] == w_min}):
                if delta < 0:
                    raise ValueError(f"deltas: expected values >= 0, found {delta}")
                if exact:
                    masked = away & (z > slack(delta, budget_w))  # (B, T)
                    token = masked & (z > delta)
                else:
                    r = compute_mask("cppo", logp=batch.logp, logp_rollout=batch.logp_rollout,
                                     advantages=batch.advantages, response_mask=valid, logp_old=batch.logp_old,
                                     anchor=anchor, **{**kwargs, "delta": delta, "delta_b": delta_b, "w_min": w_min})
                    masked = valid & ~r.keep
                    token = r.reason == 1
                n_m, n_t = int(masked.sum()), int(token.sum())
                out[index[(delta, delta_b, w_min)], 1:] = (n_m, n_m - n_t, n_t)
    return out


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
    "after_first" (``analyses.updates``). Returns one row per grid point:
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
