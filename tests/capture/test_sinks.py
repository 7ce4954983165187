"""Scalar sinks: step scalars mirrored to TensorBoard and W&B read back, with TensorBoard's own event reader and
W&B's own transaction-log reader, as the values of our own record; a failing sink never stops training."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from cppo_diag import RunRecorder, open_run
from cppo_diag.capture import sinks as sinks_mod
from cppo_diag.capture.recorder import RecorderWarning

STEPS = {  # what a trainer logs; NaN and strings are stored as null / skipped by the sinks
    0: {"reward/mean": 0.25, "mask/cppo/frac": 0.0, "eval/greedy_acc": 0.5},
    1: {"reward/mean": 0.5, "mask/cppo/frac": torch.tensor(0.125), "div/tv/p90": float("nan")},
    2: {"reward/mean": 0.75, "mask/cppo/frac": 0.0625, "batch/updates": 4, "note": "text"},
}


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """Never go online: W&B in offline mode, its global files inside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))


def _record(tmp_path, sinks, **kw) -> RunRecorder:
    rec = RunRecorder(tmp_path, name="r", rule="cppo", rule_params={"delta": 0.15}, config={"optim": {"lr": 1e-3}},
                      sinks=sinks, **kw)
    for step, values in STEPS.items():
        rec.log_scalars(step, values)
        rec.end_step(step)
    rec.close()
    return rec


def _ours(run_dir: Path) -> dict[tuple[int, str], float]:
    """(step, name) -> value from our scalars file (the reference), non-null numbers only."""
    steps = open_run(run_dir).steps()
    out = {}
    for row in steps.iter_rows(named=True):
        for k, v in row.items():
            if k not in ("step", "rank") and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                out[(row["step"], k)] = float(v)
    return out


def _tensorboard(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = {(e.step, tag): e.value for tag in ea.Tags()["scalars"] for e in ea.Scalars(tag)}
    return ea, scalars


def _wandb_records(run_dir: Path) -> list[dict]:
    """Every record of the run's .wandb transaction log, decoded by W&B's own reader (`wandb leet inspect`)."""
    files = sorted((run_dir / sinks_mod.WANDB_DIR).glob("*run-*/run-*.wandb"))  # not latest-run/ (a link)
    assert len(files) == 1, files
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(files[0])],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_tensorboard_and_wandb_return_the_recorded_values(tmp_path, offline_wandb):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecorderWarning)  # no sink may fail here
        rec = _record(tmp_path, ["tensorboard", "wandb"], on_error="raise")
    assert "sink/tensorboard" not in rec.stats["warnings"] and "sink/wandb" not in rec.stats["warnings"]
    run_dir = tmp_path / "r"
    ours = _ours(run_dir)
    assert (1, "mask/cppo/frac") in ours and (1, "div/tv/p90") not in ours  # tensor read; NaN stored as null

    ea, tb = _tensorboard(run_dir / sinks_mod.TENSORBOARD_DIR)
    assert set(tb) == set(ours)
    for key, v in ours.items():
        assert tb[key] == pytest.approx(v, rel=1e-7), key  # float32 event values
    meta = json.loads((run_dir / "meta.json").read_text())
    opened = lambda m: {k: v for k, v in m.items() if k not in ("status", "updated")}  # noqa: E731 - set by close()
    text = ea.Tensors("meta.json/text_summary")[0].tensor_proto.string_val[0].decode()
    sent = json.loads("\n".join(line[4:] for line in text.splitlines()))
    assert sent["status"] == "running" and opened(sent) == opened(meta)

    from tensorboard.plugins.hparams import plugin_data_pb2

    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["rule"].string_value == "cppo"
    assert start.hparams["config.optim.lr"].number_value == pytest.approx(1e-3)
    assert start.hparams["rule_params.delta"].number_value == pytest.approx(0.15)

    records = _wandb_records(run_dir)
    wb = {}
    for r in records:
        if r["type"] == "history":
            step = r["history"]["step"].get("num", 0)
            wb.update({(step, k): v for k, v in r["history"]["item"].items() if not k.startswith("_")})
    assert set(wb) == set(ours)
    for key, v in ours.items():
        assert wb[key] == pytest.approx(v, rel=1e-12), key
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    config = {k: v for k, v in run["config"]["update"].items() if k != "_wandb"}
    assert config["status"] == "running" and opened(config) == opened(meta)  # meta.json when the run opened
    assert run["display_name"] == "r" and run["project"] == sinks_mod.WANDB_DEFAULT_PROJECT
    assert any(r["type"] == "exit" for r in records)  # finished by close()


def test_missing_package_warns_once_and_the_record_is_complete(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.warns(RecorderWarning) as caught:
        rec = _record(tmp_path, ["tensorboard", "wandb"], on_error="raise")
    messages = [str(w.message) for w in caught]
    assert sum("sink/wandb" in m for m in messages) == 1 and sum("sink/tensorboard" in m for m in messages) == 1
    assert any("pip install 'cppo-diag[wandb]'" in m for m in messages)
    assert rec.stats["warnings"]["sink/wandb"] == 1
    assert sorted({s for s, _ in _ours(tmp_path / "r")}) == [0, 1, 2]
    assert not (tmp_path / "r" / sinks_mod.TENSORBOARD_DIR).exists()


def test_write_error_warns_once_switches_the_sink_off_and_training_continues(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    calls = []

    def fail(self, *a, **kw):
        calls.append(a)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", fail)
    with pytest.warns(RecorderWarning, match=r"sink/tensorboard.*cannot write to the tensorboard sink.*No space"):
        rec = _record(tmp_path, ["tensorboard"], on_error="raise")  # raise mode: still no exception
    assert rec.stats["warnings"]["sink/tensorboard"] == 1 and len(calls) == 1  # off after the first failure
    assert rec.stats["dropped_records"] == 0
    assert _ours(tmp_path / "r")[(2, "reward/mean")] == 0.75


def test_unknown_sink_name_raises_and_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"sinks: expected names from \['tensorboard', 'wandb'\], found 'mlflow'"):
        RunRecorder(tmp_path, name="r", sinks=["mlflow"])


def test_wandb_mode_is_offline_without_a_key_or_a_connection(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    never_called = lambda host: pytest.fail("no key: the network must not be probed")  # noqa: E731
    assert sinks_mod.wandb_mode(reachable=never_called) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert sinks_mod.wandb_mode(reachable=lambda host: False) == "offline"
    assert sinks_mod.wandb_mode(reachable=lambda host: host == "api.wandb.ai") == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    assert sinks_mod.wandb_mode(reachable=lambda host: True) == "online"  # `wandb login` keeps the key there
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert sinks_mod.wandb_mode(reachable=never_called) == "disabled"


def test_demo_trainer_with_log_tensorboard_writes_the_same_values(tmp_path):
    """Done-when of issue 16: `--log.tensorboard true` gives an event file TensorBoard's reader agrees with."""
    pytest.importorskip("tensorboard")
    from cppo_diag.cli.main import main

    rc = main(["train", "--preset", "tiny", "--steps", "2", "--log.out_dir", str(tmp_path), "--log.name", "tb",
               "--log.tensorboard", "true", "--threads", "1"])
    assert rc == 0
    run_dir = tmp_path / "tb"
    ours = _ours(run_dir)
    _, tb = _tensorboard(run_dir / sinks_mod.TENSORBOARD_DIR)
    assert set(tb) == set(ours)
    assert {"reward/mean", "mask/cppo/frac", "summary/greedy_acc_after", "eval/greedy_acc"} <= {k for _, k in tb}
    for key, v in ours.items():
        assert tb[key] == pytest.approx(v, rel=1e-6, abs=1e-30), key


def test_trainer_refuses_sinks_without_the_recorder(tmp_path):
    from cppo_diag.train.config import build_config
    from cppo_diag.train.trainer import train

    cfg = build_config("tiny", overrides={"log": {"out_dir": str(tmp_path), "record": False, "wandb": True,
                                                  "progress": False}, "threads": 1})
    with pytest.raises(ValueError, match="log.wandb: .*needs log.record true"):
        train(cfg)
