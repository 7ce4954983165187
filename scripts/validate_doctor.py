"""Validate ``cppo-diag doctor``'s early warning on fresh runs: collapsing runs must get a warning or critical
finding before their collapse step, healthy runs none at all.

Trains (unless the run directory already exists) ``--seeds`` collapsing and ``--seeds`` healthy runs of the bundled
trainer, runs ``cppo_diag.analyses.doctor.diagnose`` on each and prints a markdown table (docs/analyses.md, "Doctor:
validation") plus a JSON file with every run's findings.

Settings (each one a list of ``cppo-diag train`` arguments; override with --collapse-args / --healthy-args):
  collapse: the demo preset with GRPO clip and a learning rate that rises linearly from 0 to 6e-3 over the run
            (warm-up = the whole run): a healthy phase, then a collapse as the step size grows.
  healthy:  the demo preset at its learning rate (3e-4), rules cycling over cppo, grpo_clip and dppo.

A collapsing run counts only when its collapse step (5-step moving average of reward/mean below half of its
running maximum) is >= 10. hit = a warning/critical finding other than reward_collapse itself, first_step <
collapse step; lead = collapse step - that first_step. For healthy runs any warning/critical is a false alarm.

  python scripts/validate_doctor.py --out /tmp/doctor-val --seeds 10 --steps 60 --threads 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEALTHY_RULES = ("cppo", "grpo_clip", "dppo")
EARLY_WARNING_IDS = ("divergence_tails_rising", "mismatch_drift")


def collapse_args(steps: int) -> list[str]:
    return ["--preset", "demo", "--rule.name", "grpo_clip", "--optim.lr", "6e-3", "--optim.warmup_steps", str(steps)]


def healthy_args(rule: str) -> list[str]:
    return ["--preset", "demo", "--rule.name", rule]


def train(out: Path, name: str, args: list[str], *, seed: int, steps: int, threads: int) -> float:
    if (out / name / "meta.json").exists() and (out / name / "_done").is_dir():
        return 0.0
    cmd = [sys.executable, "-m", "cppo_diag.cli.main", "train", *args, "--steps", str(steps), "--seed", str(seed),
           "--threads", str(threads), "--log.eval_every", "0", "--log.out_dir", str(out), "--log.name", name,
           "--log.progress", "false", "--ckpt.every", "0", "--ckpt.keep", "0"]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.time() - t0


def judge(findings, kind: str) -> dict:
    coll = next((f for f in findings if f.id == "reward_collapse"), None)
    cstep = coll.first_step if coll is not None else None
    alarms = [f for f in findings if f.severity in ("warning", "critical") and f.id != "reward_collapse"]
    first = min(alarms, key=lambda f: f.first_step if f.first_step is not None else 10**9, default=None)
    ew = [f for f in alarms if f.id in EARLY_WARNING_IDS]
    first_ew = min(ew, key=lambda f: f.first_step, default=None)
    row = {"kind": kind, "collapse_step": cstep, "counts": cstep is not None and cstep >= 10 if kind == "collapse" else True,
           "first_alarm": None if first is None else {"id": first.id, "step": first.first_step},
           "first_tail_or_mismatch_alarm": None if first_ew is None else {"id": first_ew.id, "step": first_ew.first_step},
           "ids": sorted({f.id for f in alarms})}
    if kind == "collapse":
        row["hit"] = bool(cstep is not None and first is not None and first.first_step < cstep)
        row["lead"] = (cstep - first.first_step) if row["hit"] else None
        row["hit_tails_mismatch"] = bool(cstep is not None and first_ew is not None and first_ew.first_step < cstep)
        row["lead_tails_mismatch"] = (cstep - first_ew.first_step) if row["hit_tails_mismatch"] else None
    else:
        row["false_alarm"] = bool(alarms) or cstep is not None
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/doctor-val", help="directory of the runs and results")
    ap.add_argument("--seeds", type=int, default=10, help="runs of each kind (seeds FIRST..FIRST+N-1)")
    ap.add_argument("--first-seed", type=int, default=1, help="first seed (default 1)")
    ap.add_argument("--steps", type=int, default=60, help="training steps per run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-train", action="store_true", help="only diagnose the runs already under --out")
    ap.add_argument("--kinds", default="collapse,healthy", help="comma-separated: collapse, healthy")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from cppo_diag.analyses.doctor import diagnose

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in args.kinds.split(","):
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            if kind == "collapse":
                name, targs = f"collapse-s{seed}", collapse_args(args.steps)
            else:
                rule = HEALTHY_RULES[(seed - 1) % len(HEALTHY_RULES)]
                name, targs = f"healthy-{rule}-s{seed}", healthy_args(rule)
            if not args.no_train:
                secs = train(out, name, targs, seed=seed, steps=args.steps, threads=args.threads)
                if secs:
                    print(f"trained {name} in {secs:.0f} s", file=sys.stderr)
            if not (out / name / "meta.json").exists():
                continue
            fs = diagnose(out / name, out_dir=out / "figures", budget=False)
            row = {"run": name, "seed": seed, "args": targs, **judge(fs, kind),
                   "findings": [f.to_json() for f in fs]}
            rows.append(row)
            (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


def table(rows) -> str:
    col = [r for r in rows if r["kind"] == "collapse"]
    counted = [r for r in col if r["counts"]]
    hea = [r for r in rows if r["kind"] == "healthy"]
    lines = ["| run | kind | collapse step | first warning (id, step) | hit | lead (steps) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        fa = r["first_alarm"]
        first = f"{fa['id']} @ {fa['step']}" if fa else "-"
        if r["kind"] == "collapse":
            hit = ("yes" if r["hit"] else "no") if r["counts"] else "not counted (collapse < 10 or none)"
            lead = r["lead"] if r["hit"] else "-"
        else:
            hit = "false alarm" if r["false_alarm"] else "quiet (correct)"
            lead = "-"
        lines.append(f"| {r['run']} | {r['kind']} | {r['collapse_step'] if r['collapse_step'] is not None else '-'} "
                     f"| {first} | {hit} | {lead} |")
    hits = [r for r in counted if r["hit"]]
    hits_tm = [r for r in counted if r["hit_tails_mismatch"]]
    leads = sorted(r["lead"] for r in hits)
    fa = [r for r in hea if r["false_alarm"]]
    lines.append("")
    lines.append(f"Collapsing runs counted: {len(counted)} of {len(col)}; early warning (any warning/critical) before "
                 f"the collapse: {len(hits)}/{len(counted)}; from the tail/mismatch change-point alone: "
                 f"{len(hits_tm)}/{len(counted)}; lead in steps: "
                 + (f"median {leads[len(leads) // 2]}, min {leads[0]}, max {leads[-1]}" if leads else "-")
                 + f". Healthy runs with a warning/critical (false alarms): {len(fa)}/{len(hea)}.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
