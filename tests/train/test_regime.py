"""cppo_diag.train.regime: an override that leaves a preset's regime is named with what it changes."""

from __future__ import annotations

import pytest

from cppo_diag.train.config import PRESETS, build_config
from cppo_diag.train.regime import CALIBRATED_KEYS, available_cores, regime_warnings


def test_the_preset_itself_has_no_warning():
    assert regime_warnings(build_config("long"), "long") == []
    assert set(CALIBRATED_KEYS) <= set(PRESETS)


def test_each_override_is_named_with_what_it_changes():
    cfg = build_config("long", overrides={"rollout": {"staleness": 50}, "optim": {"lr": 2e-3, "warmup_steps": 40},
                                          "threads": available_cores() + 1})
    text = "\n".join(regime_warnings(cfg, "long"))
    assert f"threads: {available_cores() + 1} torch threads on {available_cores()}" in text
    assert "rollout.staleness: 50 >= steps 40" in text and "warm start's samples" in text
    assert "optim.warmup_steps: 40 >= steps 40" in text and "never reaches optim.lr" in text
    assert "rollout.staleness 10 -> 50" in text and "optim.lr 0.00025 -> 0.002" in text
    assert "calibrated regime" in text
    # a preset without a calibration only gets the checks that hold anywhere
    assert regime_warnings(build_config("tiny", overrides={"steps": 12}), "tiny") == []


def test_train_cli_prints_the_warnings_before_training(capsys, tmp_path, monkeypatch):
    import cppo_diag.train as T
    from cppo_diag.cli.main import main

    seen = []
    monkeypatch.setattr(T, "train", lambda cfg: seen.append(cfg) or {})
    assert main(["train", "--preset", "long", "--rollout.staleness", "50", "--log.out_dir", str(tmp_path)]) == 0
    assert seen and "warning: rollout.staleness: 50 >= steps 40" in capsys.readouterr().err
    # an invalid value is the error, with no regime warning before it
    assert main(["train", "--preset", "long", "--rollout.staleness", "50", "--optim.lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: expected a number" in err and "warning:" not in err


def test_the_presets_own_rule_thresholds_apply_only_when_the_run_gives_none():
    from cppo_diag.train.config import PRESET_RULE_PARAMS

    own = PRESET_RULE_PARAMS["long"]["dppo"]
    assert build_config("long").rule.params == own  # the preset's rule: DPPO at the calibrated threshold
    assert build_config("long", overrides={"rule": {"name": "dppo"}}).rule.params == own
    assert build_config("long", overrides={"rule": {"name": "cppo"}}).rule.params == {}  # CPPO at the paper's
    assert build_config("long", overrides={"rule": {"name": "grpo_clip"}}).rule.params == {}  # no threshold of its own
    assert build_config("demo", overrides={"rule": {"name": "dppo"}}).rule.params == {}  # only in its preset
    mine = build_config("long", overrides={"rule": {"name": "dppo", "params": {"divergence": "binary_kl"}}})
    assert mine.rule.params == {"divergence": "binary_kl"}  # any parameter of the run's own replaces them all
    text = "\n".join(regime_warnings(mine, "long"))
    assert f"rule.params (dppo) {own!r} -> {{'divergence': 'binary_kl'}}" in text and "calibrated regime" in text
    assert regime_warnings(build_config("long", overrides={"rule": {"name": "grpo_clip"}}), "long") == []
