"""The doctor's per-step series (issue 26): one pass, exact against numpy, cached beside the run, written by the
recorder as steps complete (so a recorded run's first doctor view reads no token for them), rebuilt when a shard
changes, and never in the way of a token."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from cppo_diag.analyses import doctor as D
from cppo_diag.analyses import doctor_series as S
from cppo_diag.analyses.synthetic import write_recorded_run

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "sample_logs" / "cppo-long"


def _blocks(run: Path) -> list[Path]:
    return sorted((run / "_cache" / "aggregates" / S.STORE_KEY).glob("*.npz"))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    return write_recorded_run(tmp_path_factory.mktemp("dser") / "run", n_tokens=60_000, seqs_per_step=16,
                              max_len=300, updates=2, seed=3)


def test_rows_match_numpy_per_step():
    rng = np.random.default_rng(0)
    n = 5000
    df = pl.DataFrame({"step": rng.integers(0, 4, n), "pos": rng.integers(0, 50, n), "update": rng.integers(0, 3, n),
                       "logp": -rng.exponential(1.0, n).astype(np.float32),
                       "logp_rollout": -rng.exponential(1.0, n).astype(np.float32),
                       "advantage": rng.normal(size=n).astype(np.float32),
                       "entropy": rng.exponential(size=n).astype(np.float32),
                       "keep_applied": rng.random(n) > 0.1})
    rows = S.step_rows(df)
    assert rows["step"].to_list() == [0, 1, 2, 3]
    for r in rows.iter_rows(named=True):
        s = df.filter(pl.col("step") == r["step"])
        after = s.filter(pl.col("update") > 0)
        d = np.abs(after["logp"].to_numpy().astype(np.float64) - after["logp_rollout"].to_numpy().astype(np.float64))
        q = np.quantile(d, 0.9)
        assert r["tail_top10_after"] == pytest.approx(d[d >= q].mean(), rel=1e-12)
        assert r["abs_lr_mean_after"] == pytest.approx(d.mean(), rel=1e-12)
        assert r["masked_frac_after"] == pytest.approx((~after["keep_applied"].to_numpy()).mean())
        first = s.filter(pl.col("update") == 0)
        lr = first["logp"].to_numpy().astype(np.float64) - first["logp_rollout"].to_numpy().astype(np.float64)
        assert r["k3_pi"] == pytest.approx(np.mean(np.expm1(lr) - lr), rel=1e-12)
        assert r["entropy"] == pytest.approx(first["entropy"].cast(pl.Float64).mean(), rel=1e-12)
        assert (r["n"], r["n_after"], r["n_old"]) == (s.height, after.height, 0)
    info = S.series(rows)
    assert info["tail_updates"] == "after_first" and info["mismatch_pair"] == "pi / mu in the first update"


def test_missing_column_is_named():
    with pytest.raises(ValueError, match="needs column 'advantage'"):
        S.step_rows(pl.DataFrame({"step": [0], "pos": [0], "logp": [-1.0]}))


def test_sample_log_is_cached_and_reused(tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(SAMPLE, run, ignore=shutil.ignore_patterns("_cache"))
    scan = S.doctor_rows(run, cache=False)
    assert not _blocks(run)
    first = S.doctor_rows(run)  # computes and saves blocks
    assert _blocks(run)
    assert_frame_equal(first, scan)
    monkeypatch.setattr(S, "step_rows", lambda *a, **k: (_ for _ in ()).throw(AssertionError("tokens read")))
    assert_frame_equal(S.doctor_rows(run), scan)  # from the blocks only
    assert D.step_series(run)["tail"].height == scan.filter(pl.col("n_tail_after") > 0).height


def test_recorder_writes_a_row_per_step(recorded, monkeypatch):
    steps = sorted(int(p.name.split("=")[1]) for p in (recorded / "tokens").iterdir())
    names = [b.name for b in _blocks(recorded)]
    singles = [n for n in names if n.split("-")[0][1:] == n.split("-")[1]]
    assert len(singles) == len(steps) >= 9  # one block per completed step, at write time ...
    assert any(n.startswith("s0-7-") for n in names)  # ... and each aligned block of 8 steps
    scan = S.doctor_rows(recorded, cache=False)
    from cppo_diag.analyses import mismatch, tokens

    from cppo_diag.storage import open_run

    fam = mismatch.mismatch_metrics(open_run(recorded).tokens(), by="step", updates="after_first")  # a scan
    monkeypatch.setattr(tokens, "_scan_step_files", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    assert_frame_equal(S.doctor_rows(recorded), scan)  # the recorder's rows equal the reader's
    got = mismatch.mismatch_metrics(recorded, by="step", updates="after_first")  # the Doctor page's default
    assert_frame_equal(got, fam, check_exact=False, rtol=1e-12)
    # the Attribution page's first view: the summary, the by-step terms and the position strata, all written
    from cppo_diag.analyses import attribution as A

    assert A.attribution_summary(recorded)["tokens"] == int(scan["n"].sum())
    assert A.attribution_by(recorded, by="step").height == len(steps)
    curves, summary = A.position_strata(recorded)
    assert summary["tokens"] == int(scan["n"].sum()) and curves.height
    assert mismatch.mismatch_metrics(recorded, by="step", updates="all")["n_tokens"].sum() == int(scan["n"].sum())


def test_changed_shard_makes_its_block_stale(tmp_path):
    run = write_recorded_run(tmp_path / "run", n_tokens=30_000, seqs_per_step=16, max_len=300, updates=2, seed=4)
    before = S.doctor_rows(run)
    shard = sorted((run / "tokens").glob("step=000001/*.parquet"))[0]
    t = pl.read_parquet(shard)
    t.with_columns(pl.col("logp_rollout") - 0.5).write_parquet(shard)  # step 1 changed after it was recorded
    after = S.doctor_rows(run)
    assert after.filter(pl.col("step") == 1)["abs_lr_mean_all"][0] != before.filter(pl.col("step") == 1)["abs_lr_mean_all"][0]
    assert_frame_equal(after, S.doctor_rows(run, cache=False))


def test_large_steps_are_left_to_the_reader(tmp_path, monkeypatch):
    from cppo_diag.analyses import step_cache

    monkeypatch.setattr(step_cache, "WRITE_MAX_ROWS", 1000)
    run = write_recorded_run(tmp_path / "run", n_tokens=20_000, seqs_per_step=16, max_len=300, seed=6)
    assert not _blocks(run)  # every step was larger than the cap: no row written, nothing held
    assert_frame_equal(S.doctor_rows(run), S.doctor_rows(run, cache=False))


def test_unreadable_block_is_rebuilt(tmp_path):
    run = write_recorded_run(tmp_path / "run", n_tokens=20_000, seqs_per_step=16, max_len=300, updates=2, seed=7)
    want = S.doctor_rows(run, cache=False)
    for b in _blocks(run):
        b.write_bytes(b"not an npz")  # torn or foreign files under the cache key
    assert_frame_equal(S.doctor_rows(run), want)
    assert _blocks(run) and all(b.read_bytes() != b"not an npz" for b in _blocks(run))  # dropped, rebuilt


def test_budget_check_window_on_big_runs(monkeypatch):
    counts = pl.DataFrame({"step": [0, 1, 2, 3], "n": [40, 30, 20, 10], "n_after": [0, 0, 0, 0]})
    assert D._budget_window(counts) == (None, 100, 100)  # a run under BUDGET_TOKENS: all of it
    monkeypatch.setattr(D, "BUDGET_TOKENS", 35)
    assert D._budget_window(counts) == ((2, 3), 30, 100)  # the latest steps holding at most 35 tokens
    monkeypatch.setattr(D, "BUDGET_TOKENS", 5)
    assert D._budget_window(counts) == ((3, 3), 10, 100)  # at least one step


def test_a_scan_loads_no_torch(recorded):
    """``cppo-diag stats`` on a run never imports torch (about a second of a fresh process): neither the
    aggregator hook the analyses register for the recorder, nor resolving the default updates."""
    import subprocess
    import sys

    code = ("import sys\nfrom cppo_diag.analyses.aggregate import position_summary\n"
            "from cppo_diag.analyses.doctor_series import doctor_rows\n"
            f"position_summary({str(recorded)!r}, metrics=('tv',), updates=None, cache=False, workers=1)\n"
            f"doctor_rows({str(recorded)!r})\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False", out.stderr
