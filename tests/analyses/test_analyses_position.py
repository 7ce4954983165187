"""Divergence-by-position statistics against plain numpy on small data (definitions: analyses/position.py)."""

import math

import numpy as np
import polars as pl
import pytest

from cppo_diag.analyses.position import BOUNDED_METRICS as BOUNDED, position_stats, threshold_schedule
from cppo_diag.analyses.tokens import MissingColumnError


def _frame(n_steps=3, seqs=6, seed=0, lengths=None):
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(n_steps):
        for s in range(seqs):
            T = int(lengths[s]) if lengths is not None else int(rng.integers(5, 60))
            q = rng.uniform(0.05, 1.0, T)
            p = np.clip(q + rng.standard_t(3, T) * 0.05, 1e-4, 1.0)
            adv = float(rng.choice([-1.0, 0.0, 1.0]))
            for t in range(T):
                rows.append((step, s, t, math.log(p[t]), math.log(q[t]), adv))
    df = pl.DataFrame(rows, schema={"step": pl.Int64, "seq_id": pl.Int64, "pos": pl.Int32, "logp": pl.Float32,
                                    "logp_rollout": pl.Float32, "advantage": pl.Float32}, orient="row")
    return df


def _np_stats(d, thresholds, hill_min_k=5, metric="abs_logratio"):
    """numpy's statistics of one bin; no Hill tail index for the bounded metrics (|pi - mu|)."""
    d = np.asarray(d, dtype=np.float64)
    p90 = np.quantile(d, 0.9)
    tail = d[d > p90]
    xi = np.mean(np.log(tail / p90)) if len(tail) and p90 > 0 else float("nan")
    return {
        "count": len(d), "mean": d.mean(), "p50": np.quantile(d, 0.5), "p90": p90, "p99": np.quantile(d, 0.99),
        "top10_mean": d[d >= p90].mean(),
        "hill_alpha": (1 / xi) if len(tail) >= hill_min_k and p90 > 0 and xi > 0 and metric not in BOUNDED else None,
        "hill_k": len(tail) if metric not in BOUNDED else None,
        **{f"surv_{x:g}": float(np.mean(d > x)) for x in thresholds},
    }


def _divs(df):
    lp = df["logp"].to_numpy().astype(np.float64)
    lq = df["logp_rollout"].to_numpy().astype(np.float64)
    k1 = np.clip(lp - lq, -20, 20)
    return {"tv": np.abs(np.exp(lp) - np.exp(lq)), "abs_logratio": np.abs(k1), "k3": np.exp(k1) - 1 - k1}


@pytest.mark.parametrize("bin_width", [1, 7, 16])
def test_stats_match_numpy(bin_width):
    df = _frame()
    thresholds = (0.01, 0.05, 0.2)
    out = position_stats(df, bin_width=bin_width, thresholds=thresholds)
    divs = _divs(df)
    bins = df["pos"].to_numpy() // bin_width
    assert set(out["metric"].unique()) == {"tv", "abs_logratio", "k3"}
    for metric, d in divs.items():
        got = out.filter(pl.col("metric") == metric).sort("bin")
        assert got["bin"].to_list() == sorted(set(bins.tolist()))
        for row in got.iter_rows(named=True):
            exp = _np_stats(d[bins == row["bin"]], thresholds, metric=metric)
            assert row["bin_start"] == row["bin"] * bin_width and row["bin_end"] == (row["bin"] + 1) * bin_width
            for k, v in exp.items():
                if v is None:
                    assert row[k] is None, (metric, row["bin"], k)
                else:
                    # divergences are computed in float64 and rounded to float32 before the order statistics
                    assert row[k] == pytest.approx(v, rel=2e-4, abs=1e-6), (metric, row["bin"], k)


def test_relative_bins_and_threshold_schedule():
    lengths = [10, 25, 40, 3, 1, 17]
    df = _frame(n_steps=2, lengths=lengths)
    out = position_stats(df, metrics=["tv"], relative=True, n_rel_bins=4, delta=0.15, w_min=0.8)
    pos = df["pos"].to_numpy()
    T = np.array([lengths[s] for s in df["seq_id"].to_numpy()])
    rel = (pos + 1) / T
    bins = np.clip(np.ceil(rel * 4).astype(int), 1, 4) - 1
    thr = np.array([threshold_schedule([p], delta=0.15, w_min=0.8, length=t)[0] for p, t in zip(pos, T)])
    d = _divs(df)["tv"]
    for row in out.iter_rows(named=True):
        sel = bins == row["bin"]
        assert row["count"] == sel.sum()
        assert row["mean"] == pytest.approx(d[sel].mean(), rel=1e-5)
        assert row["threshold_mean"] == pytest.approx(thr[sel].mean(), rel=1e-9)
        assert row["bin_start"] == pytest.approx(row["bin"] / 4)


def test_threshold_schedule_endpoints():
    thr = threshold_schedule(np.arange(5), delta=0.2, w_min=0.8, length=5)
    assert thr[0] == pytest.approx(0.2) and thr[-1] == pytest.approx(0.2 / 0.8)
    assert threshold_schedule([0], delta=0.2, w_min=0.5, length=1)[0] == pytest.approx(0.2)  # T = 1: w_1 = 1


def test_filters_step_range_and_adv_sign():
    df = _frame(n_steps=4)
    sub = df.filter((pl.col("step") >= 1) & (pl.col("step") <= 2) & (pl.col("advantage") < 0))
    a = position_stats(df, metrics=["tv"], bin_width=8, step_range=(1, 2), adv_sign="neg")
    b = position_stats(sub, metrics=["tv"], bin_width=8)
    assert a.equals(b)
    assert position_stats(df, metrics=["tv"], step_range=(None, 0))["count"].sum() == df.filter(pl.col("step") == 0).height
    with pytest.raises(ValueError, match="adv_sign"):
        position_stats(df, adv_sign="positive")
    with pytest.raises(ValueError, match="metrics"):
        position_stats(df, metrics=["nope"])


def test_empty_and_single_token_bins():
    df = _frame()
    empty = position_stats(df.head(0))
    assert empty.is_empty() and {"mean", "p90", "top10_mean", "hill_alpha"} <= set(empty.columns)
    one = position_stats(df.head(1), metrics=["tv"], bin_width=4)
    assert one["count"].to_list() == [1] and one["hill_alpha"][0] is None
    assert one["p50"][0] == pytest.approx(one["mean"][0]) == pytest.approx(one["p99"][0])


def test_missing_column_named():
    df = _frame().drop("advantage")
    with pytest.raises(MissingColumnError, match="'advantage'"):
        position_stats(df)


def test_exact_with_ties_zeros_and_negative_k3():
    """Many exact zeros (pi == mu), heavy ties and tiny values: the two-pass histogram selection returns the
    exact order statistics of the float32 divergences (compared with numpy on the same float32 values)."""
    rng = np.random.default_rng(11)
    n = 40_000
    lq = np.log(rng.uniform(0.01, 1.0, n)).astype(np.float32)
    lp = lq.copy()
    moved = rng.random(n) < 0.3
    lp[moved] = np.minimum(lq[moved] + rng.choice([1e-7, 0.01, 0.3], moved.sum()).astype(np.float32), 0)
    df = pl.DataFrame({"step": np.zeros(n, np.int64), "seq_id": np.arange(n) // 100, "pos": (np.arange(n) % 100)
                       .astype(np.int32), "logp": lp, "logp_rollout": lq, "advantage": np.ones(n, np.float32)})
    out = position_stats(df, bin_width=50, thresholds=(0.0,))
    d32 = {k: v.astype(np.float32).astype(np.float64) for k, v in _divs(df).items()}
    bins = df["pos"].to_numpy() // 50
    for metric in ("tv", "k3"):
        d = d32[metric]
        for row in out.filter(pl.col("metric") == metric).iter_rows(named=True):
            x = d[bins == row["bin"]]
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
                assert row[name] == np.quantile(x, q), (metric, name)
            assert row["top10_mean"] == pytest.approx(x[x >= np.quantile(x, 0.9)].mean(), rel=1e-9)
            assert row["surv_0"] == pytest.approx(np.mean(x > 0))


def test_signed_metric_k1_quantiles():
    """k1 = log pi - log mu takes both signs: the bucket keys stay monotone through zero."""
    df = _frame(n_steps=4, seqs=10, seed=9)
    out = position_stats(df, metrics=["k1"], bin_width=20, thresholds=(-0.1, 0.0, 0.1))
    lp = df["logp"].to_numpy().astype(np.float64)
    lq = df["logp_rollout"].to_numpy().astype(np.float64)
    d = np.clip(lp - lq, -20, 20).astype(np.float32).astype(np.float64)
    bins = df["pos"].to_numpy() // 20
    assert (d < 0).any() and (d > 0).any()
    for row in out.iter_rows(named=True):
        x = d[bins == row["bin"]]
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            assert row[name] == np.quantile(x, q)
        assert row["surv_-0.1"] == pytest.approx(np.mean(x > -0.1))
        assert row["surv_0"] == pytest.approx(np.mean(x > 0))
        assert row["top10_mean"] == pytest.approx(x[x >= np.quantile(x, 0.9)].mean(), rel=1e-9)


def _big_frame(n=60_000, seed=3, shift_after=None):
    """One step of tokens at positions 0..99 (bins of 25); after row ``shift_after`` the divergences are
    ~10x larger (a drift the pilot cannot foresee)."""
    rng = np.random.default_rng(seed)
    pos = np.tile(np.arange(100, dtype=np.int32), n // 100)
    lq = np.log(rng.uniform(0.05, 1.0, len(pos)))
    noise = rng.standard_t(3, len(pos)) * 0.05
    if shift_after is not None:
        noise[shift_after:] *= 10
    lp = np.log(np.clip(np.exp(lq) + noise, 1e-4, 1.0))
    return pl.DataFrame({"step": np.zeros(len(pos), np.int64), "seq_id": np.arange(len(pos)) // 100, "pos": pos,
                         "logp": lp.astype(np.float32), "logp_rollout": lq.astype(np.float32),
                         "advantage": np.ones(len(pos), np.float32)})


def _exact_check(out, df, metrics, thresholds, bin_width):
    divs = _divs(df)
    bins = df["pos"].to_numpy() // bin_width
    for m in metrics:
        d = divs[m].astype(np.float32).astype(np.float64)
        got = out.filter(pl.col("metric") == m)
        assert got["bin"].to_list() == sorted(set(bins.tolist()))
        for row in got.iter_rows(named=True):
            x = d[bins == row["bin"]]
            exp = _np_stats(x, thresholds, metric=m)
            for name in ("p50", "p90", "p99"):  # exact order statistics of the float32 values
                assert row[name] == exp[name], (m, row["bin"], name)
            assert row["count"] == exp["count"] and row["hill_k"] == exp["hill_k"]
            for k in ("mean", "top10_mean", *(f"surv_{x:g}" for x in thresholds)):
                assert row[k] == pytest.approx(exp[k], rel=1e-9), (m, row["bin"], k)
            # Hill: sums of float32 logs (numpy here: float64 logs)
            if exp["hill_alpha"] is None:
                assert row["hill_alpha"] is None, (m, row["bin"])
            else:
                assert row["hill_alpha"] == pytest.approx(exp["hill_alpha"], rel=1e-5), (m, row["bin"])


@pytest.mark.parametrize("case", ["single_pass", "pilot_off", "guess_missed", "too_many_kept"])
def test_single_pass_guess_and_fallback_are_exact(monkeypatch, case):
    """The pilot-guided single pass, the plain two passes, a pilot whose guess misses (the distribution
    drifts after the pilot rows) and an abandoned guess (too many kept values) all give numpy's exact
    statistics."""
    from cppo_diag.analyses import position
    from cppo_diag.analyses.tokens import divergence_exprs, load_tokens

    df = _big_frame(shift_after=20_000 if case == "guess_missed" else None)
    monkeypatch.setattr(position, "PILOT_MIN_BIN", 500)
    monkeypatch.setattr(position, "_GUESS_EPS", 0.05)  # a 10 k-row pilot: +-5 percentile points
    if case == "too_many_kept":
        monkeypatch.setattr(position, "_MAX_KEPT", 100)
    metrics, thresholds = ["tv", "k3"], (0.01, 0.05, 0.2)
    out = position.aggregate_positions(
        load_tokens(df), {m: divergence_exprs()[m] for m in metrics}, bin_width=25, thresholds=thresholds,
        chunk_rows=7_000, pilot_rows=0 if case == "pilot_off" else 10_000)
    _exact_check(out, df, metrics, thresholds, 25)


def test_nan_divergences_are_skipped_in_both_paths():
    """Null / NaN divergences are left out of every statistic (``count`` included), in the single-pass and
    the two-pass path alike."""
    from cppo_diag.analyses import position
    from cppo_diag.analyses.tokens import divergence_exprs, load_tokens

    df = _big_frame(n=20_000)
    lp = df["logp"].to_numpy().copy()
    lp[::7] = np.nan
    df = df.with_columns(logp=pl.Series(lp)).with_columns(
        logp=pl.when(pl.col("pos") == 3).then(None).otherwise(pl.col("logp")))
    outs = [position.aggregate_positions(load_tokens(df), {"tv": divergence_exprs()["tv"]}, bin_width=25,
                                         thresholds=(0.05,), pilot_rows=p, chunk_rows=5_000) for p in (0, 4_000)]
    assert outs[0].columns == outs[1].columns and outs[0].height == outs[1].height
    for c in outs[0].columns:
        if outs[0][c].dtype == pl.Float64:  # tail sums are added in another order in the two paths
            np.testing.assert_allclose(outs[0][c].to_numpy(), outs[1][c].to_numpy(), rtol=1e-12, err_msg=c)
        else:
            assert outs[0][c].to_list() == outs[1][c].to_list(), c
    d = _divs(df)["tv"].astype(np.float32).astype(np.float64)
    ok = ~np.isnan(d)
    bins = df["pos"].to_numpy() // 25
    for row in outs[0].iter_rows(named=True):
        x = d[ok & (bins == row["bin"])]
        assert row["count"] == len(x)
        assert row["p50"] == np.quantile(x, 0.5) and row["p99"] == np.quantile(x, 0.99)
        assert row["mean"] == pytest.approx(x.mean(), rel=1e-9)


def test_auto_bin_width_gives_at_most_40_bins_over_the_longest_response():
    from cppo_diag.analyses.binning import auto_bin_width

    assert auto_bin_width(33) == 1
    assert auto_bin_width(41) == 2
    assert auto_bin_width(4096) == 128
    assert auto_bin_width(10**7) == 1024  # capped at the widest choice
    for n in (1, 7, 40, 80, 81, 500, 16384):
        w = auto_bin_width(n)
        assert -(-n // w) <= 40 and (w == 1 or -(-n // (w // 2)) > 40)
