"""``cppo-diag stats RUN --engine ray`` equals ``--engine local`` on a 10 M-token run written through
RunRecorder, on a local Ray cluster that is always shut down (no Ray process may survive the test)."""

import json
import time

import polars as pl
import psutil
import pytest

ray = pytest.importorskip("ray")


def _ray_children() -> list[str]:
    """Ray processes (raylet, gcs_server, workers, ...) in this test's process tree. Scoped to our own
    children on purpose: ``ray stop`` would also stop other people's clusters on a shared machine."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        # Ray's daemons and workers; not multiprocessing's forkserver, whose sys.path merely names ray/
        ray_like = ("/ray/_private/", "/ray/dashboard/", "/ray/core/", "/ray/autoscaler/", "default_worker.py")
        if (p.name() in ("raylet", "gcs_server") or cmd.startswith("ray::") or p.name().startswith("ray::")
                or any(r in cmd for r in ray_like)):
            out.append(f"{p.pid} {p.name()} {cmd[:120]}")
    return out


def _wait_no_ray(timeout_s: float = 180.0) -> list[str]:
    end = time.monotonic() + timeout_s
    left = _ray_children()
    while left and time.monotonic() < end:
        time.sleep(0.5)
        left = _ray_children()
    return left


def _stats(run, tmp_path, *extra) -> pl.DataFrame:
    from cppo_diag.cli.main import main

    out = tmp_path / f"stats{len(list(tmp_path.glob('stats*')))}.json"
    assert main(["stats", str(run), "--format", "json", "--no-progress", "--no-cache", "--workers", "2",
                 "--out", str(out), *extra]) == 0
    return pl.DataFrame(json.loads(out.read_text()))


def _assert_equal(a: pl.DataFrame, b: pl.DataFrame):
    assert a.columns == b.columns
    assert a.select("metric", "bin", "count", "hill_k").equals(b.select("metric", "bin", "count", "hill_k"))
    for c in a.columns:
        if c in ("metric", "bin", "count", "hill_k"):
            continue
        for x, y in zip(a[c].to_list(), b[c].to_list()):
            assert (x is None and y is None) or abs(x - y) <= 1e-9 * max(abs(x), abs(y), 1e-300), (c, x, y)


@pytest.mark.slow
def test_ray_engine_equals_local_on_10m_tokens(tmp_path):
    from cppo_diag.analyses.synthetic import write_recorded_run

    run = write_recorded_run(tmp_path / "run", n_tokens=10_000_000, seqs_per_step=512, max_len=1024, seed=0)
    local = _stats(run, tmp_path, "--engine", "local")
    assert local.filter(pl.col("metric") == "tv")["count"].sum() >= 9_000_000
    assert not ray.is_initialized()
    try:
        # a local cluster of 2 CPUs started here; the engine uses the connection it finds
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        joined = _stats(run, tmp_path, "--engine", "ray")
    finally:
        ray.shutdown()
    _assert_equal(joined, local)
    assert _wait_no_ray() == []
    try:  # no cluster: the engine starts its own local one and shuts it down
        own = _stats(run, tmp_path, "--engine", "ray")
    finally:
        if ray.is_initialized():
            ray.shutdown()
    _assert_equal(own, local)
    assert not ray.is_initialized()
    assert _wait_no_ray() == [], "Ray processes survived the test"
