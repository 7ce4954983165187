"""Cached recomputed rules (issue 26): What-if, Compare and Budget key a rule's per-step partials by (run
files, rule, parameters, update filter), so a slider back at an earlier value or a page revisit reads no
tokens; the cached results equal the uncached ones."""

import numpy as np
import pytest
from polars.testing import assert_frame_equal

from cppo_diag.analyses import recomputation as rc
from cppo_diag.analyses.compare import compare_runs
from cppo_diag.analyses.synthetic import write_synthetic_run
from cppo_diag.storage import reader


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("rc") / "run", n_tokens=30_000, seqs_per_step=12,
                               max_len=200, updates=2, seed=7)


def _forbid_reads(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("tokens were read")

    monkeypatch.setattr(reader.Run, "batches", boom)


def _same(a, b):
    assert a.overall == pytest.approx(b.overall, nan_ok=True)
    assert_frame_equal(a.by_step, b.by_step)
    assert_frame_equal(a.by_position, b.by_position)
    assert_frame_equal(a.by_adv_sign, b.by_adv_sign)


@pytest.mark.parametrize("updates", ["all", "after_first"])
def test_second_call_reads_no_tokens_and_equals_uncached(run_dir, monkeypatch, updates):
    from cppo_diag.analyses.updates import select_updates

    rc._STEP_MEMO.clear()
    specs = {"a": ("cppo", {"delta": 0.1}), "b": ("cppo", {"delta": 0.2})}
    first = rc.recompute_cached(run_dir, specs, step_range=(1, 4), updates=updates)
    read = rc.TOKENS_READ[0]
    assert read > 0
    want = rc.recompute_many(select_updates(run_dir, updates, step_range=(1, 4)), specs, step_range=(1, 4),
                             progress=False)
    for label in specs:
        _same(first[label], want[label])
    _forbid_reads(monkeypatch)
    # a slider moved away and back: the earlier value reads nothing
    again = rc.recompute_cached(run_dir, {"b": specs["b"]}, step_range=(1, 4), updates=updates)
    assert rc.TOKENS_READ[0] == read
    _same(again["b"], want["b"])
    # a narrower range is merged from the same per-step partials
    rc.recompute_cached(run_dir, {"a": specs["a"]}, step_range=(2, 3), updates=updates)
    # another parameter value is new: it must read
    with pytest.raises(AssertionError, match="tokens were read"):
        rc.recompute_cached(run_dir, {"c": ("cppo", {"delta": 0.3})}, step_range=(1, 4), updates=updates)


def test_changed_step_is_recomputed(tmp_path):
    run = write_synthetic_run(tmp_path / "run", n_tokens=8_000, seqs_per_step=8, max_len=150, seed=1)
    rc._STEP_MEMO.clear()
    rc.recompute_cached(run, {"x": ("cppo", {})})
    before = rc.TOKENS_READ[0]
    shard = sorted((run / "tokens").glob("step=000001/*.parquet"))[0]
    shard.touch()  # mtime changed: that step's partial no longer matches
    import os
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    rc.recompute_cached(run, {"x": ("cppo", {})})
    step1 = sum(b.n_tokens for b in rc.iter_batches(run, step_range=(1, 1)))
    assert rc.TOKENS_READ[0] - before == step1


def test_compare_revisit_reads_no_tokens(run_dir, monkeypatch):
    rc._STEP_MEMO.clear()
    a = compare_runs([run_dir], rules=["cppo", "grpo_clip"], step_range=(0, 3), progress=False)
    _forbid_reads(monkeypatch)
    b = compare_runs([run_dir], rules=["cppo", "grpo_clip"], step_range=(0, 3), progress=False)
    assert_frame_equal(a.summary, b.summary)
    assert_frame_equal(a.by_position, b.by_position)


def test_budget_revisit_reads_no_tokens(run_dir, monkeypatch):
    from cppo_diag.analyses.budget import budget_exhaustion

    kw = dict(rule="cppo", params={"delta_b": 0.02}, step_range=(0, 3), engine="local", workers=1, progress=False)
    a = budget_exhaustion(run_dir, **kw)
    _forbid_reads(monkeypatch)
    monkeypatch.setattr(rc, "iter_batches", lambda *x, **k: (_ for _ in ()).throw(AssertionError("tokens were read")))
    b = budget_exhaustion(run_dir, **kw)
    assert_frame_equal(a.by_step, b.by_step)
    assert np.array_equal(a.first_reject["survival"].to_numpy(), b.first_reject["survival"].to_numpy())
