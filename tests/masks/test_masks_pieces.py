"""The rule library's exported pieces (away test, Eq. 9 weights, threshold schedule, Eq. 10 slack, reason codes,
rule defaults, the what-if grid) against direct transcriptions of SPEC.md and against the rules that use them."""

import math
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch

from cppo_diag.masks import (GRID_COUNTS, REASON_CODES, REASON_LABELS, REASON_NAMES, Reason, away_test, compute_mask,
                             direction_array, get_rule, list_rules, position_weight, ratio, rule_defaults, rule_grid, slack,
                             threshold_schedule)
from cppo_diag.masks.reasons import reason_name
from cppo_diag.storage.schema import REASONS


def _batch(seed=0, B=6, T=40, dtype=torch.float32, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    lq = torch.log(torch.rand(B, T, generator=g) * 0.98 + 0.02)
    lp = (lq + scale * torch.randn(B, T, generator=g)).clamp(max=0.0)
    adv = torch.randn(B, generator=g)
    return lp.to(dtype), lq.to(dtype), adv.to(dtype), mask


# -- Eq. 9 weights and the threshold schedule ---------------------------------------------------------------


def _w_spec(t: int, T: int, w_min: float) -> float:
    """SPEC CPPO step 1, transcribed: w_t = 1 - (1 - w_min) (t - 1) / max(T - 1, 1), t = 1..T."""
    return 1 - (1 - w_min) * (t - 1) / max(T - 1, 1)


@pytest.mark.parametrize("seed", range(4))
def test_position_weight_is_eq9_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    T = rng.integers(1, 300, 50)
    t = np.array([rng.integers(1, n + 1) for n in T])
    w_min = float(rng.uniform(0, 1))
    want = np.array([_w_spec(int(a), int(b), w_min) for a, b in zip(t, T)])
    np.testing.assert_allclose(position_weight(t - 1.0, T.astype(np.float64), w_min), want, rtol=1e-12)
    got_t = position_weight(torch.from_numpy(t - 1.0), torch.from_numpy(T.astype(np.float64)), w_min)
    np.testing.assert_allclose(got_t.numpy(), want, rtol=1e-12)
    df = pl.DataFrame({"pos": t - 1, "_T": T})
    got_pl = df.select(position_weight(pl.col("pos").cast(pl.Float64), pl.col("_T").cast(pl.Float64), w_min))
    np.testing.assert_allclose(got_pl.to_series().to_numpy(), want, rtol=1e-12)
    assert position_weight(0, 1, w_min) == 1.0 and position_weight(4, 5, w_min) == pytest.approx(w_min)


def test_threshold_schedule_is_delta_over_w():
    pos, T = np.arange(7), 7
    np.testing.assert_allclose(threshold_schedule(list(pos), delta=0.15, w_min=0.8, length=T),
                               [0.15 / _w_spec(p + 1, T, 0.8) for p in pos], rtol=1e-12)
    assert threshold_schedule([0], delta=0.2, w_min=0.5, length=1)[0] == pytest.approx(0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rule_weights_are_position_weight(dtype):
    lp, lq, adv, mask = _batch(1, dtype=dtype)
    res = compute_mask("cppo", logp=lp, logp_rollout=lq, advantages=adv, response_mask=mask, w_min=0.7,
                       return_internals=True)
    rank = (torch.cumsum(mask, -1) - 1).to(dtype)  # (B, T) t - 1
    want = position_weight(rank, mask.sum(-1).to(dtype)[:, None], 0.7).masked_fill(~mask, 0.0)
    assert torch.equal(res.internals["w"], want)


# -- Eq. 10 slack ---------------------------------------------------------------------------------------------


def test_slack_is_eq10_and_the_rules_c():
    lp, lq, adv, mask = _batch(2, scale=0.5)
    delta = 0.1
    res = compute_mask("cppo", logp=lp, logp_rollout=lq, advantages=adv, response_mask=mask, delta=delta,
                       return_internals=True)
    it = res.internals
    allowance = it["W"] * it["delta_b"][:, None]  # (B, T)
    c = slack(delta, allowance, it["S"])
    assert torch.equal(c[mask], it["c"][mask])  # the rule's own c_t, bit for bit
    # SPEC step 4 by a plain loop in float64
    z, w, db = it["Z"].double(), it["w"].double(), it["delta_b"].double()
    for b in range(mask.shape[0]):
        S = W = 0.0
        for t in range(int(mask[b].sum())):
            assert float(c[b, t]) == pytest.approx(min(delta, delta + float(db[b]) * W - S), abs=1e-6)
            S, W = S + float(z[b, t]), W + float(w[b, t])
    assert (c <= delta).all() and (c[mask] < 0).any()  # c_t can go negative
    assert torch.equal(allowance, it["W"] * it["delta_b"][:, None])  # not overwritten by default


# -- the away test ----------------------------------------------------------------------------------------------


def test_away_test_is_spec_and_the_rules_away():
    lp, lq, adv, mask = _batch(3)
    res = compute_mask("dppo", logp=lp, logp_rollout=lq, advantages=adv, response_mask=mask, return_internals=True)
    got = away_test(adv[:, None], ratio(lp, lq), mask)
    assert torch.equal(got, res.internals["away"])
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            rho = math.exp(min(max(float(lp[b, t]) - float(lq[b, t]), -20.0), 20.0))
            want = bool(mask[b, t]) and float(adv[b]) * (rho - 1) > 0
            if abs(rho - 1) > 1e-6:  # away from float32 rounding of rho
                assert bool(got[b, t]) == want


def test_direction_array_agrees_with_the_rules_at_tiny_log_ratios():
    lq = np.full(6, -0.01, dtype=np.float32)
    lp = np.array([np.nextafter(lq[0], np.float32(0)), np.nextafter(lq[0], np.float32(-1)), -0.005, -0.02,
                   np.nan, -0.01], dtype=np.float32)
    adv = np.array([1, 1, 1, 1, 1, -1], dtype=np.float32)
    d = direction_array(adv, lp, lq)
    assert d.tolist() == [0, 0, 1, -1, 0, 0]
    ok = ~np.isnan(lp)
    res = compute_mask("dppo", logp=torch.from_numpy(lp[ok])[None], logp_rollout=torch.from_numpy(lq[ok])[None],
                       advantages=torch.from_numpy(adv[ok])[None], return_internals=True)
    assert res.internals["away"][0].numpy().tolist() == (d[ok] > 0).tolist()


# -- reason codes ------------------------------------------------------------------------------------------------


def test_reason_codes_round_trip():
    for r in Reason:
        assert Reason(int(r)) is r
        assert REASON_CODES[REASON_NAMES[int(r)]] == r == REASON_CODES[reason_name(r)]
        assert r in REASON_LABELS
    assert REASONS is REASON_NAMES  # the storage format's table is the library's
    assert set(REASON_CODES) == {n for spec in list_rules() for n in spec.reasons} | {"kept"}
    with pytest.raises(ValueError, match="reason code"):
        reason_name(9)
    codes = torch.tensor([0, 1, 2, 3], dtype=torch.uint8)
    assert (codes == Reason.BUDGET).tolist() == [False, False, True, False]
    assert pl.select(pl.lit(2, pl.UInt8) == Reason.BUDGET).item()


def test_rule_defaults_are_the_signature_defaults():
    d = rule_defaults("cppo")
    assert d == get_rule("cppo").params and d["delta"] == 0.15 and d["w_min"] == 0.8 and d["delta_b"] == 0.02
    d["delta"] = 1.0
    assert rule_defaults("cppo")["delta"] == 0.15  # a fresh dict every call
    assert rule_defaults("grpo_clip") == {"eps_low": 0.2, "eps_high": 0.28}


def test_pure_pieces_import_without_torch():
    code = ("import sys; import cppo_diag.masks.schedule, cppo_diag.masks.reasons, cppo_diag.masks.away; "
            "from cppo_diag.masks import Reason, threshold_schedule; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the what-if grid --------------------------------------------------------------------------------------------


def _direct(rule, params, lp, lq, adv, mask):
    r = compute_mask(rule, logp=lp, logp_rollout=lq, advantages=adv, response_mask=mask, **params)
    masked = mask & ~r.keep
    return [int(mask.sum()), int(masked.sum())] + [int((r.reason == c).sum()) for c in Reason if c != Reason.KEPT]


@pytest.mark.parametrize("base", [{}, {"delta_b_mode": "fixed"}, {"weight_length": "horizon", "horizon": 16}])
def test_rule_grid_cppo_equals_compute_mask(base):
    lp, lq, adv, mask = _batch(4, B=12, T=60, scale=0.4)
    points = [{"delta": d, "delta_b": b, "w_min": w} for d in (0.0, 0.05, 0.15) for b in (0.005, 0.03)
              for w in (0.5, 1.0)] + [{"delta": 0.05}, {}]
    got = rule_grid("cppo", points, logp=lp, logp_rollout=lq, advantages=adv, response_mask=mask, **base)
    assert got.shape == (len(points), len(GRID_COUNTS)) and got.dtype == torch.int64
    for row, p in zip(got.tolist(), points):
        assert row == _direct("cppo", {**base, **p}, lp, lq, adv, mask), p
    assert len({tuple(r) for r in got.tolist()}) > 3  # the grid moves the mask


@pytest.mark.parametrize("rule,points", [("dppo", [{"delta": 0.05}, {"delta": 0.2, "delta_high": 0.1}]),
                                         ("grpo_clip", [{"eps_low": 0.1}, {"eps_high": 0.5}]),
                                         ("cppo", [{"delta": 0.1, "divergence": "binary_kl"}]),
                                         ("trm_max", [{"delta": 0.01}, {"delta": 0.5}])])
def test_rule_grid_other_rules_equal_compute_mask(rule, points):
    lp, lq, adv, mask = _batch(5, scale=0.4)
    got = rule_grid(rule, points, logp=lp, logp_rollout=lq, advantages=adv, response_mask=mask)
    for row, p in zip(got.tolist(), points):
        assert row == _direct(rule, p, lp, lq, adv, mask), p


def test_rule_grid_rejects_unknown_parameters():
    lp, lq, adv, mask = _batch(6)
    with pytest.raises(ValueError, match="eps_low"):
        rule_grid("cppo", [{"eps_low": 0.1}], logp=lp, logp_rollout=lq, advantages=adv, response_mask=mask)
    with pytest.raises(ValueError, match="delta"):
        rule_grid("cppo", [{"delta": -1.0}], logp=lp, logp_rollout=lq, advantages=adv, response_mask=mask)
