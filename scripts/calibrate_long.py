#!/usr/bin/env python
"""Calibrate the trainer's ``long`` preset and write the calibration table of docs/trainer.md (issue 27).

Trains the study preset ``calib-long`` (GRPO clip, DPPO, CPPO and the no-trust-region control ``pg_is``, 8
seeds, at the preset's own settings) at 1 torch thread and its trust-region half
(``scripts/calibration/calib-long-t2.toml``) at 2, each through ``cppo-diag study`` (resumable: rerun to continue), then reads the finished runs and reports, per rule and thread count:

* how many seeds raise greedy held-out exact accuracy (``summary/greedy_acc_after`` > ``_before``), the mean
  before -> after, and the same for the per-digit valid share (``eval/greedy_valid_share``);
* how many collapse: a *sustained* collapse (the doctor's definition, docs/analyses.md): the first step >= 10
  where the 5-step moving average of ``reward/mean`` falls below half its running maximum and stays below that
  half for the rest of the run, with at least 5 steps left;
* the masked fraction over the tokens the policy had moved on since sampling (recorded lag > 0) and the tail
  ratio (top-decile |pi - mu| in the last third of relative positions over the first third);
* per metric, the seed standard deviation of the final value and the minimum detectable difference between two
  rules at 8 and 16 seeds (two-sided alpha 0.05, power 0.8, two independent groups: 2.80 * sd * sqrt(2 / n)).

    python scripts/calibrate_long.py --root runs/calib --workers 2                      # train + table
    python scripts/calibrate_long.py --root runs/calib --no-train --write docs/trainer.md  # table only
    python scripts/calibrate_long.py --root runs/calib --threads 1 --no-train               # one thread count
    python scripts/calibrate_long.py --explore runs/explore-cosine runs/explore-constant       # exploration runs
    python scripts/calibrate_long.py --explore runs/p31 runs/p32 --candidate peak-lr --write docs/trainer.md
    python scripts/calibrate_long.py --root runs/calib-st10 --threads 1 --no-train --candidate st10 --write docs/trainer.md

The exploration studies that chose the preset's settings are ``scripts/calibration/explore-*.toml``; ``--explore``
tables any runs (finished or not): held-out accuracy at each evaluation, the lowest 5-step moving average of
``reward/mean`` against its running maximum, a sustained collapse, the masked fraction.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from cppo_diag.storage.meta import is_run_dir  # noqa: E402

START, END = "<!-- calibration-table:start (scripts/calibrate_long.py) -->", "<!-- calibration-table:end -->"
EXPLORE_START, EXPLORE_END = "<!-- explore-table:start (scripts/calibrate_long.py --explore) -->", "<!-- explore-table:end -->"
RULES = ("grpo_clip", "dppo", "cppo", "pg_is")
LABELS = {"grpo_clip": "GRPO clip", "dppo": "DPPO", "cppo": "CPPO", "pg_is": "pg_is (no trust region)"}
MDD_Z = 2.80  # z_{0.975} + z_{0.80}


def sustained_collapse(rewards: np.ndarray, steps: np.ndarray) -> int | None:
    """The doctor's sustained collapse (``analyses.doctor.reward_episodes``: the first step >= 10 where the 5-step
    moving average of the reward falls below half its running maximum and stays below to the end, with at least 5
    steps left), or None."""
    from cppo_diag.analyses.doctor import reward_episodes

    collapse = reward_episodes(steps, rewards)["collapse"]
    return None if collapse is None else int(collapse["start"])


def run_figures(path: Path) -> dict:
    """One finished run's figures (reads its scalars and recorded tokens)."""
    import polars as pl

    from cppo_diag import open_run
    from cppo_diag.analyses.updates import default_updates, filter_updates

    run = open_run(path)
    s = run.steps().sort("step")
    out = {"run": path.name, "rule": run.meta.rule, "steps": s.height,
           "finished": "summary/greedy_acc_after" in s.columns}
    for k in ("greedy_acc", "greedy_valid_share"):
        for when in ("before", "after"):
            col = f"summary/{k}_{when}"
            v = s[col].drop_nulls() if col in s.columns else []
            out[f"{k}_{when}"] = float(v[-1]) if len(v) else float("nan")
    if "reward/mean" not in s.columns:  # not past its first iteration
        return {**out, "finished": False, "collapse_step": None, "masked_frac": float("nan"), "tail_ratio": float("nan")}
    rw = s.select("step", "reward/mean").drop_nulls()
    out["collapse_step"] = sustained_collapse(rw["reward/mean"].to_numpy(), rw["step"].to_numpy())
    toks = filter_updates(run.tokens(), default_updates(run))
    toks = toks.select("step", "update", "rank", "seq_id", "pos", "logp", "logp_rollout", "keep_applied").collect()
    out["masked_frac"] = float((~toks["keep_applied"]).mean()) if toks.height else float("nan")
    toks = toks.with_columns(tv=(pl.col("logp").exp() - pl.col("logp_rollout").exp()).abs(),
                             T=pl.len().over("step", "update", "rank", "seq_id"))
    rel, tv = ((toks["pos"] + 1) / toks["T"]).to_numpy(), toks["tv"].to_numpy()

    def top10(x):
        return float(x[x >= np.quantile(x, 0.9)].mean()) if len(x) else float("nan")

    first, last = top10(tv[rel <= 1 / 3]), top10(tv[rel > 2 / 3])
    out["tail_ratio"] = last / first if first > 0 else float("nan")
    return out


def explore_table(roots: list[Path]) -> str:
    """One row per run under ``roots`` (finished or not)."""
    from cppo_diag import open_run
    from cppo_diag.analyses.doctor import reward_trend

    lines = ["| run | iterations | greedy accuracy at each evaluation | lowest reward MA / its running max | "
             "sustained collapse | masked (lag > 0, or after the 1st update) |", "|---|---|---|---|---|---|"]
    for root in roots:
        for d in sorted(p for p in Path(root).iterdir() if is_run_dir(p)):
            run = open_run(d)
            s = run.steps().sort("step")
            total = run.meta.config.get("steps", "?")
            if "reward/mean" not in s.columns:
                lines.append(f"| `{root.name}/{d.name}` | 0/{total} | - | - | - | - |")  # not past its first step
                continue
            ev = s.select("step", "eval/greedy_acc").drop_nulls()
            evs = ", ".join(f"{a:.3f}" for a in ev["eval/greedy_acc"])
            rw = s.select("step", "reward/mean").drop_nulls()
            r = rw["reward/mean"].to_numpy()
            _, ma, run_max = reward_trend(rw["step"].to_numpy(), r)  # the doctor's moving average
            low = f"{ma.min():.2f} / {run_max[int(ma.argmin())]:.2f}" if len(ma) else "-"
            col = sustained_collapse(r, rw["step"].to_numpy())
            f = run_figures(d)
            masked = "-" if f["rule"] == "pg_is" else f"{f['masked_frac']:.1%}"
            lines.append(f"| `{root.name}/{d.name}` | {s.height}/{total} | {evs} | {low} | "
                         f"{'no' if col is None else f'step {col}'} | {masked} |")
    return "\n".join(lines)


def train(root: Path, threads: int, workers: int) -> None:
    """The study preset ``calib-long`` at 1 thread; its trust-region half (scripts/calibration/calib-long-t2.toml)
    at more."""
    study = "calib-long" if threads == 1 else str(REPO / "scripts" / "calibration" / "calib-long-t2.toml")
    cmd = [sys.executable, "-m", "cppo_diag.cli.main", "study", study, "--root", str(root / f"t{threads}"),
           "--workers", str(workers), "--threads", str(threads), "--no-progress"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def collect(root: Path, threads: int) -> list[dict]:
    out = []
    for d in sorted((root / f"t{threads}").glob("*-s*")):
        if is_run_dir(d):
            f = run_figures(d)
            f["threads"], f["seed"] = threads, int(d.name.rsplit("-s", 1)[1])
            out.append(f)
    return out


def _mean(xs) -> float:
    xs = [x for x in xs if x == x]
    return float(np.mean(xs)) if xs else float("nan")


def table(rows: list[dict]) -> str:
    lines = ["| rule | threads | seeds | exact accuracy up | exact accuracy before -> after (mean) | valid share up | "
             "valid share before -> after (mean) | sustained collapses | masked (lag > 0) | tail ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rule in RULES:
        for threads in sorted({r["threads"] for r in rows}):
            rs = [r for r in rows if r["rule"] == rule and r["threads"] == threads and r["finished"]]
            if not rs:
                continue
            up = sum(r["greedy_acc_after"] > r["greedy_acc_before"] for r in rs)
            vs_up = sum(r["greedy_valid_share_after"] > r["greedy_valid_share_before"] for r in rs)
            col = sum(r["collapse_step"] is not None for r in rs)
            steps = sorted(r["collapse_step"] for r in rs if r["collapse_step"] is not None)
            col_txt = f"{col}/{len(rs)}" + (f" (steps {steps[0]}-{steps[-1]})" if steps else "")
            masked = "-" if rule == "pg_is" else f"{_mean(r['masked_frac'] for r in rs):.1%}"
            lines.append(
                f"| {LABELS[rule]} | {threads} | {len(rs)} | {up}/{len(rs)} | "
                f"{_mean(r['greedy_acc_before'] for r in rs):.3f} -> {_mean(r['greedy_acc_after'] for r in rs):.3f} | "
                f"{vs_up}/{len(rs)} | {_mean(r['greedy_valid_share_before'] for r in rs):.3f} -> "
                f"{_mean(r['greedy_valid_share_after'] for r in rs):.3f} | {col_txt} | {masked} | "
                f"{_mean(r['tail_ratio'] for r in rs):.1f}x |")
    return "\n".join(lines)


def seed_table(rows: list[dict]) -> str:
    """Per seed: each rule's exact accuracy after (before is the warm start's, the same for every run), with its
    valid share, and the step of a sustained collapse."""
    threads = sorted({r["threads"] for r in rows})
    rules = [ru for ru in RULES if any(r["rule"] == ru for r in rows)]
    cols = [(ru, t) for ru in rules for t in threads if any(r["rule"] == ru and r["threads"] == t for r in rows)]
    lines = ["| seed | " + " | ".join(f"{LABELS[ru].split(' (')[0]}, {t} thr." for ru, t in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for seed in sorted({r["seed"] for r in rows}):
        cells = []
        for ru, t in cols:
            r = next((r for r in rows if r["rule"] == ru and r["threads"] == t and r["seed"] == seed), None)
            if r is None or not r["finished"]:
                cells.append("-")
                continue
            c = "" if r["collapse_step"] is None else f", collapse {r['collapse_step']}"
            cells.append(f"{r['greedy_acc_after']:.3f} ({r['greedy_valid_share_after']:.3f}{c})")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def noise_table(rows: list[dict]) -> str:
    lines = ["| rule | threads | metric | mean | seed sd | min. detectable difference, 8 seeds | 16 seeds |",
             "|---|---|---|---|---|---|---|"]
    for rule in RULES:
        for threads in sorted({r["threads"] for r in rows}):
            rs = [r for r in rows if r["rule"] == rule and r["threads"] == threads and r["finished"]]
            if len(rs) < 2:
                continue
            for key, label in (("greedy_acc_after", "exact accuracy"), ("greedy_valid_share_after", "valid share")):
                v = np.array([r[key] for r in rs], dtype=float)
                sd = float(v.std(ddof=1))
                mdd = [MDD_Z * sd * math.sqrt(2 / n) for n in (8, 16)]
                lines.append(f"| {LABELS[rule]} | {threads} | {label} | {v.mean():.3f} | {sd:.3f} | {mdd[0]:.3f} | "
                             f"{mdd[1]:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/calib", help="runs go to ROOT/t1 and ROOT/t2 (default runs/calib)")
    ap.add_argument("--threads", type=int, action="append", default=None, help="thread counts (default 1 and 2)")
    ap.add_argument("--workers", type=int, default=2, help="training processes side by side (default 2)")
    ap.add_argument("--no-train", action="store_true", help="only read the runs already in ROOT")
    ap.add_argument("--write", default="", help="replace the table between the calibration-table markers of FILE")
    ap.add_argument("--candidate", default="", metavar="NAME",
                    help="the runs are a candidate regime, not the preset: write between the markers "
                         "calibration-table-NAME (the preset's own table stays); with --explore, explore-table-NAME")
    ap.add_argument("--json", default="", help="also write every run's figures to this JSON file")
    ap.add_argument("--explore", nargs="+", type=Path, default=None, metavar="ROOT",
                    help="only table the runs under these study roots (scripts/calibration/explore-*.toml)")
    args = ap.parse_args(argv)
    if args.explore:
        out = explore_table(args.explore)
        print(out)
        if args.write:
            start, end = EXPLORE_START, EXPLORE_END
            if args.candidate:  # another exploration's table beside the first
                start = f"<!-- explore-table-{args.candidate}:start (scripts/calibrate_long.py --explore --candidate) -->"
                end = f"<!-- explore-table-{args.candidate}:end -->"
            _write(Path(args.write), out, start, end)
        return 0
    root, threads = Path(args.root), args.threads or [1, 2]
    if not args.no_train:
        for t in threads:
            train(root, t, args.workers)
    rows = [r for t in threads for r in collect(root, t)]
    if not rows:
        raise SystemExit(f"{root}: no finished runs under t{threads[0]}/ (run without --no-train first)")
    out = (table(rows) + "\n\nPer seed, exact accuracy after RL (valid share after; a sustained collapse's first step):\n\n"
           + seed_table(rows) + "\n\nSeed spread of the final held-out metrics:\n\n" + noise_table(rows))
    print(out)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    if args.write:
        start, end = START, END
        if args.candidate:
            start = f"<!-- calibration-table-{args.candidate}:start (scripts/calibrate_long.py --candidate) -->"
            end = f"<!-- calibration-table-{args.candidate}:end -->"
        _write(Path(args.write), out, start, end)
    return 0


def _write(path: Path, out: str, start: str, end: str) -> None:
    from doc_markers import write_between

    write_between(path, start, end, out)


if __name__ == "__main__":
    raise SystemExit(main())
