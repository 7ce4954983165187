"""The verl plug-in's live metrics, sinks and rollout-correction settings, in the main environment.

verl itself lives in an isolated venv (tests/integrations/test_integration_verl.py runs the real package there). Here verl's
policy-loss registry is a stub module with verl's two names the plug-in uses (``POLICY_LOSS_REGISTRY``,
``register_policy_loss``); everything else is the plug-in's own code: the loss it registers, its metrics dict
(what verl's tracker receives), its recorder with sinks, its step clock and meta.json.
"""

from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import dataclass

import polars as pl
import pytest
import torch

from cppo_diag import metric_names as M
from cppo_diag import open_run
from cppo_diag.capture.position_live import PositionTokens, position_scalars, position_tokens
from cppo_diag.integrations.names import (VERL_ROLLOUT_CORR, ours_to_rollout_corr, rollout_corr_to_ours,
                                          verl_rollout_corr_scalars)

ENV = ("CPPO_DIAG_RULE_PARAMS", "CPPO_DIAG_RUN_DIR", "CPPO_DIAG_RUN_NAME", "CPPO_DIAG_CALLS_PER_STEP",
       "CPPO_DIAG_STEP_GAP_S", "CPPO_DIAG_SINKS", "CPPO_DIAG_POSITION_FIGURE_EVERY")


@pytest.fixture
def cv(monkeypatch):
    """``cppo_diag.integrations.verl`` imported against a stub of verl's policy-loss registry."""
    core = types.ModuleType("verl.trainer.ppo.core_algos")
    core.POLICY_LOSS_REGISTRY = {}

    def register_policy_loss(name):
        def deco(fn):
            core.POLICY_LOSS_REGISTRY[name] = fn
            return fn
        return deco

    core.register_policy_loss = register_policy_loss
    ppo = types.ModuleType("verl.trainer.ppo")
    ppo.core_algos = core
    for name, mod in {"verl": types.ModuleType("verl"), "verl.trainer": types.ModuleType("verl.trainer"),
                      "verl.trainer.ppo": ppo, "verl.trainer.ppo.core_algos": core}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    for k in ENV:
        monkeypatch.delenv(k, raising=False)
    sys.modules.pop("cppo_diag.integrations.verl", None)
    import cppo_diag.integrations.verl as module

    yield module
    module.close()
    sys.modules.pop("cppo_diag.integrations.verl", None)


@dataclass
class RolloutCorrection:  # the fields of verl's RolloutCorrectionConfig the test sets
    rollout_is: str | None = "token"
    rollout_is_threshold: float = 2.0
    rollout_rs: str | None = None
    bypass_mode: bool = False
    loss_type: str = "ppo_clip"


@dataclass
class PolicyLoss:
    loss_mode: str = "cppo"
    rollout_correction: RolloutCorrection | None = None


@dataclass
class ActorConfig:
    policy_loss: PolicyLoss
    clip_ratio: float = 0.2


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 16
    mu = -torch.rand(B, T, generator=g) * 2  # (B, T)
    logp = (mu + 0.5 * torch.randn(B, T, generator=g)).clamp(max=-1e-4)  # (B, T)
    adv = torch.randn(B, generator=g)[:, None].expand(B, T).contiguous()  # verl passes token-level advantages
    mask = torch.arange(T)[None, :] < torch.tensor([16, 11, 5, 16, 2, 9])[:, None]  # (B, T)
    return mu, logp, adv, mask


def test_pos_scalars_reach_verls_tracker_through_the_metrics_dict(cv):
    fn = sys.modules["verl.trainer.ppo.core_algos"].POLICY_LOSS_REGISTRY["cppo"]
    mu, logp, adv, mask = _batch(0)
    cv.configure(rule_params={"delta": 0.05})
    _, metrics = fn(mu, logp.requires_grad_(), adv, mask, loss_agg_mode="token-mean",
                    config=ActorConfig(PolicyLoss()))
    from cppo_diag.masks import compute_mask

    keep = compute_mask("cppo", logp=logp.detach(), logp_rollout=mu, advantages=adv, response_mask=mask, delta=0.05).keep
    expected = position_scalars(position_tokens(logp, mu, mask, keep))
    assert {k for k in expected if math.isfinite(expected[k])} <= set(metrics)
    for k, v in expected.items():
        if math.isfinite(v):
            assert metrics[k] == pytest.approx(v), k
    assert metrics[M.POS_MASKED_FRAC[2]] > 0  # the rule bites here


def test_capture_with_sinks_meta_rollout_correction_and_pooled_pos(cv, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fn = sys.modules["verl.trainer.ppo.core_algos"].POLICY_LOSS_REGISTRY["cppo"]
    cv.configure(rule_params={"delta": 0.05}, run_dir=str(tmp_path), name="v", sinks=["tensorboard"],
                 position_figure_every=1)
    cfg = ActorConfig(PolicyLoss(rollout_correction=RolloutCorrection()))
    for step in range(2):
        cv.set_step(step)
        for update in range(2):
            mu, logp, adv, mask = _batch(10 * step + update)
            fn(mu, logp.requires_grad_(), adv, mask, loss_agg_mode="token-mean", config=cfg,
                            rollout_is_weights=torch.ones_like(mu))
    cv.close()
    run = open_run(tmp_path / "v")
    corr = run.meta["config"]["rollout_correction"]
    assert corr == {"rollout_is": "token", "rollout_is_threshold": 2.0, "rollout_rs": None, "bypass_mode": False,
                    "loss_type": "ppo_clip"}
    steps = run.steps().sort("step")
    tok = run.tokens().collect()
    for step in range(2):  # recorded pos/* are pooled over the step's calls: the same as from the recorded tokens
        sub = (tok.filter(pl.col("step") == step).sort(["update", "seq_id", "pos"])
               .with_columns(T=pl.len().over(["update", "seq_id"])))
        col = lambda c, dt: torch.tensor(sub[c].to_numpy().astype(dt))  # noqa: E731
        pooled = position_scalars(PositionTokens(col("pos", "int64"), col("T", "int64"), col("logp", "float64"),
                                                 col("logp_rollout", "float64"), ~col("keep_applied", "bool")))
        row = steps.filter(pl.col("step") == step).row(0, named=True)
        for k in (*M.POS_TV_TOP10, *M.POS_MASKED_FRAC):
            assert row[k] == pytest.approx(pooled[k], rel=1e-5), (step, k)
    ea = EventAccumulator(str(tmp_path / "v" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    assert set(M.POS_TV_TOP10) <= set(ea.Tags()["scalars"])
    assert [e.step for e in ea.Images(M.POS_FIGURE)] == [0, 1]


def test_bad_sink_settings_are_refused_before_training(cv, monkeypatch):
    with pytest.raises(ValueError, match=r"found 'mlflow'"):
        cv.configure(sinks=["mlflow"])
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"configure\(sinks=\.\.\.\): sink 'wandb' needs the wandb package; "
                                          r"install it with: pip install 'cppo-diag\[wandb\]'"):
        cv.configure(sinks=["wandb"])
    monkeypatch.setenv(cv.ENV_SINKS, "wandb")
    with pytest.raises(ImportError, match=r"CPPO_DIAG_SINKS: sink 'wandb' needs"):
        cv.register()  # what a worker runs when it imports the plug-in
    monkeypatch.setenv(cv.ENV_SINKS, "")
    monkeypatch.setenv(cv.ENV_POSITION_FIGURE_EVERY, "often")
    with pytest.raises(ValueError, match="CPPO_DIAG_POSITION_FIGURE_EVERY: expected an integer >= 0, found 'often'"):
        cv.register()


def test_rollout_corr_names_map_both_ways_onto_cppo_diags_divergences():
    from cppo_diag.analyses.tokens import divergence_exprs

    mu, logp, _, mask = _batch(3)
    verl = verl_rollout_corr_scalars(logp, mu, mask)
    frame = pl.DataFrame({"logp": logp[mask].double().numpy(), "logp_rollout": mu[mask].double().numpy()})
    ours = {M.div_name(d, "mean"): float(frame.select(divergence_exprs()[d].mean()).item()) for d in ("k1", "k3")}
    mapped = rollout_corr_to_ours(verl)
    assert set(mapped) == set(ours)
    for k, v in ours.items():
        assert mapped[k] == pytest.approx(v, rel=1e-5), k
    back = ours_to_rollout_corr(ours)
    assert set(back) == set(VERL_ROLLOUT_CORR)
    for k, v in back.items():
        assert v == pytest.approx(verl[k], rel=1e-5), k
    assert json.dumps(VERL_ROLLOUT_CORR)  # plain data: docs list it
