"""Benchmark of the analyses: position statistics (ours vs a straightforward pandas version) and CPPO recompute.

    python benchmarks/bench_analyses.py                       # 100 M tokens (generated once, ~1 GB on disk)
    python benchmarks/bench_analyses.py --tokens 20_000_000   # scaled down
    python benchmarks/bench_analyses.py --tokens 100_000_000 --pandas-tokens 30_000_000

A synthetic run (``analyses.synthetic.write_synthetic_run``; 512 responses of 256-1024 tokens per step) is
written under ``bench_data/`` (gitignored) unless it exists. Each variant runs in its own subprocess so its
peak RSS (``os.wait4`` rusage of that child) and its wall/CPU time are its own:

* ``ours``: ``analyses.position_stats`` (two streaming passes, exact quantiles) on the run directory;
* ``pandas``: read the three needed columns of every shard with ``pd.read_parquet``, compute the
  divergences, ``groupby(bin)`` with ``quantile`` / boolean means / a top-decile ``transform`` - what one
  would write without thinking about memory;
* ``recompute``: ``analyses.recompute(run, "cppo")`` over the first steps holding ``--recompute-tokens``.

The two position-statistics variants must agree (checked); the script prints throughput, peak RSS and the
speed-up ratio measured side by side. The targets (>= 30 M tokens/s, < 1.5 GB, >= 3x pandas) are printed as
met / not met; numbers belong in docs/benchmarks.md ("Analyses").
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


def worker_ours(run: Path, metrics, bin_width: int, max_tokens: int | None, impl: Path | None = None) -> dict:
    import polars as pl

    if impl is None:
        from analyses.position import position_stats
    else:  # another implementation of analyses/position.py (e.g. a saved copy of an older version)
        import importlib.util

        spec = importlib.util.spec_from_file_location("position_baseline", impl)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        position_stats = mod.position_stats

    source = run if max_tokens is None else pl.scan_parquet(_files(run, max_tokens))
    t0, c0 = time.perf_counter(), time.process_time()
    table = position_stats(source, metrics=metrics, bin_width=bin_width, thresholds=THRESHOLDS)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = int(table.filter(table["metric"] == metrics[0])["count"].sum())
    return {"wall_s": wall, "cpu_s": cpu, "tokens": n,
            "table": table.select("metric", "bin", "count", "mean", "p50", "p90", "p99", "top10_mean").to_dicts()}


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
    from analyses.recompute import recompute

    files = _files(run, tokens)
    last_step = int(files[-1].parent.name.split("=")[1])
    t0, c0 = time.perf_counter(), time.process_time()
    res = recompute(run, "cppo", step_range=(None, last_step), progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "tokens": res.overall["n_valid"], "masked_frac": res.overall["masked_frac"],
            "steps": res.by_step.height}


def _run_worker(args: list[str]) -> dict:
    """Run this script as a worker subprocess; return its JSON plus its own peak RSS (os.wait4)."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = proc.stdout.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"worker {args[:2]} failed with exit code {proc.returncode}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_rss_mb"] = rusage.ru_maxrss / 1024  # Linux: KiB
    return result


def _agree(a: list[dict], b: list[dict]) -> tuple[bool, float]:
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
    return worst < 1e-4, worst


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=lambda s: int(float(s)), default=100_000_000, help="tokens in the synthetic run")
    ap.add_argument("--pandas-tokens", type=lambda s: int(float(s)), default=None,
                    help="run pandas (and ours again, for the side-by-side ratio) on the first N tokens only "
                         "(pandas needs ~80 bytes of RAM per token); default all")
    ap.add_argument("--recompute-tokens", type=lambda s: int(float(s)), default=10_000_000)
    ap.add_argument("--metrics", default=",".join(METRICS), help="comma-separated metrics (default tv,abs_logratio,k3)")
    ap.add_argument("--bin", type=int, default=64)
    ap.add_argument("--data-dir", type=Path, default=None, help="where the synthetic run lives (default bench_data/)")
    ap.add_argument("--skip-pandas", action="store_true")
    ap.add_argument("--skip-recompute", action="store_true")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a saved copy of an older analyses/position.py: run it and ours alternately (--repeats "
                         "times each, interleaved, same box) and print both, with identical-results check")
    ap.add_argument("--repeats", type=int, default=1, help="with --baseline: alternations (default 1)")
    ap.add_argument("--impl", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=["ours", "pandas", "recompute"], help=argparse.SUPPRESS)
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--max-tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    metrics = tuple(m for m in args.metrics.split(",") if m)

    if args.worker:
        if args.worker == "ours":
            res = worker_ours(args.run, metrics, args.bin, args.max_tokens, args.impl)
        elif args.worker == "pandas":
            res = worker_pandas(args.run, metrics, args.bin, args.max_tokens)
        else:
            res = worker_recompute(args.run, args.max_tokens)
        print(json.dumps(res, default=float))
        return 0

    data_dir = args.data_dir or (ROOT / "bench_data")
    run = data_dir / f"synthetic_{args.tokens}"
    if not (run / "meta.json").exists():
        from analyses.synthetic import write_synthetic_run

        print(f"generating {args.tokens:,} tokens in {run} ...", flush=True)
        t0 = time.perf_counter()
        write_synthetic_run(run, n_tokens=args.tokens, seqs_per_step=512, max_len=1024, seed=0, progress=True)
        print(f"  generated in {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (other jobs share these cores; "
          f"CPU seconds are less noisy than wall seconds)")
    common = ["--run", str(run), "--metrics", ",".join(metrics), "--bin", str(args.bin)]
    sub = ["--max-tokens", str(args.pandas_tokens)] if args.pandas_tokens else []
    if args.baseline is not None:
        return _compare_baseline(args, common)
    results = {"ours": _run_worker(["--worker", "ours", *common])}
    if not args.skip_pandas:
        if sub:  # side by side on the same subset
            results["ours (subset)"] = _run_worker(["--worker", "ours", *common, *sub])
        results["pandas"] = _run_worker(["--worker", "pandas", *common, *sub])
    if args.skip_recompute:
        results["recompute"] = None
    else:
        results["recompute"] = _run_worker(["--worker", "recompute", "--run", str(run), "--max-tokens",
                                            str(args.recompute_tokens)])

    print(f"\nposition statistics, metrics {', '.join(metrics)}, bins of {args.bin} tokens:")
    print(f"{'variant':<14} {'tokens':>13} {'wall s':>8} {'cpu s':>8} {'M tok/s (wall)':>15} {'M tok/s/cpu-s':>14} "
          f"{'peak RSS MB':>12}")
    for name in ("ours", "ours (subset)", "pandas"):
        r = results.get(name)
        if r:
            print(f"{name:<14} {r['tokens']:>13,} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} "
                  f"{r['tokens'] / r['wall_s'] / 1e6:>15.1f} {r['tokens'] / r['cpu_s'] / 1e6:>14.1f} "
                  f"{r['peak_rss_mb']:>12.0f}")
    ours = results["ours"]
    thr = ours["tokens"] / ours["wall_s"] / 1e6
    print(f"\ntarget >= 30 M tokens/s: {'met' if thr >= 30 else 'NOT met'} ({thr:.1f} M tokens/s wall)")
    print(f"target peak RSS < 1.5 GB: {'met' if ours['peak_rss_mb'] < 1536 else 'NOT met'} "
          f"({ours['peak_rss_mb']:.0f} MB)")
    if "pandas" in results:
        pd_r = results["pandas"]
        ours = results.get("ours (subset)", ours)
        ok, worst = _agree(ours["table"], pd_r["table"])
        print(f"results agree with pandas: {ok} (worst relative difference {worst:.2e})")
        speed = pd_r["wall_s"] / ours["wall_s"]
        print(f"target >= 3x pandas: {'met' if speed >= 3 else 'NOT met'} ({speed:.2f}x wall, "
              f"{pd_r['cpu_s'] / ours['cpu_s']:.2f}x CPU; pandas peak RSS {pd_r['peak_rss_mb']:.0f} MB)")
    rc = results["recompute"]
    if rc is None:
        return 0
    print(f"\nrecompute cppo over {rc['tokens']:,} tokens ({rc['steps']} steps): {rc['wall_s']:.1f} s wall, "
          f"{rc['cpu_s']:.1f} s CPU, {rc['tokens'] / rc['wall_s'] / 1e6:.2f} M tokens/s, peak RSS "
          f"{rc['peak_rss_mb']:.0f} MB, masked {100 * rc['masked_frac']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
