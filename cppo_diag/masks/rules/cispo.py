"""cispo: no mask; the IS weight sg(min(rho, 1 + eps_high)) multiplies A grad log pi (MiniMax-M1)."""

from __future__ import annotations

import torch

from cppo_diag import metric_names as M
from cppo_diag.masks.layout import RuleInput
from cppo_diag.masks.metrics import mask_metrics
from cppo_diag.masks.reduce import masked_fraction, masked_mean
from cppo_diag.masks.registry import RuleFacts, register_rule
from cppo_diag.masks.result import RuleOutput
from cppo_diag.masks.rules.common import check_nonneg, no_reason


@register_rule(
    "cispo",
    equation="weight_t = sg(min(rho_t, 1 + eps_high)); loss -weight_t A_t log pi_t  (SPEC 'cispo', MiniMax-M1 CISPO)",
    family="ratio clip",
    facts=RuleFacts(can_mask=False, threshold="constant", loss_form="is_weight"),
    default_notes={"eps_high": "required (no default; DPPO's runs capped rho at 3 or 5, i.e. eps_high 2 or 4)"},
)
def cispo(x: RuleInput, *, eps_high: float | None = None) -> RuleOutput:
    """Keep every token; truncate the importance weight at 1 + eps_high (``result.weight``, loss form
    "is_weight"). ``eps_high`` is required: the CPPO paper gives no value for CISPO.
    Metric ``mask/cispo/trunc_frac``: fraction of valid tokens whose weight was truncated."""
    if eps_high is None:
        raise ValueError(
            "cispo: eps_high is required (weight = min(rho, 1 + eps_high)); the CPPO paper gives no value, "
            "DPPO's runs used a cap of 3 or 5 on rho (eps_high=2 or 4)"
        )
    check_nonneg("eps_high", eps_high)
    v = x.valid
    cap = 1.0 + eps_high
    truncated = (x.rho > cap) & v  # (B, T)
    weight = torch.where(v, x.rho.clamp(max=cap), torch.zeros((), dtype=x.dtype, device=x.device))  # (B, T)
    keep = v.clone()
    reason = no_reason(v)

    def metrics():
        m = mask_metrics("cispo", x, keep, reason)
        m[M.mask_name("cispo", "trunc_frac")] = masked_fraction(truncated, v)
        m[M.mask_name("cispo", "trunc_frac_pos_adv")] = masked_fraction(truncated, v & (x.advantages > 0))
        m[M.mask_name("cispo", "trunc_frac_neg_adv")] = masked_fraction(truncated, v & (x.advantages < 0))
        m[M.mask_name("cispo", "weight_mean")] = masked_mean(weight, v)
        return m

    return RuleOutput(keep, reason, weight=weight, metrics=metrics, loss_form="is_weight",
                      internals={"weight": weight, "truncated": truncated})
