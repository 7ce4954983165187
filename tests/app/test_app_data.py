"""app/data.py (roots, confinement) and the `cppo-diag app` command, without a server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("streamlit")

from cppo_diag.app import data  # noqa: E402
from cppo_diag.cli import app_cmd  # noqa: E402


def test_parse_roots_from_args_and_env(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    roots = data.parse_roots(["--root", str(a)], {data.ROOTS_ENV: f"{b}{os.pathsep}{a}"})
    assert roots == [a.resolve(), b.resolve()]  # args first, duplicates dropped
    assert data.parse_roots([], {}) == [data.default_root()]


def test_confine_rejects_escapes(tmp_path):
    root = tmp_path / "root"
    (root / "run1").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    assert data.confine(root / "run1", [root]) == (root / "run1").resolve()
    assert data.confine("run1", [root]) == (root / "run1").resolve()
    with pytest.raises(PermissionError, match="outside"):
        data.confine(tmp_path / "secret", [root])
    with pytest.raises(PermissionError, match=r"'\.\.'"):
        data.confine("../secret", [root])
    with pytest.raises(PermissionError, match="outside"):
        data.confine(root / "run1" / ".." / ".." / "secret", [root])
    # A symlink inside the root that points outside is an escape too.
    (root / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(PermissionError, match="outside"):
        data.confine(root / "link", [root])


def test_server_command_binds_localhost_and_passes_roots(tmp_path):
    cmd = app_cmd.server_command([str(tmp_path)], 8765)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8765"
    assert cmd[-2:] == ["--root", str(tmp_path)]
    assert Path(cmd[4]).name == "streamlit_app.py" and Path(cmd[4]).is_file()


def test_launch_rejects_a_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="--root"):
        app_cmd.launch([str(tmp_path / "nope")], port=8765)


def test_cli_help_lists_options(capsys):
    from cppo_diag.cli.main import main

    with pytest.raises(SystemExit):
        main(["app", "--help"])
    out = capsys.readouterr().out
    assert "--root" in out and "--port" in out and "--no-browser" in out and "sample_logs" in out


def test_one_response_recompute_matches_the_whole_step(tmp_path):
    """The inspector recomputes CPPO on the chosen response alone; it must equal the step-wide recompute."""
    import numpy as np

    from tests.app_fixtures import write_run

    run = write_run(tmp_path, "r", "cppo", {"delta": 0.15, "w_min": 0.8, "delta_b": 0.02}, n_steps=2, seqs=8)
    params = {"delta": 0.15, "w_min": 0.8, "delta_b": 0.02}
    step = data._step_rule(str(run), data.run_version(str(run)), 1, "cppo", tuple(sorted(params.items())))
    for seq_id in (0, 5):
        one = data._sequence_rule(str(run), data.run_version(str(run)), 1, 0, 0, seq_id, "cppo",
                                  tuple(sorted(params.items())))
        ref = step.filter(step["seq_id"] == seq_id).sort("pos")
        assert one.height == ref.height > 0
        for col in ("keep", "reason", "w", "Z", "S", "c"):
            np.testing.assert_allclose(one[col].to_numpy().astype(float), ref[col].to_numpy().astype(float),
                                       rtol=1e-6, atol=1e-7, err_msg=col)


def test_launch_can_wait_for_a_root_a_trainer_will_create(tmp_path, monkeypatch):
    started = {}

    class FakePopen:
        def __init__(self, cmd, env, stdout, stderr, **kwargs):
            started.update(cmd=cmd, env=env)

    monkeypatch.setattr(app_cmd.subprocess, "Popen", FakePopen)
    later = tmp_path / "runs"
    app_cmd.launch([str(later)], port=8766, allow_missing=True)
    assert started["env"][app_cmd.ROOTS_ENV] == str(later.resolve())
    assert started["cmd"][-2:] == ["--root", str(later.resolve())]


def test_analysis_functions_resolve_to_functions_after_submodule_imports():
    """The app gets the functions, whatever submodules were imported before."""
    import cppo_diag.analyses.recomputation  # noqa: F401
    from cppo_diag.app import data

    for name in ("recompute", "position_stats", "compare_runs", "budget_exhaustion", "whatif_sweep"):
        fn = data._analysis_fn(name)
        assert callable(fn) and fn.__name__ == name


def test_pages_folder_is_views_not_pages():
    """A `pages/` folder next to streamlit_app.py would switch Streamlit to its legacy multipage mode
    (docs/app.md, "Layout of app/")."""
    app_dir = Path(data.__file__).resolve().parent
    assert (app_dir / "views").is_dir() and not (app_dir / "pages").exists()
