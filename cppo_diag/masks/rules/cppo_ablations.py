"""CPPO ablations (paper Fig. 5) and the soft gate (paper App. C), all built on ``cppo_core``.

Each variant takes a subset of ``cppo``'s parameters with ``cppo``'s defaults: its signature is derived from
``cppo``'s (``_variant``), so the defaults are written once, in ``cppo``'s signature, and the registry, ``cppo-diag
rules`` and docs/rules.md read them from there.
"""

from __future__ import annotations

import inspect
from typing import Callable

from cppo_diag.masks.layout import RuleInput
from cppo_diag.masks.registry import RuleFacts, register_rule
from cppo_diag.masks.result import RuleOutput
from cppo_diag.masks.rules.cppo import CPPO_NOTES, cppo, cppo_core

_BUDGET = ("delta_b", "delta_b_mode", "delta_b_quantile", "delta_b_cap", "delta_b_scale")
_WEIGHTS = ("w_min", "weight_length", "horizon")


def _variant(name: str, variant: str, params: tuple[str, ...], doc: str, *, extra: tuple[inspect.Parameter, ...] = (),
             check: Callable[[dict], None] | None = None) -> Callable[..., RuleOutput]:
    """The rule function of one CPPO variant: ``cppo``'s parameters ``params`` (its defaults), plus ``extra``;
    ``check`` validates the bound parameters before ``cppo_core`` runs."""
    base = inspect.signature(cppo)
    keep = [p for p in base.parameters.values() if p.name == "x" or p.name in params] + list(extra)
    sig = base.replace(parameters=keep)

    def rule(x: RuleInput, **kw) -> RuleOutput:
        bound = sig.bind(x, **kw)
        bound.apply_defaults()
        values = {k: v for k, v in bound.arguments.items() if k != "x"}
        if check is not None:
            check(values)
        return cppo_core(x, name, variant=variant, **values)

    rule.__signature__ = sig
    rule.__name__ = rule.__qualname__ = name
    rule.__doc__ = doc
    return rule


def _check_seed(p: dict) -> None:
    if isinstance(p["seed"], bool) or not isinstance(p["seed"], int):
        raise ValueError(f"seed: expected an int, found {p['seed']!r}")


def _check_soft(p: dict) -> None:
    if p["delta"] <= 0:
        raise ValueError(f"delta: cppo_soft divides by delta, expected > 0, found {p['delta']!r}")


cppo_no_weight = register_rule(
    "cppo_no_weight",
    equation="CPPO with w_t = 1: Z_t = D_t, c_t = min(delta, delta + delta_b (t - 1) - S_{t-1})  (CPPO Fig. 5 ablation)",
    family="cppo",
    reasons=("kept", "token", "budget"),
    default_notes=CPPO_NOTES,
    facts=RuleFacts(can_mask=True, prefix_budget=True, threshold="constant"),
)(_variant("cppo_no_weight", "no_weight", ("delta", *_BUDGET, "divergence"),
           "CPPO without position weights (w = 1 everywhere); the prefix budget is kept."))

cppo_no_budget = register_rule(
    "cppo_no_budget",
    equation="CPPO with c_t = delta: keep_t = not away_t or w_t D_t <= delta  (CPPO Fig. 5 ablation)",
    family="cppo",
    reasons=("kept", "token"),
    default_notes=CPPO_NOTES,
    facts=RuleFacts(can_mask=True, threshold="position"),
)(_variant("cppo_no_budget", "no_budget", ("delta", *_WEIGHTS, "divergence"),
           'CPPO without the prefix budget: only the position-weighted threshold (every masked token is "token").'))

cppo_shuffled = register_rule(
    "cppo_shuffled",
    equation="cppo_no_budget with w_t -> w_{perm(t)}, perm a seeded permutation per response  (CPPO Fig. 5 ablation)",
    family="cppo",
    reasons=("kept", "token"),
    default_notes=CPPO_NOTES,
    facts=RuleFacts(can_mask=True, threshold="shuffled"),
)(_variant("cppo_shuffled", "shuffled", ("delta", *_WEIGHTS, "divergence"),
           "The no-budget variant with each response's weight multiset {w_1..w_T} permuted at random. The\n"
           "    permutation depends only on (seed, step, seq_id, valid length), with ``step`` and ``seq_ids`` given to\n"
           "    ``compute_mask`` (default: no step, seq_id = row index) (``cppo_diag.masks.shuffle``).",
           extra=(inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=0, annotation=int),),
           check=_check_seed))

cppo_soft = register_rule(
    "cppo_soft",
    equation="x_t = max(Z_t / delta, S_t / (delta + delta_b W_{t-1})); gate_t = min(1, 1/x_t) if away_t else 1; "
    "loss term times gate_t  (CPPO App. C)",
    family="cppo",
    reasons=("kept",),
    default_notes=CPPO_NOTES,
    facts=RuleFacts(can_mask=False, prefix_budget=True, threshold="position"),
)(_variant("cppo_soft", "soft", ("delta", *_WEIGHTS, *_BUDGET, "divergence"),
           "Soft CPPO gate: nothing is masked (keep = valid); ``result.weight`` holds the gate in (0, 1] that\n"
           "    multiplies each token's loss term. S_t here is the inclusive prefix sum.",
           check=_check_soft))
