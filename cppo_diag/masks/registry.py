"""The rule registry: one decorated function per rule, looked up by name.

A rule is a pure function ``fn(x: RuleInput, *, <params with defaults>) -> RuleOutput`` registered with
``@register_rule("name", equation=...)``. Its keyword-only parameters, and their defaults, are read from the
signature, so ``cppo-diag rules``, ``docs/rules.md`` and the code cannot drift. Every parameter name must be
one of ``PARAMETERS`` (SPEC.md's names), so every rule is called through the same keyword signature
(``compute_mask(rule, *, logp, logp_rollout, advantages, ..., **params)``).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["RuleSpec", "RuleFacts", "THRESHOLD_SCHEDULES", "LOSS_FORMS", "rules_with", "PARAMETERS", "register_rule", "get_rule", "list_rules", "rule_defaults", "UnknownRuleError", "RuleProfile",
           "register_profile", "get_profile", "list_profiles", "profile_params", "UnknownProfileError"]

# Every parameter any rule may take, with its meaning (SPEC.md names; defaults live in each rule's signature).
PARAMETERS: dict[str, str] = {
    "delta": "token threshold on D_t (cppo family, dppo); max-KL threshold (trm_max); step size (drpo)",
    "w_min": "weight of the last position: w_t falls linearly from 1 (t = 1) to w_min (t = T) (CPPO Eq. 9)",
    "delta_b": "prefix budget per unit weight: the minimum delta_b_min (adaptive mode) or the fixed value",
    "delta_b_mode": "'adaptive' (Eq. 22: clamp(k * quantile_q(D), delta_b, cap * delta_b) per response) or 'fixed'",
    "delta_b_quantile": "q of the adaptive budget quantile (linear interpolation over the response's valid D_t)",
    "delta_b_cap": "cap: the adaptive budget is at most cap * delta_b",
    "delta_b_scale": "k: the adaptive budget is k * quantile_q(D) before clamping",
    "weight_length": "which T in w_t: 'sequence' (each response's own valid length) or 'horizon' (T := horizon)",
    "horizon": "H for weight_length='horizon' (positions beyond H get w_min)",
    "divergence": "per-token D_t: 'binary_tv', 'binary_kl', 'topk_tv' or 'topk_kl' (topk_* need topk=...)",
    "eps_low": "lower ratio clip: mask A<0 tokens with rho < 1 - eps_low",
    "eps_high": "upper ratio clip (grpo_clip: mask A>0 tokens with rho > 1 + eps_high; cispo: weight cap)",
    "delta_low": "dppo threshold for A<0 tokens (default: delta)",
    "delta_high": "dppo threshold for A>0 tokens (default: delta)",
    "delta_avg": "trm_avg threshold on the mean per-token KL of a response",
    "seed": "seed of cppo_shuffled's weight permutation (with compute_mask's step and seq_ids, and the valid length)",
}

# Parameters handled by compute_mask itself (valid for every rule).
COMMON_PARAMETERS: dict[str, str] = {
    "anchor": "'rollout' (mu, default) or 'old' (pi_old = logp_old) as the ratio's and divergence's anchor",
    "check_finite": "validate that valid positions hold finite values (one host sync); default True",
}


# What a rule can do, declared once at registration (``register_rule(..., facts=RuleFacts(...))``) and read by
# every analysis through ``get_rule(name).facts`` / ``rules_with(...)``; tests/masks/test_rule_facts.py checks each
# declared fact against ``compute_mask`` on random inputs.
THRESHOLD_SCHEDULES: dict[str, str] = {
    "none": "no threshold: every valid token keeps its full weight",
    "constant": "one threshold for every position (a ratio clip, a divergence bound, a per-response bound)",
    "position": "delta / w_t with w_t falling from 1 to w_min along the response (CPPO Eq. 9): looser later",
    "shuffled": "the position weights of 'position', permuted per response (CPPO Fig. 5 ablation)",
}
LOSS_FORMS = ("ratio", "is_weight", "drpo")  # cppo_diag.loss: how policy_loss uses the rule's result


@dataclass(frozen=True)
class RuleFacts:
    """What a rule can do.

    can_mask     some valid token can get keep = False (False: a weight / penalty rule that keeps every token)
    prefix_budget the rule has CPPO's prefix budget (Eq. 22; parameters delta_b*, reason "budget" or a gated
                 weight)
    threshold    one of ``THRESHOLD_SCHEDULES``: how the per-token threshold depends on the position
    loss_form    one of ``LOSS_FORMS``: the ``loss_form`` of every ``compute_mask`` result of the rule
    """

    can_mask: bool = True
    prefix_budget: bool = False
    threshold: str = "constant"
    loss_form: str = "ratio"

    def __post_init__(self):
        if self.threshold not in THRESHOLD_SCHEDULES:
            raise ValueError(f"RuleFacts.threshold: expected one of {list(THRESHOLD_SCHEDULES)}, found {self.threshold!r}")
        if self.loss_form not in LOSS_FORMS:
            raise ValueError(f"RuleFacts.loss_form: expected one of {list(LOSS_FORMS)}, found {self.loss_form!r}")


class UnknownRuleError(ValueError):
    """Unknown rule name; the message lists the registered ones."""


@dataclass(frozen=True)
class RuleSpec:
    """A registered rule: name, function, parameters (name -> default), paper equation and description."""

    name: str
    fn: Callable = field(repr=False)
    params: dict[str, Any]
    equation: str
    doc: str
    family: str
    reasons: tuple[str, ...]
    default_notes: dict[str, str] = field(default_factory=dict)
    facts: RuleFacts = field(default_factory=RuleFacts)

    def describe_default(self, param: str) -> str:
        return self.default_notes.get(param, repr(self.params[param]))


_REGISTRY: dict[str, RuleSpec] = {}


def register_rule(
    name: str,
    *,
    equation: str,
    family: str,
    reasons: tuple[str, ...] = ("kept",),
    default_notes: dict[str, str] | None = None,
    facts: RuleFacts | None = None,
):
    """Decorator: register ``fn(x, *, **params) -> RuleOutput`` under ``name``; ``facts``: what it can do
    (``RuleFacts``; default: a masking rule with one constant threshold, the "ratio" loss form)."""

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"rule {name!r} is already registered (by {_REGISTRY[name].fn.__module__})")
        sig = inspect.signature(fn)
        items = list(sig.parameters.values())
        if not items or items[0].kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            raise TypeError(f"rule {name!r}: first parameter must be the positional RuleInput")
        params = {}
        for p in items[1:]:
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
                raise TypeError(f"rule {name!r}: parameter {p.name!r} must be keyword-only with a default")
            if p.name not in PARAMETERS:
                raise TypeError(f"rule {name!r}: parameter {p.name!r} is not one of PARAMETERS {sorted(PARAMETERS)}")
            params[p.name] = p.default
        doc = inspect.cleandoc(fn.__doc__ or "")
        facts_ = facts or RuleFacts()
        if facts_.prefix_budget and "delta_b" not in params:
            raise TypeError(f"rule {name!r}: facts say prefix_budget=True but it takes no 'delta_b' parameter")
        _REGISTRY[name] = RuleSpec(name, fn, params, equation, doc, family, tuple(reasons), dict(default_notes or {}),
                                   facts_)
        return fn

    return deco


def _ensure_loaded() -> None:
    import cppo_diag.masks.rules  # noqa: F401  (registers the built-in rules)


def get_rule(name: str) -> RuleSpec:
    """The spec of a registered rule; raises ``UnknownRuleError`` listing the known names."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownRuleError(f"unknown rule {name!r}; known rules: {', '.join(_REGISTRY)}") from None


def list_rules() -> list[RuleSpec]:
    """All registered rules, in registration order."""
    _ensure_loaded()
    return list(_REGISTRY.values())


def rules_with(**facts: Any) -> list[str]:
    """Names of the registered rules whose ``RuleFacts`` match every given field, in registration order, e.g.
    ``rules_with(prefix_budget=True)``, ``rules_with(can_mask=False)``, ``rules_with(threshold="position")``."""
    _ensure_loaded()
    known = {f.name for f in dataclasses.fields(RuleFacts)}
    bad = sorted(set(facts) - known)
    if bad:
        raise TypeError(f"rules_with: unknown fact(s) {bad}; expected some of {sorted(known)}")
    return [s.name for s in _REGISTRY.values() if all(getattr(s.facts, k) == v for k, v in facts.items())]


def rule_defaults(name: str) -> dict[str, Any]:
    """A fresh dict of the rule's parameters and their defaults, read from its signature (the one place they
    are written). None means "resolved by the rule" (e.g. dppo's delta, by divergence: ``describe_default``)."""
    return dict(get_rule(name).params)


# -- named parameter sets ("profiles") ------------------------------------------------------------------------
# A profile names one combination of a rule's parameters used by an implementation in the field (SPEC.md
# "Implementations in the field"), so a user can recompute a run under each and see how far the masks differ.
# Profiles live beside the rule that defines the defaults (``rules/cppo.py`` registers CPPO's).


class UnknownProfileError(ValueError):
    """Unknown profile name; the message lists the rule's registered profiles."""


@dataclass(frozen=True)
class RuleProfile:
    """A named parameter set of one rule.

    ``params``: the parameters that differ from, or are pinned against, the rule's defaults. ``from_run``:
    parameter -> name of a fact read from the run it is applied to (e.g. ``{"horizon": "max_response_length"}``),
    supplied to :meth:`resolve` as keyword arguments. ``source``: what the set reproduces, with the facts behind it.
    """

    rule: str
    name: str
    params: dict[str, Any]
    source: str
    from_run: dict[str, str] = field(default_factory=dict)

    def resolve(self, **run_facts: Any) -> dict[str, Any]:
        """Every parameter of the rule: its defaults, overridden by the profile's values and the run facts."""
        out = dict(get_rule(self.rule).params)
        out.update(self.params)
        for param, fact in self.from_run.items():
            value = run_facts.get(fact)
            if value is None:
                raise ValueError(f"profile {self.name!r} of rule {self.rule!r}: parameter {param!r} needs the run's "
                                 f"{fact}, found none (pass {fact}=...)")
            out[param] = value
        return out


_PROFILES: dict[str, dict[str, RuleProfile]] = {}


def register_profile(rule: str, name: str, *, params: dict[str, Any], source: str,
                     from_run: dict[str, str] | None = None) -> RuleProfile:
    """Register a named parameter set of ``rule``; its parameter names are checked against the rule's."""
    spec = _REGISTRY.get(rule)
    if spec is None:
        raise UnknownRuleError(f"profile {name!r}: unknown rule {rule!r}; known rules: {', '.join(_REGISTRY)}")
    bad = sorted((set(params) | set(from_run or {})) - set(spec.params))
    if bad:
        raise TypeError(f"profile {name!r} of rule {rule!r}: parameters {bad} are not among the rule's "
                        f"{sorted(spec.params)}")
    profiles = _PROFILES.setdefault(rule, {})
    if name in profiles:
        raise ValueError(f"profile {name!r} of rule {rule!r} is already registered")
    profiles[name] = RuleProfile(rule, name, dict(params), source, dict(from_run or {}))
    return profiles[name]


def list_profiles(rule: str) -> list[RuleProfile]:
    """The registered profiles of ``rule`` in registration order (empty when it has none)."""
    _ensure_loaded()
    get_rule(rule)
    return list(_PROFILES.get(rule, {}).values())


def get_profile(rule: str, name: str) -> RuleProfile:
    """A registered profile; raises ``UnknownProfileError`` listing the rule's known profiles."""
    _ensure_loaded()
    get_rule(rule)
    known = _PROFILES.get(rule, {})
    if name not in known:
        raise UnknownProfileError(f"unknown profile {name!r} of rule {rule!r}; known profiles: "
                                  f"{', '.join(known) or '(none)'}")
    return known[name]


def profile_params(rule: str, name: str, **run_facts: Any) -> dict[str, Any]:
    """Every parameter of ``rule`` under profile ``name`` (see :meth:`RuleProfile.resolve`)."""
    return get_profile(rule, name).resolve(**run_facts)
