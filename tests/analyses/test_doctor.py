"""``cppo-diag doctor`` (analyses/doctor.py): the statistics against plain loops / scipy, the findings on
synthetic healthy and collapsing runs written through RunRecorder, the JSON shape, unusable input, the report
section and the app page."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cppo_diag.analyses import doctor as D


# -- statistics ---------------------------------------------------------------------------------------------------


def test_collapse_step_definition():
    r = [0.5, 0.6, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    out = D.collapse_step(range(len(r)), r)
    ma = D.moving_average(r)
    # plain loop: trailing mean over the last 5 (fewer at the start), running max, first MA < max / 2
    run_max, want = -np.inf, None
    for i in range(len(r)):
        lo = max(0, i - 4)
        m = float(np.mean(r[lo:i + 1]))
        assert ma[i] == pytest.approx(m)
        run_max = max(run_max, m)
        if want is None and m < 0.5 * run_max:
            want = i
    assert out["step"] == want == 14 and out["peak_step"] == 7  # first step at the maximum
    assert D.collapse_step(range(10), [0.5] * 10)["step"] is None
    # NaN rewards are dropped, steps kept
    assert D.collapse_step([0, 1, 2, 3], [1.0, np.nan, 0.1, 0.1])["step"] == 3


def test_mann_kendall_matches_scipy_kendall_tau():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for trend in (0.0, 0.05, -0.05):
        y = np.round(rng.normal(size=40) + trend * np.arange(40), 1)  # ties included
        mk = D.mann_kendall(y)
        s = sum(np.sign(y[j] - y[i]) for i in range(40) for j in range(i + 1, 40))
        assert mk["S"] == s
        res = stats.kendalltau(np.arange(40), y)  # same test on (time, y); its p is two-sided, no continuity corr.
        assert np.sign(mk["z"]) == np.sign(res.statistic) or abs(mk["z"]) < 0.2
        assert min(mk["p_increasing"], mk["p_decreasing"]) * 2 == pytest.approx(res.pvalue, rel=0.15, abs=0.01)


def test_theil_sen_is_the_median_pairwise_slope():
    rng = np.random.default_rng(1)
    x, y = np.arange(15.0), rng.normal(size=15) + 0.3 * np.arange(15)
    slopes = [(y[j] - y[i]) / (x[j] - x[i]) for i in range(15) for j in range(i + 1, 15)]
    assert D.theil_sen(x, y) == pytest.approx(float(np.median(slopes)))


def test_cusum_alarms_on_a_sustained_rise_not_on_noise_or_one_spike():
    rng = np.random.default_rng(2)
    false_alarms = sum(D.cusum_up(rng.normal(0, 0.5, 60))["alarm"] is not None for _ in range(200))
    assert false_alarms <= 10  # in-control: rare
    spike = rng.normal(0, 0.3, 40)
    spike[20] += 10.0
    assert D.cusum_up(spike)["alarm"] is None  # one outlier adds at most z_cap - k
    y = np.concatenate([rng.normal(0, 0.3, 20), rng.normal(1.5, 0.3, 20)])
    res = D.cusum_up(y)
    assert res["alarm"] is not None and 20 <= res["alarm"] <= 24 and 18 <= res["start"] <= res["alarm"]
    # downward changes never alarm (one-sided)
    assert D.cusum_up(-y)["alarm"] is None


def test_sequential_trend_finds_a_gradual_rise_and_stays_quiet_on_noise():
    rng = np.random.default_rng(3)
    steps = np.arange(60)
    quiet = sum(D.trend_up(steps, rng.normal(0, 0.5, 60))["alarm"] is not None for _ in range(100))
    assert quiet <= 3
    # falling series (healthy runs: tails shrink as the policy sharpens) never alarm
    assert D.trend_up(steps, -0.03 * steps + rng.normal(0, 0.2, 60))["alarm"] is None
    # a slow rise, too gradual for a change-point test: log doubles every 10 steps
    y = 0.07 * steps + rng.normal(0, 0.2, 60)
    res = D.trend_up(steps, y)
    assert res["alarm"] is not None and res["alarm"] < 20 and res["p"] < D.TREND_ALPHA
    assert res["rise"] >= D.TREND_MIN_RISE
    # a significant but tiny trend (less than a doubling over the window) is not an alarm
    assert D.trend_up(steps, 0.005 * steps + rng.normal(0, 0.02, 60))["alarm"] is None
    # nor a rise smaller than twice the scatter around the fit, however significant
    y = 0.025 * steps + np.random.default_rng(6).normal(0, 0.6, 60)
    assert D.trend_up(steps, y, min_snr=0.0)["alarm"] is not None and D.trend_up(steps, y)["alarm"] is None


# -- synthetic runs ---------------------------------------------------------------------------------------------


def _write(root: Path, name: str, *, n_steps=40, collapse_at=None, drift_from=None, seed=0, rule="grpo_clip",
           entropy=True, keep=True, rollout_copy=False, updates=(0, 1), params=None, dip=None):
    """A run through RunRecorder: 2 updates per step; update 0 has pi = mu (+ float noise), update 1 moves by a
    t(3) log-ratio of scale 0.1, growing x1.25 per step from ``drift_from``; reward/mean 0.6 + noise, dropping to
    0.05 from ``collapse_at`` (or over the steps ``range(*dip)`` only)."""
    import torch

    from cppo_diag import RunRecorder, compute_mask

    rng = np.random.default_rng(seed)
    params = dict(params or {})
    rec = RunRecorder(root, name=name, trainer="cppo-diag", rule=rule, rule_params=params, config={})
    B, T = 16, 32
    for step in range(n_steps):
        lengths = rng.integers(8, T + 1, size=B)
        mask = np.arange(T)[None, :] < lengths[:, None]
        lq = np.log(np.clip(rng.beta(2.0, 0.5, size=(B, T)), 1e-4, 1 - 1e-6)).astype(np.float32)
        rewards = rng.integers(0, 2, size=B).astype(np.float32)
        adv = (rewards - rewards.mean()).astype(np.float32)
        scale = 0.1 * (1.25 ** max(0, step - drift_from) if drift_from is not None else 1.0)
        for u in updates:
            noise = 1e-7 if u == 0 else scale
            lp = np.minimum(lq + noise * rng.standard_t(3, size=(B, T)), 0.0).astype(np.float32)
            if rollout_copy:
                lp = lq.copy()
            kw = {}
            if keep:
                res = compute_mask(rule, logp=torch.from_numpy(lp), logp_rollout=torch.from_numpy(lq),
                                   advantages=torch.from_numpy(adv), response_mask=torch.from_numpy(mask), **params)
                kw["keep_applied"] = res.keep.numpy()
            if entropy:
                kw["entropy"] = np.full((B, T), 0.3 + 0.01 * rng.normal(), dtype=np.float32)
            rec.log_tokens(step=step, update=u, logp=lp, logp_rollout=lq, advantages=adv, response_mask=mask, **kw)
        r = 0.6 + 0.03 * rng.normal()
        if (collapse_at is not None and step >= collapse_at) or (dip is not None and dip[0] <= step < dip[1]):
            r = 0.05
        rec.log_scalars(step, {"reward/mean": r})
        rec.end_step(step)
    rec.close()
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor_runs")
    return {
        "healthy": _write(root, "healthy", seed=1),
        "collapsing": _write(root, "collapsing", seed=2, drift_from=18, collapse_at=30),
        "short": _write(root, "short", n_steps=4, seed=3),
        "bare": _write(root, "bare", seed=4, entropy=False, keep=False, n_steps=10),
        "copy": _write(root, "copy", seed=5, rollout_copy=True, n_steps=10),
        "single": _write(root, "single", seed=6, updates=(0,), n_steps=30),
        "loose": _write(root, "loose", seed=7, rule="dppo", params={"delta": 2.0}, n_steps=12),
    }


def _alarms(fs):
    return [f for f in fs if f.severity in ("warning", "critical")]


def test_healthy_run_has_no_warning(runs, tmp_path):
    fs = D.diagnose(runs["healthy"], out_dir=tmp_path)
    assert _alarms(fs) == [], [(f.id, f.message) for f in fs]


def test_collapsing_run_warns_before_the_collapse(runs, tmp_path):
    fs = D.diagnose(runs["collapsing"], out_dir=tmp_path, budget=False)
    by_id = {f.id: f for f in fs}
    col = by_id["reward_collapse"]
    assert col.severity == "critical" and col.first_step == 32  # MA of [.6, .6, .05, .05, .05] = 0.27 < 0.6 / 2
    tail = by_id["divergence_tails_rising"]  # the change-point test: a change, reported as info
    assert tail.severity == "info" and 18 <= tail.first_step < col.first_step
    assert tail.evidence["updates"] == "after_first" and tail.evidence["ratio_to_reference"] > 1.5
    assert tail.page == "Divergence by position" and tail.steps[0] <= tail.first_step
    run_away = by_id["divergence_runaway"]  # the warning: the tail's trailing median past the level
    assert run_away.severity == "warning" and tail.first_step <= run_away.first_step < col.first_step
    assert run_away.evidence["value_at_alarm"] >= D.DOCTOR_SETTINGS.runaway_level
    assert run_away.evidence["change_start_step"] <= run_away.first_step
    imminent = by_id["collapse_imminent"]  # critical before the reward has fallen to half: the guard's halt
    assert imminent.severity == "critical" and run_away.first_step <= imminent.first_step < col.first_step
    assert imminent.evidence["moving_average"] < D.DOCTOR_SETTINGS.imminent_fraction * imminent.evidence["running_max"]
    masked = by_id["masked_frac_rising"]  # grpo_clip masks more as the ratio spreads, before the runaway: info
    assert masked.severity == "info" and masked.first_step < run_away.first_step
    assert masked.evidence["mann_kendall_p"] < D.ALPHA and masked.evidence["theil_sen_rise"] >= masked.evidence["reference_median"]
    for f in (col, tail, run_away, imminent):  # a figure beside the report for each
        assert f.figure and Path(f.figure).exists() and Path(f.figure).stat().st_size > 1000
    assert [f.severity for f in fs[:2]] == ["critical", "critical"]  # most severe first


def test_logs_that_cannot_support_a_finding_are_info_findings(runs):
    short = {f.id: f for f in D.diagnose(runs["short"], budget=False)}
    assert short["too_few_steps"].severity == "info" and short["too_few_steps"].evidence["logged_steps"] == 4
    bare = {f.id for f in D.diagnose(runs["bare"], budget=False)}
    assert {"no_entropy", "no_applied_mask"} <= bare
    single = D.diagnose(runs["single"], budget=False)  # pi = mu up to float32 rounding: nothing to test
    assert "single_update" in {f.id for f in single} and not _alarms(single)
    loose = {f.id: f for f in D.diagnose(runs["loose"], budget=False)}
    assert loose["rule_never_binds"].severity == "warning" and loose["rule_never_binds"].evidence["rule"] == "dppo"
    copy = D.diagnose(runs["copy"], budget=False)
    assert [f.id for f in copy if f.id == "no_rollout_logprobs"] and not _alarms(copy)


def test_missing_required_column_names_the_field():
    import polars as pl

    df = pl.DataFrame({"step": [0], "pos": [0], "logp": [-1.0], "logp_rollout": [-1.0]})
    with pytest.raises(ValueError, match="'advantage'"):
        D.diagnose(df)
    no_mu = pl.DataFrame({"step": [0, 1], "pos": [0, 0], "seq_id": [0, 0], "logp": [-1.0, -1.0],
                          "advantage": [1.0, -1.0]})
    fs = D.diagnose(no_mu, budget=False)
    assert "no_rollout_logprobs" in {f.id for f in fs}


def test_cli_json_shape_and_text(runs, tmp_path, capsys):
    from cppo_diag.cli.main import main

    rc = main(["doctor", str(runs["collapsing"]), str(runs["healthy"]), "--format", "json", "--out",
               str(tmp_path / "figs"), "--no-budget", "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["runs"] and [r["run"] for r in out["runs"]] == ["collapsing", "healthy"]
    for r in out["runs"]:
        assert list(r) == ["run", "findings"]
        for f in r["findings"]:
            assert list(f) == ["id", "severity", "first_step", "message", "evidence", "figure", "settings_version"]
            assert f["severity"] in ("info", "warning", "critical")
            if f["figure"]:
                assert Path(f["figure"]).parent == tmp_path / "figs"
    assert any(f["id"] == "divergence_tails_rising" for f in out["runs"][0]["findings"])
    rc = main(["doctor", str(runs["collapsing"]), "--no-figures", "--no-budget", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "[CRITICAL] reward_collapse from step 32" in text and "evidence:" in text
    rc = main(["doctor", str(tmp_path)])
    assert rc == 2 and "is not a cppo-diag run" in capsys.readouterr().err


def test_help_explains(capsys):
    from cppo_diag.cli.main import main

    with pytest.raises(SystemExit):
        main(["doctor", "--help"])
    text = capsys.readouterr().out
    for word in ("reward_collapse", "divergence_tails_rising", "CUSUM", "--format", "evidence"):
        assert word in text


def test_sample_logs_say_what_is_true():
    """Issue 21's done-when on the shipped sample logs (the long regime, seed 100), whatever each run did: a run
    whose 5-step reward mean never dips below half its best gets no warning and no critical; a dip that recovers
    is a warning naming when it recovered, never critical; a sustained collapse is the one critical finding.
    unstable-long (a rising lr) is also warned before it collapses."""
    root = Path(__file__).resolve().parents[2] / "sample_logs"
    seen = set()
    for run in sorted(p for p in root.iterdir() if (p / "meta.json").exists()):
        fs = D.diagnose(run, budget=False)
        scal = D._scalar_series(run)
        rew = D._reward_series(run, scal, D.step_series(run))
        ep = D.reward_episodes(rew[0], rew[1])
        crit = [f for f in fs if f.severity == "critical"]
        if ep["collapse"] is not None:
            seen.add("collapse")
            (col,) = [f for f in crit if f.id == "reward_collapse"]
            assert {f.id for f in crit} <= {"reward_collapse", "collapse_imminent"}, (run.name, [f.id for f in crit])
            assert col.first_step == ep["collapse"]["start"]
            assert col.evidence["steps_after"] >= D.COLLAPSE_MIN_AFTER
        elif ep["dips"]:
            seen.add("dip")
            assert not crit, (run.name, [(f.id, f.message) for f in fs])
            dip = next(f for f in fs if f.id == "reward_dip")
            if dip.evidence.get("recovered_step") is not None:
                assert f"recovered at step {dip.evidence['recovered_step']}" in dip.message
        else:
            seen.add("quiet")
            assert _alarms(fs) == [], (run.name, [(f.id, f.message) for f in fs])
    assert {"collapse", "quiet"} <= seen  # the shipped logs hold both kinds
    fs = D.diagnose(root / "unstable-long", budget=False)
    (col,) = [f for f in fs if f.id == "reward_collapse"]
    early = [f for f in _alarms(fs) if f.id != "reward_collapse" and f.first_step < col.first_step]
    assert early, [(f.id, f.first_step) for f in fs]


def test_reward_episodes_sustained_versus_recovering():
    """Plain loop of the definition: MA below half its running max, to the end, >= 5 steps left, start >= 10."""
    base = [0.6] * 15
    rec = base + [0.05] * 8 + [0.8] * 10  # dips and recovers
    ep = D.reward_episodes(range(len(rec)), rec)
    assert ep["collapse"] is None and len(ep["dips"]) == 1 and ep["dips"][0]["recovered"] is not None
    sus = base + [0.05] * 12
    ep = D.reward_episodes(range(len(sus)), sus)
    ma = D.moving_average(sus)
    run_max = np.maximum.accumulate(ma)
    want = next(i for i in range(len(sus)) if all(ma[j] < 0.5 * run_max[j] for j in range(i, len(sus))))
    assert ep["collapse"]["start"] == want and ep["collapse"]["steps_after"] == len(sus) - 1 - want
    # the same dip with only 4 steps left is not (yet) sustained: the live guard's rule on a prefix
    short = sus[: want + 5]
    assert D.reward_episodes(range(len(short)), short)["collapse"] is None
    assert D.reward_episodes(range(want + 6), sus[: want + 6])["collapse"]["start"] == want
    # before step 10 there was no healthy phase: never critical
    early = [0.6] * 4 + [0.01] * 20
    assert D.reward_episodes(range(len(early)), early)["collapse"] is None


def test_stats_family_mismatch(runs, capsys):
    from cppo_diag.cli.main import main

    assert main(["stats", str(runs["healthy"]), "--family", "mismatch", "--by", "step", "--format", "json",
                 "--no-progress"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 40 and {"kl_k1", "kl_k2", "kl_k3", "chi2_seq", "ess_token", "log_ppl_diff"} <= set(rows[0])
    assert main(["stats", str(runs["healthy"]), "--by", "step"]) == 2
    assert "--family mismatch" in capsys.readouterr().err


def test_report_section_lists_findings(runs, tmp_path):
    html = D.report_section([runs["collapsing"], runs["healthy"]], ["collapsing", "healthy"], tmp_path)
    assert "Doctor: findings" in html and "[CRITICAL] reward_collapse" in html
    assert "divergence_tails_rising" in html and "Divergence by position" in html
    assert "No finding" in html and "kl_k3" in html and "data:image/png;base64," in html


def test_app_doctor_page(runs, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    app = Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py"
    monkeypatch.setenv("CPPO_DIAG_ROOTS", str(runs["collapsing"].parent))
    from cppo_diag.storage.layout import append_json_line, findings_path

    live = findings_path(runs["collapsing"])  # what the live guard appends while training
    append_json_line(live, {"step": 12, "id": "reward_dip", "severity": "warning", "first_step": 12,
                            "message": "The reward dipped at step 12 (live)."})
    try:
        at = AppTest.from_file(str(app), default_timeout=600)
        at.run()
        at.multiselect(key="selected_runs").set_value([str(runs["collapsing"].resolve())]).run()
        at.switch_page("views/doctor.py").run()
    finally:
        live.unlink()
    assert not at.exception, [e.message for e in at.exception]
    assert at.title[0].value == "Doctor"
    text = " ".join(m.value for m in at.markdown)
    assert "reward_collapse" in text and "divergence_tails_rising" in text
    assert "Live doctor" in text and "The reward dipped at step 12 (live)." in text
    assert at.get("plotly_chart")  # the mismatch metric family chart


def test_position_findings_on_a_run_drifting_along_the_response(tmp_path):
    """The app fixtures' policy drifts more at late positions (sigma grows x3 along the response) and CPPO's
    budget (delta_b 0.02) runs out early there: both info findings appear, each with its figure."""
    from tests.app_fixtures import write_run

    run = write_run(tmp_path, "drift", "cppo", {"delta": 0.15}, n_steps=3, max_len=64)
    fs = {f.id: f for f in D.diagnose(run, out_dir=tmp_path / "figs")}
    along = fs["tails_along_sequence"]
    assert along.severity == "info" and along.evidence["ratio"] > 1.2 and along.evidence["mann_kendall_p"] < D.ALPHA
    bud = fs["budget_exhausted_early"]
    assert bud.severity == "info" and bud.page == "Budget"
    assert bud.evidence["median_first_budget_rejection_pos"] < D.BUDGET_EARLY_FRACTION * bud.evidence["median_response_length"]
    assert Path(along.figure).exists() and Path(bud.figure).exists()
    assert "too_few_steps" in fs and not _alarms(fs.values())


def _fake_attribution(terms, grows):
    """A stand-in for analyses/attribution.py's documented API: ``grows`` rises from step 18, the rest stay flat."""
    import types

    import polars as pl

    def attribution(run, by="step", *, bin=None, updates="lagged"):
        steps = list(range(40))
        cols = {"step": steps, "tokens": [100] * 40}
        for t in terms:
            base = [0.01] * 40
            if t == grows:
                base = [0.01 if s < 18 else 0.01 + 0.02 * (s - 17) for s in steps]
            cols[f"{t}_mean"], cols[f"{t}_abs"], cols[f"{t}_share"] = base, base, [0.3] * 40
        return pl.DataFrame(cols)

    mod = types.ModuleType("cppo_diag.analyses.attribution")
    mod.attribution, mod.attribution_terms = attribution, lambda run: list(terms)
    return mod


def test_divergence_findings_name_the_cause(runs, monkeypatch):
    import sys

    name = "cppo_diag.analyses.attribution"
    monkeypatch.setitem(sys.modules, name, _fake_attribution(["total", "engine", "lag", "update"], "lag"))
    (f,) = [f for f in D.diagnose(runs["collapsing"], budget=False) if f.id == "divergence_tails_rising"]
    assert f.evidence["cause"] == "lag" and "policy lag rising" in f.message
    assert f.evidence["attribution"]["lag"]["growth"] > 0 == f.evidence["attribution"]["engine"]["growth"]
    monkeypatch.setitem(sys.modules, name, _fake_attribution(["total", "engine+lag", "update"], "engine+lag"))
    (f,) = [f for f in D.diagnose(runs["collapsing"], budget=False) if f.id == "divergence_tails_rising"]
    assert f.evidence["cause"] == "engine+lag" and "cannot tell apart" in f.message
    monkeypatch.setitem(sys.modules, name, None)  # no attribution module: say what cannot be told apart
    (f,) = [f for f in D.diagnose(runs["collapsing"], budget=False) if f.id == "divergence_tails_rising"]
    assert f.evidence["cause"] is None and "cannot tell the engine mismatch, the policy lag and the updates apart" in f.message


def test_a_finished_run_that_never_dips_gets_no_warning(tmp_path):
    """Tails that run away (drift from step 18) in a finished run whose reward never dips: the runaway warning is
    kept as info, flagged online_severity = warning / followed_by_dip = False; the same run still training keeps
    the warning. The change-point finding is info either way."""
    run = _write(tmp_path, "drift-only", seed=2, drift_from=18, collapse_at=None)
    fs = D.diagnose(run, budget=False)
    (f,) = [f for f in fs if f.id == "divergence_runaway"]
    assert f.severity == "info" and f.evidence["online_severity"] == "warning" and not f.evidence["followed_by_dip"]
    assert _alarms(fs) == [] and "collapse_imminent" not in {g.id for g in fs}
    meta = json.loads((run / "meta.json").read_text())
    (run / "meta.json").write_text(json.dumps({**meta, "status": "running"}))
    fs = D.diagnose(run, budget=False)
    (f,) = [f for f in fs if f.id == "divergence_runaway"]
    assert f.severity == "warning" and "online_severity" not in f.evidence
    assert {g.severity for g in fs if g.id == "divergence_tails_rising"} == {"info"}


def test_imminent_collapse_that_recovers_is_a_warning_in_hindsight(tmp_path):
    """A runaway, then the reward falls under 65% of its best and comes back: online critical (the guard would
    halt), in hindsight on the finished run a warning that says the reward recovered."""
    run = _write(tmp_path, "recovers", seed=2, drift_from=18, dip=(28, 32))
    fs = {f.id: f for f in D.diagnose(run, budget=False)}
    im = fs["collapse_imminent"]
    assert im.severity == "warning" and im.evidence["online_severity"] == "critical"
    assert "recovered at step" in im.message and "reward_collapse" not in fs


def test_a_long_dip_that_recovers_says_it_was_critical_online(tmp_path):
    """A dip that stays below half its best for 5 more logged steps and then recovers is a warning offline, and
    its evidence says the live guard (the same rule on the steps so far) called it critical, and when."""
    ok = [0.6] * 15
    for below in (4, 8):
        reward = np.asarray(ok + [0.05] * below + [0.7] * 10)
        steps = np.arange(len(reward))
        # the live rule: the first prefix on which reward_episodes finds a sustained collapse
        live = next((int(steps[n - 1]) for n in range(1, len(reward) + 1)
                     if D.reward_episodes(steps[:n], reward[:n])["collapse"] is not None), None)
        assert D.reward_episodes(steps, reward)["collapse"] is None  # offline: it recovered
        (dip,) = D._reward_findings((steps, reward, "reward/mean"), None, lambda fid: tmp_path / f"{fid}.png")
        assert dip.id == "reward_dip" and dip.severity == "warning"
        assert dip.evidence.get("online_critical_step") == live
        if below == 8:
            assert live == dip.first_step + D.COLLAPSE_MIN_AFTER and f"critical at step {live}" in dip.message
            assert dip.evidence["online_severity"] == "critical"
        else:
            assert live is None and "online_severity" not in dip.evidence and "Online" not in dip.message
