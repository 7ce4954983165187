"""The live doctor (analyses/doctor_live.py) and the trainer's live guard (train/guard.py): online alarms equal the
offline ones, the shipped sample logs replayed step by step, bad input, and the guard on the tiny preset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cppo_diag.analyses import doctor as D
from cppo_diag.analyses import doctor_live as L

SAMPLES = Path(__file__).resolve().parents[2] / "sample_logs"


def _offline_first_alarm(steps, values):
    ok = np.isfinite(values) & (values > 0)
    y = np.log(values[ok])
    a = [r["alarm"] for r in (D.cusum_up(y), D.trend_up(steps[ok], y)) if r["alarm"] is not None]
    return int(steps[ok][min(a)]) if a else None


def test_online_alarm_equals_the_offline_tests():
    rng = np.random.default_rng(5)
    seen = 0
    for trial in range(40):
        n = 50
        steps = np.arange(n)
        rise = np.where(steps > rng.integers(10, 40), rng.uniform(0.0, 0.08) * (steps - 20), 0.0)
        values = np.exp(rng.normal(0, 0.3, n) + rise)
        seq = L._Sequential(D.DOCTOR_SETTINGS, transform=np.log, scale_floor=D.LOG_SCALE_FLOOR,
                            min_rise=D.TREND_MIN_RISE, accept=lambda v: v > 0)
        online = next((int(s) for s, v in zip(steps, values) if seq.add(int(s), float(v))), None)
        assert online == _offline_first_alarm(steps, values), trial
        seen += online is not None
    assert 5 <= seen <= 38  # both outcomes exercised


def _replay(name: str) -> tuple[L.LiveDoctor, list]:
    """Feed a sample log's per-step statistics (doctor.step_series, the reward scalars) to a LiveDoctor."""
    info = D.step_series(SAMPLES / name)
    sc = D._scalar_series(SAMPLES / name)
    tail = {r["step"]: r for r in info["tail"].iter_rows(named=True)}
    mm = {r["step"]: r for r in info["mismatch"].iter_rows(named=True)}
    ent = {r["step"]: r["entropy"] for r in info["entropy"].iter_rows(named=True)}
    live = L.LiveDoctor(rule=json.loads((SAMPLES / name / "meta.json").read_text())["rule"])
    fired = []
    for row in sc.sort("step").iter_rows(named=True):
        s = row["step"]
        if row.get("reward/mean") is None:
            continue
        t, m = tail.get(s, {}), mm.get(s, {})
        new = live.observe(s, reward=row["reward/mean"], tail_top10=t.get("tail_top10"),
                           masked_frac=t.get("masked_frac"), mismatch_k3=m.get("k3"),
                           mismatch_abs_lr=m.get("abs_lr_mean"), entropy=ent.get(s),
                           heldout=row.get("eval/greedy_acc"))
        fired += [(s, f) for f in new]
    return live, fired


def test_sample_logs_replayed_live():
    """Replayed step by step, every shipped sample log fires live the criticals the offline doctor finds: the
    imminent collapse at its offline step, no later than the collapse (where the guard halts; before it on the
    unstable runs), and the sustained collapse
    at the same collapse step, 5 steps later; on a run without a collapse, exactly the criticals its offline findings
    say fired online (``online_severity``), at their steps; and
    unstable-long's early warnings at the offline steps, before it."""
    for run in sorted(p for p in SAMPLES.iterdir() if (p / "meta.json").exists()):
        _, fired = _replay(run.name)
        off = {f.id: f for f in D.diagnose(run, budget=False)}
        crit = {f.id: (s, f) for s, f in fired if f.severity == "critical"}
        if "reward_collapse" in off:
            assert set(crit) == {"reward_collapse", "collapse_imminent"}, (run.name, list(crit))
            at, col = crit["reward_collapse"]
            assert col.first_step == off["reward_collapse"].first_step
            assert at == col.first_step + D.COLLAPSE_MIN_AFTER  # critical once the dip has lasted 5 more steps
            at, im = crit["collapse_imminent"]
            assert at == im.first_step == off["collapse_imminent"].first_step <= col.first_step
            if run.name.startswith("unstable"):  # README: on both unstable runs the halt comes before the collapse
                assert im.first_step < col.first_step, run.name
        else:
            # no collapse: live, only what the finished run's findings say was critical online fires, where they say
            # (an imminent collapse that did not come; a dip that lasted 5 steps before it recovered, which live
            # is a collapse: the guard cannot see the recovery coming)
            want = {("reward_collapse" if f.id == "reward_dip" else f.id): f.evidence.get("online_critical_step",
                                                                                        f.first_step)
                    for f in off.values() if f.evidence.get("online_severity") == "critical"}
            assert {k: at for k, (at, _) in crit.items()} == want, run.name
    live, fired = _replay("unstable-long")
    col = next(f for _, f in fired if f.id == "reward_collapse")
    off = {f.id: f for f in D.diagnose(SAMPLES / "unstable-long", budget=False)}
    early = [f for _, f in fired if f.severity == "warning" and f.first_step < col.first_step]
    assert early
    for f in early:  # the same early warnings, at the same steps
        assert f.first_step == off[f.id].first_step


def test_live_doctor_bad_input():
    live = L.LiveDoctor()
    with pytest.raises(ValueError, match="reward/mean"):
        live.observe(0, reward=None)
    with pytest.raises(ValueError, match="finite"):
        live.observe(1, reward=float("nan"))


def test_doctor_config_errors():
    from cppo_diag.train.config import build_config

    with pytest.raises(ValueError, match="doctor.on_critical"):
        build_config("tiny", overrides={"steps": 12, "doctor": {"live": True, "on_critical": "stop"}}).validate()
    with pytest.raises(ValueError, match="needs doctor.live true"):
        build_config("tiny", overrides={"steps": 12, "doctor": {"on_critical": "halt"}}).validate()
    with pytest.raises(ValueError, match="steps: expected at least 10"):
        build_config("tiny", overrides={"doctor": {"live": True}}).validate()
    with pytest.raises(ValueError, match="doctor.live"):
        build_config("tiny", overrides={"doctor": {"live": "maybe"}})
    with pytest.raises(ValueError, match="unknown"):
        build_config("tiny", overrides={"doctor": {"halt": True}})


def _guarded(monkeypatch, tmp_path, name, on_critical):
    """The tiny preset with a huge learning rate (the reward collapses within a few steps) under the live guard,
    with the collapse rule shortened (a dip from step 1 is critical once it lasted 3 more steps) so it fits in 12
    steps; the full rule is tested above on the sample logs."""
    import dataclasses

    from cppo_diag.cli.main import main
    from cppo_diag.train.guard import TrainGuard

    monkeypatch.setattr(TrainGuard, "settings", dataclasses.replace(D.DOCTOR_SETTINGS, version="test",
                                                                    collapse_min_step=1, collapse_min_after=3))
    rc = main(["train", "--preset", "tiny", "--steps", "12", "--optim.lr", "0.05", "--optim.warmup_steps", "20",
               "--threads", "1", "--ckpt.every", "1", "--ckpt.keep", "1", "--log.eval_every", "0",
               "--log.out_dir", str(tmp_path), "--log.name", name, "--doctor.live", "true",
               "--doctor.on_critical", on_critical])
    run = tmp_path / name
    meta = json.loads((run / "meta.json").read_text())
    findings = [json.loads(line) for line in (run / "findings.jsonl").read_text().splitlines()]
    return rc, run, meta, findings


def test_live_guard_halts_at_a_critical_finding(monkeypatch, tmp_path, capsys):
    from cppo_diag import open_run
    from cppo_diag.train.guard import HALT_EXIT_CODE

    rc, run, meta, findings = _guarded(monkeypatch, tmp_path, "halt", "halt")
    assert rc == HALT_EXIT_CODE == 3 and "doctor: halted at step" in capsys.readouterr().err
    assert meta["status"] == "halted"
    crit = [f for f in findings if f["severity"] == "critical"]  # the first critical halts: there is one
    assert len(crit) == 1 and crit[0]["id"] in ("reward_collapse", "collapse_imminent")
    assert crit[0]["settings_version"] == "test"
    halted = meta["doctor"]["halted"]
    assert halted["step"] == crit[0]["step"] < 11  # stopped before the last step
    assert open_run(run).steps()["step"].max() == halted["step"]  # nothing trained after the halt
    first_warn = meta["doctor"]["first_warning_step"]
    pinned = Path(meta["doctor"]["checkpoint_before_first_warning"])
    assert pinned.is_dir() and (pinned / "model.safetensors").exists()
    assert int(pinned.name.split("=")[1]) < first_warn <= crit[0]["first_step"]
    assert meta["doctor"]["time_s"] > 0 and meta["doctor"]["steps_checked"] == halted["step"] + 1


@pytest.mark.slow
def test_live_guard_warn_keeps_training(monkeypatch, tmp_path):
    rc, run, meta, findings = _guarded(monkeypatch, tmp_path, "warn", "warn")
    assert rc == 0 and meta["status"] == "finished" and meta["doctor"]["halted"] is None
    assert "reward_collapse" in [f["id"] for f in findings] and meta["doctor"]["steps_checked"] == 12


def test_tail_top10_matches_the_offline_statistic_at_any_size():
    """The live tail is the offline top-decile mean (polars' linear P90), also beyond torch.quantile's 2^24 limit."""
    import polars as pl
    import torch

    x = torch.rand(1001, generator=torch.Generator().manual_seed(0)).double()
    d = pl.Series(x.numpy())
    assert L.tail_top10(x) == pytest.approx(d.filter(d >= d.quantile(0.9, interpolation="linear")).mean(), rel=1e-12)
    big = torch.rand(2**24 + 1, generator=torch.Generator().manual_seed(1))
    assert L.tail_top10(big) == pytest.approx(0.95, abs=1e-3)
    assert L.tail_top10(torch.empty(0)) is None
