"""Study config loading, the resumable grid runner (with a stand-in training command that writes real runs
through RunRecorder) and the analysis over those runs."""

from __future__ import annotations

import json
import re
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cppo_diag.study.config import PRESETS, StudyConfigError, load_study
from cppo_diag.study.runner import STUDY_DIR, TrainerLauncher, cell_state, read_manifest, run_study

# A stand-in for `cppo-diag train`: writes a real run with RunRecorder, held-out accuracy that depends
# deterministically on (rule, seed, step), a token table with keep_applied / reason_applied, and resumes
# like the trainer (steps already complete are skipped). FAIL_AT=k kills the process hard after step k.
FAKE_TRAINER = textwrap.dedent(
    '''
    import os, sys
    import numpy as np
    from cppo_diag import RunRecorder


    def main(argv):
        root, name, rule, seed, steps = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4])
        fail_at = int(os.environ.get("FAIL_AT", "-1")) if os.environ.get("FAIL_RUN") == name else -1
        gain = {"cppo": 0.05, "grpo_clip": 0.03}.get(rule, 0.02)
        rec = RunRecorder(root, name=name, rule=rule, trainer="fake", config={"seed": seed, "steps": steps},
                          on_error="raise")
        for step in range(steps):
            if rec.is_done(step):
                continue
            rng = np.random.default_rng(1000 * seed + step)
            B, T = 4, 12
            logp_rollout = np.log(rng.uniform(0.2, 1.0, size=(B, T))).astype(np.float32)
            logp = np.minimum(logp_rollout + 0.1 * rng.standard_normal((B, T)), 0.0).astype(np.float32)
            adv = np.array([1.0, -1.0, 0.5, -0.5], dtype=np.float32)
            tv = np.abs(np.exp(logp) - np.exp(logp_rollout))
            keep = tv < 0.08
            reason = np.where(keep, 0, np.where(tv < 0.12, 2, 1)).astype(np.uint8)
            if rule != "cppo":
                reason[~keep] = 1
            rec.log_tokens(step=step, logp=logp, logp_rollout=logp_rollout, advantages=adv,
                           keep_applied=keep, reason_applied=reason)
            rec.log_scalars(step, {"eval/accuracy": 0.2 + gain * step + 0.01 * seed, "reward/mean": 0.5})
            rec.end_step(step)
            if step == fail_at:
                rec.flush()
                os._exit(3)
        rec.close()


    if __name__ == "__main__":
        main(sys.argv[1:])
    '''
)


class FakeLauncher:
    def __init__(self, script: Path):
        self.script = script
        self.calls: list[str] = []

    def argv(self, cell, study, root, threads=0):
        self.calls.append(cell.run_name)
        return [sys.executable, str(self.script), str(root), cell.run_name, cell.rule, str(cell.seed),
                str(study.steps)]


def fake_accuracy(rule: str, seed: int, step: int) -> float:
    return 0.2 + {"cppo": 0.05, "grpo_clip": 0.03}.get(rule, 0.02) * step + 0.01 * seed


def write_study(tmp_path: Path, body: str, name: str = "study.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


SMALL = """
[study]
name = "small"
rules = ["cppo", "grpo_clip"]
seeds = [0, 1, 2]

[trainer]
steps = 4

[analysis]
accuracy = "eval/accuracy"
threshold = 0.3
reference = "cppo"
"""


# -- config -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_and_expand(preset):
    study = load_study(preset)
    cells = study.cells()
    assert len(cells) == len(study.rules) * len(study.seeds) * len(study.settings)
    assert len({c.run_name for c in cells}) == len(cells)
    six = {"grpo_clip", "dppo", "cppo", "cppo_no_weight", "cppo_no_budget", "cppo_shuffled"}
    if preset in ("cpu", "ci-tiny"):
        assert set(study.rules) == six
    if preset == "long":  # and the no-trust-region control
        assert set(study.rules) == six | {"pg_is"}
    if preset == "cpu":
        assert len(study.seeds) >= 5


CALIBRATION = Path(__file__).resolve().parents[2] / "scripts" / "calibration"


@pytest.mark.parametrize("path", sorted(CALIBRATION.glob("*.toml")), ids=lambda p: p.name)
def test_the_calibration_studies_still_load(path):
    """The studies docs/trainer.md cites to reproduce the long preset's calibration and explorations: each must
    still load against today's config schema and rule parameters, a setting's rule parameters naming one of the
    study's rules."""
    study = load_study(str(path))
    assert study.trainer_preset == "long" and study.cells()
    for setting in study.settings:
        for rule in setting.rule_params:
            assert rule in study.rules, (path.name, setting.name, rule)


def test_cells_are_seed_major_with_settings(tmp_path):
    p = write_study(tmp_path, """
        [study]
        rules = ["cppo", "dppo"]
        seeds = 2
        [trainer]
        steps = 3
        set = { "optim.lr" = 1e-3, log = { eval_every = 2 } }
        [rule_params.cppo]
        delta = 0.2
        [[settings]]
        name = "a"
        [[settings]]
        name = "b"
        set = { "optim.lr" = 5e-4 }
        rule_params = { cppo = { w_min = 0.7 } }
    """)
    study = load_study(p)
    cells = study.cells()
    assert [c.run_name for c in cells[:4]] == ["cppo-a-s0", "dppo-a-s0", "cppo-b-s0", "dppo-b-s0"]
    assert [c.seed for c in cells] == [0] * 4 + [1] * 4
    b = cells[2]
    assert b.overrides == {"optim.lr": 5e-4, "log.eval_every": 2}
    assert b.rule_params == {"delta": 0.2, "w_min": 0.7}
    assert b.label == "cppo@b"
    assert cells[1].rule_params == {}


@pytest.mark.parametrize(
    "body, field",
    [
        ('[study]\nrules = []\n[trainer]\nsteps = 2\n', "study.rules"),
        ('[study]\nrules = ["cppo", "cppo"]\n[trainer]\nsteps = 2\n', "study.rules"),
        ('[study]\nrules = ["no_such_rule"]\n[trainer]\nsteps = 2\n', "study.rules"),
        ('[study]\nrules = ["cppo"]\nseeds = 0\n[trainer]\nsteps = 2\n', "study.seeds"),
        ('[study]\nrules = ["cppo"]\n[trainer]\nsteps = 0\n', "trainer.steps"),
        ('[study]\nrules = ["cppo"]\n[trainer]\nsteps = 2\nset = { seed = 3 }\n', "trainer.set.seed"),
        ('[study]\nrules = ["cppo"]\n[trainer]\nsteps = 2\n[analysis]\nprimary = "mean"\n', "analysis.primary"),
        ('[study]\nrules = ["cppo"]\n[trainer]\nsteps = 2\n[analysis]\nacuracy = "x"\n', "analysis"),
        ('[study]\nrules = ["cppo"]\n[trainer]\nsteps = 2\n[[settings]]\nname = "a"\n[[settings]]\nname = "a"\n',
         "settings[].name"),
        ('[stduy]\nrules = ["cppo"]\n', "<top level>"),
        ('[study]\nrules = ["cppo"]\n[trainer]\nsteps = 2\n[rule_params.cppo]\ndelat = 0.1\n', "rule_params.cppo"),
        ('[study]\nrules = ["cppo"]\n[trainer]\nsteps = 2\n[rule_params.dppo]\ndelta = 0.1\n', "rule_params.dppo"),
    ],
)
def test_config_errors_name_the_field(tmp_path, body, field):
    p = write_study(tmp_path, body)
    with pytest.raises(StudyConfigError, match=re.escape(f"field '{field}'")):
        load_study(p)


def test_unknown_preset_or_missing_file():
    with pytest.raises(StudyConfigError, match="expected a preset"):
        load_study("nope-not-a-file.toml")


def test_yaml_study(tmp_path):
    p = write_study(tmp_path, """
        study: {name: y, rules: [cppo], seeds: [3, 4]}
        trainer: {steps: 2, preset: demo}
    """, name="s.yaml")
    study = load_study(p)
    assert study.seeds == (3, 4) and study.trainer_preset == "demo"


def test_trainer_launcher_command(tmp_path):
    p = write_study(tmp_path, """
        [study]
        rules = ["cppo"]
        seeds = [7]
        [trainer]
        preset = "demo"
        steps = 5
        [trainer.set]
        "log.eval_every" = 2
        "log.progress" = false
        [rule_params.cppo]
        delta = 0.2
    """)
    study = load_study(p)
    argv = TrainerLauncher(python="py").argv(study.cells()[0], study, tmp_path / "root", threads=1)
    assert argv[:6] == ["py", "-m", "cppo_diag.cli.main", "train", "--preset", "demo"]
    flat = " ".join(argv)
    for piece in ("--log.eval_every 2", "--log.progress false", "--rule.name cppo", "--seed 7", "--steps 5",
                  f"--log.out_dir {tmp_path / 'root'}", "--log.name cppo-s7", "--threads 1",
                  "--rule.param delta=0.2"):
        assert piece in flat


# -- runner ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    script = tmp_path_factory.mktemp("fake") / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    return script


@pytest.mark.slow
def test_runner_runs_grid_resumes_and_skips(tmp_path, fake, monkeypatch):
    from cppo_diag import list_runs

    study = load_study(write_study(tmp_path, SMALL.replace("seeds = [0, 1, 2]", "seeds = [0, 1]")))
    root = tmp_path / "root"

    # First pass: one run is killed after its step 1 (of 4); the others finish.
    monkeypatch.setenv("FAIL_RUN", "grpo_clip-s1")
    monkeypatch.setenv("FAIL_AT", "1")
    launcher = FakeLauncher(fake)
    rep = run_study(study, root, workers=2, launcher=launcher, progress=False, poll_s=0.05)
    assert sorted(launcher.calls) == sorted(c.run_name for c in study.cells())
    assert list(rep.failed) == ["grpo_clip-s1"] and "exit code 3" in rep.failed["grpo_clip-s1"]
    assert len(rep.ran) == 3 and not rep.skipped
    st = cell_state(root / "grpo_clip-s1", study.steps)
    assert (st.status, st.completed_steps) == ("partial", 2)
    assert (root / STUDY_DIR / "logs" / "grpo_clip-s1.log").is_file()

    # Second pass: only the killed run is launched again, and it continues where it stopped.
    monkeypatch.delenv("FAIL_RUN")
    launcher = FakeLauncher(fake)
    rep = run_study(study, root, workers=1, launcher=launcher, progress=False, poll_s=0.05)
    assert launcher.calls == ["grpo_clip-s1"]
    assert rep.ok and rep.ran == ["grpo_clip-s1"] and len(rep.skipped) == 3
    from cppo_diag import open_run

    run = open_run(root / "grpo_clip-s1")
    steps = run.steps()
    assert steps["step"].to_list() == [0, 1, 2, 3]  # no duplicated or missing step
    assert run.tokens().select(pl.col("step").unique().sort()).collect()["step"].to_list() == [0, 1, 2, 3]

    # Third pass: everything finished, nothing is launched.
    launcher = FakeLauncher(fake)
    rep = run_study(study, root, workers=2, launcher=launcher, progress=False, poll_s=0.05)
    assert launcher.calls == [] and len(rep.skipped) == 4

    # The root is browsable: every run is listed, the _study folder is not a run.
    names = sorted(r.name for r in list_runs(root))
    assert names == sorted(c.run_name for c in study.cells())
    manifest = read_manifest(root)
    assert [c["run_name"] for c in manifest["cells"]] == [c.run_name for c in study.cells()]


def test_runner_rejects_bad_workers(tmp_path):
    study = load_study(write_study(tmp_path, SMALL))
    with pytest.raises(ValueError, match="workers"):
        run_study(study, tmp_path / "r", workers=0, progress=False)


# -- analysis over the runs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_study(tmp_path_factory):
    """The SMALL grid written in-process by the stand-in trainer (no subprocess start-up cost)."""
    from cppo_diag.study.runner import write_manifest

    tmp_path = tmp_path_factory.mktemp("study")
    study = load_study(write_study(tmp_path, SMALL))
    root = tmp_path / "root"
    ns: dict = {"__name__": "fake_trainer"}
    exec(FAKE_TRAINER, ns)
    for c in study.cells():
        ns["main"]([str(root), c.run_name, c.rule, str(c.seed), str(study.steps)])
    write_manifest(study, root)
    assert all(cell_state(root / c.run_name, study.steps).status == "finished" for c in study.cells())
    return study, root


def test_per_seed_metrics_and_table(fake_study):
    from cppo_diag.study.analysis import (collect_study, comparison_table, paired_comparisons, per_seed_metrics,
                                          results_table)
    from cppo_diag.study.stats import km_restricted_mean

    study, root = fake_study
    data = collect_study(root, study.analysis)
    ps = per_seed_metrics(data).sort("rule", "seed")
    for row in ps.iter_rows(named=True):
        r, s = row["rule"], row["seed"]
        assert row["initial_acc"] == pytest.approx(fake_accuracy(r, s, 0))
        # Primary: the mean of the last 3 evaluations after the initial one (steps 1, 2, 3).
        assert row["final_acc"] == pytest.approx(np.mean([fake_accuracy(r, s, t) for t in (1, 2, 3)]))
        assert row["final_steps"] == "1,2,3"
        assert row["last_acc"] == pytest.approx(fake_accuracy(r, s, 3))
        assert row["best_acc"] == pytest.approx(fake_accuracy(r, s, 3))
        # First step with accuracy >= 0.3
        first = next((t for t in range(4) if fake_accuracy(r, s, t) >= 0.3), None)
        if first is None:  # censored: never reached, followed up to the last evaluation
            assert math.isnan(row["steps_to_threshold"]) and row["reached"] is False
        else:
            assert row["steps_to_threshold"] == first and row["reached"] is True
        assert row["followup"] == 3
        assert 0 < row["masked_frac"] < 1
        if r == "grpo_clip":
            assert row["budget_share"] == 0.0
        assert row["mean_tv"] > 0
    table = results_table(ps)
    for rule in ("cppo", "grpo_clip"):
        got = next(t for t in table if t["rule"] == rule)
        vals = [np.mean([fake_accuracy(rule, s, t) for t in (1, 2, 3)]) for s in (0, 1, 2)]
        assert got["final_acc"].mean == pytest.approx(np.mean(vals)) and got["final_acc"].n == 3
        # Steps to 0.3 as a Kaplan-Meier restricted mean to step 3: unreached seeds censored at step 3.
        times, events = [], []
        for s in (0, 1, 2):
            first = next((t for t in range(4) if fake_accuracy(rule, s, t) >= 0.3), None)
            times.append(3.0 if first is None else float(first))
            events.append(first is not None)
        want = km_restricted_mean(times, events, tau=3)
        assert got["rmst"].rmst == pytest.approx(want.rmst) and got["rmst"].se == pytest.approx(want.se)
        assert got["reached"] == sum(events)
    comps = paired_comparisons(ps, reference="cppo", metric="final_acc")
    assert len(comps) == 1
    c = comps[0]
    # Same seed offset on both sides: the difference is the same on every seed (0.02 * mean(1, 2, 3)).
    assert c.mean_diff == pytest.approx(0.04) and c.wins == 3 and c.losses == 0
    assert c.p_holm == pytest.approx(c.p_ttest)
    ctab = comparison_table(ps, reference="cppo")
    assert [x.metric for x in ctab.paired] == ["final_acc", "best_acc"] and len(ctab.steps) == 1
    assert ctab.steps[0].diff < 0  # CPPO reaches 0.3 sooner


def _synthetic_per_seed(values: dict[str, list[float]], *, seed: int = 0, steps: dict | None = None) -> pl.DataFrame:
    """A per-seed frame as per_seed_metrics writes it, from final accuracies per rule (best = final + noise)."""
    rng = np.random.default_rng(seed)
    rows = []
    for rule, vals in values.items():
        for s, v in enumerate(vals):
            st = (steps or {}).get(rule, [None] * len(vals))[s]
            rows.append(dict(label=rule, rule=rule, setting="", seed=s, run=f"{rule}-s{s}", status="finished",
                             initial_acc=0.3, final_acc=v, last_acc=v, best_acc=v + abs(rng.normal(0, 0.02)),
                             steps_to_threshold=float("nan") if st is None else float(st), reached=st is not None,
                             followup=80, final_steps="60,70,80", updates="after_first",
                             masked_frac={"cppo": 0.031}.get(rule, 0.012),
                             budget_share={"cppo": 0.25}.get(rule, 0.0), mean_tv=0.01))
    return pl.DataFrame(rows)


def test_holm_runs_over_every_comparison_and_metric():
    from cppo_diag.study.analysis import comparison_table
    from cppo_diag.study.stats import holm_adjust

    rng = np.random.default_rng(5)
    base = rng.normal(0.5, 0.05, size=8)
    ps = _synthetic_per_seed({"cppo": list(base + 0.03), "grpo_clip": list(base + rng.normal(0, 0.02, 8)),
                              "dppo": list(base + rng.normal(0.01, 0.02, 8))},
                             steps={"cppo": [20, 30, 30, 40, None, 20, 30, 50],
                                    "grpo_clip": [40, None, None, 60, 70, 40, None, 30],
                                    "dppo": [30, 40, None, 50, 30, 60, 70, None]})
    ctab = comparison_table(ps, reference="cppo")
    assert len(ctab.paired) == 4 and len(ctab.steps) == 2 and ctab.family_size == 6
    raw = [c.p_ttest for c in ctab.paired] + [c.p for c in ctab.steps]
    np.testing.assert_allclose([c.p_holm for c in ctab.paired] + [c.p_holm for c in ctab.steps], holm_adjust(raw))
    raw_sf = [c.p_sign_flip for c in ctab.paired] + [c.p for c in ctab.steps]
    np.testing.assert_allclose([c.p_holm_sign_flip for c in ctab.paired], holm_adjust(raw_sf)[:4])
    # Not per metric: the smallest final_acc p is multiplied by the whole family (6), not by 2.
    final = ctab.by_metric("final_acc")
    smallest = min(final, key=lambda c: c.p_ttest)
    assert smallest.p_holm == pytest.approx(min(1.0, 6 * min(raw)) if smallest.p_ttest == min(raw) else
                                            holm_adjust(raw)[raw.index(smallest.p_ttest)])
    assert smallest.p_holm > holm_adjust([c.p_ttest for c in final])[final.index(smallest)] or smallest.p_holm == 1.0
    assert all(math.isnan(c.bca_lo) for c in ctab.paired)  # 8 pairs: no bootstrap interval


@pytest.mark.parametrize(
    "shift, verdict",
    [
        (0.05, "holds"),  # CPPO clearly above every rule
        (-0.05, "does not hold"),  # CPPO clearly below
        (0.0, "is inconclusive"),  # no difference beyond the noise
    ],
)
def test_headline_says_whether_the_ordering_holds(shift, verdict):
    from cppo_diag.study.analysis import comparison_table, headline, results_table
    from cppo_diag.study.config import AnalysisConfig

    rng = np.random.default_rng(11)
    base = rng.normal(0.5, 0.05, size=8)
    rules = ["grpo_clip", "dppo", "cppo_no_weight", "cppo_no_budget", "cppo_shuffled"]
    values = {"cppo": list(base + shift)} | {r: list(base + rng.normal(0, 0.004, 8)) for r in rules}
    ps = _synthetic_per_seed(values)
    an = AnalysisConfig()
    ctab = comparison_table(ps, reference="cppo")
    text = headline(ps, results_table(ps), ctab, an)
    assert text.startswith(f"**In this regime CPPO's ordering (above GRPO-clip and DPPO; each ablation below CPPO) "
                           f"{verdict}**")
    assert "mean of the last 3 evaluations, steps 60, 70, 80" in text
    c = next(c for c in ctab.by_metric("final_acc") if c.b == "dppo")
    assert f"vs `dppo` {c.mean_diff:+.3f} [{c.ci_lo:.3f}, {c.ci_hi:.3f}]" in text
    assert f"all {ctab.family_size} comparisons" in text
    assert "`cppo` 3.10% (budget share 25%)" in text and "`dppo` 1.20% (no budget masking)" in text
    assert "updates after the first of each batch" in text


def test_headline_says_what_the_control_did():
    """A study with the no-trust-region control (pg_is) says what it did: before -> after, and the reference's
    paired difference to it."""
    from cppo_diag.study.analysis import comparison_table, headline, results_table
    from cppo_diag.study.config import AnalysisConfig

    ps = _synthetic_per_seed({"cppo": [0.6, 0.62, 0.61, 0.64], "dppo": [0.5, 0.52, 0.5, 0.55],
                              "pg_is": [0.01, 0.0, 0.03, 0.02]})
    ctab = comparison_table(ps, reference="cppo")
    text = headline(ps, results_table(ps), ctab, AnalysisConfig())
    c = next(c for c in ctab.by_metric("final_acc") if c.b == "pg_is")
    assert "The no-trust-region control `pg_is`: held-out accuracy 0.300 at the start, 0.015 final" in text
    assert "2 of the 2 other rules ended above it" in text
    assert f"the reference `cppo` by {c.mean_diff:+.3f} [{c.ci_lo:.3f}, {c.ci_hi:.3f}]" in text
    assert "control" not in headline(ps.filter(ps["rule"] != "pg_is"), results_table(ps.filter(ps["rule"] != "pg_is")),
                                     ctab, AnalysisConfig())


def test_headline_without_the_reference_or_with_missing_rules():
    from cppo_diag.study.analysis import comparison_table, headline, results_table
    from cppo_diag.study.config import AnalysisConfig

    ps = _synthetic_per_seed({"cppo": [0.6, 0.62, 0.61], "dppo": [0.5, 0.52, 0.5]})
    text = headline(ps, results_table(ps), comparison_table(ps, reference="cppo"), AnalysisConfig())
    assert text.startswith("**In this regime CPPO's ordering (above GRPO-clip and DPPO; each ablation below CPPO) "
                           "holds for the rules this study ran** (not run here: `grpo_clip`, `cppo_no_weight`, "
                           "`cppo_no_budget`, `cppo_shuffled`)")
    ps = _synthetic_per_seed({"grpo_clip": [0.6, 0.62], "dppo": [0.5, 0.52]})
    text = headline(ps, results_table(ps), comparison_table(ps, reference="dppo"), AnalysisConfig(reference="dppo"))
    assert text.startswith("This study does not test CPPO's ordering")


def test_masked_fraction_matches_tokens(fake_study):
    from cppo_diag import open_run
    from cppo_diag.study.analysis import token_summary

    _, root = fake_study
    run = open_run(root / "cppo-s0")
    df = run.tokens().collect()
    s = token_summary(run)
    masked = (~df["keep_applied"]).sum()
    assert s["masked_frac"] == pytest.approx(masked / df.height)
    assert s["budget_share"] == pytest.approx((df["reason_applied"] == 2).sum() / masked)
    tv = (df["logp"].exp() - df["logp_rollout"].exp()).abs().mean()
    assert s["mean_tv"] == pytest.approx(tv, rel=1e-5)


def test_results_page_and_figures(fake_study, tmp_path):
    from cppo_diag.study.analysis import analyse_study

    study, root = fake_study
    page = analyse_study(root, tmp_path / "out" / "results.md", analysis=study.analysis, progress=False,
                         command="cppo-diag study small.toml --root root")
    text = page.read_text()
    figs = tmp_path / "out" / "results"
    for name in ("learning_curves.png", "ablation.png", "effects.png", "position_cppo.png", "position_grpo_clip.png",
                 "budget_cppo.png", "budget_grpo_clip.png", "per_seed.csv"):
        assert (figs / name).stat().st_size > 0, name
    assert "| `cppo` | 3/3 |" in text and "| `grpo_clip` | 3/3 |" in text
    assert "## Comparisons: `cppo` vs each rule" in text
    # The first paragraph after the title is the verdict on CPPO's ordering.
    assert text.split("\n\n")[1].startswith("**In this regime CPPO's ordering")
    # The comparison rows carry the numbers of paired_comparison on the per-seed values.
    per_seed = pl.read_csv(figs / "per_seed.csv")
    for metric, name in (("final_acc", "final acc (primary)"), ("best_acc", "best-so-far acc (secondary, biased")):
        a = per_seed.filter(pl.col("rule") == "cppo").sort("seed")[metric].to_numpy()
        b = per_seed.filter(pl.col("rule") == "grpo_clip").sort("seed")[metric].to_numpy()
        assert f"| {name}" in text and f"| `grpo_clip` | 3 | {np.mean(a - b):.3f} [" in text
    assert "| steps to 0.3 (KM restricted mean to step 3) | `grpo_clip` | 3/3 seeds |" in text
    # 3 pairs: no bootstrap interval of any kind, and never a percentile one.
    assert "n/a (< 10 pairs)" in text and "percentile" not in text.lower()
    assert "results/learning_curves.png" in text and "cppo-diag study small.toml" in text


def test_bundled_trainer_eval_steps_map_to_iterations(tmp_path):
    """The trainer logs the eval after iteration s on step s and the initial eval on step 0; the curve is
    against iterations completed, with the initial value from summary/<name>_before when step 0 was an eval."""
    from cppo_diag import RunRecorder, open_run
    from cppo_diag.study.analysis import _accuracy_curve

    def write(name, every, steps, evals, before):
        with RunRecorder(tmp_path, name=name, trainer="cppo-diag",
                         config={"steps": steps, "log": {"eval_every": every}}) as rec:
            if before is not None and every != 1:
                rec.log_scalars(0, {"eval/greedy_acc": before})
            for s in range(steps):
                vals = {"reward/mean": 0.1}
                if s in evals:
                    vals["eval/greedy_acc"] = evals[s]
                if s == steps - 1:
                    vals["summary/greedy_acc_before"] = before
                rec.log_scalars(s, vals)
                rec.end_step(s)
        return open_run(tmp_path / name)

    run = write("a", 2, 5, {1: 0.4, 3: 0.5, 4: 0.6}, 0.3)
    c = _accuracy_curve(run, "eval/greedy_acc")
    assert c["step"].to_list() == [0, 2, 4, 5] and c["accuracy"].to_list() == [0.3, 0.4, 0.5, 0.6]
    run = write("b", 1, 3, {0: 0.4, 1: 0.5, 2: 0.6}, 0.2)
    c = _accuracy_curve(run, "eval/greedy_acc")
    assert c["step"].to_list() == [0, 1, 2, 3] and c["accuracy"].to_list() == [0.2, 0.4, 0.5, 0.6]
    with pytest.raises(KeyError, match="eval/nope"):
        _accuracy_curve(run, "eval/nope")


def test_cli_dry_run_lists_grid(tmp_path, capsys):
    from cppo_diag.cli.main import main

    p = write_study(tmp_path, SMALL)
    assert main(["study", str(p), "--root", str(tmp_path / "r"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 runs, 4 steps each" in out and "grpo_clip-s2" in out and "--rule.name cppo" in out
    assert not (tmp_path / "r").exists()
    assert main(["study", str(tmp_path / "missing.toml"), "--root", str(tmp_path / "r")]) == 2
    assert main(["study", str(p), "--root", str(tmp_path / "nope"), "--analyse-only"]) == 2


def test_cli_refuses_an_unknown_trainer_preset_before_launching(tmp_path, capsys):
    from cppo_diag.cli.main import main

    p = write_study(tmp_path, SMALL.replace("[trainer]\n", '[trainer]\npreset = "no-such-preset"\n'))
    root = tmp_path / "r"
    assert main(["study", str(p), "--root", str(root), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "field 'trainer.preset'" in err and "'no-such-preset'" in err and "demo" in err
    assert not root.exists()  # nothing launched, nothing written
    assert main(["study", str(p), "--root", str(root), "--dry-run"]) == 0  # the grid can still be listed


def test_analysis_counts_missing_runs(tmp_path):
    """A cell whose run never ran stays in the table as a missing seed; comparisons use the complete pairs."""
    from cppo_diag.study.analysis import analyse_study, collect_study, paired_comparisons, per_seed_metrics
    from cppo_diag.study.runner import write_manifest

    study = load_study(write_study(tmp_path, SMALL))
    root = tmp_path / "root"
    ns: dict = {"__name__": "fake_trainer"}
    exec(FAKE_TRAINER, ns)
    for c in study.cells():
        if c.run_name != "grpo_clip-s2":
            ns["main"]([str(root), c.run_name, c.rule, str(c.seed), str(study.steps)])
    # A run that stopped early (status failed) is listed but not compared.
    meta_path = root / "cppo-s1" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "status": "failed"}))
    write_manifest(study, root)
    ps = per_seed_metrics(collect_study(root, study.analysis))
    missing = ps.filter(pl.col("run") == "grpo_clip-s2").row(0, named=True)
    assert missing["status"] == "missing" and math.isnan(missing["final_acc"])
    failed = ps.filter(pl.col("run") == "cppo-s1").row(0, named=True)
    assert failed["status"] == "failed" and math.isnan(failed["best_acc"]) and math.isnan(failed["masked_frac"])
    (c,) = paired_comparisons(ps, reference="cppo", metric="final_acc")
    assert c.n == 1  # only seed 0 has both
    text = analyse_study(root, tmp_path / "r.md", analysis=study.analysis, progress=False).read_text()
    assert "| `grpo_clip` | 2/3 |" in text and "| `cppo` | 2/3 |" in text
    assert "Runs found: 5/6" in text and "missing 1" in text and "failed 1" in text


def _resolve_trainer_config(study, preset: str | None = None):
    """The bundled trainer's config of the study's first cell (its preset, then the study's overrides)."""
    from cppo_diag.train.config import build_config

    cell = study.cells()[0]
    nested: dict = {"steps": study.steps, "seed": cell.seed, "rule": {"name": cell.rule, "params": cell.rule_params}}
    for key, value in cell.overrides.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return build_config(preset or study.trainer_preset, overrides=nested)


@pytest.mark.parametrize("preset", ["cpu", "ci-tiny", "long"])
def test_study_presets_resolve_against_the_trainer(preset):
    """Every override of the CPU-trainer study presets is a key the trainer knows, on its named preset."""
    from cppo_diag.train.config import PRESETS as TRAIN_PRESETS

    study = load_study(preset)
    assert study.trainer_preset in TRAIN_PRESETS
    cfg = _resolve_trainer_config(study)
    assert cfg.steps == study.steps
    if preset in ("ci-tiny", "long"):
        # The long regime's shape: several updates per batch, so the analysis pools the updates after the first.
        assert cfg.optim.epochs * cfg.optim.updates_per_batch >= 2
        assert cfg.log.eval_every >= 1 and study.steps // cfg.log.eval_every >= study.analysis.final_window


def test_long_study_preset():
    study = load_study("long")
    assert study.trainer_preset == "long"
    assert set(study.rules) == {"grpo_clip", "dppo", "cppo", "cppo_no_weight", "cppo_no_budget", "cppo_shuffled",
                                "pg_is"}
    assert len(study.seeds) >= 8 and len(study.cells()) == 7 * len(study.seeds)
    assert study.analysis.primary == "final" and study.analysis.final_window == 3
    ci = load_study("ci-tiny")  # the same rules but the control (its machinery is the same), at tiny sizes
    assert list(ci.rules) == [r for r in study.rules if r != "pg_is"] and ci.rule_params == study.rule_params
    assert (ci.analysis.primary, ci.analysis.final_window, ci.analysis.accuracy) == (
        study.analysis.primary, study.analysis.final_window, study.analysis.accuracy)


def test_ci_tiny_is_the_long_trainer_preset_shrunk():
    """ci-tiny runs the `long` preset itself (chain with forks, stale bf16 rollouts), shrunk by its overrides."""
    study = load_study("ci-tiny")
    assert study.trainer_preset == "long"
    cfg = _resolve_trainer_config(study)
    assert cfg.steps == 4 and cfg.rollout.prompts_per_step * cfg.rollout.n <= 16
    assert (cfg.task.kind, cfg.task.max_terms, cfg.rollout.precision) == ("chain", 32, "bf16")
    from cppo_diag.train import build_config

    assert cfg.rollout.staleness == build_config("long").rollout.staleness > 0
    assert cfg.rollout.max_new_tokens == cfg.task.max_terms + 1 and cfg.task.forks > 0


def test_a_run_that_records_every_kth_step_is_finished(tmp_path):
    """The bundled trainer records tokens (and _done markers) on every log.every_n_steps-th iteration only: a
    finished 7-step run with every_n_steps 3 holds steps 0, 3, 6 and is finished; without step 6 it is partial."""
    import numpy as np

    from cppo_diag import RunRecorder

    def write(name, steps):
        rec = RunRecorder(tmp_path, name=name, trainer="cppo-diag", rule="cppo",
                          config={"steps": 7, "log": {"every_n_steps": 3}})
        for step in steps:
            lp = np.full((2, 4), -1.0, dtype=np.float32)
            rec.log_tokens(step=step, update=0, logp=lp, logp_rollout=lp, advantages=np.array([1.0, -1.0], np.float32),
                           response_mask=np.ones((2, 4), bool))
            rec.end_step(step)
        rec.close()
        return tmp_path / name

    assert cell_state(write("every3", [0, 3, 6]), 7).status == "finished"
    assert cell_state(write("short", [0, 3]), 7).status == "partial"
