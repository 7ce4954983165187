"""The token inspector shows the per-token weight the loss applied (issue 11 item 7), on a real cppo_soft run
of the bundled trainer (keep_applied is all-valid there: the gate is what the loss used)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from tests.app.test_app import APP, TIMEOUT, _ok, traces  # noqa: E402


@pytest.fixture(scope="module")
def soft_root(tmp_path_factory) -> Path:
    import torch

    from cppo_diag.train import build_config, train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("soft")
    train(build_config("tiny", overrides={"steps": 1, "threads": 1, "optim": {"lr": 3e-3, "epochs": 3},
                                          "rule": {"name": "cppo_soft", "params": {"delta": 0.05}},
                                          "log": {"out_dir": str(root), "name": "soft", "progress": False}}))
    return root


def test_inspector_shows_the_loss_weight(soft_root, monkeypatch):
    monkeypatch.setenv("CPPO_DIAG_ROOTS", str(soft_root))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    _ok(at)
    at.switch_page("views/inspector.py").run()
    _ok(at)
    assert "loss weight" in at.get("html")[0].value  # on hover
    w = next(t for t in traces(at) if t.get("name") == "loss weight")
    assert len(w["y"]) > 0 and all(0.0 < v <= 1.0 for v in w["y"])  # the cppo_soft gate
    assert any("Loss weight applied" in c.value for c in at.caption)
