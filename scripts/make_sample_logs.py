#!/usr/bin/env python
"""Regenerate ``sample_logs/``: runs of the bundled trainer in the long-horizon, off-policy regime (the ``long``
preset: 160-digit chain answers, rollouts sampled in bf16 by a policy a few iterations old) for a fresh clone
to browse.

Same seed and settings, differing only in the rule (and, for the unstable run, the learning-rate schedule):

  cppo-long       cppo (paper defaults: delta 0.15, w_min 0.8, adaptive delta_b >= 0.02)
  grpo-long       grpo_clip (eps_low 0.2, eps_high 0.28)
  dppo-long       dppo (binary TV, delta 0.1: the long preset's own DPPO threshold; the paper's is 0.15)
  pg_is-long      pg_is: no trust region at all (the control: the same run collapses)
  unstable-long   grpo_clip with the learning rate rising linearly from 0 to UNSTABLE_LR over the run
                  (optim.warmup_steps = steps): it trains while the step size is small, then collapses
                  (issue 15's definition: the 5-step moving average of reward/mean falls below half its
                  running maximum)
  unstable-noise-long
                  dppo (the preset's rule) with Gaussian noise on the sampler's logits, its sd growing
                  linearly from 0 to UNSTABLE_NOISE over the run (rollout.logit_noise): an engine mismatch
                  that grows until the rollouts collapse

To keep them near 10 MB in all, tokens are recorded every ``--every`` iterations for a ``--seq-fraction`` of the
sequences (scalars and evaluations every iteration; the unstable run records tokens every iteration, for
the doctor's early warning); checkpoints are dropped at the end. After each run the
offline recompute is checked against the logged ``keep_applied`` (``cppo_diag.train.parity.check_parity``).

    python scripts/make_sample_logs.py                    # 6 runs of the long preset, ~4-5 min each on 2 cores
    python scripts/make_sample_logs.py --only dppo-long --steps 10 --out /tmp/s
    python scripts/make_sample_logs.py --reuse runs/calib/t1  # copy the calibration's seed-100 runs where they match

``--reuse ROOT`` copies ``ROOT/<rule>-s<seed>`` instead of training when that finished run's resolved config
equals the one this script would train (output location, progress bar and checkpoint cadence aside): the
calibration study (scripts/calibrate_long.py) records exactly as these runs do.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

UNSTABLE_LR = 2e-3
UNSTABLE_NOISE = 2.0
RUNS = [  # name, rule, rule params, extra overrides
    ("cppo-long", "cppo", {}, {}),
    ("grpo-long", "grpo_clip", {}, {}),
    ("dppo-long", "dppo", {}, {}),
    ("pg_is-long", "pg_is", {}, {}),
    # tokens every iteration: the doctor's early warning needs a per-step series before the collapse
    ("unstable-long", "grpo_clip", {}, {"optim": {"lr": UNSTABLE_LR, "warmup_steps": "STEPS"},
                                        "log": {"every_n_steps": 1}}),
    ("unstable-noise-long", "dppo", {}, {"rollout": {"logit_noise": UNSTABLE_NOISE}, "log": {"every_n_steps": 1}}),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "sample_logs"), help="output root")
    ap.add_argument("--preset", default="long", help="trainer preset the runs start from")
    ap.add_argument("--steps", type=int, default=None, help="RL iterations per run (default: the preset's)")
    ap.add_argument("--seed", type=int, default=100,
                    help="the runs' seed (100, the shipped logs: the first of the calibration's seeds)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (figures depend on it)")
    ap.add_argument("--every", type=int, default=3, help="record tokens every n iterations")
    ap.add_argument("--seq-fraction", type=float, default=0.125, help="fraction of sequences whose tokens are recorded")
    ap.add_argument("--only", default="", help="comma-separated run names to (re)make")
    ap.add_argument("--reuse", default="", help="copy matching finished runs ROOT/<rule>-s<seed> instead of training")
    args = ap.parse_args(argv)

    from cppo_diag.train import build_config, train
    from cppo_diag.train.parity import check_parity

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    steps = args.steps or build_config(args.preset).steps
    for name, rule, params, extra in RUNS:
        if only and name not in only:
            continue
        shutil.rmtree(out / name, ignore_errors=True)
        over = {"steps": steps, "seed": args.seed, "threads": args.threads, "rule": {"name": rule, "params": params},
                "log": {"out_dir": str(out), "name": name, "every_n_steps": args.every,
                        "seq_fraction": args.seq_fraction, "progress": False},
                "ckpt": {"every": 10, "keep": 0}}
        for section, values in extra.items():
            over.setdefault(section, {}).update({k: steps if v == "STEPS" else v for k, v in values.items()})
        cfg = build_config(args.preset, overrides=over)
        print(f"== {name}: rule={rule} lr={cfg.optim.lr:g} warmup={cfg.optim.warmup_steps}", flush=True)
        src = Path(args.reuse) / f"{rule}-s{args.seed}" if args.reuse else None
        if src is not None and _same_run(src, cfg):
            shutil.copytree(src, out / name, ignore=shutil.ignore_patterns("checkpoints", "_cache", "*.lock"))
            _rename(out / name, name)
            print(f"   copied from {src}", flush=True)
        else:
            train(cfg)
        summary = _summary(out / name)
        parity = check_parity(out / name)
        print(f"   greedy accuracy {summary['summary/greedy_acc_before']:.3f} -> {summary['summary/greedy_acc_after']:.3f};"
              f" parity: {parity}", flush=True)
        if parity["keep_mismatch"] or parity["reason_mismatch"]:
            raise SystemExit(f"{name}: the offline recompute disagrees with keep_applied: {parity}")
    return 0


# Config keys that do not change what a run computes or records.
_IGNORED = {("log", "out_dir"), ("log", "name"), ("log", "progress"), ("ckpt", "every"), ("ckpt", "keep"),
            ("ckpt", "resume")}


def _flat(d: dict, prefix=()) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "params":
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _same_run(src: Path, cfg) -> bool:
    """Whether ``src`` is a finished run of exactly ``cfg`` (aside from ``_IGNORED``)."""
    import json

    from cppo_diag.train.config import to_dict

    from cppo_diag.storage.meta import is_run_dir, read_meta

    if not is_run_dir(src):
        return False
    m = read_meta(src, version=False)
    if m.status != "finished":
        return False
    a = {k: v for k, v in _flat(m.get("config") or {}).items() if k not in _IGNORED}
    b = {k: v for k, v in _flat(json.loads(json.dumps(to_dict(cfg)))).items() if k not in _IGNORED}
    return a == b


def _rename(run_dir: Path, name: str) -> None:
    """A copied run takes its new directory's name in meta.json (written atomically, as storage writes it)."""
    from cppo_diag.storage.meta import read_meta, update_meta

    config = read_meta(run_dir, version=False).config
    config.setdefault("log", {})["name"] = name
    update_meta(run_dir, name=name, config=config)


def _summary(run_dir: Path) -> dict:
    from cppo_diag import open_run

    s = open_run(run_dir).steps()
    return {c: s[c].drop_nulls()[-1] for c in s.columns if c.startswith("summary/")}


if __name__ == "__main__":
    raise SystemExit(main())
