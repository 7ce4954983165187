"""What the live doctor (``--doctor.live true``) costs per training step.

1. In the trainer: trains ``--preset`` (default ``tiny``: the shortest steps, so the largest share) for ``--steps``
   steps with ``--doctor.live true`` and compares the guard's own time (``meta.json -> doctor.time_s``, measured
   around ``TrainGuard.after_step``: the step statistics, the detector, the findings file, the checkpoint pin) with
   the summed step time (scalar ``time/step_s``).
2. Long runs: ``LiveDoctor.observe`` on the last of ``--long-steps`` synthetic steps (the per-step cost grows with
   the steps so far: the CUSUM's robust reference is a median over them), and ``live_step_stats`` on a batch of
   the ``long`` preset's size (64 responses x 161 tokens x 4 updates).

Writes the markdown between the markers in ``--doc`` (docs/analyses.md, "Doctor: live") when given.

  python scripts/bench_doctor_live.py --doc docs/analyses.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- doctor-live-bench:begin -->", "<!-- doctor-live-bench:end -->"


def in_trainer(preset: str, steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "cppo_diag.cli.main", "train", "--preset", preset, "--steps", str(steps),
               "--threads", str(threads), "--log.out_dir", tmp, "--log.name", "bench", "--log.progress", "false",
               "--log.eval_every", "0", "--ckpt.every", "10", "--ckpt.keep", "1", "--doctor.live", "true"]
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        run = Path(tmp) / "bench"
        sys.path.insert(0, str(REPO))
        from cppo_diag import open_run
        from cppo_diag.storage.meta import read_meta

        meta = read_meta(run)

        step_s = float(open_run(run).steps()["time/step_s"].drop_nulls().sum())
    guard = float(meta["doctor"]["time_s"])
    return {"preset": preset, "steps": steps, "guard_s": guard, "step_s": step_s, "share": guard / step_s}


def long_run(n: int) -> dict:
    import numpy as np
    import torch

    from cppo_diag.analyses.doctor_live import LiveDoctor, live_step_stats

    rng = np.random.default_rng(0)
    doc = LiveDoctor(rule="dppo")
    t_last = []
    for s in range(n):
        t0 = time.perf_counter()
        doc.observe(s, reward=0.5 + 0.05 * rng.normal(), tail_top10=float(np.exp(rng.normal(0, 0.2))),
                    mismatch_k3=float(np.exp(rng.normal(-5, 0.2))), mismatch_abs_lr=0.01,
                    masked_frac=float(np.clip(0.02 + 0.005 * rng.normal(), 0, 1)), entropy=float(np.exp(rng.normal(0, 0.1))))
        if s >= n - 20:
            t_last.append(time.perf_counter() - t0)

    class U:  # one update of the long preset's batch
        def __init__(self, u):
            g = torch.Generator().manual_seed(u)
            self.update = u
            self.logp_rollout = torch.log(torch.rand(16, 161, generator=g).clamp(0.01, 1.0))
            self.logp = self.logp_rollout + 0.1 * torch.randn(16, 161, generator=g)
            self.logp_old, self.mask = None, torch.ones(16, 161, dtype=torch.bool)
            self.keep = torch.rand(16, 161, generator=g) > 0.02
            self.entropy = torch.rand(16, 161, generator=g)

    ups = [U(u) for u in range(4)]
    t0 = time.perf_counter()
    for _ in range(10):
        live_step_stats(ups)
    stats_s = (time.perf_counter() - t0) / 10
    return {"steps": n, "observe_s": float(np.median(t_last)), "stats_s": stats_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--long-steps", type=int, default=2000)
    ap.add_argument("--doc", default="", help="write the result between the markers of this markdown file")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    a = in_trainer(args.preset, args.steps, args.threads)
    b = long_run(args.long_steps)
    md = (f"Measured by `scripts/bench_doctor_live.py` ({time.strftime('%Y-%m-%d')}, `--threads {args.threads}`, "
          f"the shared 2-core machine): the `{a['preset']}` preset, {a['steps']} steps with `--doctor.live true`: the "
          f"guard took {a['guard_s'] * 1e3:.0f} ms of {a['step_s']:.1f} s of step time, **{a['share']:.2%}** (the tiny "
          f"preset has the shortest steps, so this is the largest share; a `long` step takes seconds). After "
          f"{b['steps']} steps, one `LiveDoctor.observe` takes {b['observe_s'] * 1e3:.2f} ms (median of the last "
          f"20), and `live_step_stats` on a `long`-sized step (64 x 161 tokens x 4 updates) {b['stats_s'] * 1e3:.1f} ms.")
    print(md)
    if args.doc:
        doc = Path(args.doc)
        text = doc.read_text()
        if BEGIN not in text or END not in text:
            raise SystemExit(f"{doc}: expected the markers {BEGIN} and {END}")
        head, rest = text.split(BEGIN, 1)
        doc.write_text(f"{head}{BEGIN}\n{md}\n{END}{rest.split(END, 1)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
