"""Read one or more recorded runs and say, in plain sentences, what looks wrong and from which step.

Each finding has a severity (info, warning, critical), the first step it holds, one sentence, the numbers
behind it ("evidence") and a figure that shows it (a PNG written under --out). Checks:

  collapse_imminent         critical: after a divergence runaway, the 5-step moving average of reward/mean
                            falls below 65% of its running maximum - the live guard's halt, before the reward
                            has halved; a finished run that did not then collapse for good reports a warning
  reward_collapse           critical: a sustained collapse - the first step >= 10 where the 5-step moving
                            average of reward/mean falls below half of its running maximum and stays below for
                            the rest of the run, with at least 5 steps left
  reward_dip                warning: a dip below that half that recovered (the message names the step), began
                            before step 10, or ended the run too soon to tell
  divergence_runaway        warning: the top-decile mean of |log pi - log mu| (updates after the first), median
                            of the latest 3 logged steps, reaches 0.75 nats - the early warning; with the
                            attribution columns the message names what moved (engine, lag, updates)
  entropy_collapse          warning: the entropy fell under 10% of its early level
  masked_frac_rising        warning when the divergence ran away by its step, else info: the applied rule
                            masks more and more (CUSUM / trend tests + Mann-Kendall at 1%)
  divergence_tails_rising, mismatch_drift, entropy_surge
                            info: a change-point (one-sided CUSUM against the run's own earlier steps) or
                            sequential Mann-Kendall trend in the divergence tail, in the divergence pi / mu
                            before the batch's updates (engine mismatch plus policy lag), or in the entropy
  rule_never_binds          warning: the applied rule masked nothing at all
  tails_along_sequence      info: the divergence tail grows along the response (Mann-Kendall at 1%)
  budget_exhausted_early    info: CPPO's prefix budget rejects early in the response
  too_few_steps, no_rollout_logprobs, no_reward, no_entropy, no_applied_mask, single_update
                            info: what the logs cannot support

On a finished run whose reward never dipped below half its best (and whose held-out accuracy held), the early
warnings are reported as info (evidence online_severity: warning): they were not followed by a collapse. Statistics and thresholds:
docs/analyses.md, section "Doctor" (settings: DOCTOR_SETTINGS, versioned). Exit code 0 when the runs were read (whatever
the findings), 2 on unusable input (the message names the run and the field).

Examples:
  cppo-diag doctor sample_logs/unstable-long
  cppo-diag doctor runs/a runs/b --format json --out doctor/ > findings.json
  cppo-diag doctor runs/a --no-budget --no-figures
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

HELP = "plain-language findings about runs (collapse, divergence runaway, mismatch drift, ...) with evidence"


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    parser.add_argument("--format", choices=["text", "json"], default="text",
                        help="text (default, for people) or json: {\"runs\": [{\"run\", \"findings\": [{\"id\", "
                             "\"severity\", \"first_step\", \"message\", \"evidence\", \"figure\", \"settings_version\"}]}]}")
    parser.add_argument("--out", default="doctor", metavar="DIR",
                        help="directory for the figures, one PNG per finding (default ./doctor)")
    parser.add_argument("--no-figures", action="store_true", help="write no figures (\"figure\" is null)")
    parser.add_argument("--no-budget", action="store_true",
                        help="skip the CPPO prefix-budget check (it recomputes the rule over the run: the slowest)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _text(report: dict) -> str:
    lines = []
    for run in report["runs"]:
        fs = run["findings"]
        worst = next((s for s in ("critical", "warning") if any(f["severity"] == s for f in fs)), None)
        head = f"{run['run']}: {len(fs)} finding(s)" + (f", worst {worst}" if worst else ", nothing at warning level")
        lines.append(head)
        for f in fs:
            at = f" from step {f['first_step']}" if f["first_step"] is not None else ""
            lines.append(f"  [{f['severity'].upper()}] {f['id']}{at}")
            lines.extend(textwrap.wrap(f["message"], 100, initial_indent="      ", subsequent_indent="      "))
            ev = ", ".join(f"{k}={v}" for k, v in f["evidence"].items())
            if ev:
                lines.extend(textwrap.wrap("evidence: " + ev, 100, initial_indent="      ",
                                           subsequent_indent="        "))
            if f["figure"]:
                lines.append(f"      figure: {f['figure']}")
        lines.append("")
    return "\n".join(lines)


def run(args) -> int:
    from cppo_diag.analyses.doctor import diagnose_runs
    from cppo_diag.storage.meta import is_run_dir

    for r in args.runs:
        p = Path(r)
        if not p.is_dir() or not is_run_dir(p):
            print(f"cppo-diag doctor: RUN {r!r} is not a cppo-diag run: expected a directory holding 'meta.json', "
                  f"found {'a directory without it' if p.is_dir() else 'no such directory'}", file=sys.stderr)
            return 2
    try:
        report = diagnose_runs(args.runs, out_dir=None if args.no_figures else args.out,
                               budget=not args.no_budget, progress=not args.no_progress)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"cppo-diag doctor: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        sys.stdout.write(json.dumps(report, indent=1) + "\n")
    else:
        sys.stdout.write(_text(report))
    return 0
