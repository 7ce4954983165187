#!/usr/bin/env python
"""Overhead of the live per-position metrics (``pos/*`` and the divergence-by-position figure) vs step time.

An on/off comparison of whole runs cannot resolve 2 % on a shared machine (bench_train.py's run-to-run spread
is several %), so the cost is timed where it is paid, inside real trainer steps: the bundled trainer (demo
preset, TensorBoard sink on, figure every ``--figure-every`` steps) runs with ``position_tokens``,
``position_scalars`` and ``position_figure`` (the training thread's share: gathering the step's valid tokens,
the per-third quantiles, the figure's numpy copy) wrapped in timers; each step's share is divided by that
step's own ``time/step_s`` (which includes it). The figure's drawing runs on the recorder's writer thread, off
the training path; its time is printed too (``PositionFigure.render`` + PNG encoding, timed separately).

Also printed: ``position_scalars`` alone on synthetic batches of larger shapes (the cost grows with the
step's token count; compare with your own step time).

    python benchmarks/bench_position_live.py                  # ~2 min on 2 cores
    python benchmarks/bench_position_live.py --steps 4 --figure-every 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--steps", type=int, default=8, help="RL iterations of the measured run")
    ap.add_argument("--figure-every", type=int, default=10, help="log.position_figure_every (0 = no figure)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--shapes", default="64x512,256x2048,512x4096", help="synthetic (B x T) batches for the scaling table")
    args = ap.parse_args(argv)

    import torch

    from cppo_diag import open_run
    from cppo_diag import metric_names as M
    from cppo_diag.capture import position_live as PL
    from cppo_diag.train import build_config, step_stats, train

    spent: dict[int, float] = defaultdict(float)  # step -> training-thread seconds in position code
    current = {"step": -1}

    def timed(fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[current["step"]] += time.perf_counter() - t0
        return wrapper

    orig_scalars = step_stats.StepPool.scalars

    def scalars(self):
        current["step"] = self.step
        return orig_scalars(self)

    step_stats.StepPool.scalars = scalars
    for name in ("position_tokens", "position_scalars", "position_figure"):
        setattr(step_stats, name, timed(getattr(step_stats, name)))
    render_s: list[float] = []
    orig_render = PL.PositionFigure.render

    def render(self):
        t0 = time.perf_counter()
        fig = orig_render(self)
        from cppo_diag.capture.sinks import figure_rgb

        figure_rgb(fig)  # the drawing the sink does (counted here once; the sink draws it again)
        render_s.append(time.perf_counter() - t0)
        return fig

    PL.PositionFigure.render = render

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_position_"))
    cfg = build_config(args.preset, overrides={
        "steps": args.steps, "threads": args.threads, "task": {"eval_size": 8},
        "log": {"out_dir": str(tmp), "name": "r", "progress": False, "tensorboard": True,
                "position_figure_every": args.figure_every},
        "ckpt": {"every": 0, "keep": 0}})
    train(cfg)
    steps = open_run(tmp / "r").steps().sort("step")
    rows = [(r["step"], r[M.TIME_STEP_S]) for r in steps.iter_rows(named=True) if r.get(M.TIME_STEP_S)]
    print(f"preset {args.preset}, {args.steps} steps, figure every {args.figure_every}, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'step':>4} {'step_s':>9} {'pos_s':>9} {'pos/step':>9}")
    ratios = []
    for step, step_s in rows:
        pos_s = spent.get(step, 0.0)
        ratios.append(pos_s / step_s)
        print(f"{step:>4} {step_s:>9.3f} {pos_s:>9.4f} {100 * pos_s / step_s:>8.2f}%")
    print(f"median pos/step {100 * statistics.median(ratios):.2f}%  max {100 * max(ratios):.2f}%  (target <= 2%)")
    if render_s:
        print(f"figure drawing on the writer thread: median {statistics.median(render_s):.3f} s "
              f"({len(render_s)} figures; off the training thread)")

    print("\nposition_scalars alone, synthetic batches (CPU, median of 5):")
    print(f"{'B x T':>12} {'tokens':>10} {'ms':>9}")
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        B, T = (int(x) for x in shape.split("x"))
        lp = -torch.rand(B, T, generator=g) * 3
        lr = lp + 0.2 * torch.randn(B, T, generator=g)
        mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B, 1), generator=g)
        keep = torch.rand(B, T, generator=g) > 0.05
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            PL.position_scalars(PL.position_tokens(lp, lr, mask, keep))
            times.append(time.perf_counter() - t0)
        print(f"{shape:>12} {int(mask.sum()):>10} {1e3 * statistics.median(times):>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
