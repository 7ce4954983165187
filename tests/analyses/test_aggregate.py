"""Mergeable partial aggregates (analyses/aggregate.py): merge = one pass, accuracy against the exact
statistics, the update / advantage-sign keys, the cache beside the run and the CLI."""

import json
import shutil

import numpy as np
import polars as pl
import pytest

from cppo_diag.analyses import aggregate as agg
from cppo_diag.analyses.aggregate import (AggSpec, Partial, aggregate_files, aggregate_run, position_summary, relative_accuracy_of,
                                stats_table)
from cppo_diag.analyses.position import position_stats
from cppo_diag.analyses.synthetic import write_synthetic_run
from cppo_diag.masks.reasons import Reason
from cppo_diag.storage import layout

STATS = ("mean", "p50", "p90", "p99", "top10_mean", "threshold_mean")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    # two updates per batch (update class key), group-normalised advantages (all three signs), 8 steps
    return write_synthetic_run(tmp_path_factory.mktemp("agg") / "run", n_tokens=40_000, seqs_per_step=16,
                               max_len=200, updates=2, seed=3)


def _files(run):
    return sorted(str(f) for f in (run / "tokens").glob("step=*/*.parquet"))


def _close(a: float | None, b: float | None, rel: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


def _assert_tables_close(a: pl.DataFrame, b: pl.DataFrame, rel: float, cols=None):
    assert a.columns == b.columns
    assert a.select("metric", "bin", "count").equals(b.select("metric", "bin", "count"))
    cols = cols or [c for c in a.columns if c not in ("metric", "bin", "count", "bin_start", "bin_end")]
    for c in cols:
        for x, y in zip(a[c].to_list(), b[c].to_list()):
            assert _close(x, y, rel), (c, x, y)


@pytest.mark.parametrize("seed", range(4))
def test_any_split_merges_into_one_pass(run_dir, seed):
    """Partials of an arbitrary split of the shards (here: random groups, any order) merge by addition
    into the one-pass partial: counts identical, sums and the statistics within 1e-9 relative."""
    spec = AggSpec(metrics=("tv", "k3", "k1"), bin_width=32, delta=0.15)
    files = _files(run_dir)
    # delta needs whole steps per call: split by steps, in a random grouping and order
    by_step: dict[str, list[str]] = {}
    for f in files:
        by_step.setdefault(f.split("step=")[1][:6], []).append(f)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 1 + seed, size=len(by_step))
    groups = [[f for s, lab in zip(by_step, labels) if lab == k for f in by_step[s]] for k in range(1 + seed)]
    parts = [aggregate_files(g, spec) for g in groups if g]
    rng.shuffle(parts)
    merged = parts[0].merge(*parts[1:])
    one = aggregate_files(files, spec)
    assert np.array_equal(merged.tokens, one.tokens)
    assert merged.steps == one.steps
    for m in spec.metrics:
        assert np.array_equal(merged.sketch[m][0], one.sketch[m][0])
        assert np.array_equal(merged.sketch[m][1], one.sketch[m][1])
        np.testing.assert_allclose(merged.sums[m], one.sums[m], rtol=1e-9)
    np.testing.assert_allclose(merged.thr_sum, one.thr_sum, rtol=1e-9)
    for updates in ("all", "after_first"):
        _assert_tables_close(stats_table(merged, updates=updates), stats_table(one, updates=updates), 1e-9)


def test_split_within_steps_merges(run_dir):
    """Splitting the files of one step (ranks, updates) apart is fine without response lengths."""
    spec = AggSpec(metrics=("tv",), bin_width=16)
    files = _files(run_dir)
    parts = [aggregate_files([f], spec) for f in files]
    merged = Partial(spec).merge(*parts)
    one = aggregate_files(files, spec)
    assert np.array_equal(merged.sketch["tv"][1], one.sketch["tv"][1])
    _assert_tables_close(stats_table(merged), stats_table(one), 1e-9)


@pytest.mark.parametrize("updates,adv_sign", [("all", None), ("after_first", None), ("first", "pos"),
                                              ("after_first", "neg")])
def test_sketch_within_stated_accuracy_of_exact(run_dir, updates, adv_sign):
    """Counts and means exact; quantiles and the top-decile mean within the stated relative accuracy."""
    kw = dict(metrics=("tv", "abs_logratio", "k3"), bin_width=32, updates=updates, adv_sign=adv_sign)
    exact = position_stats(run_dir, **kw)
    got = position_summary(run_dir, cache=False, workers=1, **kw)
    alpha = relative_accuracy_of(agg.mantissa_bits_for(0.01))
    assert alpha <= 0.01
    _assert_tables_close(got, exact, 1e-5, cols=["mean"])
    _assert_tables_close(got, exact, alpha * (1 + 1e-6), cols=["p50", "p90", "p99", "top10_mean"])
    # survival: off by at most the mass of the bucket straddling x
    for c in ("surv_0.05", "surv_0.1"):
        assert (got[c] - exact[c]).abs().max() < 0.01


def test_signed_metric_and_relative_bins_with_threshold(run_dir):
    """k1 has negative values (mirrored buckets); relative bins and delta / w_t need response lengths."""
    kw = dict(metrics=("k1",), relative=True, n_rel_bins=5, delta=0.15, updates="all")
    exact = position_stats(run_dir, **kw)
    got = position_summary(run_dir, cache=False, workers=1, **kw)
    assert (got["p50"] < 0).any() or (got["p90"] > 0).any()
    _assert_tables_close(got, exact, 1e-9, cols=["threshold_mean"])
    _assert_tables_close(got, exact, relative_accuracy_of(6) * (1 + 1e-6), cols=["p50", "p90", "p99"])


def test_frame_source_equals_run_directory(run_dir):
    spec = AggSpec(metrics=("tv",), bin_width=64)
    lf = pl.scan_parquet(_files(run_dir))
    a = stats_table(aggregate_run(lf, spec, cache=False))
    b = stats_table(aggregate_run(run_dir, spec, cache=False, workers=1))
    _assert_tables_close(a, b, 1e-9)


def test_partial_save_load_roundtrip(run_dir, tmp_path):
    spec = AggSpec(metrics=("tv", "k3"), bin_width=64, delta=0.2)
    p = aggregate_files(_files(run_dir), spec)
    p.save(tmp_path / "p.npz")
    q = Partial.load(tmp_path / "p.npz")
    assert q.spec == spec and q.steps == p.steps
    assert stats_table(q).equals(stats_table(p))


def test_merge_refuses_other_spec(run_dir):
    a = aggregate_files(_files(run_dir)[:1], AggSpec(metrics=("tv",), bin_width=64))
    b = aggregate_files(_files(run_dir)[:1], AggSpec(metrics=("tv",), bin_width=32))
    with pytest.raises(ValueError, match="same spec"):
        a.merge(b)


def test_bad_arguments_name_the_field(run_dir):
    with pytest.raises(ValueError, match="relative_accuracy"):
        position_summary(run_dir, relative_accuracy=0.0)
    with pytest.raises(ValueError, match="metrics"):
        AggSpec(metrics=("nope",))
    with pytest.raises(ValueError, match="engine"):
        position_summary(run_dir, engine="spark", cache=False)
    with pytest.raises(ValueError, match="adv_sign"):
        position_summary(run_dir, adv_sign="up", cache=False, workers=1)


def test_cache_aggregates_only_new_steps(tmp_path):
    """A cached run that grows by one step is aggregated for that step only, with the same result as a
    fresh pass; a rewritten shard invalidates its block."""
    kw = dict(n_tokens=20_000, seqs_per_step=8, max_len=160, updates=2, seed=5)
    full = write_synthetic_run(tmp_path / "full", **kw)  # steps 0..N-1
    n = len(list((full / "tokens").iterdir()))
    grow = tmp_path / "grow"
    shutil.copytree(full, grow)
    last = layout.step_dir_name(n - 1)
    shutil.rmtree(grow / "tokens" / last)
    (grow / "_done" / layout.done_marker_name(n - 1, 0)).unlink()
    spec = AggSpec(metrics=("tv",), bin_width=32)
    first = aggregate_run(grow, spec, workers=1)
    assert agg.LAST_INFO.steps_aggregated == list(range(n - 1)) and agg.LAST_INFO.blocks_written >= 1
    aggregate_run(grow, spec, workers=1)
    assert agg.LAST_INFO.steps_aggregated == [] and agg.LAST_INFO.steps_cached == list(range(n - 1))
    # the trainer finishes one more step
    shutil.copytree(full / "tokens" / last, grow / "tokens" / last)
    (grow / "_done" / layout.done_marker_name(n - 1, 0)).touch()
    grown = aggregate_run(grow, spec, workers=1)
    assert agg.LAST_INFO.steps_aggregated == [n - 1]
    assert grown.n_tokens > first.n_tokens
    _assert_tables_close(stats_table(grown), stats_table(aggregate_run(full, spec, cache=False, workers=1)), 1e-9)
    # a step range inside the cached blocks aggregates what no whole block covers
    aggregate_run(grow, spec, workers=1, step_range=(0, 0))
    assert agg.LAST_INFO.steps_aggregated in ([], [0])
    # rewriting a shard (new size/mtime) makes its block stale
    f = sorted((grow / "tokens" / layout.step_dir_name(0)).glob("*.parquet"))[0]
    pl.read_parquet(f).head(10).write_parquet(f)
    aggregate_run(grow, spec, workers=1)
    assert 0 in agg.LAST_INFO.steps_aggregated and n - 1 not in agg.LAST_INFO.steps_aggregated


def test_cache_compacts_many_blocks(tmp_path):
    run = write_synthetic_run(tmp_path / "r", n_tokens=20_000, seqs_per_step=8, max_len=160, seed=1)
    spec = AggSpec(metrics=("tv",), bin_width=32)
    n = len(list((run / "tokens").iterdir()))
    for s in range(n):  # one block per step, as a run polled after every step would leave
        aggregate_run(run, spec, workers=1, step_range=(s, s))
    cache = run / agg.CACHE_DIR / spec.key()
    assert len(list(cache.glob("*.npz"))) == n
    before = stats_table(aggregate_run(run, spec, workers=1, max_blocks=2))
    assert len(list(cache.glob("*.npz"))) == 1
    after = stats_table(aggregate_run(run, spec, workers=1))
    assert agg.LAST_INFO.steps_aggregated == []
    _assert_tables_close(before, after, 1e-9)


def test_cache_fills_gaps_between_blocks(tmp_path):
    """Steps between two cached blocks are aggregated as their own block, so the next call reads nothing."""
    run = write_synthetic_run(tmp_path / "r", n_tokens=20_000, seqs_per_step=8, max_len=160, seed=2)
    n = len(list((run / "tokens").iterdir()))
    assert n >= 6
    spec = AggSpec(metrics=("tv",), bin_width=32)
    aggregate_run(run, spec, workers=1, step_range=(0, 1))
    aggregate_run(run, spec, workers=1, step_range=(4, None))
    full = aggregate_run(run, spec, workers=1)
    assert agg.LAST_INFO.steps_aggregated == [2, 3] and agg.LAST_INFO.blocks_written >= 1
    again = aggregate_run(run, spec, workers=1)
    assert agg.LAST_INFO.steps_aggregated == []
    _assert_tables_close(stats_table(again), stats_table(full), 1e-9)
    _assert_tables_close(stats_table(again), stats_table(aggregate_run(run, spec, workers=1, cache=False)), 1e-9)


def test_local_engine_processes_equal_one_process(run_dir):
    spec = AggSpec(metrics=("tv", "k3"), bin_width=32)
    one = stats_table(aggregate_run(run_dir, spec, cache=False, workers=1))
    two = stats_table(aggregate_run(run_dir, spec, cache=False, workers=2))
    _assert_tables_close(one, two, 1e-9)


def test_cli_stats_sketch_exact_and_updates(run_dir, tmp_path, capsys):
    from cppo_diag.cli.main import main

    def stats(*extra):
        out = tmp_path / "o.json"
        assert main(["stats", str(run_dir), "--format", "json", "--metric", "tv", "--no-progress", "--workers", "1",
                     "--out", str(out), *extra]) == 0
        return pl.DataFrame(json.loads(out.read_text()))

    sketch, exact = stats(), stats("--exact")
    assert sketch["count"].to_list() == exact["count"].to_list()
    assert ((sketch["p90"] - exact["p90"]).abs() / exact["p90"]).max() <= relative_accuracy_of(6)
    # --updates keeps working on the update-class key: first + after_first = all, and auto = after_first on
    # this two-update run
    first, later, both = stats("--updates", "first"), stats("--updates", "after_first"), stats("--updates", "all")
    assert (first["count"] + later["count"]).to_list() == both["count"].to_list()
    assert sketch["count"].to_list() == later["count"].to_list()
    assert main(["stats", str(run_dir), "--engine", "local", "--relative-accuracy", "2"]) == 2
    assert "relative_accuracy" in capsys.readouterr().err


def _reference_applied(lf: pl.LazyFrame, bin_width: int) -> tuple[dict, pl.DataFrame, pl.DataFrame]:
    """The logged mask's tables by one plain polars query (what analyses.compare computed before)."""
    lf = lf.filter(pl.col("keep_applied").is_not_null())
    lp, lr = pl.col("logp").cast(pl.Float32), pl.col("logp_rollout").cast(pl.Float32)
    rho = (lp - lr).clip(-20.0, 20.0).exp()
    base = lf.select("step", (pl.col("pos") // bin_width).alias("bin"), (~pl.col("keep_applied")).cast(pl.Int64).alias("m"),
                     (pl.col("reason_applied") == Reason.BUDGET).cast(pl.Int64).alias("b"),
                     (pl.col("advantage").cast(pl.Float32) * (rho - 1.0) > 0).cast(pl.Int64).alias("away"),
                     (pl.col("advantage") > 0).alias("ap"), (pl.col("advantage") < 0).alias("an")).collect()
    tot = base.select(n=pl.len(), m=pl.col("m").sum(), b=pl.col("b").sum(), away=pl.col("away").sum(),
                      mp=pl.col("m").filter(pl.col("ap")).mean(), mn=pl.col("m").filter(pl.col("an")).mean()).row(0, named=True)
    summary = {"n_valid": tot["n"], "n_masked": tot["m"], "masked_frac": tot["m"] / tot["n"],
               "budget_share": tot["b"] / tot["m"], "away_frac": tot["away"] / tot["n"],
               "masked_frac_pos_adv": tot["mp"], "masked_frac_neg_adv": tot["mn"]}
    by_pos = base.group_by("bin").agg(n_valid=pl.len(), masked_frac=pl.col("m").mean()).sort("bin")
    by_step = base.group_by("step").agg(masked_frac=pl.col("m").mean(),
                                        budget_share=pl.col("b").sum() / pl.col("m").sum()).sort("step")
    return summary, by_pos, by_step


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("aggm") / "run", n_tokens=30_000, seqs_per_step=16,
                               max_len=200, updates=2, seed=4, noise=0.05, with_keep_applied="cppo")


def _without_last_step(src, tmp_path):
    """A copy of the run ``src`` (no cache) whose last step is not completed yet, its step count, and a
    function that completes that step (its shards and done marker appear, as a trainer writes them)."""
    run = tmp_path / "run"
    shutil.copytree(src, run)
    shutil.rmtree(run / "_cache", ignore_errors=True)
    n = len(list((run / "tokens").iterdir()))
    last = layout.step_dir_name(n - 1)
    held = tmp_path / "held"
    shutil.move(str(run / "tokens" / last), held)
    (run / "_done" / layout.done_marker_name(n - 1, 0)).unlink()

    def finish_last_step():
        shutil.move(str(held), run / "tokens" / last)
        (run / "_done" / layout.done_marker_name(n - 1, 0)).touch()

    return run, n, finish_last_step


@pytest.mark.parametrize("updates", ["all", "after_first", "first"])
def test_applied_mask_from_partials_equals_plain_query(masked_run, updates):
    from cppo_diag.analyses.updates import filter_updates

    got = agg.applied_mask(masked_run, "r", "applied:cppo", bin_width=32, updates=updates, cache=False)
    ref = _reference_applied(filter_updates(pl.scan_parquet(_files(masked_run)), updates), 32)
    assert got[0]["n_masked"] > 0
    for k, v in ref[0].items():
        assert _close(got[0][k], v, 1e-12), k
    assert got[1].select("bin", "n_valid").equals(ref[1].select("bin", pl.col("n_valid").cast(pl.Int64)))
    np.testing.assert_allclose(got[1]["masked_frac"], ref[1]["masked_frac"], rtol=1e-12)
    assert got[2]["step"].to_list() == ref[2]["step"].to_list()
    np.testing.assert_allclose(got[2]["masked_frac"], ref[2]["masked_frac"], rtol=1e-12)
    np.testing.assert_allclose(got[2]["budget_share"].fill_null(np.nan), ref[2]["budget_share"].fill_nan(None)
                               .fill_null(np.nan), rtol=1e-12)


def test_compare_applied_row_is_cached_and_grows_by_new_steps(masked_run, tmp_path):
    """compare_runs' applied-mask row comes from the cached partials: a second call reads no shard, and a
    run that grows by a step aggregates that step only."""
    from cppo_diag.analyses.compare import compare_runs

    run, n, finish_last_step = _without_last_step(masked_run, tmp_path)
    kw = dict(rules=("dppo",), progress=False, bin_width=32, updates="all")
    compare_runs([run], **kw)
    assert agg.LAST_INFO.steps_aggregated == list(range(n - 1))
    compare_runs([run], **kw)
    assert agg.LAST_INFO.steps_aggregated == []
    finish_last_step()
    res = compare_runs([run], **kw)
    assert agg.LAST_INFO.steps_aggregated == [n - 1]
    row = res.summary.filter(pl.col("applied")).row(0, named=True)
    ref = _reference_applied(pl.scan_parquet(_files(masked_run)), 32)[0]
    assert row["n_masked"] == ref["n_masked"] and _close(row["masked_frac"], ref["masked_frac"], 1e-12)


def test_run_object_source_as_the_app_passes_it(run_dir):
    """The app hands analyses a ``cppo_diag.open_run`` object: it is aggregated (and cached) like its path."""
    from cppo_diag import open_run

    kw = dict(metrics=("tv",), bin_width=64, updates="all", workers=1)
    _assert_tables_close(position_summary(open_run(run_dir), **kw), position_summary(run_dir, cache=False, **kw), 1e-9)


def _assert_budget_equal(a, b, rel=1e-12):
    from polars.testing import assert_frame_equal

    assert_frame_equal(a.by_step, b.by_step, check_exact=False, rel_tol=rel)
    assert_frame_equal(a.first_reject, b.first_reject, check_exact=False, rel_tol=rel)
    assert_frame_equal(a.slack, b.slack, check_exact=False, rel_tol=rel)
    assert a.overall.keys() == b.overall.keys()
    for k, v in a.overall.items():
        w = b.overall[k]
        assert (np.isnan(v) and np.isnan(w)) or _close(v, w, rel), (k, v, w)


def test_budget_merges_over_step_groups(masked_run):
    """Budget exhaustion over groups of whole steps merges into the one-pass tables (merge_budget), and the
    local engine (2 processes) gives them too."""
    from cppo_diag.analyses.budget import budget_exhaustion, merge_budget

    kw = dict(bin_width=32, updates="after_first", progress=False)
    one = budget_exhaustion(masked_run, **kw)
    assert one.overall["n_masked"] > 0 and one.first_reject.height > 0
    n = len(list((masked_run / "tokens").iterdir()))
    parts = [budget_exhaustion(masked_run, step_range=r, **kw) for r in ((0, 1), (2, 2), (3, None))]
    assert n > 3
    _assert_budget_equal(merge_budget(parts[::-1], bin_width=32), one)
    _assert_budget_equal(budget_exhaustion(masked_run, engine="local", workers=2, cache=False, **kw), one)
    # a frame has no shard files to group: the engine falls back to one in-process pass
    frame = pl.scan_parquet(_files(masked_run))
    _assert_budget_equal(budget_exhaustion(frame, engine="local", **kw), budget_exhaustion(frame, **kw))
    with pytest.raises(ValueError, match="rule, parameters and updates"):
        merge_budget([one, budget_exhaustion(masked_run, step_range=(0, 0), bin_width=32, updates="all",
                                             progress=False)], bin_width=32)


def test_budget_engine_cache_recomputes_only_new_steps(masked_run, tmp_path):
    """With an engine, each group's budget state is cached beside the run: a second call recomputes
    nothing, a new step is recomputed alone, and the tables equal a one-pass recompute."""
    from cppo_diag.analyses.budget import budget_exhaustion

    run, n, finish_last_step = _without_last_step(masked_run, tmp_path)
    kw = dict(bin_width=32, updates="after_first", progress=False, engine="local", workers=1)
    assert budget_exhaustion(run, **kw).cache_info.steps_aggregated == list(range(n - 1))
    cached = budget_exhaustion(run, **kw)
    assert cached.cache_info.steps_aggregated == []
    _assert_budget_equal(cached, budget_exhaustion(run, bin_width=32, updates="after_first", progress=False))
    finish_last_step()
    grown = budget_exhaustion(run, **kw)
    assert grown.cache_info.steps_aggregated == [n - 1]
    _assert_budget_equal(grown, budget_exhaustion(masked_run, bin_width=32, updates="after_first", progress=False))


def test_empty_run_gives_the_empty_table(tmp_path):
    from cppo_diag.analyses.synthetic import empty_run

    run = empty_run(tmp_path / "empty")
    got = position_summary(run, workers=1)
    assert got.is_empty() and got.columns == position_stats(run).columns
