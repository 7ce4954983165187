"""What an override does to a preset's regime, said before training starts (``cppo-diag train`` prints these).

A preset such as ``long`` is a calibrated regime (docs/trainer.md: its calibration table says how often each rule
learns there). An override can take a run out of it without any value being invalid: a staleness as long as the
run makes every batch the warm start's samples, a warm-up as long as the run never reaches the learning rate, more
torch threads than cores slows each step down. ``regime_warnings`` names each such change and what it changes;
invalid values are ``TrainConfig.validate``'s job.
"""

from __future__ import annotations

import os

from .config import PRESET_RULE_PARAMS, TrainConfig, build_config, to_dict

__all__ = ["CALIBRATED_KEYS", "available_cores", "regime_warnings"]

# The settings a preset's calibration fixed (docs/trainer.md); changing one leaves the calibrated regime.
CALIBRATED_KEYS = {
    "long": ("steps", "rollout.staleness", "rollout.precision", "rollout.prompts_per_step", "rollout.n",
             "rollout.temperature", "rollout.logit_noise", "rollout.logit_noise_schedule", "optim.lr", "optim.grad_clip",
             "optim.schedule", "optim.min_lr_ratio", "optim.warmup_steps", "optim.updates_per_batch",
             "optim.epochs", "task.fork_profile", "task.detour_credit", "task.forks"),
}


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def regime_warnings(cfg: TrainConfig, preset: str | None = None) -> list[str]:
    """One sentence per override that changes what the run is: each names the field, its value and what it
    changes. Empty when the run stays in its preset's regime."""
    out: list[str] = []
    cores = available_cores()
    if cfg.threads > cores:
        out.append(f"threads: {cfg.threads} torch threads on {cores} available core(s): the threads compete for the "
                   f"cores, so each step gets slower, not faster; use at most {cores}")
    if cfg.steps and cfg.rollout.staleness >= cfg.steps:
        out.append(f"rollout.staleness: {cfg.rollout.staleness} >= steps {cfg.steps}: every batch is sampled by the "
                   "initial weights, so the run is offline RL on the warm start's samples, not an asynchronous one")
    if cfg.steps and cfg.optim.warmup_steps >= cfg.steps:
        out.append(f"optim.warmup_steps: {cfg.optim.warmup_steps} >= steps {cfg.steps}: the learning rate rises for "
                   f"the whole run and never reaches optim.lr {cfg.optim.lr:g} (how sample_logs/unstable-long is built)")
    keys = CALIBRATED_KEYS.get(preset or "")
    if keys:
        base, now = to_dict(build_config(preset)), to_dict(cfg)
        changed = [f"{k} {_get(base, k)!r} -> {_get(now, k)!r}" for k in keys if _get(base, k) != _get(now, k)]
        calibrated = PRESET_RULE_PARAMS.get(preset, {}).get(cfg.rule.name, {})  # the calibration's rule parameters
        if cfg.rule.params != calibrated:
            changed.append(f"rule.params ({cfg.rule.name}) {calibrated!r} -> {cfg.rule.params!r}")
        if changed:
            out.append(f"preset {preset!r}: {', '.join(changed)} leave(s) the calibrated regime; the calibration in "
                       "docs/trainer.md does not cover this run, so expect other learning curves")
    return out

