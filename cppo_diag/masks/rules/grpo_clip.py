"""grpo_clip: PPO/GRPO ratio clipping with Clip-Higher, as a token mask."""

from __future__ import annotations

from cppo_diag import metric_names as M
from cppo_diag.masks.layout import RuleInput
from cppo_diag.masks.metrics import mask_metrics
from cppo_diag.masks.reduce import masked_fraction
from cppo_diag.masks.registry import RuleFacts, register_rule
from cppo_diag.masks.result import RuleOutput
from cppo_diag.masks.rules.common import check_nonneg, token_reason


@register_rule(
    "grpo_clip",
    equation="masked_t = (A_t > 0 and rho_t > 1 + eps_high) or (A_t < 0 and rho_t < 1 - eps_low)  (SPEC 'grpo_clip', PPO clip + Clip-Higher)",
    family="ratio clip",
    facts=RuleFacts(can_mask=True, threshold="constant"),
    reasons=("kept", "token"),
)
def grpo_clip(x: RuleInput, *, eps_low: float = 0.2, eps_high: float = 0.28) -> RuleOutput:
    """PPO clip written as a mask: a token is dropped when its clipped surrogate has zero gradient.

    Defaults are the CPPO paper's GRPO baseline (eps_low 0.2, eps_high 0.28); eps_high = eps_low is plain PPO.
    Reason of every masked token: "token".
    """
    check_nonneg("eps_low", eps_low)
    check_nonneg("eps_high", eps_high)
    rho, a, v = x.rho, x.advantages, x.valid
    high = (a > 0) & (rho > 1.0 + eps_high) & v  # (B, T)
    low = (a < 0) & (rho < 1.0 - eps_low) & v  # (B, T)
    masked = high | low
    keep = v & ~masked
    reason = token_reason(masked)

    def metrics():
        m = mask_metrics("grpo_clip", x, keep, reason)
        m[M.mask_name("grpo_clip", "clip_high_frac")] = masked_fraction(high, v)
        m[M.mask_name("grpo_clip", "clip_low_frac")] = masked_fraction(low, v)
        return m

    return RuleOutput(keep, reason, metrics=metrics)
