#!/usr/bin/env python
"""Regenerate ``sample_logs/``: small runs of the bundled trainer for a fresh clone to browse.

Four runs of the CPU demo task from the shipped warm start, same seed, differing only in the rule (and, for the
last, the learning rate):

  grpo-fib       grpo_clip (eps_low 0.2, eps_high 0.28)
  dppo-fib       dppo (binary TV, delta 0.15)
  cppo-fib       cppo (paper defaults: delta 0.15, w_min 0.8, adaptive delta_b >= 0.02)
  unstable-fib   grpo_clip at 10x the learning rate: divergence tails blow up

To stay a few MB in all, tokens and texts are recorded every 5th step for 35% of the sequences (scalars every
step); checkpoints are dropped at the end.

    python scripts/make_sample_logs.py                    # about 10 minutes on 2 cores (much more when busy)
    python scripts/make_sample_logs.py --steps 10 --out /tmp/s
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

RUNS = [
    ("grpo-fib", "grpo_clip", {}, 1.0),
    ("dppo-fib", "dppo", {}, 1.0),
    ("cppo-fib", "cppo", {}, 1.0),
    ("unstable-fib", "grpo_clip", {}, 10.0),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "sample_logs"), help="output root")
    ap.add_argument("--steps", type=int, default=150, help="RL iterations per run (the demo preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated run names to (re)make")
    args = ap.parse_args(argv)

    from cppo_diag.train import build_config, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    for name, rule, params, lr_mult in RUNS:
        if only and name not in only:
            continue
        shutil.rmtree(out / name, ignore_errors=True)
        base = build_config("demo")
        cfg = build_config("demo", overrides={
            "steps": args.steps, "seed": args.seed, "rule": {"name": rule, "params": params},
            "optim": {"lr": base.optim.lr * lr_mult},
            "log": {"out_dir": str(out), "name": name, "every_n_steps": 5, "seq_fraction": 0.35, "eval_every": 25},
            "ckpt": {"every": 25, "keep": 0}})
        print(f"== {name}: rule={rule} lr={cfg.optim.lr:g}")
        summary = train(cfg)
        print(f"   greedy accuracy {summary['summary/greedy_acc_before']:.3f} -> {summary['summary/greedy_acc_after']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
