"""Scale benchmark (issue 26): the ``--no-cache`` scan vs pandas at equal work, the first view from the
recorder's write-time aggregates, and the recorder's added cost, side by side in one run.

    python benchmarks/bench_scale.py --tokens 1e8                  # the issue-26 table (100 M tokens)
    python benchmarks/bench_scale.py --tokens 1e7 --repeats 1      # scaled down

The run (512 responses of 256-1024 tokens per step) is written under ``--data-dir`` (default ``bench_data/``)
through ``cppo_diag.RunRecorder`` (``cppo_diag.analyses.synthetic.write_recorded_run``), write-time aggregates
on, unless it exists. Every timed variant is a fresh process (imports and start-up included), peak RSS is the
largest sum of RSS over its process tree (sampled every 20 ms), CPU seconds are the larger of ``os.wait4``'s
and the sum over the tree's processes of their last sampled CPU times (the local engine's worker processes
are forkserver children, which ``wait4`` does not see):

* ``first open``: the reader's one-time integrity check of a run's shards (kept beside the run for every later
  process), timed once before the rows below;
* ``ours (scan)``: ``cppo-diag stats RUN --by position --bin 64 --metric tv --no-cache`` (reads every shard);
* ``pandas (equal work)``: read pos, logp, logp_rollout of every shard (``pd.read_parquet``), |pi - mu|,
  bin = pos // 64, ``groupby(bin)`` mean and P90 - less than ours, which also gives count, P50, P99,
  top-decile mean and four survival fractions per bin;
* ``ours (first view)``: the same command without ``--no-cache`` on a run whose only cache is what the
  recorder wrote: it merges the write-time aggregates (also at ``--bin 128``), reading no token; and
  ``cppo-diag doctor RUN --no-budget`` (its per-step series, attribution and position tables from the
  recorder's blocks).

Ours and pandas alternate ``--repeats`` times. Accuracy: largest relative difference of our mean and P90
per bin from pandas' (float64, exact). The recorder's cost: ``--overhead-steps`` steps recorded with
write-time aggregates on and off, alternating; the writer thread's CPU per step for the aggregates, and that
as a share of a training step (``--step-us-per-token``, default the demo trainer's measured 30 us per
sampled token, docs/benchmarks.md "Trainer"). Figures belong in docs/benchmarks.md ("Scale").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

PANDAS = r"""
import sys, glob
import numpy as np, pandas as pd
run, bw, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
files = sorted(glob.glob(f"{run}/tokens/step=*/*.parquet"))
df = pd.concat([pd.read_parquet(f, columns=["pos", "logp", "logp_rollout"]) for f in files], ignore_index=True)
tv = (np.exp(df["logp"].astype("float64")) - np.exp(df["logp_rollout"].astype("float64"))).abs()
g = tv.groupby(df["pos"] // bw)
pd.DataFrame({"mean": g.mean(), "p90": g.quantile(0.9), "count": g.size()}).rename_axis("bin").to_csv(out)
"""


def run_timed(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds, CPU seconds (``os.wait4``: the process and its reaped descendants) and the
    peak RSS of its process tree."""
    from proc_tree import TreeSampler

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with TreeSampler(proc.pid) as tree:
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    peak, cpu = [tree.peak_rss], tree.cpu  # cpu: pid -> CPU seconds (worker processes that wait4 does not reap)
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd} failed:\n{err}")
    own = ru.ru_utime + ru.ru_stime  # the process and the descendants it reaped
    others = sum(v for pid, v in cpu.items() if pid != proc.pid)  # sampled: forkserver workers are not reaped
    return {"wall_s": wall, "cpu_s": max(own, cpu.get(proc.pid, 0.0) + others), "rss_mb": peak[0] / 2**20,
            "stderr": err}


def ours_cmd(run: Path, out: Path, *, bin_width: int = 64, no_cache: bool = True, metrics=("tv",),
             extra: tuple = ()) -> list[str]:
    cmd = [sys.executable, "-m", "cppo_diag.cli.main", "stats", str(run), "--by", "position", "--bin", str(bin_width),
           "--no-progress", "--out", str(out), *extra]
    for m in metrics:
        cmd += ["--metric", m]
    return cmd + (["--no-cache"] if no_cache else [])


def recorder_overhead(tmp: Path, steps: int, repeats: int) -> dict:
    """Writer-thread CPU per step with write-time aggregates on and off (alternating recordings)."""
    from cppo_diag.analyses.synthetic import write_recorded_run

    out = {"on": [], "off": [], "agg": [], "tokens_per_step": None}
    for r in range(repeats):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            st: dict = {}
            path = tmp / f"overhead-{mode}-{r}"
            n = 512 * 640 * steps
            write_recorded_run(path, n_tokens=n, seqs_per_step=512, max_len=1024, seed=r, aggregates=mode == "on",
                               stats=st)
            out[mode].append(st["writer_cpu_s"] / steps)
            if mode == "on":
                out["agg"].append(st["writer_aggregates_cpu_s"] / steps)
            out["tokens_per_step"] = st["rows_written"] / steps
            shutil.rmtree(path, ignore_errors=True)
    return out


def _read_csv(path: Path):
    import polars as pl

    return pl.read_csv(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=lambda s: int(float(s)), default=100_000_000)
    ap.add_argument("--data-dir", type=Path, default=ROOT / "bench_data")
    ap.add_argument("--repeats", type=int, default=2, help="alternations of ours and pandas (default 2)")
    ap.add_argument("--skip-pandas", action="store_true")
    ap.add_argument("--ray", default="", help="comma-separated CPU counts of a local Ray cluster to time the scan "
                                              "on (fresh process, ray.init included), e.g. 1,2")
    ap.add_argument("--only-ray", action="store_true", help="only the Ray rows (and one local scan for comparison)")
    ap.add_argument("--overhead-steps", type=int, default=10, help="steps per recording of the overhead runs")
    ap.add_argument("--overhead-repeats", type=int, default=2)
    ap.add_argument("--step-us-per-token", type=float, default=30.0,
                    help="training step time per sampled token, microseconds (default: the demo trainer's 30)")
    args = ap.parse_args()

    run = args.data_dir / f"recorded_{args.tokens}"
    from cppo_diag.storage.meta import is_run_dir

    if not is_run_dir(run):
        from cppo_diag.analyses.synthetic import write_recorded_run

        print(f"generating {args.tokens:,} tokens in {run} (RunRecorder, write-time aggregates on) ...", flush=True)
        t0 = time.perf_counter()
        st: dict = {}
        write_recorded_run(run, n_tokens=args.tokens, seqs_per_step=512, max_len=1024, seed=0, stats=st)
        print(f"  written in {time.perf_counter() - t0:.1f} s; writer CPU {st['writer_cpu_s']:.1f} s, of which "
              f"write-time aggregates {st['writer_aggregates_cpu_s']:.1f} s", flush=True)
    # the first view must find only what the recorder wrote: drop caches of earlier queries
    from cppo_diag.analyses.aggregate import drop_view_caches

    drop_view_caches(run)
    # the reader's one-time integrity check (every page of every new shard version decoded, then kept in
    # RUN/_cache/shard_checks.json for every later process): timed apart, so the rows below are steady state
    first_open = run_timed([sys.executable, "-c", "import sys; from cppo_diag import open_run; "
                            "print(len(open_run(sys.argv[1]).token_files()))", str(run)])
    print(f"first open (the reader's shard checks, once per shard version): {first_open['wall_s']:.2f} s wall, "
          f"{first_open['cpu_s']:.2f} CPU-s, {first_open['rss_mb']:.0f} MB", flush=True)
    n_files = len(list((run / "tokens").glob("step=*/*.parquet")))
    size = sum(f.stat().st_size for f in (run / "tokens").glob("step=*/*.parquet"))
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    print(f"run: {run} ({n_files} shards, {size / 2**20:,.0f} MiB); machine: {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    res: dict[str, list[dict]] = {"ours (scan)": [], "pandas (equal work)": []}
    try:
        for r in range(args.repeats):
            order = ["ours", "pandas"] if r % 2 == 0 else ["pandas", "ours"]
            for who in order:
                if who == "pandas" and args.skip_pandas:
                    continue
                load = os.getloadavg()[0]
                if who == "ours":
                    x = run_timed(ours_cmd(run, tmp / "ours.csv"))
                    name = "ours (scan)"
                else:
                    x = run_timed([sys.executable, "-c", PANDAS, str(run), "64", str(tmp / "pandas.csv")])
                    name = "pandas (equal work)"
                x["load"] = load
                res[name].append(x)
                print(f"  {name}: {x['wall_s']:.2f} s wall, {x['cpu_s']:.2f} CPU-s, {x['rss_mb']:.0f} MB "
                      f"(load {load:.1f})", flush=True)
        for w in [int(x) for x in args.ray.split(",") if x]:
            name = f"ours (scan), Ray local cluster x{w}"
            x = run_timed(ours_cmd(run, tmp / f"ray{w}.csv", extra=("--engine", "ray", "--workers", str(w))))
            x["load"] = os.getloadavg()[0]
            res[name] = [x]
            print(f"  {name}: {x['wall_s']:.2f} s wall, {x['cpu_s']:.2f} CPU-s, {x['rss_mb']:.0f} MB", flush=True)
        if args.only_ray:
            return 0
        first = {}
        for label, kw in (("first view, --bin 64 --metric tv", dict(bin_width=64)),
                          ("first view, --bin 128 --metric tv", dict(bin_width=128)),
                          ("first view, --bin 64, 3 metrics", dict(bin_width=64, metrics=("tv", "abs_logratio", "k3")))):
            out = tmp / f"first-{len(first)}.csv"
            x = run_timed(ours_cmd(run, out, no_cache=False, **kw))
            x["load"] = os.getloadavg()[0]
            x["out"] = out
            first[label] = x
            print(f"  {label}: {x['wall_s']:.2f} s wall, {x['cpu_s']:.2f} CPU-s, {x['rss_mb']:.0f} MB", flush=True)
        # the doctor's first view: per-step series, attribution and mismatch rows written by the recorder
        doc = [sys.executable, "-m", "cppo_diag.cli.main", "doctor", str(run), "--no-budget", "--no-figures",
               "--format", "json", "--no-progress"]
        x = run_timed(doc)
        x["load"] = os.getloadavg()[0]
        first["first view, doctor --no-budget"] = x
        print(f"  first view, doctor --no-budget: {x['wall_s']:.2f} s wall, {x['cpu_s']:.2f} CPU-s, "
              f"{x['rss_mb']:.0f} MB", flush=True)
        ovh = recorder_overhead(tmp, args.overhead_steps, args.overhead_repeats)

        # -- accuracy ------------------------------------------------------------------------------
        import numpy as np

        ours = _read_csv(tmp / "ours.csv")
        acc = {}
        if not args.skip_pandas:
            pd_ = _read_csv(tmp / "pandas.csv").sort("bin")
            o = ours.sort("bin")
            assert o["bin"].to_list() == pd_["bin"].to_list() and o["count"].to_list() == pd_["count"].to_list()
            for c in ("mean", "p90"):
                acc[c] = float(np.max(np.abs(o[c].to_numpy() / pd_[c].to_numpy() - 1)))
        f64 = _read_csv(first["first view, --bin 64 --metric tv"]["out"]).sort("bin")
        same_first = (f64["count"].to_list() == ours.sort("bin")["count"].to_list()
                      and float(np.max(np.abs(f64["p90"].to_numpy() / ours.sort("bin")["p90"].to_numpy() - 1))) < 1e-9)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    tokens = int(ours["count"].sum())
    print(f"\n### Scale, {tokens:,} tokens, bins of 64, |pi - mu|; load average now {os.getloadavg()[0]:.1f}\n")
    print("| variant | runs | wall s (best / median) | CPU s (median) | M tokens/s (best wall) | "
          "M tokens per CPU-s | peak RSS MB | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = {**res, **{k: [v] for k, v in first.items()}}
    for name, xs in rows.items():
        if not xs:
            continue
        walls, cpus = [x["wall_s"] for x in xs], [x["cpu_s"] for x in xs]
        print(f"| {name} | {len(xs)} | {min(walls):.2f} / {statistics.median(walls):.2f} | "
              f"{statistics.median(cpus):.2f} | {tokens / min(walls) / 1e6:.1f} | "
              f"{tokens / statistics.median(cpus) / 1e6:.1f} | {max(x['rss_mb'] for x in xs):.0f} | "
              f"{statistics.median(x['load'] for x in xs):.1f} |")
    o, p = res["ours (scan)"], res["pandas (equal work)"]
    thr = tokens / min(x["wall_s"] for x in o) / 1e6
    print()
    print(f"target >= 30 M tokens/s (scan, fresh process): {'met' if thr >= 30 else 'NOT met'} ({thr:.1f})")
    if p:
        ratio_w = statistics.median(x["wall_s"] for x in p) / statistics.median(x["wall_s"] for x in o)
        ratio_c = statistics.median(x["cpu_s"] for x in p) / statistics.median(x["cpu_s"] for x in o)
        print(f"target >= 3x pandas at equal work: {'met' if ratio_w >= 3 else 'NOT met'} "
              f"({ratio_w:.1f}x wall, {ratio_c:.1f}x CPU, medians)")
        worst = max(acc.values())
        print(f"target <= 1% relative error vs pandas: {'met' if worst <= 0.01 else 'NOT met'} "
              f"(mean {acc['mean']:.2e}, P90 {acc['p90']:.2e}; counts equal)")
    rss = max(x["rss_mb"] for x in o)
    print(f"target peak RSS < 1.5 GB: {'met' if rss < 1536 else 'NOT met'} ({rss:.0f} MB)")
    fv = first["first view, --bin 64 --metric tv"]
    print(f"first view from write-time aggregates: {fv['wall_s']:.2f} s wall, equal to the scan (counts equal, "
          f"P90 within 1e-9): {same_first}")
    agg = statistics.median(ovh["agg"])
    on, off = statistics.median(ovh["on"]), statistics.median(ovh["off"])
    tps = ovh["tokens_per_step"]
    step_s = tps * args.step_us_per_token * 1e-6
    print(f"recorder: writer CPU per step {off * 1e3:.1f} ms (aggregates off) / {on * 1e3:.1f} ms (on); the "
          f"aggregates {agg * 1e3:.1f} ms per step of {tps:,.0f} tokens ({agg / tps * 1e9:.0f} ns/token), none on the "
          f"training thread; as a share of a {step_s:.1f} s step ({args.step_us_per_token:g} us/token): "
          f"{100 * agg / step_s:.2f}% (target <= 3%: {'met' if agg / step_s <= 0.03 else 'NOT met'})")
    print(json.dumps({"tokens": tokens, "scan_M_per_s": thr, "accuracy": acc}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
