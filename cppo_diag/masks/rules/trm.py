"""trm_max / trm_avg: sequence-level Trust Region Masking (TRM, arXiv 2512.23075), direction-blind."""

from __future__ import annotations

import torch

from cppo_diag import metric_names as M
from cppo_diag.masks.divergence import KL_DIVERGENCES
from cppo_diag.masks.layout import RuleInput
from cppo_diag.masks.metrics import divergence_metrics, mask_metrics
from cppo_diag.masks.reduce import masked_fraction, masked_max, masked_mean
from cppo_diag.masks.registry import RuleFacts, register_rule
from cppo_diag.masks.reasons import KEPT, SEQUENCE
from cppo_diag.masks.result import RuleOutput
from cppo_diag.masks.rules.common import check_choice, check_nonneg

_NOTES = {"divergence": "'binary_kl' (per-token KL(mu || pi); 'topk_kl' with topk=...)"}


def _sequence_mask(x: RuleInput, name: str, stat: torch.Tensor, threshold: float, d: torch.Tensor,
                   divergence: str) -> RuleOutput:
    """Reject every valid token of the non-empty responses whose statistic ``stat`` (B,) exceeds ``threshold``."""
    v = x.valid
    nonempty = v.any(dim=-1)  # (B,)
    bad = (stat > threshold) & nonempty  # (B,)
    masked = bad[:, None] & v  # (B, T) every valid token of a rejected response
    keep = v & ~masked
    reason = torch.where(masked, SEQUENCE, KEPT).to(torch.uint8)

    def metrics():
        m = mask_metrics(name, x, keep, reason)
        m.update(divergence_metrics(divergence, d, v))
        m[M.mask_name(name, "seq_frac")] = masked_fraction(bad, nonempty)
        m[f"{name}/stat_mean"] = masked_mean(stat, nonempty)
        return m

    return RuleOutput(keep, reason, metrics=metrics, internals={"D": d, "seq_stat": stat, "seq_masked": bad})


@register_rule(
    "trm_max",
    equation="keep the whole response iff max_t D_t <= delta, D_t the per-token KL(mu || pi)  (SPEC 'trm_max', TRM)",
    family="sequence",
    facts=RuleFacts(can_mask=True, threshold="constant"),
    reasons=("kept", "sequence"),
    default_notes={"delta": "0.05 (alone; 0.1 when combined with trm_avg in the TRM paper)", **_NOTES},
)
def trm_max(x: RuleInput, *, delta: float = 0.05, divergence: str = "binary_kl") -> RuleOutput:
    """Reject every token of a response whose largest per-token KL exceeds ``delta``, whatever the token's
    direction (no away test). Reason "sequence". Empty responses are kept."""
    check_choice("divergence", divergence, KL_DIVERGENCES)
    check_nonneg("delta", delta)
    d = x.divergence(divergence)  # (B, T)
    stat = masked_max(d, x.valid, dim=-1)  # (B,)
    return _sequence_mask(x, "trm_max", stat, delta, d, divergence)


@register_rule(
    "trm_avg",
    equation="keep the whole response iff mean_t D_t <= delta_avg, D_t the per-token KL(mu || pi)  (SPEC 'trm_avg', TRM)",
    family="sequence",
    facts=RuleFacts(can_mask=True, threshold="constant"),
    reasons=("kept", "sequence"),
    default_notes={"delta_avg": "0.001 (alone; 0.002 when combined with trm_max in the TRM paper)", **_NOTES},
)
def trm_avg(x: RuleInput, *, delta_avg: float = 0.001, divergence: str = "binary_kl") -> RuleOutput:
    """Reject every token of a response whose mean per-token KL exceeds ``delta_avg`` (direction-blind).
    Reason "sequence". Empty responses are kept."""
    check_choice("divergence", divergence, KL_DIVERGENCES)
    check_nonneg("delta_avg", delta_avg)
    d = x.divergence(divergence)  # (B, T)
    stat = masked_mean(d, x.valid, dim=-1)  # (B,)
    return _sequence_mask(x, "trm_avg", stat, delta_avg, d, divergence)
