"""Smoke test of benchmarks/bench_rules.py (every code path but the CUDA timer, on a tiny batch)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_rules.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_rules", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_runs_and_reports_ratios(capsys):
    bench = _load()
    assert bench.main(["-B", "6", "-T", "64", "--repeats", "1", "--loop-repeats", "1", "--clock", "cpu",
                       "--rules", "cppo", "dppo"]) == 0
    out = capsys.readouterr().out
    assert "CPPO vs per-sequence loop" in out and "CPPO vs one-read floor" in out
    assert "loop vs vectorised keep: 0 of" in out


def test_loop_baseline_equals_the_rule():
    bench = _load()
    lp, lr, adv, mask, lengths = bench.make_batch(8, 128, "cpu", torch.float64, seed=3)
    from cppo_diag.masks import compute_mask

    res = compute_mask("cppo", logp=lp, logp_rollout=lr, advantages=adv, response_mask=mask)
    assert torch.equal(res.keep & mask, bench.cppo_loop(lp, lr, adv, lengths) & mask)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_flag_without_cuda_is_a_clear_error(capsys):
    assert _load().main(["--device", "cuda", "--quick"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_quick_run(capsys):
    assert _load().main(["--device", "cuda", "--quick", "--rules", "cppo"]) == 0


def test_bench_baseline_runs_side_by_side(capsys):
    """--baseline loads a copy of a rules library under another package name and times it interleaved; here the
    copy is the current library, so every rule must report identical results."""
    bench = _load()
    root = str(BENCH.parents[1])
    assert bench.main(["-B", "5", "-T", "48", "--repeats", "1", "--loop-repeats", "1", "--clock", "cpu",
                       "--rules", "cppo", "cppo_shuffled", "--baseline", root]) == 0
    out = capsys.readouterr().out
    assert "before/after" in out
    lines = [ln for ln in out.splitlines() if ln.startswith(("cppo ", "cppo_shuffled ")) and ln.rstrip().endswith(("yes", "NO"))]
    assert len(lines) == 2 and all(ln.rstrip().endswith("yes") for ln in lines), out
