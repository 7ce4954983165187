"""Trust-region rules (SPEC.md "Rules"): one registry, one entry point, and the pieces the rules are made of.

    from cppo_diag.masks import compute_mask, list_rules, get_rule, MaskResult
    res = compute_mask("cppo", logp=logp, logp_rollout=logp_rollout, advantages=adv, response_mask=mask)
    res.keep, res.reason, res.weight, res.metrics, res.internals

The pieces, each defined once and used by the rules, the trainer, the integrations and the analyses:

    ratio, log_ratio, drift, away_test, ...    rho_t and the away test A_t (rho_t - 1) > 0   (``away``)
    position_weight, threshold_schedule, slack  CPPO Eq. 9 w_t, delta / w_t, Eq. 10 c_t       (``schedule``)
    Reason, REASON_CODES, REASON_NAMES, ...     reason codes of masked tokens                 (``reasons``)
    rule_defaults(name)                         a rule's parameters and defaults              (``registry``)
    rule_grid(rule, points, ...)                one rule over a grid of parameter values      (``grid``)

Modules: ``registry`` (names, parameters, profiles), ``compute`` (entry point), ``layout`` (padded / packed
input, validation), ``away``, ``schedule``, ``reasons``, ``divergence`` (D_t), ``quantile`` (adaptive
delta_b), ``shuffle`` (cppo_shuffled permutation), ``reduce`` (masked reductions), ``metrics``, ``result``,
``grid`` and ``rules/`` (one module per rule family).

Names are imported on first use, so ``cppo_diag.masks.away``, ``schedule`` and ``reasons`` load without torch.
"""

from __future__ import annotations

from cppo_diag._lazy import lazy_attributes

_EXPORTS = {
    "compute_mask": "compute",
    "list_rules": "registry",
    "get_rule": "registry",
    "register_rule": "registry",
    "rule_defaults": "registry",
    "RuleSpec": "registry",
    "RuleFacts": "registry",
    "rules_with": "registry",
    "UnknownRuleError": "registry",
    "PARAMETERS": "registry",
    "COMMON_PARAMETERS": "registry",
    "MaskResult": "result",
    "RuleOutput": "result",
    "RuleInput": "layout",
    "TopK": "layout",
    "InputError": "layout",
    "DIVERGENCES": "divergence",
    "RULE_DIVERGENCES": "divergence",
    "shuffle_permutation": "shuffle",
    "LOG_RATIO_CLAMP": "away",
    "log_ratio": "away",
    "ratio": "away",
    "away_test": "away",
    "drift": "away",
    "direction_array": "away",
    "position_weight": "schedule",
    "threshold_schedule": "schedule",
    "slack": "schedule",
    "Reason": "reasons",
    "REASON_CODES": "reasons",
    "REASON_NAMES": "reasons",
    "REASON_LABELS": "reasons",
    "rule_grid": "grid",
    "GRID_COUNTS": "grid",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, {name: f"{__name__}.{m}" for name, m in _EXPORTS.items()})
