"""rollout.logit_noise (scripts/validate_doctor.py's growing engine mismatch): noise on the sampler's logits whose
sd grows linearly from 0 at iteration 0, so mu leaves the trainer's pi more and more; with
rollout.logit_noise_schedule constant, the full sd from the first iteration (a steadily mismatched engine)."""

from __future__ import annotations

import polars as pl
import pytest


def test_logit_noise_grows_the_first_update_mismatch(tmp_path):
    from cppo_diag import open_run
    from cppo_diag.cli.main import main
    from cppo_diag.train.config import build_config

    with pytest.raises(ValueError, match="rollout.logit_noise"):
        build_config("tiny", overrides={"rollout": {"logit_noise": -1.0}}).validate()
    assert main(["train", "--preset", "tiny", "--steps", "3", "--rollout.logit_noise", "3.0", "--threads", "1",
                 "--log.eval_every", "0", "--ckpt.every", "0", "--ckpt.keep", "0", "--log.out_dir", str(tmp_path),
                 "--log.name", "noisy"]) == 0
    tok = open_run(tmp_path / "noisy").tokens().filter(pl.col("update") == 0)
    gap = (tok.with_columns((pl.col("logp") - pl.col("logp_rollout")).abs().alias("d"))
           .group_by("step").agg(pl.col("d").mean()).sort("step").collect())
    d = dict(zip(gap["step"].to_list(), gap["d"].to_list()))
    assert d[0] < 1e-4  # no noise at iteration 0: pi = mu up to float rounding
    assert d[2] > 0.1 and d[2] > d[1] > d[0]  # sd 1.5 at iteration 1, 3.0 at iteration 2


def test_constant_noise_schedule():
    from cppo_diag.train.config import build_config
    from cppo_diag.train.phases import _logit_noise

    cfg = build_config("tiny", overrides={"steps": 5, "rollout": {"logit_noise": 0.4}})
    assert [_logit_noise(cfg, j) for j in (0, 2, 4)] == [0.0, 0.2, 0.4]  # linear: the default
    cfg = build_config("tiny", overrides={"steps": 5, "rollout": {"logit_noise": 0.4, "logit_noise_schedule": "constant"}})
    assert [_logit_noise(cfg.validate(), j) for j in (0, 2, 4)] == [0.4, 0.4, 0.4]
    with pytest.raises(ValueError, match="rollout.logit_noise_schedule"):
        build_config("tiny", overrides={"rollout": {"logit_noise_schedule": "cosine"}}).validate()


@pytest.mark.slow
def test_doctor_names_the_engine_as_the_cause(tmp_path):
    """A growing engine mismatch, logged with logp_behavior: the doctor's divergence findings name the engine."""
    from cppo_diag.analyses.doctor import diagnose
    from cppo_diag.cli.main import main

    assert main(["train", "--preset", "tiny", "--steps", "16", "--rollout.logit_noise", "3.0", "--threads", "1",
                 "--log.behavior_logp", "true", "--log.eval_every", "0", "--ckpt.every", "0", "--ckpt.keep", "0",
                 "--log.out_dir", str(tmp_path), "--log.name", "noisy"]) == 0
    fs = {f.id: f for f in diagnose(tmp_path / "noisy", budget=False)}
    assert fs["mismatch_drift"].evidence["cause"] == "engine"
    assert "Cause: engine mismatch rising" in fs["mismatch_drift"].message
    assert fs["divergence_tails_rising"].evidence["cause"] == "engine"

