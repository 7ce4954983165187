"""The plug-ins' ``sinks=``: the TRL plug-in's step scalars (``pos/*`` included) and its divergence-by-position
figure reach TensorBoard through RunRecorder's sink code; a failing sink warns once and the run's own record
stays complete; a sink that is unknown or not installed is refused when the trainer is built."""

from __future__ import annotations

import math
import sys
import warnings

import pytest

pytest.importorskip("trl")
pytest.importorskip("tensorboard")

from cppo_diag import metric_names as M  # noqa: E402
from cppo_diag import open_run  # noqa: E402
from cppo_diag.capture import sinks as sinks_mod  # noqa: E402
from cppo_diag.capture.recorder import RecorderWarning  # noqa: E402
from cppo_diag.integrations.trl import CppoDiagConfig  # noqa: E402
from tests.integrations.test_integration_trl import _train, _trainer  # noqa: E402


def _ours(run_dir):
    rows = open_run(run_dir).steps().iter_rows(named=True)
    return {(r["step"], k): float(v) for r in rows for k, v in r.items()
            if k not in ("step", "rank") and isinstance(v, (int, float)) and v is not None and math.isfinite(v)}


def _tensorboard(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / sinks_mod.TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea, {(e.step, t): e.value for t in ea.Tags()["scalars"] for e in ea.Scalars(t)}


@pytest.mark.slow
def test_trl_plugin_sends_its_scalars_and_the_position_figure_to_tensorboard(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecorderWarning)
        trainer = _train(tmp_path, max_steps=3, cppo_diag=CppoDiagConfig(
            run_dir=tmp_path / "runs", name="r", rule="cppo", rule_params={"delta": 0.05}, sinks=["tensorboard"],
            position_figure_every=2, on_error="raise"))
    run_dir = tmp_path / "runs" / "r"
    ours = _ours(run_dir)
    assert {n for _, n in ours} >= {*M.POS_TV_TOP10, *M.POS_MASKED_FRAC, "mask/cppo/frac"}
    ea, tb = _tensorboard(run_dir)
    assert set(tb) == set(ours)
    for key, v in ours.items():
        assert tb[key] == pytest.approx(v, rel=1e-6), key
    assert [e.step for e in ea.Images(M.POS_FIGURE)] == [0, 2]
    # TRL's own logs (its report_to) carry the per-micro-batch pos/* too; they are not recorded twice as trl/pos/*
    logged = {k for h in trainer.state.log_history for k in h}
    assert M.POS_TV_TOP10[0] in logged and not any(n.startswith("trl/pos/") for _, n in ours)


@pytest.mark.slow
def test_trl_plugin_failing_sink_warns_once_and_the_record_is_complete(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def fail(self, *a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", fail)
    with pytest.warns(RecorderWarning, match="cannot write to the tensorboard sink") as caught:
        _train(tmp_path, max_steps=2, cppo_diag=CppoDiagConfig(run_dir=tmp_path / "runs", name="r",
                                                               sinks=["tensorboard"], on_error="raise"))
    assert sum("sink/tensorboard" in str(w.message) for w in caught) == 1
    steps = {s for s, _ in _ours(tmp_path / "runs" / "r")}
    assert steps == {0, 1}
    assert open_run(tmp_path / "runs" / "r").completed_steps() == [0, 1]


def test_unknown_or_missing_sink_is_refused_when_the_trainer_is_built(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"sinks: expected names from \['tensorboard', 'wandb'\], found 'mlflow'"):
        CppoDiagConfig(run_dir=tmp_path, sinks=["mlflow"]).validate()
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ImportError, match=r"CppoDiagConfig.sinks: sink 'wandb' needs the wandb package; install it "
                                          r"with: pip install 'cppo-diag\[wandb\]'"):
        _trainer(tmp_path, cppo_diag=CppoDiagConfig(run_dir=tmp_path / "runs", name="r", sinks=["wandb"]))
    assert not (tmp_path / "runs").exists()  # refused before any run directory
    with pytest.raises(ValueError, match="position_figure_every: expected an integer >= 0, found -1"):
        CppoDiagConfig(position_figure_every=-1).validate()
