"""The verl plug-in against the real verl package from PyPI.

verl pins transformers to a range that excludes ours, so it lives in an isolated virtual environment built by
``scripts/verl_env.sh`` (idempotent; one to three minutes from scratch). The check below runs there in a subprocess:
cppo-diag's rules resolve through verl's own ``get_policy_loss_fn``, their output equals
``compute_mask`` + ``policy_loss`` (loss and gradient), verl's global-batch normalisation is honoured, verl's
bypass mode dispatches to a rule anchored to the rollout log-probs, and the recorder writes a readable run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECK = r'''
import json, os, sys
import torch

import cppo_diag.integrations.verl as cv
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn
from verl.trainer.config.algorithm import RolloutCorrectionConfig
from verl.workers.config import ActorConfig, PolicyLossConfig
from cppo_diag import open_run
from cppo_diag.loss import policy_loss
from cppo_diag.masks import compute_mask

out = {"registered": cv.registered_names()}
out["verl_cispo_module"] = core_algos.POLICY_LOSS_REGISTRY["cispo"].__module__

torch.manual_seed(0)
B, T = 6, 12
mu = -torch.rand(B, T) * 2.0                                          # (B, T) anchor log-probs
logp = (mu + 0.4 * torch.randn(B, T)).clamp(max=-1e-4).requires_grad_()  # (B, T) current policy
adv = torch.randn(B)[:, None].expand(B, T).contiguous()               # verl passes token-level advantages
mask = torch.ones(B, T, dtype=torch.bool)
for i, n in enumerate([12, 9, 5, 12, 1, 7]):
    mask[i, n:] = False


def cfg(mode, **policy_kwargs):
    return ActorConfig(strategy="fsdp", clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                       ppo_micro_batch_size_per_gpu=1, rollout_n=1,
                       policy_loss=PolicyLossConfig(loss_mode=mode, **policy_kwargs))


os.environ[cv.ENV_RULE_PARAMS] = json.dumps({"cppo": {"delta": 0.1, "w_min": 0.8}, "dppo": {"delta": 0.1}})
expected_params = {"cppo": {"delta": 0.1, "w_min": 0.8}, "dppo": {"delta": 0.1},
                   "grpo_clip": {"eps_low": 0.2, "eps_high": 0.28}}   # grpo_clip: from verl's clip ratios
out["rules"] = {}
for name, params in expected_params.items():
    for lookup in (name, cv.PREFIX + name):
        fn = get_policy_loss_fn(lookup)                                # verl's own lookup
        loss, metrics = fn(old_log_prob=mu, log_prob=logp, advantages=adv, response_mask=mask,
                           loss_agg_mode="token-mean", config=cfg(lookup), rollout_is_weights=None)
        res = compute_mask(name, logp=logp.detach(), logp_rollout=mu, advantages=adv, response_mask=mask, **params)
        ref, _ = policy_loss(logp, mu, adv, mask, res, agg="token-mean", rule=name)
        g, = torch.autograd.grad(loss, logp)
        g_ref, = torch.autograd.grad(ref, logp)
        out["rules"][lookup] = {
            "loss": float(loss), "ref": float(ref), "grad_max_diff": float((g - g_ref).abs().max()),
            "masked": int((mask & ~res.keep).sum()), "pg_clipfrac": metrics["actor/pg_clipfrac"],
            "masked_frac": float((mask & ~res.keep).sum() / mask.sum()), "metric_names": sorted(metrics),
        }

# verl's global-batch normalisation (agg_loss with dp_size / batch_num_tokens / global_batch_size)
out["agg"] = {}
rho = torch.exp((logp - mu).clamp(-20, 20))
for mode in ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
    c = cfg("pg_is")
    c.global_batch_info.update(dp_size=2, batch_num_tokens=100, global_batch_size=10, loss_scale_factor=16)
    loss, _ = get_policy_loss_fn("pg_is")(mu, logp, adv, mask, loss_agg_mode=mode, config=c)
    ref = agg_loss(loss_mat=-adv * rho, loss_mask=mask, loss_agg_mode=mode, **c.global_batch_info)
    out["agg"][mode] = [float(loss), float(ref)]

# verl's rollout-correction weights multiply the per-token loss, as in verl's own losses
w = torch.rand(B, T) + 0.5
loss_w, _ = get_policy_loss_fn("pg_is")(mu, logp, adv, mask, loss_agg_mode="token-mean", config=cfg("pg_is"),
                                         rollout_is_weights=w)
out["is_weights"] = [float(loss_w), float(agg_loss(loss_mat=-adv * rho * w, loss_mask=mask, loss_agg_mode="token-mean"))]

# bypass mode: loss_type=<rule> runs the rule; verl's own loss types still reach verl
bypass = get_policy_loss_fn("bypass_mode")
c = cfg("bypass_mode", rollout_correction=RolloutCorrectionConfig(bypass_mode=True, loss_type="cppo"))
loss_b, metrics_b = bypass(mu, logp, adv, mask, loss_agg_mode="token-mean", config=c)
# verl's own off-policy diagnostics of the same tensors, as its bypass loss computes them
from verl.trainer.ppo.rollout_corr_helper import compute_offpolicy_metrics
verl_corr = compute_offpolicy_metrics(old_log_prob=logp.detach(), rollout_log_prob=mu, response_mask=mask)
out["rollout_corr"] = {k: [metrics_b[k], float(verl_corr[k.split("/", 1)[1]])]
                       for k in metrics_b if k.startswith("rollout_corr/")}
c2 = cfg("bypass_mode", rollout_correction=RolloutCorrectionConfig(bypass_mode=True, loss_type="ppo_clip",
                                                                   rollout_is=None))
loss_p, _ = bypass(mu, logp, adv, mask, loss_agg_mode="token-mean", config=c2)
loss_v, _ = core_algos.compute_policy_loss_vanilla(mu, logp, adv, mask, loss_agg_mode="token-mean", config=cfg("vanilla"))
out["bypass"] = {"cppo": float(loss_b), "cppo_ref": out["rules"]["cppo"]["loss"], "ppo_clip": float(loss_p),
                 "vanilla": float(loss_v)}

# capture: two steps x two loss calls, step given by set_step
run_root = sys.argv[1]
cv.configure(run_dir=run_root, name="verl-run")
keeps = {}
for step in range(2):
    cv.set_step(step)
    for update in range(2):
        lp = (mu + 0.4 * torch.randn(B, T)).clamp(max=-1e-4).requires_grad_()
        get_policy_loss_fn("cppo")(mu, lp, adv, mask, loss_agg_mode="token-mean", config=cfg("cppo"))
        res = compute_mask("cppo", logp=lp.detach(), logp_rollout=mu, advantages=adv, response_mask=mask,
                           delta=0.1, w_min=0.8)
        keeps[(step, update)] = res.keep
cv.close()
run = open_run(os.path.join(run_root, "verl-run"))
tok = run.tokens().collect().sort(["step", "update", "seq_id", "pos"])
agree = True
for (step, update), keep in keeps.items():
    part = tok.filter((tok["step"] == step) & (tok["update"] == update))
    rows = torch.tensor(part["seq_id"].to_list()) - update * B
    cols = torch.tensor(part["pos"].to_list())
    agree &= bool(torch.equal(keep[rows, cols], torch.tensor(part["keep_applied"].to_list())))
out["capture"] = {
    "meta": {k: run.meta[k] for k in ("trainer", "rule", "anchor", "rule_params")},
    "step_source": run.meta["config"]["step_source"],
    "completed": run.completed_steps(), "rows": tok.height, "valid": int(mask.sum()) * 4,
    "keep_agrees": agree, "scalar_columns": sorted(run.steps().columns),
}
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def verl_python() -> str:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "verl_env.sh")], capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        raise AssertionError(f"scripts/verl_env.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    python = proc.stdout.strip().splitlines()[-1]
    assert Path(python).exists(), python
    return python


@pytest.mark.slow
def test_rules_through_verl_registry(verl_python, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CPPO_DIAG_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env["RAY_DISABLE_IMPORT_WARNING"] = "1"
    proc = subprocess.run([verl_python, "-c", CHECK, str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env=env, cwd=str(tmp_path))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"verl check failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    out = json.loads(lines[-1][len("RESULT "):])

    for name in ("cppo", "dppo", "grpo_clip"):
        assert name in out["registered"] and "cppo_diag_" + name in out["registered"]
    # verl's own cispo is never replaced; ours is reachable under the prefix
    assert "cppo_diag_cispo" in out["registered"] and "cispo" not in out["registered"]
    assert out["verl_cispo_module"].startswith("verl.")

    for lookup, r in out["rules"].items():
        assert r["loss"] == pytest.approx(r["ref"], rel=1e-6, abs=1e-7), lookup
        assert r["grad_max_diff"] < 1e-6, lookup
        assert r["pg_clipfrac"] == pytest.approx(r["masked_frac"], abs=1e-6), lookup
    assert out["rules"]["cppo"]["masked"] > 0 and out["rules"]["dppo"]["masked"] > 0  # the rules bite here
    assert any(n.startswith("mask/cppo/") for n in out["rules"]["cppo"]["metric_names"])

    for mode, (ours, verls) in out["agg"].items():
        assert ours == pytest.approx(verls, rel=1e-6, abs=1e-7), mode
    assert out["is_weights"][0] == pytest.approx(out["is_weights"][1], rel=1e-6)

    b = out["bypass"]
    assert b["cppo"] == pytest.approx(b["cppo_ref"], rel=1e-6)
    # a rule in bypass mode reports verl's rollout_corr/* diagnostics, equal to verl's own
    assert {"rollout_corr/kl", "rollout_corr/k3_kl", "rollout_corr/chi2_token"} <= set(out["rollout_corr"])
    for name, (ours, verls) in out["rollout_corr"].items():
        assert ours == pytest.approx(verls, rel=1e-5, abs=1e-6), name
    assert b["ppo_clip"] == pytest.approx(b["vanilla"], rel=1e-6)

    cap = out["capture"]
    assert cap["meta"] == {"trainer": "verl", "rule": "cppo", "anchor": "old", "rule_params": {"delta": 0.1, "w_min": 0.8}}
    assert cap["step_source"] == "set_step()"
    assert cap["completed"] == [0, 1]
    assert cap["rows"] == cap["valid"]
    assert cap["keep_agrees"]
    assert "mask/cppo/frac" in cap["scalar_columns"]


def test_verl_env_script_is_idempotent_when_built():
    """The venv script exits at once (printing the interpreter) when the stamp matches: CI reruns stay cheap."""
    venv = ROOT / ".venv-verl"
    if not (venv / ".cppo-diag-verl-stamp").exists():
        pytest.skip("verl venv not built yet (test_rules_through_verl_registry builds it)")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "verl_env.sh")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip() == str(venv / "bin" / "python")
    assert "building" not in proc.stderr


@pytest.mark.slow
def test_verl_loads_plugin_from_its_own_hook(verl_python, tmp_path):
    """No import of cppo_diag in user code: verl's VERL_USE_EXTERNAL_MODULES hook (run in every verl process at
    ``import verl``) registers the rules, as it would in verl's Ray actor workers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CPPO_DIAG_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env["VERL_USE_EXTERNAL_MODULES"] = "cppo_diag.integrations.verl"
    code = ("import sys; from verl.trainer.ppo.core_algos import get_policy_loss_fn; "
            "print(get_policy_loss_fn('cppo').__name__, 'cppo_diag' in ' '.join(sys.modules))")
    proc = subprocess.run([verl_python, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split()[-2:] == ["cppo_diag_policy_loss_cppo", "True"]


# -- verl's scalar names, at the unit level (no verl needed) -------------------------------------------------


def _loop_rollout_corr(logp, mu, mask):
    """verl's rollout_corr/* definitions written as plain loops over valid tokens and responses."""
    import math

    toks = [(float(logp[i, t]), float(mu[i, t])) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t]]
    n = len(toks)
    seqs = []
    for i in range(mask.shape[0]):
        row = [(float(logp[i, t]), float(mu[i, t])) for t in range(mask.shape[1]) if mask[i, t]]
        if row:
            seqs.append((sum(a for a, _ in row) / len(row), sum(b for _, b in row) / len(row)))
    return {
        "rollout_corr/kl": sum(b - a for a, b in toks) / n,
        "rollout_corr/k3_kl": sum(math.exp(a - b) - (a - b) - 1 for a, b in toks) / n,
        "rollout_corr/training_ppl": sum(math.exp(-a) for a, _ in seqs) / len(seqs),
        "rollout_corr/rollout_ppl": sum(math.exp(-b) for _, b in seqs) / len(seqs),
        "rollout_corr/log_ppl_diff": sum(b - a for a, b in seqs) / len(seqs),
        "rollout_corr/chi2_token": sum(math.exp(2 * max(min(a - b, 20.0), -20.0)) for a, b in toks) / n - 1,
    }


def test_rollout_corr_names_match_a_plain_loop():
    import torch

    from cppo_diag.integrations.names import verl_rollout_corr_scalars

    torch.manual_seed(1)
    B, T = 5, 9
    mu = -torch.rand(B, T) * 3.0
    logp = (mu + 0.3 * torch.randn(B, T)).clamp(max=-1e-4)
    mask = torch.ones(B, T, dtype=torch.bool)
    for i, n in enumerate([9, 4, 0, 7, 1]):  # one response without a valid token
        mask[i, n:] = False
    logp[~mask] = float("nan")  # padding holds anything: it must not leak into the means
    ours = verl_rollout_corr_scalars(logp, mu, mask)
    ref = _loop_rollout_corr(torch.nan_to_num(logp), mu, mask)
    assert set(ours) == set(ref)
    for name in ref:
        assert ours[name] == pytest.approx(ref[name], rel=1e-5, abs=1e-6), name


def test_pg_clipfrac_and_rollout_corr_in_the_loss_metrics(monkeypatch):
    """Without verl: the loss core the plug-in registers, called as verl calls it, returns verl's names beside
    ours; bypass mode (anchor = rollout) adds rollout_corr/*, decoupled mode does not."""
    import sys
    import types

    import torch

    fake = types.ModuleType("verl.trainer.ppo.core_algos")  # only what the plug-in touches at import
    fake.POLICY_LOSS_REGISTRY = {}
    fake.register_policy_loss = lambda name: (lambda fn: fake.POLICY_LOSS_REGISTRY.setdefault(name, fn))
    for mod in ("verl", "verl.trainer", "verl.trainer.ppo"):
        monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", fake)
    sys.modules["verl.trainer.ppo"].core_algos = fake
    monkeypatch.setitem(sys.modules, "cppo_diag.integrations.verl", None)  # restored (or removed) afterwards
    del sys.modules["cppo_diag.integrations.verl"]  # import it afresh, against the stand-in above
    monkeypatch.delenv("CPPO_DIAG_RUN_DIR", raising=False)
    monkeypatch.setenv("CPPO_DIAG_RULE_PARAMS", '{"delta": 0.05}')
    import cppo_diag.integrations.verl as cv
    from cppo_diag.masks import compute_mask

    torch.manual_seed(0)
    mu = -torch.rand(4, 6) * 2.0
    logp = (mu + 0.4 * torch.randn(4, 6)).clamp(max=-1e-4)
    adv = torch.randn(4)[:, None].expand(4, 6).contiguous()
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 3:] = False
    res = compute_mask("dppo", logp=logp, logp_rollout=mu, advantages=adv, response_mask=mask, delta=0.05)
    masked_frac = float((~res.keep & mask).sum() / mask.sum())
    for anchor in ("old", "rollout"):
        _, metrics = cv._rule_loss("dppo", mu, logp.clone().requires_grad_(), adv, mask, "token-mean", None, None,
                                   anchor=anchor)
        assert metrics["actor/pg_clipfrac"] == pytest.approx(masked_frac) and masked_frac > 0
        assert metrics["mask/dppo/frac"] == pytest.approx(masked_frac)
        has_corr = any(k.startswith("rollout_corr/") for k in metrics)
        assert has_corr == (anchor == "rollout")
    assert metrics["rollout_corr/kl"] == pytest.approx(_loop_rollout_corr(logp, mu, mask)["rollout_corr/kl"], rel=1e-5)
