"""Validate ``cppo-diag doctor`` out of sample: train fresh runs with seeds the settings were never tuned on, run the
frozen detector (``DOCTOR_SETTINGS``) on each, and write docs/analyses.md's validation section and its sample-log
claims (between their markers; nothing in them is typed by hand).

Mechanisms (each a list of ``cppo-diag train`` overrides on top of ``--preset``, default ``long``):

  lr           a learning rate rising linearly over the whole run (warm-up longer than the run) to ``--lr-peak``,
               GRPO clip: the shipped ``sample_logs/unstable-long`` setting (its meta.json)
  pg_is        no trust region at all (rule ``pg_is``) in the preset's off-policy regime
  logit_noise  Gaussian noise added to the sampler's logits, its sd growing linearly from 0 to ``--noise``
               over the run (``rollout.logit_noise``): an engine mismatch that grows
  healthy      the preset as shipped, rules cycling cppo, dppo, grpo_clip (the false-alarm runs)

The shipped unstable sample logs are the ``lr`` (``sample_logs/unstable-long``) and ``logit_noise``
(``sample_logs/unstable-noise-long``) settings at seed 100.

For every run: its sustained collapse step (``reward_episodes``; critical ``reward_collapse``), the first warning
or critical finding before it (hit; lead = collapse step - first warning step), and whether the run's 5-step
moving average ever dipped below half its running maximum. Alarms are counted as they fire online (``--doctor.live``):
a finding that ``diagnose`` re-grades in hindsight on a finished run (evidence ``online_severity``) counts with
its online severity. A **false alarm** is such an alarm on a run whose moving average never dips below half its
running maximum; a **false critical** is an online critical finding on a run without a sustained collapse; the
**halt** is the first online critical (where ``--doctor.on_critical halt`` stops), counted as in time when it
comes before the collapse. Rates come with 95% Wilson intervals.

``--guard N`` also re-trains the first N seeds of each collapse mechanism with ``--doctor.live true
--doctor.on_critical halt`` (``<mech>-s<seed>-guard``) and reports the step each halted at beside the step the
same run, unguarded, collapsed.

Seeds: ``TUNING_SEEDS`` are the seeds the settings were tuned on (seeds 0-16: the old sample logs, issue 15's
runs, the pilot runs of the two unstable settings at seeds 1-2; seeds 100-107: the long preset's calibration
runs and today's sample logs, on which settings 3.0 chose the runaway level); ``--seeds`` must not overlap them. Runs already finished under ``--out`` are not retrained (resumable);
``--workers`` trains several at once.

  python scripts/validate_doctor.py                                  # long preset, 6 + 10 seeds, 2 workers
  python scripts/validate_doctor.py --seeds 200-205 --healthy-seeds 200-209 --guard 2 --workers 2
  python scripts/validate_doctor.py --no-train                       # re-diagnose what is under --out
  python scripts/validate_doctor.py --sample-logs-only               # only the sample-log claims
  python scripts/validate_doctor.py --quick --out /tmp/v --doc /tmp/analyses.md   # tiny preset, for the test
  python scripts/validate_doctor.py --from-runs runs/calib2 --out runs/doctor-validation   # + existing runs

``--from-runs ROOT`` also judges the finished runs ``ROOT/<rule>-s<seed>`` another script trained: ``pg_is`` runs
count as the ``pg_is`` mechanism, every other rule's as healthy. Their seeds must be held out like ``--seeds``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from cppo_diag.storage.meta import is_run_dir, read_meta  # noqa: E402
TUNING_SEEDS = (*range(0, 17), *range(100, 108))  # see the module docstring
HEALTHY_RULES = ("cppo", "dppo", "grpo_clip")
MECHANISMS = ("lr", "pg_is", "logit_noise")
BEGIN, END = "<!-- doctor-validation:begin -->", "<!-- doctor-validation:end -->"
TUNE_BEGIN, TUNE_END = "<!-- doctor-tuning:begin -->", "<!-- doctor-tuning:end -->"
SAMPLE_BEGIN, SAMPLE_END = "<!-- doctor-sample-logs:begin -->", "<!-- doctor-sample-logs:end -->"


def mechanism_args(mech: str, steps: int, *, lr_peak: float, noise: float, seed: int) -> list[str]:
    if mech == "lr":
        return ["--rule.name", "grpo_clip", "--optim.lr", str(lr_peak), "--optim.warmup_steps", str(steps)]
    if mech == "pg_is":
        return ["--rule.name", "pg_is"]
    if mech == "logit_noise":
        return ["--rollout.logit_noise", str(noise)]
    if mech == "healthy":
        return ["--rule.name", HEALTHY_RULES[seed % len(HEALTHY_RULES)]]
    raise ValueError(f"--mechanisms: expected some of {MECHANISMS} (and healthy), found {mech!r}")


def parse_seeds(text: str) -> list[int]:
    """'100-109' or '100,101,105' -> a list of seeds."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n trials ((0, 1) for n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def _finished(run: Path, statuses=("finished",)) -> bool:
    return is_run_dir(run) and read_meta(run).status in statuses


def train(out: Path, name: str, args: list[str], *, preset: str, seed: int, steps: int | None, threads: int,
          extra: list[str], guard: bool = False) -> float:
    """Train one run (skipped when already done); a guarded run may end halted (exit 3)."""
    if _finished(out / name, ("finished", "halted") if guard else ("finished",)):
        return 0.0
    if guard:
        extra = [*extra, "--doctor.live", "true", "--doctor.on_critical", "halt"]
    cmd = [sys.executable, "-m", "cppo_diag.cli.main", "train", "--preset", preset, *args, "--seed", str(seed),
           "--threads", str(threads), "--log.out_dir", str(out), "--log.name", name, "--log.progress", "false",
           "--ckpt.every", "10", "--ckpt.keep", "0", *extra]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if res.returncode != 0 and not (guard and res.returncode == 3):
        raise RuntimeError(f"training {name} failed (exit {res.returncode}): {res.stderr.strip()[-2000:]}")
    return time.time() - t0


def judge(run: Path) -> dict:
    """The frozen detector on one run: its collapse, dips, first warning and the verdicts."""
    from cppo_diag.analyses import doctor as D

    fs = D.diagnose(run, budget=False)
    scal = D._scalar_series(run)
    info = D.step_series(run)
    rew = D._reward_series(run, scal, info)
    ep = D.reward_episodes(rew[0], rew[1]) if rew is not None else {"dips": [], "collapse": None}
    col = ep["collapse"]["start"] if ep["collapse"] else None
    # the online alarms: what fired as a warning or critical, whatever the finished run re-graded it to
    alarms = [f for f in fs if _online(f) in ("warning", "critical")]
    halt = min((f.first_step for f in alarms if _online(f) == "critical" and f.first_step is not None), default=None)
    before = sorted((f for f in alarms if f.first_step is not None and col is not None and f.first_step < col),
                    key=lambda f: f.first_step)
    first = min((f.first_step for f in alarms if f.first_step is not None), default=None)
    return {"collapse_step": col, "dipped": bool(ep["dips"]), "first_alarm_step": first,
            "hit": bool(before) if col is not None else None,
            "lead": (col - before[0].first_step) if before else None,
            "before": [f"{f.id} @ {f.first_step}" for f in before],
            "false_alarm": bool(alarms) and not ep["dips"],
            "false_critical": any(_online(f) == "critical" for f in fs) and col is None,
            "offline_false_critical": any(f.severity == "critical" for f in fs) and col is None,
            "halt_step": halt,
            "halt_in_time": (halt is not None and halt < col) if col is not None else None,
            "alarms": [f"{_online(f)}:{f.id} @ {f.first_step}" for f in alarms],
            "settings_version": D.DOCTOR_SETTINGS.version}


def _rate(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k}/{n} ({lo:.2f}-{hi:.2f})"


def tables(rows: list[dict], header: dict, guards: list[dict] = ()) -> str:
    """The markdown of the validation section."""
    from cppo_diag.analyses.doctor import DOCTOR_SETTINGS

    if header.get("tuning_table"):
        intro = (f"Generated by `scripts/validate_doctor.py --tuning-runs` (doctor settings {DOCTOR_SETTINGS.version}): "
                 "the runs the settings were chosen on (in sample: these rates are not evidence of how it "
                 "generalises). 95% Wilson intervals in parentheses.")
    else:
        intro = (f"Generated by `scripts/validate_doctor.py` (doctor settings {DOCTOR_SETTINGS.version}, frozen before "
                 f"these runs were judged): preset `{header['preset']}`, {header['steps_note']}; tuning seeds "
                 f"{header['tuning']} (never used here); validation seeds {header['seeds']} (collapse mechanisms) and "
                 f"{header['healthy_seeds']} (healthy). 95% Wilson intervals in parentheses.")
    lines = [intro, "",
             "| mechanism | runs | sustained collapses | warned before the collapse | lead (median, range) | "
             "halt before the collapse | false alarms (of the runs that never dip) | false criticals online (of the "
             "runs without a sustained collapse) | ... after hindsight |", "|---|---|---|---|---|---|---|---|---|"]
    for mech in [*header["mechanisms"], "healthy"]:
        rs = [r for r in rows if r["mechanism"] == mech]
        if not rs:
            continue
        col = [r for r in rs if r["collapse_step"] is not None]
        hits = [r for r in col if r["hit"]]
        leads = sorted(r["lead"] for r in hits)
        lead = (f"{leads[len(leads) // 2] if len(leads) % 2 else (leads[len(leads) // 2 - 1] + leads[len(leads) // 2]) / 2:g}"
                f" ({leads[0]}-{leads[-1]})") if leads else "-"
        quiet = [r for r in rs if not r["dipped"]]
        no_col = [r for r in rs if r["collapse_step"] is None]
        lines.append(f"| {mech} | {len(rs)} | {len(col)}/{len(rs)} | {_rate(len(hits), len(col))} | {lead} | "
                     f"{_rate(sum(bool(r['halt_in_time']) for r in col), len(col))} | "
                     f"{_rate(sum(r['false_alarm'] for r in quiet), len(quiet))} | "
                     f"{_rate(sum(r['false_critical'] for r in no_col), len(no_col))} | "
                     f"{_rate(sum(r['offline_false_critical'] for r in no_col), len(no_col))} |")
    if guards:
        lines += ["", "The live guard (`--doctor.live true --doctor.on_critical halt`) on re-trains of the same seeds:", "",
                  "| run | status | halted at step | on | the unguarded run collapsed at | halted before |",
                  "|---|---|---|---|---|---|"]
        for g in guards:
            lines.append(f"| {g['run']} | {g['status']} | {g['halted_at'] if g['halted_at'] is not None else '-'} | "
                         f"{g['finding'] or '-'} | {g['unguarded_collapse'] if g['unguarded_collapse'] is not None else '-'} | "
                         f"{'yes' if g['before'] else 'no'} |")
    lines += ["", "| run | mechanism | seed | collapse step | warnings/criticals before it | lead | dipped | "
                  "findings (as they fired online: warning/critical) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['mechanism']} | {r['seed']} | {r['collapse_step'] if r['collapse_step'] is not None else '-'} "
                     f"| {', '.join(r['before']) or '-'} | {r['lead'] if r['lead'] is not None else '-'} | "
                     f"{'yes' if r['dipped'] else 'no'} | {', '.join(r['alarms']) or '-'} |")
    return "\n".join(lines)


def sample_log_claims(root: Path = REPO / "sample_logs") -> str:
    """One line per shipped sample log: its reward's verdict and the doctor's warning/critical findings."""
    from cppo_diag.analyses import doctor as D

    lines = [f"Generated by `scripts/validate_doctor.py` (doctor settings {D.DOCTOR_SETTINGS.version}) on "
             "`sample_logs/` (`diagnose(..., budget=False)`):", ""]
    for run in sorted(p for p in root.iterdir() if is_run_dir(p)):
        fs = D.diagnose(run, budget=False)
        scal = D._scalar_series(run)
        rew = D._reward_series(run, scal, D.step_series(run))
        ep = D.reward_episodes(rew[0], rew[1])
        ma, mx = ep["ma"], ep["running_max"]
        low = float((ma / mx).min()) if len(ma) else float("nan")
        if ep["collapse"]:
            verdict = f"sustained collapse at step {ep['collapse']['start']}"
        elif ep["dips"]:
            d = ep["dips"][0]
            verdict = (f"dips below half its best at step {d['start']}"
                       + (f", recovers at step {d['recovered']}" if d["recovered"] is not None else ""))
        else:
            verdict = f"never dips below half its best (lowest 5-step mean {low:.0%} of the best so far)"
        ho = D.heldout_accuracy(scal)
        acc = (f"; held-out accuracy {ho['values'][0]:.3g} -> {ho['values'][-1]:.3g}" if ho else "")
        alarms = [f"{f.severity} `{f.id}` @ {f.first_step}"
                  + (f" (online: critical @ {f.evidence['online_critical_step']})"
                     if "online_critical_step" in f.evidence else "")
                  for f in fs if f.severity in ("warning", "critical")]
        alarms += [f"info `{f.id}` @ {f.first_step} (online: critical, a false alarm in hindsight)"
                   for f in fs if f.severity == "info" and f.evidence.get("online_severity") == "critical"]
        lines.append(f"* `{run.name}`: {verdict}{acc}. Findings: {', '.join(alarms) if alarms else 'no warning or critical'}.")
    return "\n".join(lines)


def write_between(doc: Path, begin: str, end: str, body: str) -> None:
    text = doc.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{doc}: expected the markers {begin} and {end}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{body}\n{end}{tail}")


def _online(f) -> str:
    """The severity a finding had online (``--doctor.live``), before a finished run's hindsight re-grading."""
    return f.evidence.get("online_severity", f.severity)


def guard_row(out: Path, mech: str, seed: int, unguarded: dict) -> dict:
    """The guarded re-train of (mech, seed) beside the unguarded run's collapse."""
    run = out / f"{mech}-s{seed}-guard"
    meta = read_meta(run)
    halted = (meta.get("doctor") or {}).get("halted") or {}
    col = unguarded.get("collapse_step")
    step = halted.get("step")
    return {"run": run.name, "mechanism": mech, "seed": seed, "status": meta.get("status"), "halted_at": step,
            "finding": halted.get("finding"), "unguarded_collapse": col,
            "before": (step is not None and col is not None and step < col)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/doctor-validation", help="directory of the runs and results.json")
    ap.add_argument("--preset", default="long", help="training preset (default long)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: the preset's)")
    ap.add_argument("--seeds", default="200-205", help="validation seeds of each collapse mechanism")
    ap.add_argument("--healthy-seeds", default="200-209", help="validation seeds of the healthy runs (>= 10)")
    ap.add_argument("--guard", type=int, default=0, metavar="N",
                    help="re-train the first N seeds of each collapse mechanism under the live guard (halt)")
    ap.add_argument("--mechanisms", default=",".join(MECHANISMS), help=f"comma-separated, of {MECHANISMS}")
    ap.add_argument("--lr-peak", type=float, default=2e-3, help="lr mechanism: the peak learning rate")
    ap.add_argument("--noise", type=float, default=2.0, help="logit_noise mechanism: the sd at the last step")
    ap.add_argument("--workers", type=int, default=2, help="runs trained at once")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--no-train", action="store_true", help="only diagnose the runs already under --out")
    ap.add_argument("--doc", default=str(REPO / "docs" / "analyses.md"), help="the doc to write ('' = none)")
    ap.add_argument("--sample-logs-only", action="store_true", help="only rewrite the sample-log claims")
    ap.add_argument("--from-runs", nargs="+", type=Path, default=[], metavar="ROOT",
                    help="also judge the finished runs ROOT/<name>-s<seed> (each as its config's mechanism)")
    ap.add_argument("--tuning-runs", nargs="+", type=Path, default=[], metavar="ROOT",
                    help="the runs the settings were tuned on (ROOT/<name>-s<seed>): tabled apart, in the tuning section")
    ap.add_argument("--quick", action="store_true",
                    help="the tiny preset, 12 steps, one seed per mechanism, two healthy (a smoke test)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    doc = Path(args.doc) if args.doc else None
    if args.sample_logs_only:
        if doc is None:
            raise SystemExit("--sample-logs-only: needs --doc")
        write_between(doc, SAMPLE_BEGIN, SAMPLE_END, sample_log_claims())
        return 0
    extra: list[str] = []
    if args.quick:
        args.preset, args.steps = "tiny", args.steps or 12
        args.seeds, args.healthy_seeds = "200", "200-201"
        extra = ["--log.eval_every", "0"]
    seeds, healthy_seeds = parse_seeds(args.seeds), parse_seeds(args.healthy_seeds)
    overlap = sorted(set(seeds + healthy_seeds) & set(TUNING_SEEDS))
    if overlap:
        raise SystemExit(f"--seeds/--healthy-seeds: {overlap} were used to tune the settings (TUNING_SEEDS "
                         "0-16, 100-107); choose held-out seeds")
    mechs = [m for m in args.mechanisms.split(",") if m]
    for m in mechs:
        if m not in MECHANISMS:
            raise SystemExit(f"--mechanisms: expected some of {MECHANISMS}, found {m!r}")
    from cppo_diag.train.config import PRESETS

    if args.preset not in PRESETS:
        raise SystemExit(f"--preset: expected one of {sorted(PRESETS)}, found {args.preset!r}")
    steps = args.steps or PRESETS[args.preset].get("steps", 60)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(m, s) for m in mechs for s in seeds] + [("healthy", s) for s in healthy_seeds]
    names = {job: f"{job[0]}-s{job[1]}" for job in jobs}

    def one(job):
        mech, seed = job
        targs = mechanism_args(mech, steps, lr_peak=args.lr_peak, noise=args.noise, seed=seed)
        secs = 0.0 if args.no_train else train(out, names[job], targs, preset=args.preset, seed=seed,
                                                steps=args.steps, threads=args.threads, extra=extra)
        if secs:
            print(f"trained {names[job]} in {secs:.0f} s", file=sys.stderr)
        return job, targs

    rows = []
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for (mech, seed), targs in pool.map(one, jobs):
            run = out / names[(mech, seed)]
            if not is_run_dir(run):
                continue
            rows.append({"run": run.name, "mechanism": mech, "seed": seed, "args": targs, **judge(run)})
    rows += _existing_runs(args.from_runs)
    guards = []
    gjobs = [(m, s) for m in mechs for s in seeds[: max(0, args.guard)]]

    def guarded(job):
        mech, seed = job
        targs = mechanism_args(mech, steps, lr_peak=args.lr_peak, noise=args.noise, seed=seed)
        if not args.no_train:
            train(out, f"{mech}-s{seed}-guard", targs, preset=args.preset, seed=seed, steps=args.steps,
                  threads=args.threads, extra=extra, guard=True)
        return job

    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for mech, seed in pool.map(guarded, gjobs):
            if is_run_dir(out / f"{mech}-s{seed}-guard"):
                unguarded = next((r for r in rows if r["mechanism"] == mech and r["seed"] == seed), {})
                guards.append(guard_row(out, mech, seed, unguarded))
    (out / "results.json").write_text(json.dumps({"runs": rows, "guard": guards}, indent=1))
    used = {r["mechanism"] for r in rows}
    header = {"preset": args.preset, "steps_note": f"{steps} steps per run", "tuning": "0-16 and 100-107",
              "seeds": _seed_text(rows, healthy=False) if args.from_runs else args.seeds,
              "healthy_seeds": _seed_text(rows, healthy=True) if args.from_runs else args.healthy_seeds,
              "mechanisms": [m for m in MECHANISMS if m in used]}
    md = tables(rows, header, guards)
    (out / "validation.md").write_text(md + "\n")
    print(md)
    if args.tuning_runs:
        trows = _existing_runs(args.tuning_runs, tuning=True)
        (out / "tuning.json").write_text(json.dumps(trows, indent=1))
        tmd = tables(trows, {**header, "tuning_table": True,
                             "mechanisms": [m for m in MECHANISMS if m in {r["mechanism"] for r in trows}]})
        if doc is not None:
            write_between(doc, TUNE_BEGIN, TUNE_END, tmd)
    if doc is not None and rows:  # a tuning-only call leaves the held-out section as it is
        write_between(doc, BEGIN, END, md)
        write_between(doc, SAMPLE_BEGIN, SAMPLE_END, sample_log_claims())
    return 0


def _mechanism_of(meta: dict) -> str:
    """A finished run's mechanism from its resolved config: pg_is (the rule), logit_noise (noise on the sampler's
    logits), lr (a warm-up as long as the run to a peak lr >= 1e-3), else healthy."""
    cfg = meta.get("config") or {}
    optim, rollout = cfg.get("optim") or {}, cfg.get("rollout") or {}
    if meta.get("rule") == "pg_is":
        return "pg_is"
    if float(rollout.get("logit_noise") or 0.0) > 0:
        return "logit_noise"
    if float(optim.get("lr") or 0.0) >= 1e-3 and int(optim.get("warmup_steps") or 0) >= int(cfg.get("steps") or 1):
        return "lr"
    return "healthy"


def _existing_runs(roots: list[Path], *, tuning: bool = False) -> list[dict]:
    """Rows for the finished runs ``ROOT/<name>-s<seed>`` of ``roots``, each judged as its config's mechanism
    (``_mechanism_of``). Validation runs (``tuning=False``) must have held-out seeds."""
    import re

    rows = []
    for root in roots:
        for run in sorted(p for p in Path(root).iterdir() if is_run_dir(p)):
            m = re.fullmatch(r"(.+)-s(\d+)", run.name)
            meta = read_meta(run)
            if m is None or meta.get("status") != "finished":
                continue
            seed = int(m.group(2))
            if seed in TUNING_SEEDS and not tuning:
                raise SystemExit(f"--from-runs: {run} has seed {seed}, one the settings were tuned on (TUNING_SEEDS)")
            rows.append({"run": f"{Path(root).name}/{run.name}", "mechanism": _mechanism_of(meta), "seed": seed,
                         "args": ["--rule.name", str(meta.get("rule"))], **judge(run)})
    return rows


def _seed_text(rows: list[dict], *, healthy: bool) -> str:
    seeds = sorted({r["seed"] for r in rows if (r["mechanism"] == "healthy") == healthy})
    return ", ".join(map(str, seeds)) if seeds else "none"


if __name__ == "__main__":
    sys.exit(main())
