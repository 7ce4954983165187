"""cppo: Cumulative Prefix-divergence Policy Optimization (CPPO, arXiv 2606.10968, Eq. 8-10, Algorithm 1).

Per response of valid length T (positions t = 1..T among the valid tokens):
  w_t     = 1 - (1 - w_min) (t - 1) / max(T - 1, 1)                          (Eq. 9)
  Z_t     = w_t D_t
  S_{t-1} = sum_{j<t} Z_j,   W_{t-1} = sum_{j<t} w_j    (every valid token counts)
  c_t     = min(delta, delta + delta_b W_{t-1} - S_{t-1})                   (Eq. 10)
  keep_t  = not away_t or Z_t <= c_t;  reason "token" if Z_t > delta else "budget"
delta_b per response: adaptive (Eq. 22, ``cppo_diag.masks.quantile``) or fixed.

The whole batch is computed at once: two cumulative sums along T, no loop over sequences. The ablations
(``cppo_no_weight``, ``cppo_no_budget``, ``cppo_shuffled``, ``cppo_soft``) reuse ``cppo_core`` and live in
``cppo_ablations.py``.
"""

from __future__ import annotations

import functools
import inspect

import torch

from cppo_diag import metric_names as M
from cppo_diag.masks.divergence import RULE_DIVERGENCES
from cppo_diag.masks.layout import RuleInput
from cppo_diag.masks.metrics import divergence_metrics, mask_metrics
from cppo_diag.masks.quantile import adaptive_delta_b
from cppo_diag.masks.reduce import masked_fraction, masked_mean
from cppo_diag.masks.registry import RuleFacts, register_profile, register_rule
from cppo_diag.masks.reasons import BUDGET, TOKEN
from cppo_diag.masks.result import RuleOutput
from cppo_diag.masks.rules.common import check_choice, check_nonneg, check_positive, check_range
from cppo_diag.masks.schedule import position_weight, slack

__all__ = ["cppo", "cppo_core", "position_weights", "cppo_reasons", "CPPO_EQUATION", "CPPO_NOTES", "CPPO_PROFILES"]

CPPO_EQUATION = (
    "w_t = 1 - (1 - w_min)(t - 1)/max(T - 1, 1); Z_t = w_t D_t; c_t = min(delta, delta + delta_b W_{t-1} - S_{t-1}); "
    "keep_t = not away_t or Z_t <= c_t  (CPPO Eq. 8-10, Algorithm 1; adaptive delta_b Eq. 22)"
)
CPPO_NOTES = {
    "delta": "0.15 (dense models; the paper uses 0.20 for MoE)",
    "delta_b": "0.02 (minimum in adaptive mode, value in fixed mode; the paper's post-trained 1.7B used fixed 0.015)",
    "horizon": "None (required when weight_length='horizon')",
}


def position_weights(x: RuleInput, *, w_min: float, weight_length: str, horizon: int | None,
                     src_rank: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) w_t (CPPO Eq. 9) in the batch dtype, 0 on padding.

    weight_length "sequence": w = 1 - (1 - w_min) (t - 1) / max(T - 1, 1), T the response's own valid length
    weight_length "horizon":  the same with T := horizon, and w = w_min for t > horizon.
    ``src_rank`` (B, T) int64, optional: the 0-based position whose weight each token takes (cppo_shuffled).
    """
    dt = x.dtype
    if src_rank is None:
        # t as exact integers: counted in int32 over the uint8 view (cheaper than a float cumsum of the bool
        # mask), converted to the batch dtype, then t - 1 in that dtype (the same operations and roundings).
        r = torch.cumsum(x.valid.view(torch.uint8), dim=-1, dtype=torch.int32).to(dt)  # (B, T) t
        r -= 1.0  # t - 1
    else:
        r = src_rank.to(dt)
    if weight_length == "sequence":
        w = position_weight(r, x.lengths.to(dt)[:, None], w_min)  # (B, T), T per response (B, 1)
    else:
        H = int(horizon)
        beyond = r > H - 1  # (B, T)
        w = position_weight(r.clamp_(max=H - 1), H, w_min)  # (B, T), T := H
        w.masked_fill_(beyond, w_min)
    return w.masked_fill_(x.invalid, 0.0)


def cppo_reasons(z: torch.Tensor, c: torch.Tensor, away: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked, reason), both (B, T): Algorithm 1 steps 5-6 on Z_t = w_t D_t and the slack c_t (Eq. 10).

    masked_t = away_t and Z_t > c_t (tokens moving back toward mu are always kept); reason TOKEN where
    Z_t > delta (the position-weighted threshold alone rejects the token), BUDGET on the other masked tokens,
    KEPT elsewhere. ``c`` may be a number (the no_budget variants: c_t = delta).
    """
    masked = z > c  # (B, T)
    masked &= away  # only tokens moving away from mu (away implies valid)
    reason = masked.view(torch.uint8) * BUDGET  # BUDGET on every masked token ... (bool as 0/1 bytes: no copy)
    token = z > delta
    token &= masked
    reason.masked_fill_(token, TOKEN)  # ... TOKEN where Z_t > delta alone rejects it
    return masked, reason


def _exclusive_cumsum(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inclusive, exclusive) prefix sums along T, sharing one (B, T + 1) buffer: S_t and S_{t-1} (S_0 = 0)."""
    B, T = z.shape
    buf = torch.empty((B, T + 1), dtype=z.dtype, device=z.device)
    buf[:, 0] = 0.0
    torch.cumsum(z, dim=-1, out=buf[:, 1:])
    return buf[:, 1:], buf[:, :-1]


def _check_common(delta, w_min, delta_b, delta_b_mode, delta_b_quantile, delta_b_cap, delta_b_scale,
                  weight_length, horizon, divergence) -> None:
    check_nonneg("delta", delta)
    check_range("w_min", w_min, 0.0, 1.0)
    check_nonneg("delta_b", delta_b)
    check_choice("delta_b_mode", delta_b_mode, ("adaptive", "fixed"))
    check_range("delta_b_quantile", delta_b_quantile, 0.0, 1.0)
    check_range("delta_b_cap", delta_b_cap, 1.0, float("inf"))
    check_positive("delta_b_scale", delta_b_scale)
    check_choice("weight_length", weight_length, ("sequence", "horizon"))
    if weight_length == "horizon":
        if horizon is None or isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon: weight_length='horizon' needs an integer horizon >= 1, found {horizon!r}")
    check_choice("divergence", divergence, RULE_DIVERGENCES)


@functools.cache
def _cppo_defaults() -> dict:
    return {k: v.default for k, v in inspect.signature(cppo).parameters.items() if k != "x"}


def cppo_core(x: RuleInput, name: str, *, variant: str, seed: int = 0, **params) -> RuleOutput:
    """CPPO and its ablations on the canonical batch.

    variant: "full" (cppo), "no_weight" (w = 1, budget kept), "no_budget" (c_t = delta, weights kept),
    "shuffled" (no_budget with each response's weights permuted), "soft" (App. C gate in ``weight``).
    ``params``: the variant's parameters; those it does not take get ``cppo``'s defaults (its signature is the
    one place they are written) and are not used by it.
    """
    p = {**_cppo_defaults(), **params}
    delta, w_min, delta_b, delta_b_mode = p["delta"], p["w_min"], p["delta_b"], p["delta_b_mode"]
    delta_b_quantile, delta_b_cap, delta_b_scale = p["delta_b_quantile"], p["delta_b_cap"], p["delta_b_scale"]
    weight_length, horizon, divergence = p["weight_length"], p["horizon"], p["divergence"]
    _check_common(delta, w_min, delta_b, delta_b_mode, delta_b_quantile, delta_b_cap, delta_b_scale,
                  weight_length, horizon, divergence)
    v = x.valid  # (B, T)
    dt = x.dtype
    n = x.lengths  # (B,)
    d = x.divergence(divergence)  # (B, T), 0 on padding

    # -- position weights w_t (Eq. 9) ------------------------------------------------------------------
    if variant == "no_weight":
        w = v.to(dt)  # (B, T)
    else:
        src = None
        if variant == "shuffled":
            from cppo_diag.masks.shuffle import permuted_positions

            # (B, T) perm[rank] on valid tokens (padding: 0, masked below), keyed on (seed, step, seq_id, T)
            src = permuted_positions(n, v, seed=seed, seq_ids=x.seq_ids, step=x.step)
        w = position_weights(x, w_min=w_min, weight_length=weight_length, horizon=horizon, src_rank=src)
    z = w * d  # (B, T) Z_t, 0 on padding
    internals = {"w": w, "D": d, "Z": z, "away": x.away}

    uses_budget = variant in ("full", "no_weight", "soft")
    if uses_budget:
        # -- budget per response (Eq. 22 or fixed) --------------------------------------------------
        if delta_b_mode == "adaptive":
            db = adaptive_delta_b(d, v, n, q=delta_b_quantile, scale=delta_b_scale, delta_b_min=delta_b,
                                  cap=delta_b_cap)  # (B,)
        else:
            db = torch.full((x.shape[0],), delta_b, dtype=dt, device=x.device)  # (B,)
        # -- prefix sums over every valid token (padding adds exact zeros) --------------------------------
        s_incl, s_prev = _exclusive_cumsum(z)  # (B, T) S_t, S_{t-1}
        _, w_prev = _exclusive_cumsum(w)  # (B, T) W_{t-1}
        allowance = w_prev * db[:, None]  # (B, T) delta_b W_{t-1}
        if variant == "soft":
            budget = allowance + delta  # (B, T) delta + delta_b W_{t-1}, the soft gate's denominator
        c = slack(delta, allowance, s_prev, overwrite=True)  # (B, T) c_t  (Eq. 10)
        internals.update({"S": s_prev, "W": w_prev, "c": c, "delta_b": db})
    else:
        db = None
        c = delta
        internals["c"] = torch.full(x.shape, delta, dtype=dt, device=x.device).masked_fill_(x.invalid, 0.0)

    if variant == "soft":
        # App. C: x_t = max(Z_t / delta, S_t / (delta + delta_b W_{t-1})), gate min(1, 1/x_t) on away tokens.
        ratio = z / delta  # (B, T)
        torch.maximum(ratio, s_incl / budget, out=ratio)
        gate = ratio.reciprocal_().clamp_(max=1.0)  # (B, T); 1/0 = inf -> 1
        gate = torch.where(x.away, gate, v)  # not away: 1 if valid, 0 on padding (away implies valid)
        keep = v.clone()
        reason = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
        internals["gate"] = gate
        weight = gate
    else:
        masked, reason = cppo_reasons(z, c, x.away, delta)  # (B, T) each
        keep = v ^ masked  # valid and not masked
        weight = None

    def metrics():
        m = mask_metrics(name, x, keep, reason)
        m.update(divergence_metrics(divergence, d, v))
        m[f"{name}/z_mean"] = masked_mean(z, v)
        if db is not None:
            has = n > 0
            m[f"{name}/delta_b_mean"] = masked_mean(db, has)
            m[f"{name}/delta_b_at_min_frac"] = masked_fraction(db <= delta_b, has)
            m[f"{name}/delta_b_at_cap_frac"] = masked_fraction(db >= delta_b * delta_b_cap, has)
            m[f"{name}/c_neg_frac"] = masked_fraction(internals["c"] < 0, v)
        if weight is not None:
            m[M.mask_name(name, "gated_frac")] = masked_fraction(weight < 1, v)
            m[M.mask_name(name, "gate_mean_away")] = masked_mean(weight, x.away)
            m[M.mask_name(name, "gate_mean")] = masked_mean(weight, v)
        return m

    return RuleOutput(keep, reason, weight=weight, metrics=metrics, internals=internals)


@register_rule("cppo", equation=CPPO_EQUATION, family="cppo", reasons=("kept", "token", "budget"), default_notes=CPPO_NOTES,
               facts=RuleFacts(can_mask=True, prefix_budget=True, threshold="position"))
def cppo(
    x: RuleInput,
    *,
    delta: float = 0.15,
    w_min: float = 0.8,
    delta_b: float = 0.02,
    delta_b_mode: str = "adaptive",
    delta_b_quantile: float = 0.9,
    delta_b_cap: float = 2.0,
    delta_b_scale: float = 1.0,
    weight_length: str = "sequence",
    horizon: int | None = None,
    divergence: str = "binary_tv",
) -> RuleOutput:
    """CPPO: a position-weighted token threshold plus a cumulative prefix budget. A token moving away from mu
    is masked when its weighted divergence Z_t exceeds c_t; reason "token" if Z_t > delta (the weighted threshold
    alone rejects it), otherwise "budget". Internals: w, D, Z, S (= S_{t-1}), W (= W_{t-1}), c, away (B, T) and
    delta_b (B,). Metrics add cppo/delta_b_mean (paper Fig. 7) and mask/cppo/budget_share."""
    return cppo_core(x, "cppo", variant="full", delta=delta, w_min=w_min, delta_b=delta_b, delta_b_mode=delta_b_mode,
                     delta_b_quantile=delta_b_quantile, delta_b_cap=delta_b_cap, delta_b_scale=delta_b_scale,
                     weight_length=weight_length, horizon=horizon, divergence=divergence)


# -- implementations in the field as named parameter sets (SPEC.md "Implementations in the field", read
# 2026-11-29). Only mask parameters: a loss setting such as an IS cap is not part of the rule. ----------------
CPPO_PROFILES = (
    register_profile(
        "cppo", "paper", params={},
        source="the paper's defaults (Eq. 9 with each response's own T, Eq. 22 adaptive delta_b, cap 2; "
               "delta 0.15, w_min 0.8, delta_b_min 0.02)"),
    register_profile(
        "cppo", "unirl",
        params={"weight_length": "sequence", "delta_b_mode": "adaptive", "delta_b_cap": 2.0, "divergence": "binary_tv"},
        source="the authors' UniRL code: T per response, adaptive delta_b with cap 2, Binary-TV (it also has no "
               "IS cap, a loss setting: the mask equals the paper's)"),
    register_profile(
        "cppo", "verl-pr6731",
        params={"weight_length": "horizon", "delta_b_mode": "adaptive", "delta_b_cap": 5.0, "divergence": "binary_tv"},
        from_run={"horizon": "max_response_length"},
        source="verl PR #6731 (open): T = the padded response width, i.e. the run's maximum response length "
               "for every response (w_t stays near 1 on short answers), adaptive cap 5 * delta_b, Binary-TV only "
               "(anchored to mu only in verl's bypass mode)"),
)
