"""Property tests: every rule equals the plain per-token loop of SPEC.md (tests/reference_loop.py) in float64,
on random and adversarial batches (ties, thresholds taken from the data, zero advantages, T = 1, empty rows,
left and right padding, every CPPO option)."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference_loop import ALL_MASK_RULES, assert_matches_reference

from cppo_diag.masks.reasons import BUDGET, KEPT

NICE_PROBS = [0.01, 0.1, 0.25, 0.5, 0.64, 0.75, 0.9, 0.99, 1.0]
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def batches(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 9))
    prob = st.one_of(st.sampled_from(NICE_PROBS), st.floats(1e-4, 1.0, allow_nan=False))
    q = [[draw(prob) for _ in range(T)] for _ in range(B)]
    p = [[q[b][t] if draw(st.integers(0, 3)) == 0 else draw(prob) for t in range(T)] for b in range(B)]  # ties
    adv_val = st.one_of(st.sampled_from([-1.0, 0.0, 1.0, 0.5]), st.floats(-2, 2, allow_nan=False))
    per_token = draw(st.booleans())
    adv = [[draw(adv_val) for _ in range(T)] for _ in range(B)] if per_token else [draw(adv_val) for _ in range(B)]
    lengths = [draw(st.integers(0, T)) for _ in range(B)]
    side = draw(st.sampled_from(["right", "left"]))
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = True
        else:
            mask[b, T - n:] = True
    lp = torch.tensor([[math.log(x) for x in row] for row in p], dtype=torch.float64)
    lr = torch.tensor([[math.log(x) for x in row] for row in q], dtype=torch.float64)
    return lp, lr, torch.tensor(adv, dtype=torch.float64), mask


def data_threshold(draw, lp, lr, mask, default):
    """Either the default or one of the batch's own |p - q| values (an exact tie with some D_t)."""
    d = (torch.exp(lp) - torch.exp(lr)).abs()[mask].tolist()
    if d and draw(st.booleans()):
        return draw(st.sampled_from(d))
    return default


@SETTINGS
@given(batch=batches(), data=st.data())
def test_cppo_family_equals_reference(batch, data):
    lp, lr, adv, mask = batch
    draw = data.draw
    rule = draw(st.sampled_from(["cppo", "cppo_no_weight", "cppo_no_budget", "cppo_shuffled", "cppo_soft"]))
    params = {
        "delta": data_threshold(draw, lp, lr, mask, 0.15),
        "w_min": draw(st.sampled_from([0.8, 1.0, 0.5, 0.0])),
        "delta_b": draw(st.sampled_from([0.02, 0.0, 0.05])),
        "delta_b_mode": draw(st.sampled_from(["adaptive", "fixed"])),
        "delta_b_quantile": draw(st.sampled_from([0.9, 0.5, 0.0, 1.0])),
        "delta_b_cap": draw(st.sampled_from([2.0, 1.0, 5.0])),
        "delta_b_scale": draw(st.sampled_from([1.0, 0.5, 3.0])),
        "weight_length": draw(st.sampled_from(["sequence", "horizon"])),
        "divergence": draw(st.sampled_from(["binary_tv", "binary_tv", "binary_kl"])),
        "seed": draw(st.integers(0, 3)),
    }
    if params["weight_length"] == "horizon":
        params["horizon"] = draw(st.integers(1, 10))
    if rule == "cppo_soft" and params["delta"] == 0:
        params["delta"] = 0.15
    if rule == "cppo_no_weight":
        params.pop("w_min")
    assert_matches_reference(rule, lp, lr, adv, mask, **params)


@SETTINGS
@given(batch=batches(), data=st.data())
def test_other_rules_equal_reference(batch, data):
    lp, lr, adv, mask = batch
    draw = data.draw
    rule = draw(st.sampled_from([r for r in ALL_MASK_RULES if not r.startswith("cppo")]))
    params = {}
    if rule == "grpo_clip":
        rho = torch.exp((lp - lr).clamp(-20, 20))[mask].tolist()
        params["eps_high"] = draw(st.sampled_from([0.28, 0.2] + [r - 1 for r in rho if r > 1][:3]))
        params["eps_low"] = draw(st.sampled_from([0.2] + [1 - r for r in rho if r < 1][:3]))
    elif rule == "cispo":
        params["eps_high"] = draw(st.sampled_from([0.28, 2.0, 0.0]))
    elif rule == "dppo":
        params["divergence"] = draw(st.sampled_from(["binary_tv", "binary_kl"]))
        params["delta"] = data_threshold(draw, lp, lr, mask, None)
        if draw(st.booleans()):
            params["delta_high"] = data_threshold(draw, lp, lr, mask, 0.1)
            params["delta_low"] = data_threshold(draw, lp, lr, mask, 0.2)
    elif rule == "trm_max":
        params["delta"] = draw(st.sampled_from([0.05, 0.1, 0.0]))
    elif rule == "trm_avg":
        params["delta_avg"] = draw(st.sampled_from([0.001, 0.002, 0.05]))
    elif rule == "drpo":
        params["delta"] = 0.15
    assert_matches_reference(rule, lp, lr, adv, mask, **params)


def test_adversarial_cppo_zero_slack_chain():
    """delta_b = 0, w_min = 1, every D equal to delta / 2: the slack shrinks to 0 then goes negative; each
    tie (Z == c) is kept and the next token is masked, as in the loop."""
    T = 6
    lr = torch.full((1, T), math.log(0.5), dtype=torch.float64)
    lp = torch.full((1, T), math.log(0.625), dtype=torch.float64)  # D = 0.125 exactly
    adv = torch.ones(1, dtype=torch.float64)
    mask = torch.ones(1, T, dtype=torch.bool)
    res = assert_matches_reference("cppo", lp, lr, adv, mask, delta=0.25, w_min=1.0, delta_b=0.0,
                                   delta_b_mode="fixed")
    assert res.keep[0].tolist() == [True, True, False, False, False, False]  # c_2 = 0.125 == Z_2: kept
    assert res.reason[0].tolist() == [KEPT, KEPT, BUDGET, BUDGET, BUDGET, BUDGET]
