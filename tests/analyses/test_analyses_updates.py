"""Which updates an analysis pools (issue 11 item 5), runs keyed apart when pooled (item 3), one p90
estimator (item 6) and CPPO's named parameter sets (issue 10 item 6)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal

from cppo_diag import analyses as A
from cppo_diag.analyses.recomputation import load_batches
from cppo_diag.analyses.synthetic import write_synthetic_run
from cppo_diag.analyses.updates import default_updates, select_updates, updates_note


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    """Two updates per step, the first with pi = mu exactly (as a trainer's first minibatch), CPPO applied."""
    run = write_synthetic_run(tmp_path_factory.mktemp("u") / "two", n_tokens=6_000, seqs_per_step=8, max_len=64,
                              updates=2, with_keep_applied="cppo", seed=3, noise=0.05)
    for f in (run / "tokens").glob("step=*/*-u0-*.parquet"):
        df = pl.read_parquet(f)
        df.with_columns(pl.col("logp_rollout").alias("logp"), pl.lit(True).alias("keep_applied"),
                        pl.lit(0, pl.UInt8).alias("reason_applied")).write_parquet(f)
    return run


def _only(run, update_pred) -> pl.DataFrame:
    return A.load_tokens(run).filter(update_pred).collect()


def test_default_is_after_first_only_for_several_updates(run2, tmp_path):
    one = write_synthetic_run(tmp_path / "one", n_tokens=1_000, seqs_per_step=4, max_len=32)
    assert default_updates(run2) == "after_first"
    assert default_updates(one) == "all"
    assert "after the first" in updates_note("after_first")
    with pytest.raises(ValueError, match="updates: expected one of .*'after_first'.*found 'second'"):
        A.position_stats(run2, updates="second")


def test_first_update_dilutes_tv_and_the_filter_removes_it(run2):
    after = _only(run2, pl.col("update") > 0)
    for updates, frame in (("after_first", after), ("first", _only(run2, pl.col("update") == 0))):
        got = A.position_stats(run2, metrics=("tv",), bin_width=16, delta=0.15, updates=updates)
        ref = A.position_stats(frame, metrics=("tv",), bin_width=16, delta=0.15)
        assert_frame_equal(got, ref, check_exact=False, rel_tol=1e-9)  # sums in another order: last bits
    pooled = A.position_stats(run2, metrics=("tv",), bin_width=1024)["mean"][0]
    later = A.position_stats(run2, metrics=("tv",), bin_width=1024, updates="after_first")["mean"][0]
    first = A.position_stats(run2, metrics=("tv",), bin_width=1024, updates="first")["mean"][0]
    assert first == 0.0 and later > 1.8 * pooled  # the first update (pi = mu) halves the pooled mean
    assert A.position_stats(run2, metrics=("tv",), bin_width=1024, updates=None)["mean"][0] == later


def test_recompute_based_analyses_filter_updates(run2):
    after = _only(run2, pl.col("update") > 0)
    bud = A.budget_exhaustion(run2, updates="after_first", bin_width=16, progress=False)
    ref = A.budget_exhaustion(after, bin_width=16, progress=False)
    assert_frame_equal(bud.by_step, ref.by_step)
    assert_frame_equal(bud.slack, ref.slack, check_exact=False, rel_tol=1e-9)
    assert bud.updates == "after_first"
    assert bud.overall["n_valid"] == after.height

    cmp = A.compare_runs([run2], ("dppo", "cppo"), updates="after_first", bin_width=16, progress=False)
    cref = A.compare_runs([after], ("dppo", "cppo"), names=["two"], bin_width=16, progress=False)
    s = cmp.summary.sort("rule")
    assert s["updates"].to_list() == ["after_first"] * 3
    cref_s = cref.summary.with_columns(pl.col("rule").replace("applied:?", "applied:cppo")).sort("rule")  # no meta
    assert_frame_equal(s.drop("updates"), cref_s.drop("updates"), check_exact=False, rel_tol=1e-9)
    applied = s.filter(pl.col("applied"))
    assert applied["n_valid"][0] == after.height
    pooled = A.compare_runs([run2], ("cppo",), progress=False).summary.filter(pl.col("applied"))
    assert applied["masked_frac"][0] > 1.8 * pooled["masked_frac"][0]

    grid = dict(deltas=(0.1, 0.2), delta_bs=(0.02,), w_mins=(0.8,), progress=False)
    assert_frame_equal(A.whatif_sweep(run2, updates="after_first", **grid), A.whatif_sweep(after, **grid))


def test_select_updates_on_a_batch_set_and_a_streamed_run(run2):
    bs = load_batches(run2)
    assert {b.update for b in select_updates(bs, "first").batches} == {0}
    assert {b.update for b in select_updates(bs, "after_first").batches} == {1}
    streamed = select_updates(run2, "after_first", step_range=(0, 1))
    batches = list(streamed.batches)
    assert {(b.step, b.update) for b in batches} == {(0, 1), (1, 1)}
    assert len(list(streamed.batches)) == len(batches)  # every pass streams the run again
    assert select_updates(run2, "all") is run2


def test_study_pools_seeds_keyed_by_run(tmp_path):
    """Two seeds whose responses share (step, update, rank, seq_id) but not their lengths: the delta / w_t
    overlay must use each response's own T (issue 11 item 3)."""
    from cppo_diag import open_run
    from cppo_diag.study.analysis import RunEntry, _pooled_tokens

    entries = []
    for seed, max_len in ((0, 12), (1, 40)):
        path = write_synthetic_run(tmp_path / f"s{seed}", n_tokens=600, seqs_per_step=4, max_len=max_len,
                                   min_len=max_len, seed=seed)
        entries.append(RunEntry(run_name=f"s{seed}", rule="cppo", seed=seed, setting="", label="cppo",
                                rule_params={}, path=path, run=open_run(path)))
    got = A.position_stats(_pooled_tokens(entries), metrics=("tv",), bin_width=1, delta=0.15, w_min=0.8)
    pos = [A.load_tokens(e.run).select("pos").collect()["pos"].to_numpy() for e in entries]  # each run's own
    T = np.concatenate([np.full(len(p), length) for p, length in zip(pos, (12, 40))])
    pos = np.concatenate(pos)
    w = 1.0 - 0.2 * pos / (T - 1)
    thr = pl.DataFrame({"bin": pos.astype(np.int64), "thr": 0.15 / w}).group_by("bin").agg(pl.col("thr").mean())
    joined = got.join(thr, on="bin")
    assert joined.height == 40
    assert np.allclose(joined["threshold_mean"].to_numpy(), joined["thr"].to_numpy(), rtol=1e-12)


def test_study_token_summary_uses_updates_after_the_first(run2):
    from cppo_diag.study.analysis import token_summary

    s = token_summary(run2)
    after = _only(run2, pl.col("update") > 0)
    assert s["updates"] == "after_first" and s["n_tokens"] == after.height
    assert s["masked_frac"] == pytest.approx((~after["keep_applied"]).mean())
    assert token_summary(run2, "all")["masked_frac"] < 0.6 * s["masked_frac"]


def test_div_p90_is_the_linear_interpolation_quantile():
    """The rules' div/*/p90 and the analyses' p90 are one estimator (numpy's linear interpolation)."""
    from cppo_diag.masks.metrics import divergence_metrics

    d = torch.arange(12, dtype=torch.float64)[None, :] ** 2  # 12 values: nearest rank gives x_10 = 100
    p90 = float(divergence_metrics("binary_tv", d, torch.ones_like(d, dtype=torch.bool))["div/tv/p90"])
    assert p90 == pytest.approx(np.quantile(d.numpy(), 0.9)) and p90 != 100.0
    pos = A.position_stats(pl.DataFrame({"step": [0] * 12, "seq_id": [0] * 12, "pos": list(range(12)),
                                         "logp": [0.0] * 12, "logp_rollout": [math.log(1 - 0.01 * i) for i in range(12)],
                                         "advantage": [1.0] * 12}), metrics=("tv",), bin_width=64)
    vals = np.abs(1 - np.exp(np.array([math.log(1 - 0.01 * i) for i in range(12)], dtype=np.float32)))
    assert pos["p90"][0] == pytest.approx(np.quantile(vals, 0.9), rel=1e-5)


# -- CPPO profiles -----------------------------------------------------------------------------------------


def test_profiles_are_named_parameter_sets_of_cppo():
    from cppo_diag.masks.registry import UnknownProfileError, get_rule, list_profiles, profile_params

    assert [p.name for p in list_profiles("cppo")] == ["paper", "unirl", "verl-pr6731"]
    defaults = get_rule("cppo").params
    assert profile_params("cppo", "paper") == defaults
    assert profile_params("cppo", "unirl") == defaults  # the authors' code: the paper's mask
    verl = profile_params("cppo", "verl-pr6731", max_response_length=512)
    assert verl == {**defaults, "weight_length": "horizon", "horizon": 512, "delta_b_cap": 5.0}
    with pytest.raises(UnknownProfileError, match="unknown profile 'verl'.*known profiles: paper, unirl, verl-pr6731"):
        profile_params("cppo", "verl")
    with pytest.raises(ValueError, match="needs the run's max_response_length"):
        profile_params("cppo", "verl-pr6731")


def test_verl_profile_reads_the_runs_maximum_response_length(run2, tmp_path):
    from cppo_diag.analyses.profiles import run_max_response_length, run_profile_params

    longest = int(A.load_tokens(run2).select(pl.col("pos").max()).collect().item()) + 1
    assert run_max_response_length(run2) == longest  # no cap in this run's config: the longest response
    assert run_profile_params(run2, "cppo", "verl-pr6731")["horizon"] == longest
    capped = write_synthetic_run(tmp_path / "capped", n_tokens=500, seqs_per_step=4, max_len=20)
    import json

    meta = json.loads((capped / "meta.json").read_text())
    meta["config"]["rollout"] = {"max_new_tokens": 96}
    (capped / "meta.json").write_text(json.dumps(meta))
    assert run_max_response_length(capped) == 96


def test_compare_offers_profiles_and_they_differ_on_short_answers(run2):
    cmp = A.compare_runs([run2], (), profiles=("paper", "verl-pr6731"), updates="after_first", progress=False)
    s = {r["rule"]: r for r in cmp.summary.iter_rows(named=True)}
    assert {"cppo[paper]", "cppo[verl-pr6731]", "applied:cppo"} <= set(s)
    assert s["cppo[paper]"]["masked_frac"] == s["applied:cppo"]["masked_frac"]
    # T = the longest response for every response keeps w_t near 1 on short answers: fewer masks
    assert s["cppo[verl-pr6731]"]["masked_frac"] != s["cppo[paper]"]["masked_frac"]


# -- command line ----------------------------------------------------------------------------------------


def test_recompute_cli_profile_and_updates(run2, capsys):
    from cppo_diag.cli.main import main

    assert main(["recompute", str(run2), "--rule", "cppo", "--profile", "verl-pr6731", "--json", "--no-progress"]) == 0
    data = __import__("json").loads(capsys.readouterr().out)
    longest = int(A.load_tokens(run2).select(pl.col("pos").max()).collect().item()) + 1
    assert data["profile"] == "verl-pr6731" and data["updates"] == "all"
    assert data["params"]["weight_length"] == "horizon" and data["params"]["horizon"] == longest
    assert data["params"]["delta_b_cap"] == 5.0
    assert main(["recompute", str(run2), "--rule", "cppo", "--profile", "unirl", "--param", "delta=0.15",
                 "--updates", "after_first", "--json", "--no-progress"]) == 0
    data = __import__("json").loads(capsys.readouterr().out)
    assert data["params"]["delta"] == 0.15 and data["updates"] == "after_first"
    assert data["overall"]["n_valid"] == _only(run2, pl.col("update") > 0).height
    assert data["agreement"]["agreement"] == 1.0  # unirl = the paper's mask = what the run applied
    assert main(["recompute", str(run2), "--rule", "cppo", "--profile", "verl", "--no-progress"]) == 2
    assert "known profiles: paper, unirl, verl-pr6731" in capsys.readouterr().err


def test_stats_cli_updates(run2, capsys):
    from cppo_diag.cli.main import main

    def mean(*extra):
        assert main(["stats", str(run2), "--metric", "tv", "--bin", "1024", "--format", "json", "--no-progress",
                     *extra]) == 0
        return __import__("json").loads(capsys.readouterr().out)[0]["mean"]

    auto, after, every = mean(), mean("--updates", "after_first"), mean("--updates", "all")
    assert auto == after and after > 1.8 * every
    assert mean("--updates", "first") == 0.0


@pytest.mark.slow
def test_report_says_which_updates_and_draws_profiles(run2, tmp_path):
    from cppo_diag.cli.main import main

    out = tmp_path / "rep"
    assert main(["report", str(run2), "--out", str(out), "--bin", "16", "--no-progress", "--no-whatif",
                 "--rules", "dppo", "--profile", "verl-pr6731"]) == 0
    page = (out / "report.html").read_text()
    assert "updates after the first of each batch" in page and "cppo[verl-pr6731]" in page
    assert "two_position_hill.png" in {p.name for p in out.glob("*.png")}
