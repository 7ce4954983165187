"""Top-K divergences (SPEC "topk_tv" / "topk_kl"): both top-K layouts, the "other" bucket, no double counting."""

from __future__ import annotations

import math

import pytest
import torch

from reference_loop import assert_matches_reference
from cppo_diag.masks import InputError, TopK, compute_mask

F64 = torch.float64


def make_topk(B=3, T=5, V=12, K=4, seed=0, vllm=False):
    """Full distributions mu, pi over V tokens; the sampled y ~ mu; mu's top-K ids and both log-probs there."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.softmax(torch.randn(B, T, V, generator=g, dtype=F64) * 2, -1)
    pi = torch.softmax(mu.log() + 0.5 * torch.randn(B, T, V, generator=g, dtype=F64), -1)
    y = torch.multinomial(mu.reshape(-1, V), 1, generator=g).reshape(B, T)
    ids = torch.topk(mu, K, -1).indices  # (B, T, K)
    if vllm:
        outside = ~(ids == y[..., None]).any(-1)
        ids = ids.clone()
        ids[..., K - 1] = torch.where(outside, y, ids[..., K - 1])
    topk = TopK(ids=ids, logp_rollout=mu.gather(-1, ids).log(), logp=pi.gather(-1, ids).log(), token_ids=y)
    logp = pi.gather(-1, y[..., None])[..., 0].log()
    logp_rollout = mu.gather(-1, y[..., None])[..., 0].log()
    return mu, pi, y, topk, logp, logp_rollout


def brute_force(mu, pi, ids, y, kind):
    """Aggregate the full distributions into the buckets set(ids) U {y} plus everything else."""
    B, T, V = mu.shape
    out = torch.zeros(B, T, dtype=F64)
    for b in range(B):
        for t in range(T):
            members = set(ids[b, t].tolist()) | {int(y[b, t])}
            rest = [v for v in range(V) if v not in members]
            buckets = [(float(pi[b, t, v]), float(mu[b, t, v])) for v in members]
            buckets.append((float(pi[b, t, rest].sum()), float(mu[b, t, rest].sum())))
            buckets = [(max(p, 1e-12), max(q, 1e-12)) for p, q in buckets]
            if kind == "tv":
                out[b, t] = 0.5 * sum(abs(p - q) for p, q in buckets)
            else:
                out[b, t] = sum(q * math.log(q / p) for p, q in buckets)
    return out


@pytest.mark.parametrize("vllm", [False, True])
@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_topk_divergence_matches_full_vocabulary_buckets(vllm, kind):
    mu, pi, y, topk, lp, lr = make_topk(seed=1 if vllm else 2, vllm=vllm)
    adv = torch.ones(3, dtype=F64)
    res = compute_mask("dppo", logp=lp, logp_rollout=lr, advantages=adv, topk=topk, divergence=f"topk_{kind}",
                       return_internals=True)
    expect = brute_force(mu, pi, topk.ids, y, kind)
    torch.testing.assert_close(res.internals["D"], expect, rtol=1e-9, atol=1e-12)
    # the sampled token is outside mu's top-K at least once, so the extra bucket is exercised
    assert bool((~(torch.topk(mu, 4, -1).indices == y[..., None]).any(-1)).any())


def test_vllm_layout_does_not_double_count_the_sampled_token():
    mu, pi, y, topk, lp, lr = make_topk(seed=3, vllm=True)
    assert bool((topk.ids == topk.token_ids[..., None]).any(-1).all())  # y always listed
    res = compute_mask("dppo", logp=lp, logp_rollout=lr, advantages=torch.ones(3, dtype=F64), topk=topk,
                       divergence="topk_tv", return_internals=True)
    d = res.internals["D"]
    assert bool((d <= 1.0 + 1e-12).all())
    torch.testing.assert_close(d, brute_force(mu, pi, topk.ids, y, "tv"), rtol=1e-9, atol=1e-12)


def test_absent_entries_and_dict_input():
    mu, pi, y, topk, lp, lr = make_topk(seed=4)
    ids = topk.ids.clone()
    ids[0, 0, 3] = -1  # a short list at one position
    as_dict = {"topk_ids": ids, "topk_logp_rollout": topk.logp_rollout, "topk_logp": topk.logp, "token_id": y}
    res = compute_mask("cppo", logp=lp, logp_rollout=lr, advantages=torch.ones(3, dtype=F64), topk=as_dict,
                       divergence="topk_tv", return_internals=True)
    expect = brute_force(mu, pi, ids.clamp(min=0).where(ids >= 0, y[..., None]), y, "tv")
    torch.testing.assert_close(res.internals["D"], expect, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rule", ["cppo", "dppo", "trm_max", "trm_avg", "cppo_soft"])
def test_topk_rules_equal_reference(rule):
    mu, pi, y, topk, lp, lr = make_topk(B=4, T=7, seed=5, vllm=rule == "dppo")
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, :2] = False
    adv = torch.tensor([1.0, -1.0, 0.5, 1.0], dtype=F64)
    div = "topk_kl" if rule.startswith("trm") else "topk_tv"
    tk = {"ids": topk.ids, "logp_rollout": topk.logp_rollout, "logp": topk.logp, "token_ids": topk.token_ids}
    assert_matches_reference(rule, lp, lr, adv, mask, topk=tk, divergence=div)


def test_topk_packed_equals_padded():
    mu, pi, y, topk, lp, lr = make_topk(B=2, T=5, seed=6)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    a = compute_mask("cppo", logp=lp, logp_rollout=lr, advantages=adv, topk=topk, divergence="topk_tv")
    cu = torch.tensor([0, 5, 10])
    packed = TopK(topk.ids.reshape(10, -1), topk.logp_rollout.reshape(10, -1), topk.logp.reshape(10, -1),
                  topk.token_ids.reshape(10))
    b = compute_mask("cppo", logp=lp.reshape(10), logp_rollout=lr.reshape(10), advantages=adv, topk=packed,
                     cu_seqlens=cu, divergence="topk_tv")
    assert b.keep.tolist() == a.keep.reshape(10).tolist()


def test_topk_errors():
    mu, pi, y, topk, lp, lr = make_topk(seed=7)
    adv = torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match="needs topk"):
        compute_mask("dppo", logp=lp, logp_rollout=lr, advantages=adv, divergence="topk_tv")
    with pytest.raises(InputError, match=r"topk.ids: expected shape"):
        compute_mask("dppo", logp=lp, logp_rollout=lr, advantages=adv, divergence="topk_tv",
                     topk=TopK(topk.ids[:, :2], topk.logp_rollout, topk.logp, y))
    with pytest.raises(InputError, match="missing key 'token_ids'"):
        compute_mask("dppo", logp=lp, logp_rollout=lr, advantages=adv, divergence="topk_tv",
                     topk={"ids": topk.ids, "logp_rollout": topk.logp_rollout, "logp": topk.logp})
    bad = topk.logp.clone()
    bad[2, 1, 0] = float("nan")
    with pytest.raises(InputError, match=r"topk.logp has 1 non-finite.*row 2, pos 1"):
        compute_mask("dppo", logp=lp, logp_rollout=lr, advantages=adv, divergence="topk_tv",
                     topk=TopK(topk.ids, topk.logp_rollout, bad, y))
    with pytest.raises(ValueError, match="anchor='old'"):
        compute_mask("dppo", logp=lp, logp_rollout=lr, advantages=adv, divergence="topk_tv", topk=topk,
                     logp_old=lr, anchor="old")
