"""policy_loss: per-token forms, aggregation modes, gradients, weights and the loop equivalent."""

from __future__ import annotations

import pytest
import torch

from reference_loop import pack, pad, random_batch
from cppo_diag.loss import (AGG_MODES, AGGREGATIONS, LOSS_FORMS, agg_loss, get_aggregation, get_loss_form,
                            policy_loss)
from cppo_diag.masks import compute_mask

F64 = torch.float64


def batch(seed=0):
    lp0, lr0, adv, n = random_batch(4, 9, seed=seed, drift=0.3, lengths=[9, 4, 0, 6])
    lp, m = pad(lp0, n, 9, "left")
    lr, _ = pad(lr0, n, 9, "left")
    return lp, lr, adv, m, (lp0, lr0, n)


def loop_loss(lp, lr, adv, m, keep, weight, agg, max_len=None, trunc=None):
    """Plain loops of SPEC "Loss" (values only)."""
    B, T = lp.shape
    per_seq, tot, cnt, longest = [], 0.0, 0, 0
    for b in range(B):
        s, c = 0.0, 0
        for t in range(T):
            if not m[b, t]:
                continue
            rho = float(torch.exp((lp[b, t] - lr[b, t]).clamp(-20, 20)))
            a = float(adv[b])
            if trunc is None:
                term = -a * rho
            else:
                term = -a * min(rho, trunc) * float(lp[b, t])
            term *= float(keep[b, t]) * (1.0 if weight is None else float(weight[b, t]))
            s += term
            c += 1
        tot += s
        cnt += c
        longest = max(longest, c)
        if c:
            per_seq.append(s / c)
    if agg == "token-mean":
        return tot / max(cnt, 1)
    if agg == "token-sum":
        return tot
    if agg == "seq-mean-token-sum":
        return tot / max(len(per_seq), 1)
    if agg == "seq-mean-token-mean":
        return sum(per_seq) / len(per_seq) if per_seq else 0.0
    H = max_len if max_len is not None else longest
    return tot / (B * max(H, 1))


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("rule", ["cppo", "pg_is", "cppo_soft", "grpo_clip"])
def test_loss_values_equal_loop(agg, rule):
    lp, lr, adv, m, _ = batch(1)
    res = compute_mask(rule, logp=lp, logp_rollout=lr, advantages=adv, response_mask=m)
    for trunc in (None, 1.5):
        loss, metrics = policy_loss(lp, lr, adv, m, res, agg=agg, trunc_cap=trunc)
        expect = loop_loss(lp, lr, adv, m, res.keep, res.weight, agg, trunc=trunc)
        assert float(loss) == pytest.approx(expect, rel=1e-12, abs=1e-14)
        assert metrics["loss/policy"] == pytest.approx(expect, rel=1e-12, abs=1e-14)
    loss, _ = policy_loss(lp, lr, adv, m, res, agg="seq-mean-token-sum-norm", max_len=20)
    assert float(loss) == pytest.approx(loop_loss(lp, lr, adv, m, res.keep, res.weight, "x", max_len=20), rel=1e-12)


def test_masked_tokens_stay_in_the_denominator_and_get_no_gradient():
    lp, lr, adv, m, _ = batch(2)
    lp = lp.clone().requires_grad_()
    res = compute_mask("cppo", logp=lp, logp_rollout=lr, advantages=adv, response_mask=m, delta=0.05)
    assert res.masked.any()
    loss, metrics = policy_loss(lp, lr, adv, m, res)
    loss.backward()
    g = lp.grad
    assert bool((g[res.masked] == 0).all()) and bool((g[~m] == 0).all())
    # gradient of -A rho / N at kept tokens: -A rho / N
    rho = torch.exp(lp.detach() - lr)
    expect = -adv[:, None] * rho / m.sum()
    torch.testing.assert_close(g[res.keep], expect.expand_as(g)[res.keep])
    assert metrics["loss/kept_frac"] == pytest.approx(res.keep.sum().item() / m.sum().item())


def test_truncated_is_form_has_the_same_gradient_below_the_cap():
    lp, lr, adv, m, _ = batch(3)
    res = compute_mask("dppo", logp=lp, logp_rollout=lr, advantages=adv, response_mask=m)
    g = []
    for cap in (None, 1e9):
        x = lp.clone().requires_grad_()
        loss, _ = policy_loss(x, lr, adv, m, res, trunc_cap=cap)
        loss.backward()
        g.append(x.grad)
    torch.testing.assert_close(g[0], g[1])
    x = lp.clone().requires_grad_()
    _, metrics = policy_loss(x, lr, adv, m, res, trunc_cap=1.0)
    assert 0 < metrics["loss/trunc_frac"] < 1


def test_cispo_uses_the_is_weight_and_logp():
    lp, lr, adv, m, _ = batch(4)
    res = compute_mask("cispo", logp=lp, logp_rollout=lr, advantages=adv, response_mask=m, eps_high=0.2)
    x = lp.clone().requires_grad_()
    loss, metrics = policy_loss(x, lr, adv, m, res)
    loss.backward()
    w = torch.exp(lp - lr).clamp(max=1.2)
    expect = torch.where(m, -adv[:, None] * w / m.sum(), 0.0)
    torch.testing.assert_close(x.grad, expect)
    assert "loss/weight_mean" in metrics


def test_drpo_penalty():
    lp, lr, adv, m, _ = batch(5)
    res = compute_mask("drpo", logp=lp, logp_rollout=lr, advantages=adv, response_mask=m, delta=0.2)
    loss, _ = policy_loss(lp, lr, adv, m, res)
    rho, mu, a = torch.exp(lp - lr), torch.exp(lr), adv[:, None]
    obj = rho * a - a.abs() / 0.4 * mu * (rho - 1) ** 2
    assert float(loss) == pytest.approx(float(-(obj[m]).sum() / m.sum()), rel=1e-12)


def test_packed_loss_equals_padded():
    lp, lr, adv, m, (lp0, lr0, n) = batch(6)
    res = compute_mask("cppo", logp=lp, logp_rollout=lr, advantages=adv, response_mask=m)
    plp, cu = pack(lp0, n)
    plr, _ = pack(lr0, n)
    pres = compute_mask("cppo", logp=plp, logp_rollout=plr, advantages=adv, cu_seqlens=cu)
    for agg in AGG_MODES:
        a, _ = policy_loss(lp, lr, adv, m, res, agg=agg)
        b, _ = policy_loss(plp, plr, adv, None, pres, agg=agg, cu_seqlens=cu)
        assert float(a) == pytest.approx(float(b), rel=1e-12), agg


def test_rule_name_computes_the_mask_and_errors():
    lp, lr, adv, m, _ = batch(7)
    res = compute_mask("cppo", logp=lp, logp_rollout=lr, advantages=adv, response_mask=m)
    a, _ = policy_loss(lp, lr, adv, m, res)
    b, _ = policy_loss(lp, lr, adv, m, rule="cppo")
    assert float(a) == float(b)
    with pytest.raises(ValueError, match="agg"):
        policy_loss(lp, lr, adv, m, res, agg="mean")
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(lp, lr, torch.zeros(5, dtype=F64), m, res)
    with pytest.raises(ValueError, match="response_mask"):
        policy_loss(lp, lr, adv, m[:, :3], res)


def test_empty_and_all_masked_batches_are_finite():
    z = torch.zeros(0, 4, dtype=F64, requires_grad=True)
    loss, metrics = policy_loss(z, z.detach(), torch.zeros(0, dtype=F64), None)
    assert float(loss.detach()) == 0.0 and all(v == v for v in metrics.values())
    lp, lr, adv, m, _ = batch(8)
    none = torch.zeros_like(m)
    for agg in AGG_MODES:
        loss, _ = policy_loss(lp, lr, adv, none, None, agg=agg)
        assert float(loss) == 0.0


# -- the registries: each loss form and each aggregation against its formula written out ---------------------
def _random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 5, 7
    lp = -torch.rand(B, T, generator=g, dtype=F64) * 2  # (B, T)
    lr = (lp + 0.5 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)  # (B, T)
    adv = torch.randn(B, T, generator=g, dtype=F64)  # (B, T) token-level
    w = torch.rand(B, T, generator=g, dtype=F64) * 1.5  # (B, T)
    m = torch.rand(B, T, generator=g) > 0.3  # (B, T)
    m[3] = False  # a response with no valid token
    return lp, lr, adv, w, m


def test_registries_hold_the_documented_names():
    assert set(LOSS_FORMS) == {"ratio", "is_weight", "drpo"}
    assert AGG_MODES == tuple(AGGREGATIONS) == ("token-mean", "token-sum", "seq-mean-token-sum",
                                                "seq-mean-token-mean", "seq-mean-token-sum-norm")


@pytest.mark.parametrize("seed", [0, 1])
def test_each_loss_form_equals_its_formula(seed):
    lp, lr, adv, w, _ = _random_inputs(seed)
    rho = torch.exp((lp - lr).clamp(-20, 20))
    kw = dict(adv=adv, rho=rho, logp=lp, logp_rollout=lr)
    cases = {  # (form, weight, cap, params): l_t written out (SPEC "Loss")
        ("ratio", None, None): -adv * rho,
        ("ratio", "w", None): -adv * rho * w,
        ("ratio", "w", 1.3): -adv * rho.clamp(max=1.3) * lp * w,
        ("is_weight", None, None): -adv * rho * lp,
        ("is_weight", "w", 1.1): -adv * w.clamp(max=1.1) * lp,
        ("drpo", None, None): -(rho * adv - adv.abs() / (2 * 0.2) * torch.exp(lr) * (rho - 1) ** 2),
    }
    for (form, weight, cap), expect in cases.items():
        per_tok, trunc = get_loss_form(form)(**kw, weight=w if weight else None, trunc_cap=cap,
                                             params={"delta": 0.2})
        torch.testing.assert_close(per_tok, expect, rtol=1e-14, atol=0)
        if cap is not None:
            assert torch.equal(trunc, (rho if form == "ratio" else w) > cap)


@pytest.mark.parametrize("seed", [0, 1])
def test_each_aggregation_equals_its_formula(seed):
    _, _, l, _, m = _random_inputs(seed)  # any per-token values
    lm = torch.where(m, l, 0.0)
    S, n_tok, has = lm.sum(), m.sum(), m.any(1)
    row_means = lm.sum(1)[has] / m.sum(1)[has]
    longest = m.sum(1).max()
    expect = {
        "token-mean": S / n_tok,
        "token-sum": S,
        "seq-mean-token-sum": S / has.sum(),
        "seq-mean-token-mean": row_means.mean(),
        "seq-mean-token-sum-norm": S / (m.shape[0] * longest),
    }
    for mode, value in expect.items():
        assert float(agg_loss(l, m, mode)) == pytest.approx(float(value), rel=1e-13), mode
    # global denominators (verl's global_batch_info) replace the local counts; dp_size scales
    glob = dict(dp_size=4, batch_num_tokens=100, global_batch_size=16)
    g_expect = {
        "token-mean": S / 100 * 4, "token-sum": S * 4, "seq-mean-token-sum": S / 16 * 4,
        "seq-mean-token-mean": row_means.sum() / 16 * 4, "seq-mean-token-sum-norm": S / (16 * 9) * 4,
    }
    for mode, value in g_expect.items():
        got = agg_loss(l, m, mode, max_len=9, **glob)
        assert float(got) == pytest.approx(float(value), rel=1e-13), mode


def test_unknown_form_or_mode_names_the_known_ones():
    with pytest.raises(ValueError, match=r"loss form: expected one of \['drpo', 'is_weight', 'ratio'\], found 'clip'"):
        get_loss_form("clip")
    with pytest.raises(ValueError, match=r"agg: expected one of \['token-mean', .*found 'mean'"):
        get_aggregation("mean")
    lp, lr, adv, _, m = _random_inputs(2)
    res = compute_mask("pg_is", logp=lp, logp_rollout=lr, advantages=adv, response_mask=m)
    res.loss_form = "clip"
    with pytest.raises(ValueError, match="loss form"):
        policy_loss(lp, lr, adv, m, res)
