"""Write-time aggregates (issue 26): the recorder's writer saves each completed step's partial aggregate,
the first view merges them instead of scanning, at any multiple of the stored bin width; stale blocks are
detected and rebuilt; a bin width that is not a multiple scans and says so; a full disk costs no token."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from cppo_diag.analyses import aggregate as agg
from cppo_diag.analyses.synthetic import write_recorded_run
from cppo_diag.storage import open_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    # 2 updates per batch (both update classes), 11 steps: blocks of 1 and 8 steps (2 and 4: memory only)
    return write_recorded_run(tmp_path_factory.mktemp("wagg") / "run", n_tokens=88_000, seqs_per_step=16,
                              max_len=400, updates=2, seed=5)


def _blocks(run: Path) -> list[str]:
    d = run / agg.CACHE_DIR / agg.AggSpec(**agg.WRITE_SPEC_ARGS).key()
    return sorted(f.name for f in d.glob("*.npz"))


def _no_scan(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a token shard was read")

    monkeypatch.setattr(agg, "aggregate_files", boom)
    monkeypatch.setattr(agg, "_read_row_groups", boom)


def test_recorder_writes_step_and_dyadic_blocks(recorded):
    names = _blocks(recorded)
    n_steps = len(list((recorded / "tokens").iterdir()))
    assert n_steps == 11
    singles = [n for n in names if n.split("-")[0][1:] == n.split("-")[1]]
    assert len(singles) == n_steps
    assert any(n.startswith("s0-7-") for n in names)
    assert not any(n.startswith(("s8-9-", "s0-1-", "s4-7-")) for n in names)
    assert not any(n.startswith("s8-15-") for n in names)  # steps 11..15 never came


@pytest.mark.parametrize("kw", [dict(metrics=("tv",)), dict(bin_width=128), dict(bin_width=192, metrics=("k3", "tv")),
                                dict(step_range=(3, 9), adv_sign="pos"), dict(updates="first"),
                                dict(delta=0.15), dict(delta=0.2, w_min=0.5, bin_width=128, metrics=("tv",))])
def test_first_view_merges_without_reading_tokens(recorded, monkeypatch, kw):
    want = agg.position_summary(recorded, cache=False, workers=1, **kw)  # a scan
    _no_scan(monkeypatch)
    got = agg.position_summary(recorded, **kw)
    assert agg.LAST_INFO.from_recorder and agg.LAST_INFO.steps_aggregated == []
    # the same buckets and counts: equal up to the order of float sums
    assert_frame_equal(got, want, check_exact=False, rel_tol=1e-9)


def test_derive_equals_a_direct_pass(recorded):
    files = [str(f) for f in open_run(recorded).token_files()]
    fine = agg.aggregate_files(files, agg.AggSpec(**agg.WRITE_SPEC_ARGS))
    direct = agg.aggregate_files(files, agg.AggSpec(metrics=("abs_logratio",), bin_width=256))
    got = agg.derive(fine, direct.spec)
    np.testing.assert_array_equal(np.trim_zeros(got.tokens, "b"), np.trim_zeros(direct.tokens, "b"))
    for a, b in zip(got.sketch["abs_logratio"], direct.sketch["abs_logratio"]):
        np.testing.assert_array_equal(a, b)
    n = len(direct.sums["abs_logratio"])
    np.testing.assert_allclose(got.sums["abs_logratio"][:n], direct.sums["abs_logratio"], rtol=1e-12)
    assert not got.sums["abs_logratio"][n:].any()
    with pytest.raises(ValueError, match="not a multiple"):
        agg.derive(fine, agg.AggSpec(metrics=("tv",), bin_width=100))


def test_bin_width_not_a_multiple_scans_and_says_so(recorded):
    got = agg.position_summary(recorded, bin_width=100, metrics=("tv",), workers=1)
    assert agg.LAST_INFO.note and "not a multiple" in agg.LAST_INFO.note
    assert not agg.LAST_INFO.from_recorder
    assert_frame_equal(got, agg.position_summary(recorded, bin_width=100, metrics=("tv",), cache=False, workers=1),
                       check_exact=False, rel_tol=1e-9)
    out = subprocess.run([sys.executable, "-m", "cppo_diag.cli.main", "stats", str(recorded), "--bin", "100",
                          "--metric", "tv", "--no-progress", "--workers", "1"], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert "not a multiple of the recorded aggregates' 32" in out.stderr


def test_stale_aggregates_are_detected_and_rebuilt(tmp_path):
    run = write_recorded_run(tmp_path / "run", n_tokens=20_000, seqs_per_step=8, max_len=300, seed=2)
    shard = sorted((run / "tokens" / "step=000002").glob("*.parquet"))[0]
    t = pq.read_table(shard)
    logp = t.column("logp").to_numpy() - np.float32(0.5)  # the run changed after it was recorded
    t = t.set_column(t.schema.get_field_index("logp"), "logp", pa.array(np.asarray(logp, np.float32)))
    pq.write_table(t, shard)
    got = agg.position_summary(run, metrics=("tv",), workers=1)
    assert 2 in agg.LAST_INFO.steps_aggregated and 0 not in agg.LAST_INFO.steps_aggregated
    want = agg.position_summary(run, metrics=("tv",), cache=False, workers=1)
    assert_frame_equal(got, want, check_exact=False, rel_tol=1e-9)
    again = agg.position_summary(run, metrics=("tv",), workers=1)  # rebuilt: nothing left to scan
    assert agg.LAST_INFO.steps_aggregated == []
    assert_frame_equal(again, want, check_exact=False, rel_tol=1e-9)


def test_full_disk_while_writing_aggregates_loses_no_token(tmp_path, monkeypatch):
    calls = {"n": 0}

    def full(self, path):
        calls["n"] += 1
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(agg.Partial, "save", full)
    with pytest.warns(Warning, match="aggregates"):
        run = write_recorded_run(tmp_path / "run", n_tokens=20_000, seqs_per_step=8, max_len=300, seed=2)
    assert calls["n"] == 1  # switched off after the first failure
    monkeypatch.undo()
    ref = write_recorded_run(tmp_path / "ref", n_tokens=20_000, seqs_per_step=8, max_len=300, seed=2)
    got, want = open_run(run).tokens().collect(), open_run(ref).tokens().collect()
    assert got.height == want.height > 0
    assert_frame_equal(got, want)
    assert not (run / agg.CACHE_DIR).exists() or not _blocks(run)
    assert_frame_equal(agg.position_summary(run, metrics=("tv",), workers=1),
                       agg.position_summary(ref, metrics=("tv",), workers=1), check_exact=False, rel_tol=1e-9)


def test_no_cache_scans_even_with_recorded_aggregates(recorded, monkeypatch):
    _no_scan(monkeypatch)
    with pytest.raises(AssertionError, match="token shard was read"):
        agg.position_summary(recorded, metrics=("tv",), cache=False, workers=1)


def test_recorder_aggregates_off(tmp_path):
    from cppo_diag import RunRecorder

    rec = RunRecorder(tmp_path / "r", aggregates=False)
    rec.log_tokens(step=0, logp=np.zeros(4, np.float32) - 1, logp_rollout=np.zeros(4, np.float32) - 1.1,
                   cu_seqlens=np.array([0, 4]), advantages=np.ones(1, np.float32))
    rec.end_step(0)
    rec.close()
    assert open_run(tmp_path / "r").tokens().collect().height == 4
    assert not (tmp_path / "r" / agg.CACHE_DIR).exists()


def test_logged_mask_counts_from_recorded_aggregates(tmp_path, monkeypatch):
    """A trainer's logged mask (keep_applied, reason_applied) is counted by the writer too: the Compare
    page's applied-mask row merges it without a scan and equals the scan's."""
    from cppo_diag import RunRecorder

    rng = np.random.default_rng(0)
    rec = RunRecorder(tmp_path / "r")
    for step in range(3):
        lengths = rng.integers(20, 150, 8)
        cu = np.r_[0, np.cumsum(lengths)]
        n = int(cu[-1])
        lr = np.log(rng.uniform(0.05, 1, n)).astype(np.float32)
        lp = (lr + rng.normal(0, 0.2, n)).astype(np.float32)
        keep = rng.random(n) > 0.1
        reason = np.where(keep, 0, rng.choice([1, 2], n)).astype(np.uint8)
        rec.log_tokens(step=step, logp=lp, logp_rollout=lr, cu_seqlens=cu,
                       advantages=rng.choice([-1.0, 1.0], 8).astype(np.float32), keep_applied=keep,
                       reason_applied=reason)
        rec.end_step(step)
    rec.close()
    run = tmp_path / "r"
    want = agg.applied_mask(run, "r", "applied", cache=False)
    _no_scan(monkeypatch)
    got = agg.applied_mask(run, "r", "applied")
    assert agg.LAST_INFO.from_recorder and want is not None
    assert got[0] == pytest.approx(want[0], nan_ok=True)
    assert_frame_equal(got[1], want[1])
    assert_frame_equal(got[2], want[2])


def test_delta_overlay_scans_when_lengths_are_unknown(recorded, tmp_path):
    """Blocks without response lengths (a scan's) cannot give delta / w_t: the view scans and says why."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(recorded, run)
    d = run / agg.CACHE_DIR / agg.AggSpec(**agg.WRITE_SPEC_ARGS).key()
    for f in d.glob("*.npz"):  # rewrite every block without its lengths
        p = agg.Partial.load(f)
        p.lengths_ok = False
        p.save(f)
    got = agg.position_summary(run, delta=0.15, workers=1)
    assert "response lengths" in (agg.LAST_INFO.note or "")
    assert_frame_equal(got, agg.position_summary(run, delta=0.15, cache=False, workers=1), check_exact=False,
                       rel_tol=1e-9)


def test_run_facts_from_footers_equal_a_scan(recorded, monkeypatch):
    import polars as pl

    from cppo_diag.analyses import run_summary as R

    run = open_run(recorded)
    assert R._footer_facts(run) is not None
    want = {int(s): int(n) for s, n in run.tokens().group_by("step").agg(n=pl.len()).sort("step").collect().iter_rows()}
    assert R.tokens_per_step(run) == want
    assert R.token_steps(run) == sorted(want)
    assert R.max_position(run) == run.tokens().select(pl.col("pos").max()).collect().item()
    import pyarrow.parquet as pq

    monkeypatch.setattr(pq, "read_metadata", lambda *a, **k: (_ for _ in ()).throw(OSError("unreadable footer")))
    assert R._footer_facts(run) is None and R.tokens_per_step(run) == want  # falls back to the scan


def test_arrow_to_numpy_without_pandas_handles_nulls_offsets_and_chunks():
    a = pa.chunked_array([pa.array([1.5, None, 3.0], pa.float32()).slice(1), pa.array([4.0], pa.float32())])
    vals, valid = agg._to_numpy(a)
    assert valid.tolist() == [False, True, True] and vals[1:].tolist() == [3.0, 4.0]
    b = pa.array([True, None, False, True, False, True, True, False, True], pa.bool_()).slice(2)
    vals, valid = agg._to_numpy(b)
    assert vals.tolist() == [False, True, False, True, True, False, True] and valid is None
    t = pa.table({"x": pa.array([1, None, 3], pa.int32())})
    assert agg._numpy_column(t, "x", np.int32, "t", 0).tolist() == [1, 0, 3]
    with pytest.raises(ValueError, match="column 'x' has 1 null"):
        agg._numpy_column(t, "x", np.int32, "t")


def test_rows_the_storage_rule_rejects_are_not_aggregated(monkeypatch):
    """Where ``cppo_diag.storage.validate`` exists (the reliability work), rows it rejects (non-finite or
    positive log-probs, a non-finite advantage) are left out of the fast path too; nulls are not bad values."""
    import sys
    import types

    fake = types.ModuleType("cppo_diag.storage.validate")
    fake.LOGP_MAX, fake.LOGPROB_COLUMNS, fake.FINITE_COLUMNS = 1e-3, ("logp", "logp_rollout"), ("advantage",)
    monkeypatch.setitem(sys.modules, "cppo_diag.storage.validate", fake)
    t = pa.table({"step": pa.array([0] * 5, pa.int64()), "pos": pa.array([0, 1, 2, 3, 4], pa.int32()),
                  "logp": pa.array([-1.0, float("nan"), 0.5, -1.0, None], pa.float32()),
                  "logp_rollout": pa.array([-1.1] * 5, pa.float32()),
                  "advantage": pa.array([1.0, 1.0, 1.0, float("inf"), 1.0], pa.float32()),
                  "keep_applied": pa.array([True, False, True, False, True], pa.bool_())})
    cols = agg.table_columns(t, agg.AggSpec(metrics=("tv",)))
    assert cols["pos"].tolist() == [0, 4]  # NaN, > LOGP_MAX and inf advantage dropped; the null kept
    assert cols["keep_applied"][0].tolist() == [True, True] and cols["step"].tolist() == [0, 0]
    monkeypatch.delitem(sys.modules, "cppo_diag.storage.validate")
    monkeypatch.setattr("builtins.__import__", _no_validate(__import__))
    assert agg.table_columns(t, agg.AggSpec(metrics=("tv",)))["pos"].tolist() == [0, 1, 2, 3, 4]


def _no_validate(real):
    def imp(name, *a, **k):
        if name == "cppo_diag.storage.validate":
            raise ImportError(name)
        return real(name, *a, **k)

    return imp
