"""Each registered rule's declared ``RuleFacts`` (masks/registry.py) against what ``compute_mask`` does on random
inputs: can it mask, does it have a prefix budget, how its threshold depends on the position, its loss form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cppo_diag.masks import compute_mask, list_rules, rules_with
from cppo_diag.masks.reasons import Reason

RULES = [s.name for s in list_rules()]
REQUIRED = {"cispo": {"eps_high": 2.0}}  # parameters without a usable default


def _random_batch(seed: int, B: int = 8, T: int = 32):
    g = torch.Generator().manual_seed(seed)
    mu = torch.log(torch.rand(B, T, generator=g).clamp(0.02, 0.98))  # (B, T)
    logp = (mu + 1.5 * torch.randn(B, T, generator=g)).clamp(max=0.0)  # (B, T): far from mu, a valid log-prob
    adv = torch.randn(B, generator=g)  # (B,)
    lens = torch.randint(4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lens[:, None]  # (B, T)
    return dict(logp=logp, logp_rollout=mu, advantages=adv, response_mask=mask, seq_ids=torch.arange(B), step=3)


def _effective(res) -> torch.Tensor:
    """keep times the loss weight (1 where the rule gives none): how much each token counts."""
    w = res.weight if res.weight is not None else torch.ones_like(res.keep, dtype=torch.float32)
    return res.keep.float() * w.float()


@pytest.mark.parametrize("rule", RULES)
def test_declared_facts_match_compute_mask(rule):
    from cppo_diag.masks import get_rule

    spec = get_rule(rule)
    facts = spec.facts

    # loss form and can_mask, over random batches
    masked_any = False
    for seed in range(12):
        res = compute_mask(rule, **_random_batch(seed), **REQUIRED.get(rule, {}))
        assert res.loss_form == facts.loss_form, f"{rule}: declared loss_form {facts.loss_form}, got {res.loss_form}"
        masked_any |= bool(res.masked.any())
        if not facts.can_mask:
            assert torch.equal(res.keep, res.valid), f"{rule}: declared can_mask=False but masked a token"
    assert masked_any == facts.can_mask, f"{rule}: declared can_mask={facts.can_mask}, masked a token: {masked_any}"

    # prefix budget: a tiny fixed budget changes the result against an unbounded one; without one, no parameter
    if facts.prefix_budget:
        changed, budget_reason = False, False
        for seed in range(12):
            b = _random_batch(seed)
            tight = compute_mask(rule, **b, delta_b=1e-4, delta_b_mode="fixed")
            loose = compute_mask(rule, **b, delta_b=1e6, delta_b_mode="fixed")
            changed |= not torch.equal(_effective(tight), _effective(loose))
            budget_reason |= bool((tight.reason == int(Reason.BUDGET)).any())
        assert changed, f"{rule}: declared prefix_budget=True but delta_b changes nothing"
        assert budget_reason == facts.can_mask  # a masking budget rule says "budget"; a gate masks nothing
    else:
        assert "delta_b" not in spec.params

    # threshold schedule: rows of constant divergence (same mu, same log-ratio c at every position), all "away"
    T = 40
    cs = torch.linspace(0.02, 2.5, 48)
    mu = torch.full((cs.numel(), T), math.log(0.3))
    logp = (mu + cs[:, None]).clamp(max=-1e-4)
    no_budget = {"delta_b": 1e6, "delta_b_mode": "fixed"} if facts.prefix_budget else {}
    res = compute_mask(rule, logp=logp, logp_rollout=mu, advantages=torch.ones(cs.numel()),
                       seq_ids=torch.arange(cs.numel()), step=1, **no_budget, **REQUIRED.get(rule, {}))
    e = _effective(res).numpy()  # (rows, T)
    row_const = np.all(np.isclose(e, e[:, :1]), axis=1)
    diffs = np.diff(e, axis=1)
    if facts.threshold == "none":
        assert np.allclose(e, 1.0), f"{rule}: declared no threshold but down-weights tokens"
    elif facts.threshold == "constant":
        assert row_const.all(), f"{rule}: declared a constant threshold but it depends on the position"
        assert not np.allclose(e, 1.0), f"{rule}: declared a threshold that never binds"
    elif facts.threshold == "position":
        assert not row_const.all(), f"{rule}: declared a position schedule but no row depends on the position"
        assert (diffs >= -1e-6).all(), f"{rule}: declared delta / w_t (looser later) but a later token counts less"
    elif facts.threshold == "shuffled":
        assert not row_const.all(), f"{rule}: declared shuffled weights but no row depends on the position"
        assert (diffs < -1e-6).any(), f"{rule}: declared shuffled weights but every row is monotone"


def test_rules_with_is_the_one_query():
    assert set(rules_with(can_mask=False)) == {"pg_is", "cispo", "drpo", "cppo_soft"}
    assert set(rules_with(prefix_budget=True)) == {"cppo", "cppo_no_weight", "cppo_soft"}
    assert set(rules_with(prefix_budget=True, can_mask=True)) == {"cppo", "cppo_no_weight"}
    assert rules_with(loss_form="drpo") == ["drpo"]
    with pytest.raises(TypeError, match="unknown fact"):
        rules_with(masks=True)
    from cppo_diag.masks import RuleFacts

    with pytest.raises(ValueError, match="threshold"):
        RuleFacts(threshold="linear")
