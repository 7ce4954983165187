"""CPPO ablations (paper Fig. 5) and the soft gate (paper App. C), all built on ``cppo_core``."""

from __future__ import annotations

from cppo_diag.masks.layout import RuleInput
from cppo_diag.masks.registry import register_rule
from cppo_diag.masks.result import RuleOutput
from cppo_diag.masks.rules.cppo import CPPO_NOTES, cppo_core


@register_rule(
    "cppo_no_weight",
    equation="CPPO with w_t = 1: Z_t = D_t, c_t = min(delta, delta + delta_b (t - 1) - S_{t-1})  (CPPO Fig. 5 ablation)",
    family="cppo",
    reasons=("kept", "token", "budget"),
    default_notes=CPPO_NOTES,
)
def cppo_no_weight(
    x: RuleInput,
    *,
    delta: float = 0.15,
    delta_b: float = 0.02,
    delta_b_mode: str = "adaptive",
    delta_b_quantile: float = 0.9,
    delta_b_cap: float = 2.0,
    delta_b_scale: float = 1.0,
    divergence: str = "binary_tv",
) -> RuleOutput:
    """CPPO without position weights (w = 1 everywhere); the prefix budget is kept."""
    return cppo_core(x, "cppo_no_weight", variant="no_weight", delta=delta, delta_b=delta_b,
                     delta_b_mode=delta_b_mode, delta_b_quantile=delta_b_quantile, delta_b_cap=delta_b_cap,
                     delta_b_scale=delta_b_scale, divergence=divergence)


@register_rule(
    "cppo_no_budget",
    equation="CPPO with c_t = delta: keep_t = not away_t or w_t D_t <= delta  (CPPO Fig. 5 ablation)",
    family="cppo",
    reasons=("kept", "token"),
    default_notes=CPPO_NOTES,
)
def cppo_no_budget(
    x: RuleInput,
    *,
    delta: float = 0.15,
    w_min: float = 0.8,
    weight_length: str = "sequence",
    horizon: int | None = None,
    divergence: str = "binary_tv",
) -> RuleOutput:
    """CPPO without the prefix budget: only the position-weighted threshold (every masked token is "token")."""
    return cppo_core(x, "cppo_no_budget", variant="no_budget", delta=delta, w_min=w_min,
                     weight_length=weight_length, horizon=horizon, divergence=divergence)


@register_rule(
    "cppo_shuffled",
    equation="cppo_no_budget with w_t -> w_{perm(t)}, perm a seeded permutation per response  (CPPO Fig. 5 ablation)",
    family="cppo",
    reasons=("kept", "token"),
    default_notes=CPPO_NOTES,
)
def cppo_shuffled(
    x: RuleInput,
    *,
    delta: float = 0.15,
    w_min: float = 0.8,
    weight_length: str = "sequence",
    horizon: int | None = None,
    divergence: str = "binary_tv",
    seed: int = 0,
) -> RuleOutput:
    """The no-budget variant with each response's weight multiset {w_1..w_T} permuted at random. The
    permutation depends only on (seed, step, seq_id, valid length), with ``step`` and ``seq_ids`` given to
    ``compute_mask`` (default: no step, seq_id = row index) (``cppo_diag.masks.shuffle``)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, found {seed!r}")
    return cppo_core(x, "cppo_shuffled", variant="shuffled", delta=delta, w_min=w_min,
                     weight_length=weight_length, horizon=horizon, divergence=divergence, seed=seed)


@register_rule(
    "cppo_soft",
    equation="x_t = max(Z_t / delta, S_t / (delta + delta_b W_{t-1})); gate_t = min(1, 1/x_t) if away_t else 1; "
    "loss term times gate_t  (CPPO App. C)",
    family="cppo",
    reasons=("kept",),
    default_notes=CPPO_NOTES,
)
def cppo_soft(
    x: RuleInput,
    *,
    delta: float = 0.15,
    w_min: float = 0.8,
    delta_b: float = 0.02,
    delta_b_mode: str = "adaptive",
    delta_b_quantile: float = 0.9,
    delta_b_cap: float = 2.0,
    delta_b_scale: float = 1.0,
    weight_length: str = "sequence",
    horizon: int | None = None,
    divergence: str = "binary_tv",
) -> RuleOutput:
    """Soft CPPO gate: nothing is masked (keep = valid); ``result.weight`` holds the gate in (0, 1] that
    multiplies each token's loss term. S_t here is the inclusive prefix sum."""
    if delta <= 0:
        raise ValueError(f"delta: cppo_soft divides by delta, expected > 0, found {delta!r}")
    return cppo_core(x, "cppo_soft", variant="soft", delta=delta, w_min=w_min, delta_b=delta_b,
                     delta_b_mode=delta_b_mode, delta_b_quantile=delta_b_quantile, delta_b_cap=delta_b_cap,
                     delta_b_scale=delta_b_scale, weight_length=weight_length, horizon=horizon, divergence=divergence)
