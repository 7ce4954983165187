#!/usr/bin/env python
"""Trainer benchmarks, measured side by side in one process (these machines are noisy: compare ratios).

1. Recorder on vs off: the demo preset with ``log.record`` true (RunRecorder) and false (NullRecorder),
   alternating, ``--repeats`` times; prints the median per-step time of each and the overhead ratio
   (target: <= 3%).
2. Demo step-time breakdown from the recorded run's scalars: rollout, forward/backward/optimiser, rule + loss,
   token logging, and the rest.

    python benchmarks/bench_train.py                 # ~3-4 minutes on 2 cores
    python benchmarks/bench_train.py --steps 4 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="RL iterations per measured run")
    ap.add_argument("--repeats", type=int, default=3, help="on/off pairs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args(argv)

    import torch

    from cppo_diag import open_run
    from cppo_diag.train import build_config, train

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))

    def one(record: bool, i: int) -> tuple[float, Path]:
        name = f"{'on' if record else 'off'}-{i}"
        cfg = build_config("demo", overrides={
            "steps": args.steps, "threads": args.threads, "task": {"eval_size": 8},
            "log": {"out_dir": str(tmp), "name": name, "record": record, "progress": False},
            "ckpt": {"every": 0, "keep": 0}})
        t0 = time.perf_counter()
        train(cfg)
        return (time.perf_counter() - t0) / args.steps, tmp / name

    one(True, -1)  # warm-up: imports, allocator, first-touch of the warm start
    on, off, runs = [], [], []
    for i in range(args.repeats):
        order = (True, False) if i % 2 == 0 else (False, True)
        for rec in order:
            t, path = one(rec, i)
            (on if rec else off).append(t)
            if rec:
                runs.append(path)
    m_on, m_off = statistics.median(on), statistics.median(off)
    print(f"recorder on : median {m_on:.3f} s/step  ({', '.join(f'{x:.3f}' for x in on)})")
    print(f"recorder off: median {m_off:.3f} s/step  ({', '.join(f'{x:.3f}' for x in off)})")
    print(f"overhead: {100 * (m_on / m_off - 1):+.1f}%  (target <= 3%)")

    import polars as pl

    st = pl.concat([open_run(p).steps() for p in runs], how="diagonal_relaxed")
    masked = f"mask/{open_run(runs[0]).meta['rule']}/frac"  # the masked fraction, pooled over each step's updates
    mean = {c: float(st[c].mean()) for c in ("time/step_s", "time/rollout_s", "time/update_s", "time/rule_s",
                                             "time/log_tokens_s", "throughput/tokens_per_s", masked)}
    step = mean["time/step_s"]
    fwd_bwd = mean["time/update_s"] - mean["time/rule_s"] - mean["time/log_tokens_s"]
    print("\ndemo step-time breakdown (recorder on, mean over steps):")
    for label, v in [("rollout (sampling, KV cache)", mean["time/rollout_s"]),
                     ("forward/backward/AdamW", fwd_bwd), ("rule + loss (compute_mask, policy_loss)", mean["time/rule_s"]),
                     ("log_tokens (RunRecorder, enqueue)", mean["time/log_tokens_s"]),
                     ("rest (rewards, sequences, scalars)", step - mean["time/rollout_s"] - mean["time/update_s"])]:
        print(f"  {label:42s} {v:7.3f} s  {100 * v / step:5.1f}%")
    print(f"  {'step':42s} {step:7.3f} s   ({mean['throughput/tokens_per_s']:.0f} sampled tokens/s, masked fraction {mean[masked]:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
