"""dppo: divergence-based token mask (DPPO, arXiv 2602.04879)."""

from __future__ import annotations

import torch

from cppo_diag.masks.divergence import RULE_DIVERGENCES
from cppo_diag.masks.layout import RuleInput
from cppo_diag.masks.metrics import divergence_metrics, mask_metrics
from cppo_diag.masks.registry import RuleFacts, register_rule
from cppo_diag.masks.result import RuleOutput
from cppo_diag.masks.rules.common import check_choice, check_nonneg, token_reason

DPPO_DEFAULT_DELTA = {"binary_tv": 0.15, "topk_tv": 0.15, "binary_kl": 0.05, "topk_kl": 0.05}


@register_rule(
    "dppo",
    equation="keep_t = not away_t or D_t <= delta  (delta_high if A_t > 0, delta_low if A_t < 0); away_t = A_t (rho_t - 1) > 0  (SPEC 'dppo')",
    family="divergence",
    facts=RuleFacts(can_mask=True, threshold="constant"),
    reasons=("kept", "token"),
    default_notes={
        "delta": "0.15 for TV divergences, 0.05 for KL (0.20 TV for MoE in the papers)",
        "delta_low": "delta",
        "delta_high": "delta",
    },
)
def dppo(
    x: RuleInput,
    *,
    delta: float | None = None,
    divergence: str = "binary_tv",
    delta_low: float | None = None,
    delta_high: float | None = None,
) -> RuleOutput:
    """Mask `away` tokens whose divergence D_t from mu exceeds the threshold; tokens moving back toward mu
    are always kept. Optional asymmetric thresholds: ``delta_high`` for A > 0, ``delta_low`` for A < 0.
    Reason of every masked token: "token"."""
    check_choice("divergence", divergence, RULE_DIVERGENCES)
    if delta is None:
        delta = DPPO_DEFAULT_DELTA[divergence]
    check_nonneg("delta", delta)
    d_hi = delta if delta_high is None else check_nonneg("delta_high", delta_high)
    d_lo = delta if delta_low is None else check_nonneg("delta_low", delta_low)
    d = x.divergence(divergence)  # (B, T), 0 on padding
    if d_hi == d_lo:
        over = d > d_hi
    else:
        thr = torch.where(x.advantages > 0, torch.as_tensor(d_hi, dtype=x.dtype, device=x.device),
                          torch.as_tensor(d_lo, dtype=x.dtype, device=x.device))  # (B, T)
        over = d > thr
    masked = x.away & over  # away already implies valid
    keep = x.valid & ~masked
    reason = token_reason(masked)

    def metrics():
        m = mask_metrics("dppo", x, keep, reason)
        m.update(divergence_metrics(divergence, d, x.valid))
        return m

    return RuleOutput(keep, reason, metrics=metrics, internals={"D": d, "away": x.away},
                      resolved={"delta": delta, "delta_low": d_lo, "delta_high": d_hi})
