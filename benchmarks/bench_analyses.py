"""Benchmark of the analyses: position statistics (partial aggregates, exact, pandas, Ray) and CPPO recompute.

    python benchmarks/bench_analyses.py --tokens 1e8 --metrics tv --pandas-tokens 3e7   # the issue-14 table
    python benchmarks/bench_analyses.py --tokens 1e7 --metrics tv                       # scaled down
    python benchmarks/bench_analyses.py --tokens 1e8 --baseline OLD_position.py         # exact: old vs new

A synthetic run (512 responses of 256-1024 tokens per step) is written under ``bench_data/`` (gitignored)
through ``cppo_diag.RunRecorder`` (``cppo_diag.analyses.synthetic.write_recorded_run``) unless it exists. Each variant
runs in its own subprocess; its peak RSS is the largest sum of the RSS of its whole process tree (workers,
Ray daemons), sampled every 20 ms, and its CPU seconds come from ``os.wait4`` (reaped descendants
included; Ray's daemons are not reaped by the benchmark process, so Ray rows understate CPU). Side by side,
in one run:

* ``sketch local xN``: ``cppo_diag.analyses.aggregate.position_summary`` (mergeable partials, log-bucket sketch,
  cache off) with N worker processes (default N = 1 and 2);
* ``exact``: ``cppo_diag.analyses.position.position_stats`` (exact order statistics, polars' threads);
* ``pandas``: read the needed columns of every shard with ``pd.read_parquet``, compute the divergence,
  ``groupby(bin)`` count, mean, quantiles, top-decile mean, survival - what one would write without
  thinking about memory (``--pandas-tokens``: on the first N tokens only, with ``exact`` and the sketch run
  again on the same subset for the ratio);
* ``sketch ray xN``: the same on a local Ray cluster of N CPUs (``ray.init`` timed separately), N = 1, 2;
* ``recompute``: ``cppo_diag.analyses.recompute(run, "cppo")`` over the first ``--recompute-tokens`` (off by default).

It prints throughput, peak RSS, the ratio to pandas, the largest relative difference of the sketch's mean and
P90 per bin from the exact ones, and the issue-14 targets as met / not met; figures belong in
docs/benchmarks.md ("Analyses").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("tv", "abs_logratio", "k3")
THRESHOLDS = (0.05, 0.1, 0.2, 0.5)


# -- workers (run in a subprocess) ---------------------------------------------------------------------
def _files(run: Path, max_tokens: int | None = None) -> list[Path]:
    files = sorted((run / "tokens").glob("step=*/*.parquet"))
    if max_tokens is None:
        return files
    import pyarrow.parquet as pq

    out, n = [], 0
    for f in files:
        if n >= max_tokens:
            break
        out.append(f)
        n += pq.ParquetFile(f).metadata.num_rows
    return out


def worker_ours(run: Path, metrics, bin_width: int, max_tokens: int | None, impl: Path | None = None,
                mode: str = "exact", engine: str = "local", workers: int = 1, cached: bool = False) -> dict:
    import polars as pl

    init_s = None
    if mode == "sketch":
        from cppo_diag.analyses.aggregate import position_summary

        if engine == "ray":  # start the local cluster first: its start-up is timed on its own
            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "POLARS_MAX_THREADS": "1"}})
            init_s = time.perf_counter() - t0

        def position_stats(source, **kw):
            return position_summary(source, engine=engine, workers=workers, cache=cached, **kw)
    elif impl is None:
        from cppo_diag.analyses.position import position_stats
    else:  # another implementation of analyses/position.py (e.g. a saved copy of an older version)
        import importlib.util

        spec = importlib.util.spec_from_file_location("position_baseline", impl)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        position_stats = mod.position_stats

    source = run if max_tokens is None else pl.scan_parquet(_files(run, max_tokens))
    if cached:  # start cold
        import shutil

        from cppo_diag.analyses.aggregate import CACHE_DIR

        shutil.rmtree(run / CACHE_DIR, ignore_errors=True)
    if mode == "sketch" and max_tokens is not None:  # a subset: a copy of the run's first shards as a run
        source = _subset_run(run, max_tokens)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        table = position_stats(source, metrics=metrics, bin_width=bin_width, thresholds=THRESHOLDS)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        if init_s is not None:
            import ray

            ray.shutdown()
    reopen_s = None
    if cached:  # a second call answers from the cache beside the run (then the cache is removed)
        import shutil

        from cppo_diag.analyses.aggregate import CACHE_DIR

        t0 = time.perf_counter()
        again = position_stats(source, metrics=metrics, bin_width=bin_width, thresholds=THRESHOLDS)
        reopen_s = time.perf_counter() - t0
        assert again.equals(table)
        shutil.rmtree(Path(source) / CACHE_DIR)
    n = int(table.filter(table["metric"] == metrics[0])["count"].sum())
    return {"wall_s": wall, "cpu_s": cpu, "tokens": n, "init_s": init_s, "reopen_s": reopen_s,
            "table": table.select("metric", "bin", "count", "mean", "p50", "p90", "p99", "top10_mean").to_dicts()}


def _subset_run(run: Path, max_tokens: int) -> Path:
    """A run directory holding hard links to the first shards of ``run`` (about ``max_tokens`` tokens)."""
    import shutil

    sub = run.parent / f"{run.name}.first{max_tokens}"
    if not (sub / "meta.json").exists():
        shutil.rmtree(sub, ignore_errors=True)
        (sub / "tokens").mkdir(parents=True)
        (sub / "_done").mkdir()
        shutil.copy(run / "meta.json", sub / "meta.json")
        for f in _files(run, max_tokens):
            (sub / "tokens" / f.parent.name).mkdir(exist_ok=True)
            os.link(f, sub / "tokens" / f.parent.name / f.name)
            step = int(f.parent.name.split("=")[1])
            (sub / "_done" / f"step={step:06d}.rank0").touch()
    return sub


def worker_pandas(run: Path, metrics, bin_width: int, max_tokens: int | None) -> dict:
    import numpy as np
    import pandas as pd

    t0, c0 = time.perf_counter(), time.process_time()
    df = pd.concat([pd.read_parquet(f, columns=["pos", "logp", "logp_rollout"]) for f in _files(run, max_tokens)],
                   ignore_index=True)
    df[["logp", "logp_rollout"]] = df[["logp", "logp_rollout"]].astype("float64")
    k1 = (df["logp"] - df["logp_rollout"]).clip(-20, 20)
    divs = {"tv": (np.exp(df["logp"]) - np.exp(df["logp_rollout"])).abs(), "abs_logratio": k1.abs(),
            "k3": np.exp(k1) - 1 - k1}
    bins = df["pos"] // bin_width
    rows = []
    for m in metrics:
        d = pd.DataFrame({"bin": bins, "d": divs[m].astype("float32")})
        g = d.groupby("bin")["d"]
        agg = g.agg(["count", "mean"])
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            agg[name] = g.quantile(q)
        p90 = g.transform(lambda s: s.quantile(0.9))
        agg["top10_mean"] = d["d"].where(d["d"] >= p90).groupby(d["bin"]).mean()
        for x in THRESHOLDS:
            agg[f"surv_{x:g}"] = (d["d"] > x).groupby(d["bin"]).mean()
        tail = d["d"] > p90
        logs = np.log(d["d"][tail] / p90[tail])
        agg["hill_alpha"] = 1.0 / logs.groupby(d["bin"][tail]).mean()
        agg = agg.reset_index()
        agg.insert(0, "metric", m)
        rows.append(agg)
    table = pd.concat(rows, ignore_index=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "tokens": int(len(df)),
            "table": table[["metric", "bin", "count", "mean", "p50", "p90", "p99", "top10_mean"]].to_dict("records")}


def worker_recompute(run: Path, tokens: int) -> dict:
    from cppo_diag.analyses.recomputation import recompute

    files = _files(run, tokens)
    last_step = int(files[-1].parent.name.split("=")[1])
    t0, c0 = time.perf_counter(), time.process_time()
    res = recompute(run, "cppo", step_range=(None, last_step), progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "tokens": res.overall["n_valid"], "masked_frac": res.overall["masked_frac"],
            "steps": res.by_step.height}


def _run_worker(args: list[str]) -> dict:
    """Run this script as a worker subprocess; return its JSON, its CPU seconds (``os.wait4``) and the peak
    RSS of its whole process tree (sampled every 20 ms)."""
    from proc_tree import TreeSampler

    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    with TreeSampler(proc.pid) as tree:
        out = proc.stdout.read()
        _, status, rusage = os.wait4(proc.pid, 0)
    peak = [tree.peak_rss]
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"worker {args[:2]} failed with exit code {proc.returncode}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_rss_mb"] = max(peak[0] / 2**20, rusage.ru_maxrss / 1024)  # Linux ru_maxrss: KiB
    result["cpu_tree_s"] = rusage.ru_utime + rusage.ru_stime  # incl. start-up and reaped descendants
    return result


def _agree(a: list[dict], b: list[dict], tol: float = 1e-4) -> tuple[bool, float]:
    key = lambda r: (r["metric"], int(r["bin"]))  # noqa: E731
    bm = {key(r): r for r in b}
    worst = 0.0
    if len(a) != len(b):
        return False, float("inf")
    for r in a:
        o = bm.get(key(r))
        if o is None or int(o["count"]) != int(r["count"]):
            return False, float("inf")
        for c in ("mean", "p50", "p90", "p99", "top10_mean"):
            x, y = float(r[c]), float(o[c])
            worst = max(worst, abs(x - y) / max(abs(y), 1e-12))
    return worst < tol, worst


def _compare_baseline(args, common: list[str]) -> int:
    """Baseline and ours alternately, each in its own subprocess; wall, CPU, peak RSS of every run."""
    runs: dict[str, list[dict]] = {"baseline": [], "ours": []}
    for _ in range(args.repeats):
        for name in ("baseline", "ours"):
            extra = ["--impl", str(args.baseline.resolve())] if name == "baseline" else []
            r = _run_worker(["--worker", "ours", *common, *extra])
            r["load"] = os.getloadavg()[0]
            runs[name].append(r)
            print(f"{name:<9} {r['tokens']:>13,} tokens  wall {r['wall_s']:6.2f} s  CPU {r['cpu_s']:6.2f} s  "
                  f"{r['tokens'] / r['wall_s'] / 1e6:5.1f} M tok/s wall  {r['tokens'] / r['cpu_s'] / 1e6:5.1f} M tok/CPU-s  "
                  f"peak RSS {r['peak_rss_mb']:5.0f} MB  (load {r['load']:.1f})", flush=True)
    b, o = runs["baseline"][-1]["table"], runs["ours"][-1]["table"]
    ok, worst = _agree(o, b)
    print(f"results agree with the baseline: {ok} (worst relative difference {worst:.2e})")
    for name, rs in runs.items():
        best_w = min(r["wall_s"] for r in rs)
        best_c = min(r["cpu_s"] for r in rs)
        print(f"{name}: best wall {best_w:.2f} s, best CPU {best_c:.2f} s, max peak RSS "
              f"{max(r['peak_rss_mb'] for r in rs):.0f} MB")
    bw = min(r["wall_s"] for r in runs["baseline"]) / min(r["wall_s"] for r in runs["ours"])
    bc = min(r["cpu_s"] for r in runs["baseline"]) / min(r["cpu_s"] for r in runs["ours"])
    print(f"speed-up (best of each): {bw:.2f}x wall, {bc:.2f}x CPU")
    return 0


def _accuracy(sketch: list[dict], exact: list[dict]) -> dict:
    """Largest relative difference of the sketch from the exact table, per column (counts must match)."""
    key = lambda r: (r["metric"], int(r["bin"]))  # noqa: E731
    ex = {key(r): r for r in exact}
    worst = {"count_equal": len(sketch) == len(exact)}
    for r in sketch:
        o = ex.get(key(r))
        if o is None or int(o["count"]) != int(r["count"]):
            worst["count_equal"] = False
            continue
        for c in ("mean", "p50", "p90", "p99", "top10_mean"):
            x, y = float(r[c]), float(o[c])
            worst[c] = max(worst.get(c, 0.0), abs(x - y) / max(abs(y), 1e-300))
    return worst


def _row(name: str, r: dict) -> str:
    init = f"{r['init_s']:.1f}" if r.get("init_s") is not None else ""
    return (f"| {name} | {r['tokens']:,} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r.get('cpu_tree_s', 0):.2f} | "
            f"{r['tokens'] / r['wall_s'] / 1e6:.1f} | {r['peak_rss_mb']:.0f} | {init} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=lambda s: int(float(s)), default=100_000_000, help="tokens in the synthetic run")
    ap.add_argument("--pandas-tokens", type=lambda s: int(float(s)), default=None,
                    help="run pandas (and exact and the sketch again, for the side-by-side ratio) on the first N "
                         "tokens only (pandas needs ~60 bytes of RAM per token); default all")
    ap.add_argument("--recompute-tokens", type=lambda s: int(float(s)), default=0,
                    help="also time recompute(run, 'cppo') over the first N tokens (default 0: skip)")
    ap.add_argument("--skip-recompute", action="store_true", help="(the default; kept for older command lines)")
    ap.add_argument("--metrics", default="tv", help="comma-separated metrics (default tv: one divergence)")
    ap.add_argument("--bin", type=int, default=64)
    ap.add_argument("--workers", default="1,2", help="worker counts of the sketch rows (default 1,2)")
    ap.add_argument("--data-dir", type=Path, default=None, help="where the synthetic run lives (default bench_data/)")
    ap.add_argument("--skip-pandas", action="store_true")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a saved copy of an older analyses/position.py: run it and the exact position_stats "
                         "alternately (--repeats times each, interleaved, same box) and print both")
    ap.add_argument("--repeats", type=int, default=1, help="with --baseline: alternations (default 1)")
    ap.add_argument("--impl", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=["ours", "pandas", "recompute"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["exact", "sketch"], default="exact", help=argparse.SUPPRESS)
    ap.add_argument("--engine", choices=["local", "ray"], default="local", help=argparse.SUPPRESS)
    ap.add_argument("--n-workers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--max-tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    metrics = tuple(m for m in args.metrics.split(",") if m)

    if args.worker:
        if args.worker == "ours":
            res = worker_ours(args.run, metrics, args.bin, args.max_tokens, args.impl, args.mode, args.engine,
                              args.n_workers, args.cached)
        elif args.worker == "pandas":
            res = worker_pandas(args.run, metrics, args.bin, args.max_tokens)
        else:
            res = worker_recompute(args.run, args.max_tokens)
        print(json.dumps(res, default=float))
        return 0

    data_dir = args.data_dir or (ROOT / "bench_data")
    run = data_dir / f"recorded_{args.tokens}"
    if not (run / "meta.json").exists():
        from cppo_diag.analyses.synthetic import write_recorded_run

        print(f"generating {args.tokens:,} tokens in {run} (RunRecorder) ...", flush=True)
        t0 = time.perf_counter()
        write_recorded_run(run, n_tokens=args.tokens, seqs_per_step=512, max_len=1024, seed=0, progress=True)
        print(f"  generated in {time.perf_counter() - t0:.1f} s", flush=True)
    load0 = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load average {load0:.1f} (other jobs share these cores)", flush=True)
    common = ["--run", str(run), "--metrics", ",".join(metrics), "--bin", str(args.bin)]
    if args.baseline is not None:
        return _compare_baseline(args, common)
    workers = [int(w) for w in args.workers.split(",") if w]
    sub = ["--max-tokens", str(args.pandas_tokens)] if args.pandas_tokens else []
    res: dict[str, dict] = {}

    def go(name: str, extra: list[str]) -> dict:
        r = _run_worker(extra)
        r["load"] = os.getloadavg()[0]
        res[name] = r
        print(f"  {name}: {r['tokens']:,} tokens, {r['wall_s']:.2f} s wall, {r['tokens'] / r['wall_s'] / 1e6:.1f} M "
              f"tokens/s, peak RSS {r['peak_rss_mb']:.0f} MB (load {r['load']:.1f})", flush=True)
        return r

    for w in workers:
        go(f"sketch local x{w}", ["--worker", "ours", *common, "--mode", "sketch", "--n-workers", str(w)])
    go("sketch local, cache on", ["--worker", "ours", *common, "--mode", "sketch", "--n-workers", str(max(workers)),
                                  "--cached"])
    go("exact", ["--worker", "ours", *common])
    if not args.skip_pandas:
        if sub:
            go("sketch local (subset)", ["--worker", "ours", *common, *sub, "--mode", "sketch", "--n-workers",
                                         str(max(workers))])
            go("exact (subset)", ["--worker", "ours", *common, *sub])
        go("pandas", ["--worker", "pandas", *common, *sub])
    if not args.skip_ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("  ray not installed: pip install 'cppo-diag[ray]' (Ray rows skipped)")
        else:
            for w in (1, 2):
                go(f"sketch ray x{w}", ["--worker", "ours", *common, "--mode", "sketch", "--engine", "ray",
                                        "--n-workers", str(w)])
    if args.recompute_tokens:
        res["recompute"] = _run_worker(["--worker", "recompute", "--run", str(run), "--max-tokens",
                                        str(args.recompute_tokens)])

    print(f"\nposition statistics, metrics {', '.join(metrics)}, bins of {args.bin} tokens, load average "
          f"{load0:.1f} -> {os.getloadavg()[0]:.1f}:\n")
    print("| variant | tokens | wall s | CPU s (call) | CPU s (process tree) | M tokens/s (wall) | peak RSS MB | "
          "Ray init s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in res.items():
        if name != "recompute":
            print(_row(name, r))
    best = min((r for n, r in res.items() if n.startswith("sketch local x")), key=lambda r: r["wall_s"])
    cached = res["sketch local, cache on"]
    print(f"\ncache beside the run: first call {cached['wall_s']:.2f} s (aggregates and writes the blocks), "
          f"reopening {cached['reopen_s']:.3f} s ({cached['tokens'] / cached['reopen_s'] / 1e6:,.0f} M tokens/s)")
    thr = best["tokens"] / best["wall_s"] / 1e6
    print()
    acc = _accuracy(best["table"], res["exact"]["table"])
    print(f"sketch vs exact: counts equal {acc['count_equal']}; largest relative difference "
          + ", ".join(f"{c} {acc[c]:.2e}" for c in ("mean", "p50", "p90", "p99", "top10_mean") if c in acc))
    for name in [n for n in res if n.startswith("sketch ray")]:
        ok, worst = _agree(res[name]["table"], best["table"], tol=1e-9)
        print(f"{name} equals the local engine (counts identical, other columns within 1e-9): {ok} "
              f"(worst {worst:.1e})")
    print(f"target >= 30 M tokens/s: {'met' if thr >= 30 else 'NOT met'} ({thr:.1f} M tokens/s wall, best sketch row)")
    print(f"target peak RSS < 1.5 GB: {'met' if best['peak_rss_mb'] < 1536 else 'NOT met'} "
          f"({best['peak_rss_mb']:.0f} MB, whole process tree)")
    worst = max(acc.get("mean", 0), acc.get("p90", 0))
    print(f"target mean and P90 within 1% of exact: {'met' if worst <= 0.01 and acc['count_equal'] else 'NOT met'} "
          f"({worst:.2%})")
    if "pandas" in res:
        ours = res.get("sketch local (subset)", best)
        speed = res["pandas"]["wall_s"] / ours["wall_s"]
        print(f"target >= 3x pandas: {'met' if speed >= 3 else 'NOT met'} ({speed:.1f}x wall on the same "
              f"{ours['tokens']:,} tokens; pandas peak RSS {res['pandas']['peak_rss_mb']:.0f} MB)")
    rc = res.get("recompute")
    if rc:
        print(f"\nrecompute cppo over {rc['tokens']:,} tokens ({rc['steps']} steps): {rc['wall_s']:.1f} s wall, "
              f"{rc['tokens'] / rc['wall_s'] / 1e6:.2f} M tokens/s, peak RSS {rc['peak_rss_mb']:.0f} MB, "
              f"masked {100 * rc['masked_frac']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
