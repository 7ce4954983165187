"""drpo: a smooth trust region by a quadratic penalty (DRPO, arXiv 2606.09821), no mask."""

from __future__ import annotations

from cppo_diag import metric_names as M
from cppo_diag.masks.divergence import binary_tv
from cppo_diag.masks.layout import RuleInput
from cppo_diag.masks.metrics import mask_metrics
from cppo_diag.masks.reduce import masked_fraction, masked_mean
from cppo_diag.masks.registry import RuleFacts, register_rule
from cppo_diag.masks.result import RuleOutput
from cppo_diag.masks.rules.common import check_positive, no_reason


@register_rule(
    "drpo",
    equation="objective_t = rho_t A_t - |A_t| / (2 delta) mu_t (rho_t - 1)^2; loss = -objective  (SPEC 'drpo')",
    family="penalty",
    facts=RuleFacts(can_mask=False, threshold="none", loss_form="drpo"),
    default_notes={"delta": "0.15 (the per-token optimum sits at pi - mu = sign(A) delta, a TV step; the SPEC gives no value)"},
)
def drpo(x: RuleInput, *, delta: float = 0.15) -> RuleOutput:
    """Keep every token; ``policy_loss`` adds the penalty |A| / (2 delta) mu (rho - 1)^2 (loss form "drpo").
    The per-token objective peaks at pi - mu = sign(A) delta; metric ``mask/drpo/past_optimum_frac`` is the
    fraction of valid tokens already beyond that point (away and |pi - mu| > delta)."""
    check_positive("delta", delta)
    keep = x.valid.clone()
    reason = no_reason(x.valid)
    beyond = x.away & (binary_tv(x.p, x.q) > delta)  # (B, T)

    def metrics():
        m = mask_metrics("drpo", x, keep, reason)
        m[M.mask_name("drpo", "past_optimum_frac")] = masked_fraction(beyond, x.valid)
        m[M.mask_name("drpo", "ratio_mean")] = masked_mean(x.rho, x.valid)
        return m

    return RuleOutput(keep, reason, metrics=metrics, loss_form="drpo", loss_params={"delta": delta},
                      internals={"past_optimum": beyond})
