"""Recompute a trust-region rule over a recorded run, offline, one training step at a time.

The run's tokens are grouped by (step, update, rank), rebuilt into padded batches in seq_id order (the
row order the trainer's rule saw) and passed to ``cppo_diag.masks.compute_mask``. Prints the masked fraction
overall, by advantage sign, by step and by position bin, the budget-mask share, and - when the run logged
``keep_applied`` - the agreement between the recomputed and the applied mask (100% for runs of the bundled
trainer recomputed with the same rule and parameters).

Examples:
  cppo-diag recompute runs/demo                 # the rule the run applied, with its recorded parameters
  cppo-diag recompute runs/demo --rule cppo
  cppo-diag recompute runs/demo --rule dppo --param delta=0.2 --out dppo_side.parquet
  cppo-diag recompute runs/demo --rule cppo --param delta_b_mode=fixed --param delta_b=0.015 --steps 10:50
  cppo-diag recompute runs/demo --rule cppo --json
  cppo-diag recompute runs/demo --rule cppo --profile verl-pr6731      # a named parameter set
  cppo-diag recompute runs/demo --rule cppo --updates after_first

--profile NAME recomputes the rule under a named parameter set of implementations in the field (for cppo:
paper, unirl, verl-pr6731; `cppo-diag rules` and docs/rules.md list them); --param values override it.
verl-pr6731 reads the run's maximum response length. --updates all (default) recomputes every update, so the
agreement with keep_applied covers the whole run.
"""

from __future__ import annotations

import json
import os
import sys

HELP = "recompute a rule's mask over a recorded run (summaries; optional per-token side table)"


def add_arguments(parser) -> None:
    from cppo_diag.analyses.cli_util import add_steps_argument, positive_int
    from cppo_diag.analyses.updates import add_updates_argument

    parser.add_argument("run", help="run directory")
    parser.add_argument("--rule", default=None,
                        help="registered rule name (see `cppo-diag rules`; default: the rule the run applied)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="rule parameter, repeatable (e.g. --param delta=0.2 --param delta_b_mode=fixed)")
    parser.add_argument("--profile", default=None, metavar="NAME",
                        help="named parameter set of the rule (cppo: paper, unirl, verl-pr6731); --param overrides")
    parser.add_argument("--out", default=None, metavar="SIDE.parquet",
                        help="write per-token keep/reason (+ weight) with step, update, rank, seq_id, pos")
    add_steps_argument(parser)
    add_updates_argument(parser, default="all")
    parser.add_argument("--bin", type=positive_int(), default=64, metavar="N",
                        help="position bin width in tokens (default 64)")
    parser.add_argument("--anchor", choices=["rollout", "old"], default=None,
                        help="anchor of the ratio and divergence (default: the run's meta, else rollout)")
    parser.add_argument("--defaults", action="store_true",
                        help="use the rule's default parameters even when the run applied the same rule (without "
                             "--param and --defaults, a run's own rule is recomputed with the run's rule_params)")
    parser.add_argument("--json", action="store_true", help="print the summaries as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _pct(x) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.3f}%"


def run(args) -> int:
    from cppo_diag.analyses.cli_util import check_out_file, check_rule_params, parse_params
    from cppo_diag.analyses.recomputation import recompute

    from cppo_diag.analyses.profiles import run_profile_params
    from cppo_diag.analyses.tokens import run_meta
    from cppo_diag.analyses.updates import resolve_updates, select_updates, updates_arg

    try:
        params = parse_params(args.param)
        check_out_file(args.out)
        meta = run_meta(args.run)
        args.rule = args.rule or meta.rule
        if not args.rule:
            raise ValueError(f"--rule: {args.run}/meta.json names no applied rule; pass --rule NAME")
        check_rule_params(args.rule, params)
        from_run = not args.param and not args.defaults and not args.profile and meta.rule == args.rule
        if from_run:
            params = meta.rule_params
        elif args.profile:
            params = {**run_profile_params(args.run, args.rule, args.profile), **params}
        updates = resolve_updates(args.run, updates_arg(args.updates))
        source = select_updates(args.run, updates, step_range=args.steps)
        res = recompute(source, args.rule, params=params, step_range=args.steps, side_table=args.out,
                        bin_width=args.bin, anchor=args.anchor, progress=not args.no_progress)
        res.extra["profile"], res.extra["updates"] = args.profile, updates
    except (ValueError, TypeError, KeyError, FileNotFoundError) as exc:
        print(f"cppo-diag recompute: {exc}", file=sys.stderr)
        return 2
    try:
        _print(args, res, from_run)
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _print(args, res, from_run: bool) -> None:
    if args.json:
        print(json.dumps({
            "rule": res.rule, "profile": res.extra.get("profile"), "updates": res.extra.get("updates"),
            "params": res.params, "overall": res.overall, "agreement": res.agreement,
            "by_step": res.by_step.to_dicts(), "by_position": res.by_position.to_dicts(),
            "by_adv_sign": res.by_adv_sign.to_dicts(), "side_table": str(res.side_table) if res.side_table else None,
        }, default=str))
        return
    o = res.overall
    profile = res.extra.get("profile")
    print(f"rule {res.rule} {res.params or '(defaults)'} on {args.run}"
          + (" (parameters from the run's meta.json)" if from_run else "")
          + (f" (profile {profile})" if profile else ""))
    if res.extra.get("updates") != "all":
        print(f"  updates: {res.extra['updates']}")
    print(f"  tokens {o['n_valid']}, masked {o['n_masked']} ({_pct(o['masked_frac'])}); "
          f"reasons: token {o['n_token']}, budget {o['n_budget']}, sequence {o['n_sequence']}; "
          f"budget share {_pct(o['budget_share'])}; away {_pct(o['away_frac'])}")
    print(f"  masked among A>0 tokens {_pct(o['masked_frac_pos_adv'])}, among A<0 tokens {_pct(o['masked_frac_neg_adv'])}")
    if res.agreement:
        a = res.agreement
        print(f"  agreement with keep_applied: {_pct(a['agreement'])} of {a['n_compared']} tokens"
              + (f"; first mismatch {a['first_mismatch']}" if a["first_mismatch"] else ""))
    else:
        print("  agreement: the run did not log keep_applied")
    print("\nby step:")
    print(res.by_step.select("step", "n_valid", "n_masked", "masked_frac", "budget_share").to_pandas()
          .to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nby position (bins of {res.bin_width} tokens):")
    print(res.by_position.select("bin_start", "bin_end", "n_valid", "n_masked", "masked_frac", "budget_share")
          .to_pandas().to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if res.side_table:
        print(f"\nper-token side table: {res.side_table}")
