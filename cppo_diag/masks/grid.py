"""``rule_grid``: one rule over a grid of parameter values on one batch (the what-if entry point).

Every grid point gives the counts ``GRID_COUNTS`` (valid tokens, masked tokens, and masked tokens per
``Reason``), equal to what ``compute_mask`` at that point gives. In general that is one ``compute_mask`` call
per point. For ``cppo`` with points that differ only in ``delta``, ``delta_b`` and ``w_min`` the grid reuses
what does not depend on them, through the rule's own pieces, so every count is the rule's bit for bit:

* per w_min, one ``compute_mask("cppo", ..., return_internals=True)``: D_t, the away test, w_t (Eq. 9),
  Z_t = w_t D_t and the exclusive prefix sums S_{t-1}, W_{t-1};
* per delta_b, the per-response budget delta_b_seq (Eq. 22, ``adaptive_delta_b``, or the fixed value);
* per delta, the slack c_t (Eq. 10, ``schedule.slack``) and the masks and reasons (``cppo_reasons``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from cppo_diag.masks.compute import compute_mask
from cppo_diag.masks.quantile import adaptive_delta_b
from cppo_diag.masks.reasons import Reason
from cppo_diag.masks.registry import get_rule
from cppo_diag.masks.rules.cppo import cppo_reasons
from cppo_diag.masks.schedule import slack

__all__ = ["rule_grid", "GRID_COUNTS"]

# Columns of rule_grid's result: n_valid, n_masked, then n_<reason> for every masking reason (code order).
GRID_COUNTS = ("n_valid", "n_masked", *(f"n_{r.name.lower()}" for r in Reason if r != Reason.KEPT))
_FAST = {"cppo": ("delta", "delta_b", "w_min")}  # rule -> the parameters its fast path varies


def rule_grid(rule: str, points: Sequence[Mapping[str, Any]], *, logp, logp_rollout, advantages, response_mask=None,
              logp_old=None, topk=None, anchor: str = "rollout", seq_ids=None, step: int | None = None,
              **params) -> torch.Tensor:
    """(len(points), len(GRID_COUNTS)) int64 counts of ``rule`` at every grid point, on the CPU.

    points    one mapping of parameter values per grid point; each overrides ``params`` (the rule's other
              parameters, None or missing: the rule's defaults)
    batch     logp, logp_rollout, advantages, response_mask, logp_old, topk, anchor, seq_ids, step: as
              ``compute_mask`` (padded (B, T) layout)
    Column j is ``GRID_COUNTS[j]``: n_valid, n_masked, n_token, n_budget, n_sequence.
    """
    spec = get_rule(rule)
    points = [dict(p) for p in points]
    for p in points:
        bad = sorted(set(p) - set(spec.params))
        if bad:
            raise ValueError(f"rule_grid({rule!r}): grid parameters {bad} are not among the rule's {sorted(spec.params)}")
    batch = dict(logp=logp, logp_rollout=logp_rollout, advantages=advantages, response_mask=response_mask,
                 logp_old=logp_old, topk=topk, anchor=anchor, seq_ids=seq_ids, step=step)
    varied = _FAST.get(rule)
    if varied and points and all(set(p) <= set(varied) for p in points):
        rows = _cppo_grid(points, batch, params)
    else:
        rows = [_counts(compute_mask(rule, **batch, **{**params, **p})) for p in points]
    if not rows:
        return torch.zeros((0, len(GRID_COUNTS)), dtype=torch.int64)
    return torch.stack(rows).cpu()  # one device -> host copy


def _counts(res) -> torch.Tensor:
    """(len(GRID_COUNTS),) int64 counts of one MaskResult, on its device."""
    masked = res.valid & ~res.keep
    reason = torch.where(masked, res.reason, torch.zeros_like(res.reason))
    per_reason = torch.bincount(reason.reshape(-1).to(torch.int64), minlength=len(Reason))[1:len(Reason)]
    return torch.cat([res.valid.sum().reshape(1), masked.sum().reshape(1), per_reason])


def _cppo_grid(points: list[dict], batch: dict, params: dict) -> list[torch.Tensor]:
    base = {**get_rule("cppo").params, **{k: v for k, v in params.items() if v is not None}}
    rows: list[torch.Tensor | None] = [None] * len(points)
    keys = [tuple(float(p.get(k, base[k])) for k in ("delta", "delta_b", "w_min")) for p in points]
    for delta, _, _ in keys:
        if delta < 0:
            raise ValueError(f"delta: expected values >= 0, found {delta}")
    for w_min in dict.fromkeys(k[2] for k in keys):
        first = next(k for k in keys if k[2] == w_min)
        res = compute_mask("cppo", **batch, return_internals=True,
                           **{**base, "delta": first[0], "delta_b": first[1], "w_min": w_min})
        it, valid = res.internals, res.valid
        z, s_prev, w_prev, d, away = it["Z"], it["S"], it["W"], it["D"], it["away"]  # (B, T) each
        n = valid.sum(-1)  # (B,)
        n_valid = valid.sum().reshape(1)
        for delta_b in dict.fromkeys(k[1] for k in keys if k[2] == w_min):
            if base["delta_b_mode"] == "adaptive":
                db = adaptive_delta_b(d, valid, n, q=base["delta_b_quantile"], scale=base["delta_b_scale"],
                                      delta_b_min=delta_b, cap=base["delta_b_cap"])  # (B,)
            else:
                db = torch.full((z.shape[0],), delta_b, dtype=z.dtype, device=z.device)  # (B,)
            allowance = w_prev * db[:, None]  # (B, T) delta_b W_{t-1}
            for i, key in enumerate(keys):
                if key[1:] != (delta_b, w_min):
                    continue
                _, reason = cppo_reasons(z, slack(key[0], allowance, s_prev), away, key[0])  # (B, T)
                per_reason = torch.bincount(reason.reshape(-1).to(torch.int64), minlength=len(Reason))
                rows[i] = torch.cat([n_valid, per_reason[1:].sum().reshape(1), per_reason[1:len(Reason)]])
    return rows
