"""Trust-region rules (SPEC.md "Rules"): one registry, one entry point.

    from cppo_diag.masks import compute_mask, list_rules, get_rule, MaskResult
    res = compute_mask("cppo", logp=logp, logp_rollout=logp_rollout, advantages=adv, response_mask=mask)
    res.keep, res.reason, res.weight, res.metrics, res.internals

Modules: ``registry`` (names, parameters), ``compute`` (entry point), ``layout`` (padded / packed input,
validation), ``divergence`` (D_t), ``quantile`` (adaptive delta_b), ``shuffle`` (cppo_shuffled permutation),
``reduce`` (masked reductions), ``metrics``, ``result``, and ``rules/`` (one module per rule family).
"""

from cppo_diag.masks.compute import compute_mask
from cppo_diag.masks.divergence import DIVERGENCES, RULE_DIVERGENCES
from cppo_diag.masks.layout import InputError, RuleInput, TopK
from cppo_diag.masks.registry import (
    COMMON_PARAMETERS,
    PARAMETERS,
    RuleSpec,
    UnknownRuleError,
    get_rule,
    list_rules,
    register_rule,
)
from cppo_diag.masks.result import REASON_CODES, MaskResult, RuleOutput
from cppo_diag.masks.shuffle import shuffle_permutation

__all__ = [
    "compute_mask",
    "list_rules",
    "get_rule",
    "register_rule",
    "MaskResult",
    "RuleOutput",
    "RuleInput",
    "RuleSpec",
    "TopK",
    "InputError",
    "UnknownRuleError",
    "PARAMETERS",
    "COMMON_PARAMETERS",
    "DIVERGENCES",
    "RULE_DIVERGENCES",
    "REASON_CODES",
    "shuffle_permutation",
]
