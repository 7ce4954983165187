"""The ci-tiny study (the long study's rules and analysis at tiny sizes) end to end with the real bundled trainer:
every run trains, a second invocation skips the finished runs, and the generator writes the results page (the
verdict paragraph first, every rule in the table, the comparison table, the figures) in a temporary directory.
About 75 s of CPU in all (12 runs + the page), so under a minute of wall time with 2 workers on an idle 2-core
machine; 2.5 min measured on the shared dev box at load 5."""

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
    # The page opens with the verdict on CPPO's ordering, with the effects and what each rule masked.
    first = text.split("\n\n")[1]
    assert first.startswith("**In this regime CPPO's ordering (above GRPO-clip and DPPO; each ablation below CPPO) ")
    assert "final held-out accuracy (mean of the last 3 evaluations, steps 2, 3, 4)" in first
    for rule in study.rules:
        if rule != "cppo":
            assert f"vs `{rule}` " in first, rule
        assert f"`{rule}` " in first.split("What the rules did")[1], rule
    assert "lag > 0" in first  # the runs record lag: the tokens the policy had moved on since sampling
    for rule in study.rules:
        assert f"| `{rule}` | 2/2 |" in text, rule
    assert "## Comparisons: `cppo` vs each rule" in text
    assert "| final acc (primary) | `dppo` | 2 |" in text and "| best-so-far acc (secondary, biased upward) |" in text
    assert "n/a (< 10 pairs)" in text and "percentile" not in text.lower()
    assert "Holm adjusts every row of this table together** (" in text
    figs = results.parent / "results"
    for name in ("learning_curves.png", "ablation.png", "effects.png", "learning_curves_by_rule.png", "per_seed.csv"):
        assert (figs / name).stat().st_size > 0, name
    for rule in study.rules:
        assert (figs / f"position_{rule}.png").stat().st_size > 0
        assert (figs / f"budget_{rule}.png").stat().st_size > 0
    assert "## Summary" in text and "- vs `dppo` (Table 1" in text
