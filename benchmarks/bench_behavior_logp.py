#!/usr/bin/env python
"""What ``--log.behavior_logp true`` costs the bundled trainer (issue 20): the ``long`` preset's step time with
and without it, measured side by side in one process (runs alternate, so a change in the machine's load hits
both), as the median of ``time/step_s`` over the iterations after the first (which also compiles kernels).

    python benchmarks/bench_behavior_logp.py                 # 2 pairs of 6-iteration runs, 1 torch thread
    python benchmarks/bench_behavior_logp.py --pairs 3 --steps 8

Prints one line per run and the ratio on / off of the medians (the figure in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import numpy as np


def one_run(root: str, name: str, steps: int, on: bool, threads: int) -> list[float]:
    from cppo_diag import open_run
    from cppo_diag.train import build_config, train

    cfg = build_config("long", overrides={"steps": steps, "threads": threads,
                                          "log": {"out_dir": root, "name": name, "behavior_logp": on, "eval_every": 0,
                                                  "progress": False, "every_n_steps": 1},
                                          "task": {"eval_size": 8}, "ckpt": {"every": 0, "keep": 0}})
    train(cfg)
    return open_run(f"{root}/{name}").steps().sort("step")["time/step_s"].to_list()[1:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2, help="on/off pairs of runs (default 2)")
    ap.add_argument("--steps", type=int, default=6, help="iterations per run (default 6)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    times = {True: [], False: []}
    with tempfile.TemporaryDirectory() as root:
        for i in range(args.pairs):
            for on in ((False, True) if i % 2 == 0 else (True, False)):
                t = one_run(root, f"{'on' if on else 'off'}-{i}", args.steps, on, args.threads)
                times[on] += t
                print(f"pair {i} behavior_logp={'on ' if on else 'off'}: median step {statistics.median(t):.3f} s "
                      f"({len(t)} iterations)", flush=True)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"median step time: on {on:.3f} s, off {off:.3f} s, ratio on/off {on / off:.3f} "
          f"(+{(on / off - 1) * 100:.1f}%; iterations: {len(times[True])} vs {len(times[False])}; "
          f"p25-p75 ratio {np.percentile(times[True], 25) / np.percentile(times[False], 25):.3f}-"
          f"{np.percentile(times[True], 75) / np.percentile(times[False], 75):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
