"""Rules: truth tables at the thresholds, layouts, edge cases, validation errors and the registry."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from reference_loop import (
    ALL_MASK_RULES,
    NEEDS,
    assert_matches_reference,
    pack,
    pad,
    random_batch,
    reference,
    valid_rows,
)
from cppo_diag.masks import (
    PARAMETERS,
    InputError,
    MaskResult,
    UnknownRuleError,
    compute_mask,
    get_rule,
    list_rules,
    shuffle_permutation,
)
from cppo_diag.masks.reasons import BUDGET, KEPT, Reason

F64 = torch.float64


def t64(rows):
    return torch.tensor(rows, dtype=F64)


def run(rule, lp, lr, adv, mask=None, **kw):
    return compute_mask(rule, logp=lp, logp_rollout=lr, advantages=adv, response_mask=mask, **{**NEEDS.get(rule, {}), **kw})


# ---------------------------------------------------------------- registry -----------------------------------------


def test_registry_names_are_the_contract():
    assert [s.name for s in list_rules()] == ALL_MASK_RULES


def test_unknown_rule_lists_known_ones():
    with pytest.raises(UnknownRuleError) as exc:
        get_rule("minpro")
    for name in ALL_MASK_RULES:
        assert name in str(exc.value)
    with pytest.raises(ValueError, match="known rules"):
        compute_mask("cppo2", logp=torch.zeros(1, 1), logp_rollout=torch.zeros(1, 1), advantages=torch.zeros(1))


def test_every_rule_has_the_same_keyword_signature():
    """Every rule function takes (x, *, params...) with params drawn from PARAMETERS, and compute_mask accepts
    the full set of parameter names for every rule (unused ones are ignored and reported)."""
    every = {
        "delta": 0.15, "w_min": 0.8, "delta_b": 0.02, "delta_b_mode": "adaptive", "delta_b_quantile": 0.9,
        "delta_b_cap": 2.0, "delta_b_scale": 1.0, "weight_length": "sequence", "horizon": 8,
        "divergence": "binary_kl", "eps_low": 0.2, "eps_high": 0.28, "delta_low": None, "delta_high": None,
        "delta_avg": 0.001, "seed": 3,
    }
    assert set(every) == set(PARAMETERS)
    lp, lr, adv, n = random_batch(3, 6, seed=1, lengths=[6, 3, 0])
    lp, m = pad(lp, n, 6)
    lr, _ = pad(lr, n, 6)
    for spec in list_rules():
        sig = inspect.signature(spec.fn)
        params = list(sig.parameters.values())
        assert params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), spec.name
        assert set(spec.params) <= set(PARAMETERS), spec.name
        assert spec.equation and spec.doc, spec.name
        res = compute_mask(spec.name, logp=lp, logp_rollout=lr, advantages=adv, response_mask=m, **every)
        assert isinstance(res, MaskResult)
        assert set(res.params.get("ignored", [])) == set(every) - set(spec.params)
        assert res.params["anchor"] == "rollout"


def test_unknown_parameter_raises_naming_it():
    lp, lr, adv, _ = random_batch(2, 4, lengths=[4, 4])
    with pytest.raises(TypeError, match="delta_bmin"):
        compute_mask("cppo", logp=lp, logp_rollout=lr, advantages=adv, delta_bmin=0.02)



# ---------------------------------------------------------------- truth tables -------------------------------------


def _one_token(p, q, a):
    return t64([[math.log(p)]]), t64([[math.log(q)]]), t64([a])


@pytest.mark.parametrize(
    "p,q,a,eps_high,masked",
    [
        (0.5, 0.5, 1.0, 0.28, False),  # rho = 1
        (0.64, 0.5, 1.0, 0.28, False),  # rho = 1.28 exactly at 1 + eps_high: kept (strict >)
        (0.65, 0.5, 1.0, 0.28, True),
        (0.65, 0.5, -1.0, 0.28, False),  # A < 0 and rho > 1: never clipped from above
        (0.65, 0.5, 0.0, 0.28, False),  # zero advantage
    ],
)
def test_grpo_clip_truth_table(p, q, a, eps_high, masked):
    lp, lr, adv = _one_token(p, q, a)
    rho = float(torch.exp(lp - lr))
    eps = rho - 1.0 if (p, q) == (0.64, 0.5) else eps_high  # make the equality exact in float
    res = run("grpo_clip", lp, lr, adv, eps_high=eps)
    assert bool(res.masked[0, 0]) is masked
    assert int(res.reason[0, 0]) == (1 if masked else 0)


def test_grpo_clip_low_side_at_equality():
    lp, lr, adv = _one_token(0.4, 0.5, -1.0)
    rho = float(torch.exp(lp - lr))
    assert not bool(run("grpo_clip", lp, lr, adv, eps_low=1.0 - rho).masked[0, 0])  # rho == 1 - eps_low: kept
    assert bool(run("grpo_clip", lp, lr, adv, eps_low=(1.0 - rho) * 0.5).masked[0, 0])
    assert not bool(run("grpo_clip", lp, lr, -adv, eps_low=0.0).masked[0, 0])  # A > 0, rho < 1: back toward mu


@pytest.mark.parametrize("rule", ["dppo", "cppo", "cppo_no_budget", "cppo_no_weight"])
def test_threshold_equality_is_kept(rule):
    """D == delta (first token, w_1 = 1, c_1 = delta): kept; just above: masked with reason token."""
    lp, lr, adv = _one_token(0.7, 0.5, 1.0)
    d = float(torch.exp(lp) - torch.exp(lr))
    assert not bool(run(rule, lp, lr, adv, delta=d).masked[0, 0])
    res = run(rule, lp, lr, adv, delta=math.nextafter(d, 0.0))
    assert bool(res.masked[0, 0]) and int(res.reason[0, 0]) == Reason.TOKEN


@pytest.mark.parametrize("rule", ["dppo", "cppo", "cppo_no_weight", "cppo_no_budget", "cppo_shuffled"])
def test_back_toward_mu_is_never_masked(rule):
    # A > 0 with rho < 1 and A < 0 with rho > 1 move back toward mu; a huge divergence does not matter.
    lp = t64([[math.log(0.01), math.log(0.99)]])
    lr = t64([[math.log(0.99), math.log(0.01)]])
    adv = t64([[1.0, -1.0]])
    res = run(rule, lp, lr, adv, delta=0.0)
    assert not bool(res.masked.any())
    assert res.metrics[f"mask/{rule}/away_frac"] == 0.0


def test_dppo_asymmetric_thresholds():
    lp = t64([[math.log(0.7), math.log(0.3)]])
    lr = t64([[math.log(0.5), math.log(0.5)]])  # D = 0.2 for both
    adv = t64([[1.0, -1.0]])
    res = run("dppo", lp, lr, adv, delta_high=0.25, delta_low=0.1)
    assert res.masked.tolist() == [[False, True]]
    res = run("dppo", lp, lr, adv, delta_high=0.1, delta_low=0.25)
    assert res.masked.tolist() == [[True, False]]
    assert res.params["delta"] == 0.15


def test_dppo_default_delta_depends_on_divergence():
    lp, lr, adv, _ = random_batch(2, 4, lengths=[4, 4])
    assert run("dppo", lp, lr, adv).params["delta"] == 0.15
    assert run("dppo", lp, lr, adv, divergence="binary_kl").params["delta"] == 0.05
    assert run("dppo", lp, lr, adv, divergence="binary_kl", delta=0.2).params["delta"] == 0.2


def test_cppo_hand_computed_budget_mask():
    """Four tokens, fixed delta_b, w_min = 1: the budget (not the token threshold) rejects the third token."""
    q = [0.5, 0.5, 0.5, 0.5]
    p = [0.6, 0.55, 0.6, 0.6]  # D = 0.1, 0.05, 0.1, 0.1
    lp, lr, adv = t64([[math.log(x) for x in p]]), t64([[math.log(x) for x in q]]), t64([1.0])
    res = run("cppo", lp, lr, adv, delta=0.15, w_min=1.0, delta_b=0.02, delta_b_mode="fixed", return_internals=True)
    d = (torch.exp(lp) - torch.exp(lr)).abs()[0].tolist()
    # c_1 = 0.15; c_2 = min(.15, .15 + .02 - d1); c_3 = min(.15, .15 + .04 - d1 - d2); c_4 with S including d3
    c = [0.15, min(0.15, 0.15 + 0.02 * 1 - d[0]), min(0.15, 0.15 + 0.02 * 2 - d[0] - d[1]),
         min(0.15, 0.15 + 0.02 * 3 - d[0] - d[1] - d[2])]
    keep = [d[i] <= c[i] for i in range(4)]
    assert res.keep[0].tolist() == keep == [True, True, False, False]
    assert res.reason[0].tolist() == [KEPT, KEPT, BUDGET, BUDGET]
    torch.testing.assert_close(res.internals["c"][0], t64(c), rtol=0, atol=1e-15)
    assert res.metrics["mask/cppo/budget_share"] == 1.0
    # Every valid token adds to S, masked ones included: c_4 counts the masked third token (else c_4 = 0.06).
    assert c[3] < 0


def test_cppo_negative_slack_masks_every_away_token():
    p, q = [0.9, 0.9, 0.52, 0.48], [0.5, 0.5, 0.5, 0.5]
    lp, lr = t64([[math.log(x) for x in p]]), t64([[math.log(x) for x in q]])
    adv = t64([[1.0, -1.0, 1.0, 1.0]])
    res = run("cppo", lp, lr, adv, delta=0.5, w_min=1.0, delta_b=0.0, delta_b_mode="fixed", return_internals=True)
    c = res.internals["c"][0]
    assert float(c[2]) < 0 and float(c[3]) < 0
    # token 3 moves away (tiny D) -> masked by the budget; token 4 moves back toward mu -> kept
    assert res.keep[0].tolist() == [True, True, False, True]
    assert res.reason[0].tolist() == [KEPT, KEPT, BUDGET, KEPT]


def test_cppo_weights_sequence_and_horizon():
    lp, lr, adv, n = random_batch(3, 7, seed=4, lengths=[7, 1, 4])
    lp, m = pad(lp, n, 9, "left")
    lr, _ = pad(lr, n, 9, "left")
    res = run("cppo", lp, lr, adv, m, w_min=0.8, return_internals=True)
    w = valid_rows(res.internals["w"], m)
    assert w[1] == [1.0]  # T = 1 -> w = 1
    torch.testing.assert_close(t64(w[0]), torch.linspace(1.0, 0.8, 7, dtype=F64))
    torch.testing.assert_close(t64(w[2]), torch.linspace(1.0, 0.8, 4, dtype=F64))
    res = run("cppo", lp, lr, adv, m, w_min=0.8, weight_length="horizon", horizon=5, return_internals=True)
    w = valid_rows(res.internals["w"], m)
    torch.testing.assert_close(t64(w[0]), t64([1.0, 0.95, 0.9, 0.85, 0.8, 0.8, 0.8]))
    assert w[1] == [1.0]
    with pytest.raises(ValueError, match="horizon"):
        run("cppo", lp, lr, adv, m, weight_length="horizon")


def test_no_weight_ablation_uses_unit_weights_and_no_budget_has_only_token_reasons():
    lp, lr, adv, n = random_batch(6, 30, seed=5, drift=0.3)
    lp, m = pad(lp, n, 30)
    lr, _ = pad(lr, n, 30)
    r = run("cppo_no_weight", lp, lr, adv, m, return_internals=True)
    assert torch.equal(r.internals["w"], m.to(F64))
    r = run("cppo_no_budget", lp, lr, adv, m)
    assert set(r.reason[r.masked].tolist()) <= {1}
    assert r.masked.any()


def test_soft_gate_values():
    lp, lr, adv, n = random_batch(5, 20, seed=6, drift=0.3)
    lp, m = pad(lp, n, 20)
    lr, _ = pad(lr, n, 20)
    r = run("cppo_soft", lp, lr, adv, m, return_internals=True)
    assert torch.equal(r.keep, m) and not r.masked.any()
    g = r.weight[m]
    assert bool(((g > 0) & (g <= 1)).all())
    away = r.internals["away"]
    assert bool((r.weight[m & ~away] == 1).all())
    assert bool((r.weight[away] < 1).any())
    assert r.metrics["mask/cppo_soft/gated_frac"] > 0


def test_cispo_requires_eps_high_and_reports_truncation():
    lp = t64([[math.log(0.9), math.log(0.5), math.log(0.1)]])
    lr = t64([[math.log(0.5), math.log(0.5), math.log(0.5)]])
    adv = t64([1.0])
    with pytest.raises(ValueError, match="eps_high is required"):
        compute_mask("cispo", logp=lp, logp_rollout=lr, advantages=adv)
    r = compute_mask("cispo", logp=lp, logp_rollout=lr, advantages=adv, eps_high=0.5)
    torch.testing.assert_close(r.weight, t64([[1.5, 1.0, 0.2]]))
    assert r.keep.all() and r.loss_form == "is_weight"
    assert r.metrics["mask/cispo/trunc_frac"] == pytest.approx(1 / 3)


def test_trm_masks_whole_sequences_direction_blind():
    # row 0: one token with a large KL but moving back toward mu (A < 0, rho > 1) -> still masked (direction-blind)
    lp = t64([[math.log(0.5), math.log(0.9)], [math.log(0.5), math.log(0.5)]])
    lr = t64([[math.log(0.5), math.log(0.5)], [math.log(0.5), math.log(0.5)]])
    adv = t64([-1.0, 1.0])
    for rule in ("trm_max", "trm_avg"):
        r = run(rule, lp, lr, adv)
        assert r.masked.tolist() == [[True, True], [False, False]], rule
        assert r.reason.tolist() == [[3, 3], [0, 0]]
        assert r.metrics[f"mask/{rule}/seq_frac"] == 0.5
    with pytest.raises(ValueError, match="divergence"):
        run("trm_max", lp, lr, adv, divergence="binary_tv")


def test_trm_threshold_equality():
    lp, lr, adv = _one_token(0.7, 0.5, 1.0)
    from cppo_diag.masks.divergence import binary_kl

    d = float(binary_kl(torch.exp(lp), torch.exp(lr)))
    assert not run("trm_max", lp, lr, adv, delta=d).masked.any()
    assert run("trm_max", lp, lr, adv, delta=math.nextafter(d, 0)).masked.all()
    assert not run("trm_avg", lp, lr, adv, delta_avg=d).masked.any()


def test_drpo_keeps_everything_and_records_delta():
    lp, lr, adv, _ = random_batch(2, 5, lengths=[5, 5])
    r = run("drpo", lp, lr, adv, delta=0.1)
    assert r.keep.all() and r.loss_form == "drpo" and r.loss_params == {"delta": 0.1}


# ---------------------------------------------------------------- adaptive delta_b ---------------------------------


def test_adaptive_delta_b_matches_quantile_clamp():
    g = torch.Generator().manual_seed(7)
    B, T = 40, 50
    d_rows = []
    for b in range(B):
        scale = [0.005, 0.03, 0.1][b % 3]
        d_rows.append((torch.rand(T, generator=g, dtype=F64) * scale * 1.3).tolist())
    q = torch.full((B, T), 0.5, dtype=F64)
    p = q + t64(d_rows)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lp, m = pad(p.log(), lengths, T + 3, "left")
    lr, _ = pad(q.log(), lengths, T + 3, "left")
    adv = torch.ones(B, dtype=F64)
    for kw in ({}, {"delta_b_quantile": 0.5}, {"delta_b_scale": 3.0}, {"delta_b_cap": 1.0}, {"delta_b_quantile": 1.0},
               {"delta_b_quantile": 0.0}, {"delta_b": 0.0}):
        r = run("cppo", lp, lr, adv, m, return_internals=True, **kw)
        P = {"delta_b_quantile": 0.9, "delta_b_scale": 1.0, "delta_b_cap": 2.0, "delta_b": 0.02, **kw}
        for b in range(B):
            vals = (torch.exp(lp[b]) - torch.exp(lr[b])).abs()[m[b]]
            expect = float(torch.quantile(vals, P["delta_b_quantile"]))
            expect = min(max(P["delta_b_scale"] * expect, P["delta_b"]), P["delta_b_cap"] * P["delta_b"])
            assert float(r.internals["delta_b"][b]) == pytest.approx(expect, rel=1e-12, abs=1e-15), (kw, b)
        db = r.internals["delta_b"]
        if kw == {}:  # the batch has rows at the minimum, at the cap, and in between
            assert bool((db == 0.02).any()) and bool((db == 0.04).any()) and bool(((db > 0.02) & (db < 0.04)).any())
        assert_matches_reference("cppo", lp, lr, adv, m, **kw)


def test_fixed_delta_b():
    lp, lr, adv, n = random_batch(3, 8, seed=8, lengths=[8, 8, 2])
    lp, m = pad(lp, n, 8)
    lr, _ = pad(lr, n, 8)
    r = run("cppo", lp, lr, adv, m, delta_b_mode="fixed", delta_b=0.015, return_internals=True)
    assert r.internals["delta_b"].tolist() == [0.015] * 3
    assert r.metrics["cppo/delta_b_mean"] == pytest.approx(0.015)


# ---------------------------------------------------------------- layouts ------------------------------------------


@pytest.mark.parametrize("rule", ALL_MASK_RULES)
def test_padding_amount_and_side_do_not_matter(rule):
    lp0, lr0, adv, n = random_batch(5, 16, seed=9, drift=0.25, lengths=[16, 9, 1, 0, 12])
    outs, metrics = [], []
    for width, side in ((16, "right"), (23, "right"), (20, "left")):
        lp, m = pad(lp0, n, width, side, fill=float("nan"))  # NaN in padding must not leak
        lr, _ = pad(lr0, n, width, side, fill=-5.0)
        r = run(rule, lp, lr, adv, m, return_internals=True)
        w = None if r.weight is None else valid_rows(r.weight, m)
        outs.append((valid_rows(r.keep, m), valid_rows(r.reason, m), w))
        metrics.append(r.metrics)
        assert not r.keep[~m].any() and not r.reason[~m].any()
    assert outs[0] == outs[1] == outs[2]
    for mt in metrics[1:]:  # equal up to summation order
        assert mt == pytest.approx(metrics[0], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("rule", ALL_MASK_RULES)
def test_packed_equals_padded(rule):
    lp0, lr0, adv, n = random_batch(5, 14, seed=10, drift=0.25, lengths=[14, 3, 0, 1, 9])
    lp, m = pad(lp0, n, 14)
    lr, _ = pad(lr0, n, 14)
    r_pad = run(rule, lp, lr, adv, m, return_internals=True)
    plp, cu = pack(lp0, n)
    plr, _ = pack(lr0, n)
    r_pk = compute_mask(rule, logp=plp, logp_rollout=plr, advantages=adv, cu_seqlens=cu, return_internals=True,
                        **NEEDS.get(rule, {}))
    assert r_pk.keep.shape == plp.shape
    assert r_pk.keep.tolist() == r_pad.keep[m].tolist()
    assert r_pk.reason.tolist() == r_pad.reason[m].tolist()
    if r_pad.weight is not None:
        assert r_pk.weight.tolist() == r_pad.weight[m].tolist()
    assert r_pk.metrics == pytest.approx(r_pad.metrics, rel=1e-12, abs=1e-15)
    for k, v in r_pad.internals.items():
        if v.shape == m.shape:
            assert r_pk.internals[k].tolist() == v[m].tolist(), k
    # per-token advantages in packed form give the same result
    adv_tok, _ = pack(adv[:, None].expand(5, 14), n)
    r2 = compute_mask(rule, logp=plp, logp_rollout=plr, advantages=adv_tok, cu_seqlens=cu, **NEEDS.get(rule, {}))
    assert torch.equal(r2.keep, r_pk.keep)


def test_packed_with_response_mask_skips_prompt_tokens():
    lp0, lr0, adv, n = random_batch(2, 6, seed=11, drift=0.3, lengths=[6, 6])
    plp, cu = pack(lp0, n)
    plr, _ = pack(lr0, n)
    rm = torch.ones(12, dtype=torch.bool)
    rm[[0, 1, 6]] = False  # "prompt" tokens
    r = compute_mask("cppo", logp=plp, logp_rollout=plr, advantages=adv, cu_seqlens=cu, response_mask=rm)
    lp, m = pad(lp0, n, 6)
    lr, _ = pad(lr0, n, 6)
    m2 = m.clone()
    m2[0, :2] = False
    m2[1, 0] = False
    r2 = run("cppo", lp, lr, adv, m2)
    assert r.keep.tolist() == r2.keep.reshape(-1).tolist()
    assert not r.keep[~rm].any()


def test_t_equals_one_and_empty_batches():
    lp, lr, adv = _one_token(0.9, 0.5, 1.0)
    for rule in ALL_MASK_RULES:
        r = run(rule, lp, lr, adv)
        assert r.keep.shape == (1, 1)
        assert_matches_reference(rule, lp, lr, adv, torch.ones(1, 1, dtype=torch.bool), **NEEDS.get(rule, {}))
    for shape, adv_shape in (((0, 5), (0,)), ((3, 0), (3,))):
        for rule in ALL_MASK_RULES:
            z = torch.zeros(shape, dtype=F64)
            r = run(rule, z, z, torch.zeros(adv_shape, dtype=F64), return_internals=True)
            assert r.keep.shape == shape and r.reason.dtype == torch.uint8
            assert r.metrics[f"mask/{rule}/frac"] == 0.0
    # packed, empty
    e = torch.zeros(0, dtype=F64)
    r = compute_mask("cppo", logp=e, logp_rollout=e, advantages=e, cu_seqlens=torch.zeros(1, dtype=torch.int64))
    assert r.keep.shape == (0,)


def test_all_masked_rows_and_zero_advantages():
    B, T = 3, 5
    lp = torch.full((B, T), math.log(0.95), dtype=F64)
    lr = torch.full((B, T), math.log(0.05), dtype=F64)
    adv = t64([1.0, 0.0, -1.0])
    for rule in ("dppo", "cppo", "cppo_no_weight", "cppo_no_budget", "grpo_clip"):
        r = run(rule, lp, lr, adv)
        assert r.masked[0].all(), rule  # every token moves far away
        assert not r.masked[1].any(), rule  # A = 0: never away
        assert not r.masked[2].any(), rule  # A < 0, rho > 1: back toward mu
        assert r.metrics[f"mask/{rule}/frac"] == pytest.approx(1 / 3)
        assert r.metrics[f"mask/{rule}/frac_pos_adv"] == 1.0
        assert r.metrics[f"mask/{rule}/frac_neg_adv"] == 0.0
    r = run("cppo", torch.zeros(B, T, dtype=F64), lr, torch.zeros(B, dtype=F64))
    assert not r.masked.any() and r.metrics["mask/cppo/budget_share"] == 0.0


def test_float32_matches_float64_away_from_thresholds():
    lp, lr, adv, n = random_batch(8, 40, seed=12, drift=0.2)
    lp, m = pad(lp, n, 40)
    lr, _ = pad(lr, n, 40)
    for rule in ("dppo", "cppo", "grpo_clip", "trm_max"):
        r64 = run(rule, lp, lr, adv, m, return_internals=rule == "cppo")
        r32 = run(rule, lp.float(), lr.float(), adv.float(), m, return_internals=rule == "cppo")
        assert r32.keep.dtype == torch.bool
        if rule == "cppo":
            margin = (r64.internals["Z"] - r64.internals["c"]).abs()
            near = margin < 1e-5
            assert torch.equal((r32.keep ^ r64.keep) & ~near, torch.zeros_like(m))
        else:
            assert (r32.keep != r64.keep).float().mean() < 0.01
    r16 = run("cppo", lp.to(torch.bfloat16), lr.to(torch.bfloat16), adv.to(torch.bfloat16), m, return_internals=True)
    assert r16.internals["Z"].dtype == torch.float32


# ---------------------------------------------------------------- anchor -------------------------------------------


def test_anchor_old_uses_logp_old():
    lp, lr, adv, n = random_batch(3, 10, seed=13, drift=0.3, lengths=[10, 10, 10])
    old = lr + 0.1
    r_old = compute_mask("cppo", logp=lp, logp_rollout=lr, advantages=adv, logp_old=old, anchor="old")
    r_ref = compute_mask("cppo", logp=lp, logp_rollout=old, advantages=adv)
    assert torch.equal(r_old.keep, r_ref.keep) and r_old.anchor == "old" and r_old.params["anchor"] == "old"
    with pytest.raises(InputError, match="logp_old"):
        compute_mask("cppo", logp=lp, logp_rollout=lr, advantages=adv, anchor="old")
    with pytest.raises(InputError, match="anchor"):
        compute_mask("cppo", logp=lp, logp_rollout=lr, advantages=adv, anchor="mu")


# ---------------------------------------------------------------- validation ---------------------------------------


@pytest.mark.parametrize("name", ["logp", "logp_rollout", "advantages"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_name_tensor_and_position(name, bad):
    lp, lr, adv, n = random_batch(3, 6, seed=14, lengths=[6, 4, 6])
    lp, m = pad(lp, n, 6)
    lr, _ = pad(lr, n, 6)
    adv_tok = adv[:, None].expand(3, 6).clone()
    tensors = {"logp": lp, "logp_rollout": lr, "advantages": adv_tok}
    tensors[name] = tensors[name].clone()
    tensors[name][1, 2] = bad
    tensors[name][2, 5] = bad
    with pytest.raises(InputError, match=rf"{name} has 2 non-finite.*row 1, pos 2"):
        compute_mask("cppo", logp=tensors["logp"], logp_rollout=tensors["logp_rollout"],
                     advantages=tensors["advantages"], response_mask=m)
    # the same value in padding is fine
    tensors = {"logp": lp.clone(), "logp_rollout": lr.clone(), "advantages": adv_tok.clone()}
    tensors[name][1, 5] = bad
    compute_mask("cppo", logp=tensors["logp"], logp_rollout=tensors["logp_rollout"], advantages=tensors["advantages"],
                 response_mask=m)


def test_non_finite_packed_and_per_sequence_advantage():
    lp0, lr0, adv, n = random_batch(3, 5, seed=15, lengths=[5, 2, 4])
    plp, cu = pack(lp0, n)
    plp[6] = float("nan")  # row 1, pos 1
    plr, _ = pack(lr0, n)
    with pytest.raises(InputError, match=r"logp has 1 non-finite.*row 1, pos 1; packed index 6"):
        compute_mask("dppo", logp=plp, logp_rollout=plr, advantages=adv, cu_seqlens=cu)
    adv2 = adv.clone()
    adv2[2] = float("nan")
    with pytest.raises(InputError, match=r"advantages.*row 2"):
        compute_mask("dppo", logp=lp0, logp_rollout=lr0, advantages=adv2)


def test_shape_mismatches_name_tensors_and_shapes():
    lp, lr, adv, _ = random_batch(3, 6, lengths=[6, 6, 6])
    with pytest.raises(InputError, match=r"logp_rollout: expected shape \(3, 6\).*found \(3, 5\)"):
        compute_mask("cppo", logp=lp, logp_rollout=lr[:, :5], advantages=adv)
    with pytest.raises(InputError, match=r"advantages: expected shape \(3,\).*found \(4,\)"):
        compute_mask("cppo", logp=lp, logp_rollout=lr, advantages=torch.zeros(4, dtype=F64))
    with pytest.raises(InputError, match=r"response_mask: expected shape \(3, 6\).*found \(3, 7\)"):
        compute_mask("cppo", logp=lp, logp_rollout=lr, advantages=adv, response_mask=torch.ones(3, 7, dtype=torch.bool))
    with pytest.raises(InputError, match=r"logp_old: expected shape"):
        compute_mask("cppo", logp=lp, logp_rollout=lr, advantages=adv, logp_old=lr[:2])
    with pytest.raises(InputError, match=r"logp: expected shape \(B, T\)"):
        compute_mask("cppo", logp=lp[0], logp_rollout=lr[0], advantages=adv)
    with pytest.raises(InputError, match="cu_seqlens"):
        compute_mask("cppo", logp=lp.reshape(-1), logp_rollout=lr.reshape(-1), advantages=adv,
                     cu_seqlens=torch.tensor([0, 6, 12, 17]))
    with pytest.raises(InputError, match="logp: expected a floating-point"):
        compute_mask("cppo", logp=torch.zeros(3, 6, dtype=torch.int64), logp_rollout=lr, advantages=adv)


def test_bad_parameter_values_are_named():
    lp, lr, adv, _ = random_batch(2, 4, lengths=[4, 4])
    for kw, field in (({"delta_b_mode": "auto"}, "delta_b_mode"), ({"w_min": 1.5}, "w_min"),
                      ({"divergence": "js"}, "divergence"), ({"delta_b_cap": 0.5}, "delta_b_cap"),
                      ({"delta": -1.0}, "delta"), ({"weight_length": "padded"}, "weight_length")):
        with pytest.raises(ValueError, match=field):
            run("cppo", lp, lr, adv, **kw)


def test_inputs_are_not_modified_and_no_grad_flows():
    lp, lr, adv, _ = random_batch(2, 6, lengths=[6, 6])
    lp = lp.clone().requires_grad_()
    before = (lp.detach().clone(), lr.clone(), adv.clone())
    r = compute_mask("cppo_soft", logp=lp, logp_rollout=lr, advantages=adv, return_internals=True)
    assert not r.weight.requires_grad and not r.internals["Z"].requires_grad
    assert torch.equal(before[0], lp.detach()) and torch.equal(before[1], lr) and torch.equal(before[2], adv)


def test_metrics_are_lazy_floats_and_namespaced():
    lp, lr, adv, n = random_batch(4, 10, seed=16, drift=0.3)
    lp, m = pad(lp, n, 10)
    lr, _ = pad(lr, n, 10)
    r = run("cppo", lp, lr, adv, m)
    assert r._metrics is None
    mt = r.metrics
    assert all(isinstance(v, float) for v in mt.values())
    for k in ("mask/cppo/frac", "mask/cppo/budget_share", "mask/cppo/frac_pos_adv", "mask/cppo/frac_neg_adv",
              "mask/cppo/away_frac", "cppo/delta_b_mean", "div/tv/p90"):
        assert k in mt
    assert mt["mask/cppo/frac"] == pytest.approx(r.masked.sum().item() / m.sum().item())


# ---------------------------------------------------------------- shuffled ----------------------------------------


def test_shuffle_permutation_properties():
    perm = shuffle_permutation(0, 3, 50)
    assert sorted(perm) == list(range(50)) and perm != list(range(50))
    assert shuffle_permutation(0, 3, 50) == perm
    assert shuffle_permutation(1, 3, 50) != perm and shuffle_permutation(0, 4, 50) != perm
    assert shuffle_permutation(0, 0, 1) == [0] and shuffle_permutation(0, 0, 0) == []


def test_shuffled_weights_are_a_permutation_of_the_row_weights():
    lp, lr, adv, n = random_batch(4, 12, seed=17, lengths=[12, 7, 1, 0])
    lp, m = pad(lp, n, 15, "left")
    lr, _ = pad(lr, n, 15, "left")
    base = run("cppo_no_budget", lp, lr, adv, m, return_internals=True).internals["w"]
    for seed in (0, 5):
        w = run("cppo_shuffled", lp, lr, adv, m, seed=seed, return_internals=True).internals["w"]
        for b in range(4):
            assert sorted(w[b][m[b]].tolist()) == sorted(base[b][m[b]].tolist())
            perm = shuffle_permutation(seed, b, int(n[b]))
            assert w[b][m[b]].tolist() == [base[b][m[b]][i].item() for i in perm]


def test_shuffled_permutation_is_keyed_on_seq_id_and_step_not_the_row():
    """Issue 11 item 2: the permutation follows the response (its seq_id), whatever row it sits in, and a new
    step draws a new permutation; the vectorised rule equals the plain loop with the same keys."""
    from reference_loop import reference

    lp, lr, adv, n = random_batch(4, 30, seed=19, drift=0.3, lengths=[30, 25, 28, 20])
    lp, m = pad(lp, n, 30)
    lr, _ = pad(lr, n, 30)
    ids = torch.tensor([40, 7, 13, 2])
    kw = dict(delta=0.02, seed=3, return_internals=True)
    a = run("cppo_shuffled", lp, lr, adv, m, seq_ids=ids, step=5, **kw)
    flip = torch.tensor([3, 2, 1, 0])
    b = run("cppo_shuffled", lp[flip], lr[flip], adv[flip], m[flip], seq_ids=ids[flip], step=5, **kw)
    assert torch.equal(a.internals["w"][flip], b.internals["w"]) and torch.equal(a.keep[flip], b.keep)
    c = run("cppo_shuffled", lp, lr, adv, m, seq_ids=ids, step=6, **kw)
    assert not torch.equal(a.internals["w"], c.internals["w"])  # the step is mixed into the seed
    for step in (None, 5):
        res = run("cppo_shuffled", lp, lr, adv, m, seq_ids=ids, step=step, **kw)
        ref = reference("cppo_shuffled", lp, lr, adv, m, seq_ids=ids.tolist(), step=step, delta=0.02, seed=3)
        assert res.keep.tolist() == ref["keep"] and res.reason.tolist() == ref["reason"]
    from cppo_diag.masks import shuffle

    rank = torch.cumsum(m, -1) - 1
    assert torch.equal(shuffle.permuted_ranks(rank, n, m, seed=3, seq_ids=ids, step=5),  # numpy fast path
                       shuffle._permuted_ranks_rowsort(rank, n, m, seed=3, seq_ids=ids, step=5))
    # no ids, no step: the row index and no step (the key of callers that give neither)
    assert torch.equal(run("cppo_shuffled", lp, lr, adv, m, **kw).internals["w"],
                       run("cppo_shuffled", lp, lr, adv, m, seq_ids=torch.arange(4), **kw).internals["w"])
    with pytest.raises(ValueError, match=r"seq_ids: expected an integer tensor of shape \(4,\)"):
        run("cppo_shuffled", lp, lr, adv, m, seq_ids=torch.arange(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    lp, lr, adv, n = random_batch(8, 64, seed=18, drift=0.2)
    lp, m = pad(lp, n, 64)
    lr, _ = pad(lr, n, 64)
    for rule in ALL_MASK_RULES:
        a = run(rule, lp, lr, adv, m)
        b = run(rule, lp.cuda(), lr.cuda(), adv.cuda(), m.cuda())
        assert torch.equal(a.keep, b.keep.cpu()), rule
        assert a.metrics.keys() == b.metrics.keys()


def test_reference_rejects_unknown_rule():
    with pytest.raises(KeyError):
        reference("nope", torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1))


def test_masked_row_quantile_equals_torch_quantile():
    from cppo_diag.masks.quantile import masked_row_quantile

    g = torch.Generator().manual_seed(19)
    d = torch.rand(6, 30, generator=g, dtype=F64)
    m = torch.rand(6, 30, generator=g) < 0.6
    m[0] = False
    for q in (0.0, 0.37, 0.9, 1.0):
        out = masked_row_quantile(d, m, q)
        for b in range(6):
            expect = float(torch.quantile(d[b][m[b]], q)) if m[b].any() else 0.0
            assert float(out[b]) == pytest.approx(expect, rel=1e-12, abs=1e-15)


def test_advantages_shapes_are_equivalent():
    lp, lr, adv, n = random_batch(3, 7, seed=20, drift=0.3, lengths=[7, 5, 2])
    lp, m = pad(lp, n, 7)
    lr, _ = pad(lr, n, 7)
    a = run("cppo", lp, lr, adv, m)
    for form in (adv[:, None], adv[:, None].expand(3, 7).clone()):
        assert torch.equal(run("cppo", lp, lr, form, m).keep, a.keep)


def test_none_parameter_means_default():
    lp, lr, adv, n = random_batch(3, 9, seed=21, drift=0.3, lengths=[9, 9, 4])
    a = run("cppo", lp, lr, adv)
    b = run("cppo", lp, lr, adv, delta=None, w_min=None, delta_b=None, delta_b_mode=None, horizon=None)
    assert torch.equal(a.keep, b.keep) and b.params["delta"] == 0.15 and b.params["delta_b_mode"] == "adaptive"
