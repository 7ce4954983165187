"""pg_is: plain importance-sampled policy gradient, no trust region."""

from __future__ import annotations

from cppo_diag import metric_names as M
from cppo_diag.masks.layout import RuleInput
from cppo_diag.masks.metrics import mask_metrics
from cppo_diag.masks.reduce import masked_mean
from cppo_diag.masks.registry import RuleFacts, register_rule
from cppo_diag.masks.result import RuleOutput
from cppo_diag.masks.rules.common import no_reason


@register_rule("pg_is", equation="keep_t = 1 for every valid token; loss -A_t rho_t  (SPEC 'pg_is')", family="baseline",
               facts=RuleFacts(can_mask=False, threshold="none"))
def pg_is(x: RuleInput) -> RuleOutput:
    """Keep every valid token (the unconstrained importance-sampled policy gradient)."""
    keep = x.valid.clone()
    reason = no_reason(x.valid)

    def metrics():
        m = mask_metrics("pg_is", x, keep, reason)
        m[M.mask_name("pg_is", "ratio_mean")] = masked_mean(x.rho, x.valid)
        return m

    return RuleOutput(keep, reason, metrics=metrics)
