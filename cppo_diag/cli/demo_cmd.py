"""The demo: train a fresh CPPO run on CPU in the long-horizon, off-policy regime and watch it live in the app.

What happens:
  1. the app starts on sample_logs/ and runs/ at once (http://127.0.0.1:8501), so there is data to browse
     immediately;
  2. a fresh CPPO run trains with the `long` preset (the `chain` task: 160-digit answers where every digit
     depends on the prefix and forks grow denser along the answer, prefix-credit reward, from the shipped SFT
     warm start; 16 prompts x 8 responses per iteration, rollouts 10 iterations stale and sampled in bf16,
     2 epochs x 2 minibatches, lr 2.5e-4 after a warm-up, decaying along a cosine) into runs/demo-cppo-<time>/
     and appears in the app live (40 iterations, a few minutes on 2 cores); `--preset demo` runs the
     short-answer `fib` task instead;
  3. with --compare, the same run without any trust region (`pg_is`, the control: in the long regime it
     collapses where CPPO learns), then GRPO (ratio clip) and DPPO follow on the same seed, for side-by-side
     comparison on the Compare runs page;
  4. the greedy accuracy on the held-out set before and after RL is printed with the partial-credit reward
     beside it and why the two can move apart (also in each run's scalars as summary/greedy_acc_before /
     summary/greedy_acc_after). The app keeps running until Ctrl-C.

``--quick`` is a first look: the same regime (same task, staleness, bf16 sampling, rule) cut to QUICK_STEPS
iterations of QUICK_PROMPTS prompts (the long preset has 16), a smaller held-out set (QUICK_EVAL_SIZE
problems) and no evaluation in between, so the run's first steps reach the app within about two minutes on
a loaded 2-core box (README, "What the demo shows"). Its accuracy change is a short run's on a small set:
the full regime is the default (no flag).

The app server is stopped on every way the demo ends: Ctrl-C (SIGINT), SIGTERM, SIGHUP, an error, and on
Linux even SIGKILL (the kernel signals the server when its parent dies). A port already in use is reported
before training starts; pass --port to use another.

Examples:
  cppo-diag demo                      # CPPO + app (the full long regime)
  cppo-diag demo --quick              # a first look in about two minutes
  cppo-diag demo --compare            # CPPO, then no trust region (pg_is), GRPO and DPPO on the same seed
  cppo-diag demo --no-app --steps 20  # train only (CI, headless machines)
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from cppo_diag import metric_names as M

HELP = "train a fresh CPPO run on CPU (long regime, a few minutes) and open the app on sample_logs/ + runs/"

# pg_is first: the no-trust-region control beside CPPO is what the long regime exists to show
COMPARE = [("pg_is", "pg_is", {}), ("grpo", "grpo_clip", {}), ("dppo", "dppo", {})]


def plan(args) -> list[tuple[str, str, dict]]:
    """The runs the demo trains, in order: (label, rule, rule params)."""
    return [("cppo", "cppo", {})] + (COMPARE if args.compare else [])

# --quick: the preset's regime on fewer iterations, half the long preset's prompts per iteration and a smaller
# held-out set (the settings that make the phenomenon, i.e. answer length, forks, staleness and bf16 sampling,
# are the preset's own). The long preset's 16 prompts buy a steadier 40-iteration run, not a different picture
# in 12 iterations, and would double the first look's wait.
QUICK_STEPS = 12
QUICK_PROMPTS = 8
QUICK_EVAL_SIZE = 32


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs", help="directory for the demo runs (created if missing)")
    parser.add_argument("--samples", default=None, help="sample runs to show beside them (default: the repo's sample_logs/)")
    parser.add_argument("--preset", default="long", choices=["long", "demo"],
                        help="trainer preset: long (160-token answers, off-policy; default) or demo (short fib task)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a first look: the preset's regime on {QUICK_STEPS} iterations and {QUICK_EVAL_SIZE} "
                             "held-out problems (the first steps reach the app in about two minutes)")
    parser.add_argument("--steps", type=int, default=None, help="RL iterations (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the README's figures were measured with 1 and the "
                             "result depends on the float reduction order)")
    parser.add_argument("--seed", type=int, default=0, help="seed shared by all demo runs")
    parser.add_argument("--compare", action="store_true",
                        help="also train, on the same seed, the control without a trust region (pg_is: it collapses "
                             "in the long regime), then GRPO (ratio clip) and DPPO")
    parser.add_argument("--port", type=int, default=8501, help="app port on 127.0.0.1")
    parser.add_argument("--no-app", action="store_true", help="train only; print how to open the app afterwards")
    parser.add_argument("--no-browser", action="store_true", help="start the app server but do not open a browser")
    parser.add_argument("--exit-when-done", action="store_true", help="stop the app and exit once training ends")


def _sample_logs(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    for c in (Path(__file__).resolve().parents[2] / "sample_logs", Path.cwd() / "sample_logs"):
        if c.is_dir():
            return c
    return None


def run(args) -> int:
    from cppo_diag.train import build_config, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = _sample_logs(args.samples)
    roots = [str(p) for p in (samples, out) if p is not None]
    app_cmd = None
    if not args.no_app:
        try:
            from cppo_diag.cli import app_cmd
        except ImportError:
            print("the app is not installed in this checkout; training only")
    with contextlib.ExitStack() as stack:
        proc = None
        if app_cmd is not None:
            try:  # the server is stopped when this block ends, however it ends
                proc = stack.enter_context(app_cmd.serving(roots, port=args.port, open_browser=not args.no_browser))
            except app_cmd.PortInUseError as exc:
                print(f"cppo-diag demo: {exc}", file=sys.stderr)
                return 2
            print(f"app: http://127.0.0.1:{args.port}  (roots: {', '.join(roots)})")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        results, cfg = {}, None
        for label, rule, params in plan(args):
            over = overrides(args, rule, params, out, f"demo-{label}-{stamp}")
            print(f"training {label} -> {out / over['log']['name']}", flush=True)
            cfg = build_config(args.preset, overrides=over)
            results[label] = train(cfg)
        lines = [summary_line(label, s) for label, s in results.items()]
        why = why_apart(cfg.task)
        if args.quick:
            why += (f" (--quick: {cfg.steps} iterations, {cfg.task.eval_size} held-out problems, a first look rather "
                    "than a result; run without --quick for the full regime)")
        if proc is None:
            print(f"open the runs with: cppo-diag app --root {out}" + (f" --root {samples}" if samples else ""))
            print("\n".join([*lines, why]), flush=True)
            return 0
        if not args.exit_when_done:
            print("training done; the app keeps running (Ctrl-C to stop)")
        print("\n".join([*lines, why]), flush=True)  # the last lines: what the run did, and how to read it
        if args.exit_when_done:
            return 0
        proc.wait()
        return 0


def overrides(args, rule: str, params: dict, out: Path, name: str) -> dict:
    """The trainer overrides of one demo run on top of ``args.preset`` (``--quick``: QUICK_STEPS iterations of
    QUICK_PROMPTS prompts, QUICK_EVAL_SIZE held-out problems, no evaluation in between; ``--steps`` wins over
    the iterations)."""
    over = {"seed": args.seed, "threads": args.threads, "rule": {"name": rule, "params": params},
            "log": {"out_dir": str(out), "name": name}}
    if args.quick:
        over.update(steps=QUICK_STEPS, task={"eval_size": QUICK_EVAL_SIZE},
                    rollout={"prompts_per_step": QUICK_PROMPTS})
        over["log"]["eval_every"] = 0
    if args.steps is not None:
        over["steps"] = args.steps
    return over


def summary_line(label: str, s: dict) -> str:
    """One run's result in words: exact (greedy) accuracy and partial-credit reward on the held-out problems,
    before -> after RL."""
    nan = float("nan")
    return (f"{label}: on held-out problems, greedy exact accuracy {s.get(M.SUMMARY_GREEDY_ACC_BEFORE, nan):.3f} -> "
            f"{s.get(M.SUMMARY_GREEDY_ACC_AFTER, nan):.3f}, partial-credit reward "
            f"{s.get(M.SUMMARY_GREEDY_REWARD_BEFORE, nan):.3f} -> {s.get(M.SUMMARY_GREEDY_REWARD_AFTER, nan):.3f}")


def why_apart(task) -> str:
    """Why exact accuracy and the partial-credit reward can move in opposite directions, for this task config
    (the chain task's reward: cppo_diag/train/tasks/chain.py)."""
    if task.reward != "partial":
        return "accuracy and reward: both count exact answers only (task.reward = exact)"
    if task.kind == "chain" and task.forks > 0 and task.detour_credit < 1:
        credit = "no" if task.detour_credit == 0 else f"only {task.detour_credit:g} of a digit's"
        return ("why the two can move apart: at a fork both the rule's digit and the detour digit are right, so exact "
                f"accuracy counts detours, but a detour earns {credit} partial credit; more detours raise accuracy "
                "and lower the reward")
    return ("why the two can move apart: exact accuracy needs the whole answer right, the partial-credit reward pays "
            "for the parts that are right, so the reward can rise or fall while no answer turns exact")
