"""``DoctorGuardCallback`` (integrations/trl_guard.py) driven with TRL's log dicts: findings appended as they fire,
the checkpoint before the first warning pinned, a halt at a sustained collapse, clear errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # importing transformers takes tens of seconds on the shared machine

from cppo_diag.integrations.trl_guard import HALT_EXIT_CODE, DoctorGuardCallback  # noqa: E402


def _drive(guard, tmp_path, rewards, tails=None):
    args = SimpleNamespace(output_dir=str(tmp_path / "out"))
    (tmp_path / "out").mkdir(exist_ok=True)
    control = SimpleNamespace(should_training_stop=False)
    for i, r in enumerate(rewards):
        state = SimpleNamespace(global_step=i + 1, is_world_process_zero=True)
        if i == 12:  # the Trainer saved checkpoint-12 (the state after step 11)
            (tmp_path / "out" / "checkpoint-12").mkdir()
            (tmp_path / "out" / "checkpoint-12" / "model.safetensors").write_text("w")
        logs = {"loss": 0.1, "reward": r, "entropy": 0.5}
        if tails is not None:
            logs["cppo_diag/div_tail_top10"] = tails[i]
        guard.on_log(args, state, control, logs=logs)
        if control.should_training_stop:
            return i, control
    return None, control


def test_halts_at_a_sustained_collapse(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "meta.json").write_text(json.dumps({"status": "finished"}))
    guard = DoctorGuardCallback(run_dir=run, on_critical="halt")
    stopped, control = _drive(guard, tmp_path, [0.6] * 15 + [0.05] * 15)
    lines = [json.loads(x) for x in (run / "findings.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["reward_dip", "reward_collapse"]
    dip, col = lines
    assert col["severity"] == "critical" and col["step"] == dip["first_step"] + 5 == stopped
    assert guard.pinned.endswith("before-warning-checkpoint-12") and (tmp_path / "out" / "before-warning-checkpoint-12").is_dir()
    assert guard.finish() == HALT_EXIT_CODE == 3
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "halted" and meta["doctor"]["halted"]["finding"] == "reward_collapse"


def test_the_plugin_tail_makes_the_halt_come_before_the_reward_halves(tmp_path):
    """With the plug-in's tail in the logs: the runaway warns, and the imminent collapse halts while the reward's
    moving average is still above half its best."""
    guard = DoctorGuardCallback(run_dir=tmp_path / "run", on_critical="halt")
    rewards = [0.6] * 15 + [0.3] * 3 + [0.05] * 12
    tails = [0.3] * 12 + [1.0] * 18
    stopped, control = _drive(guard, tmp_path, rewards, tails)
    ids = [f.id for f in guard.doctor.findings]
    assert ids[0] == "divergence_runaway" and guard.halted["finding"] == "collapse_imminent"
    from cppo_diag.analyses.doctor import reward_trend

    steps, ma, run_max = reward_trend(range(len(rewards)), rewards)
    halved = int(steps[ma < 0.5 * run_max][0])  # 19: the 5-step mean of [.6, .3, .3, .3, .05]
    assert stopped == guard.halted["step"] < halved


def test_warn_and_a_recovering_dip(tmp_path):
    guard = DoctorGuardCallback(run_dir=tmp_path / "run", on_critical="warn")
    stopped, _ = _drive(guard, tmp_path, [0.6] * 15 + [0.05] * 6 + [0.7] * 10)
    assert stopped is None and guard.finish() == 0
    ids = [f.id for f in guard.doctor.findings]
    assert ids == ["reward_dip", "reward_recovered"]


def test_errors():
    with pytest.raises(ValueError, match="on_critical"):
        DoctorGuardCallback(on_critical="stop")
    guard = DoctorGuardCallback()
    with pytest.raises(ValueError, match="'reward'"):
        guard.on_log(SimpleNamespace(output_dir="/tmp"), SimpleNamespace(global_step=1), SimpleNamespace(),
                     logs={"loss": 0.3, "rewards/acc": 0.5})
