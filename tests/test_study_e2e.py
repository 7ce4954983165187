"""The ci-tiny study end to end with the real bundled trainer: every run trains, a second invocation skips the
finished runs, and the analysis writes the results table with every rule."""

from __future__ import annotations

import pytest

from cppo_diag.study.config import load_study
from cppo_diag.study.runner import cell_state

pytestmark = pytest.mark.slow


def _warmstart_missing() -> bool:
    from cppo_diag.train.models import warmstart_dir

    return not warmstart_dir("fib").exists()


@pytest.mark.skipif(_warmstart_missing(), reason="the tiny GPT's shipped warm start (scripts/make_warmstart.py) "
                                                "is not in cppo_diag/train/assets yet")
def test_ci_tiny_study_end_to_end(tmp_path):
    from cppo_diag import list_runs, open_run
    from cppo_diag.cli.main import main
    from cppo_diag.study.runner import run_study

    study = load_study("ci-tiny")
    root = tmp_path / "root"
    results = tmp_path / "docs" / "results.md"
    rc = main(["study", "ci-tiny", "--root", str(root), "--workers", "2", "--results", str(results),
               "--no-progress"])
    assert rc == 0
    cells = study.cells()
    for c in cells:
        st = cell_state(root / c.run_name, study.steps)
        assert st.status == "finished", (c.run_name, st)
        run = open_run(root / c.run_name)
        assert run.meta["rule"] == c.rule and run.meta["config"]["seed"] == c.seed
        assert run.completed_steps() == list(range(study.steps))
    assert sorted(r.name for r in list_runs(root)) == sorted(c.run_name for c in cells)

    # Resume: nothing left to do, so nothing is launched.
    class Refuse:
        def argv(self, cell, study, root, threads=0):
            raise AssertionError(f"finished run {cell.run_name} was launched again")

    rep = run_study(study, root, workers=2, launcher=Refuse(), progress=False)
    assert rep.ok and len(rep.skipped) == len(cells) and not rep.ran

    text = results.read_text()
    for rule in study.rules:
        assert f"| `{rule}` | 2/2 |" in text, rule
    assert "## Paired comparison: `cppo` vs each rule, best_acc" in text
    assert (results.parent / "results" / "learning_curves.png").stat().st_size > 0
    assert (results.parent / "results" / "ablation.png").stat().st_size > 0
    assert (results.parent / "results" / "learning_curves_by_rule.png").stat().st_size > 0
    for rule in study.rules:
        assert (results.parent / "results" / f"position_{rule}.png").stat().st_size > 0
        assert (results.parent / "results" / f"budget_{rule}.png").stat().st_size > 0
    assert "## Summary" in text and "- vs `dppo` (Table 1" in text
