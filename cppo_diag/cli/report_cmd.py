"""Write every analysis of one or more runs as PNG figures plus one self-contained HTML report.

For each run: divergence by position with its tails and CPPO's threshold delta / w_t (paper Fig. 2), tail
survival and Hill index by position, the CPPO prefix budget per step (paper Fig. 7), the first budget
rejection as a survival curve, the slack c_t by position, the train/rollout mismatch |pi_old - mu| (when
logged) and a what-if heatmap over (delta, delta_b). Across runs: the masked fraction of every rule in
--rules recomputed on the same logged tokens, next to the mask each run applied. The HTML embeds the PNGs
(base64), so DIR/report.html is one file you can share.

Examples:
  cppo-diag report runs/cppo runs/grpo --out report/
  cppo-diag report runs/demo --out report/ --rules grpo_clip dppo cppo cppo_no_budget --bin 32
  cppo-diag report runs/demo --out report/ --param cppo:delta=0.2 --steps 100:
  cppo-diag report runs/demo --out report/ --updates all --profile unirl --profile verl-pr6731

For runs with several optimiser updates per batch every figure pools, by default, the tokens the policy had moved
on since sampling: lag > 0 where the run records lag, else the updates after the first (which assumes on-policy
sampling); the report says which. --updates chooses.
"""

from __future__ import annotations

import sys

HELP = "write PNG figures and a self-contained HTML report for one or more runs"


def add_arguments(parser) -> None:
    from cppo_diag.analyses.cli_util import add_steps_argument, positive_int
    from cppo_diag.analyses.updates import add_updates_argument

    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    parser.add_argument("--rules", nargs="+", default=["grpo_clip", "dppo", "cppo"],
                        help="rules to recompute and compare (default grpo_clip dppo cppo)")
    parser.add_argument("--param", action="append", default=[], metavar="RULE:NAME=VALUE",
                        help="parameter of one rule, repeatable (e.g. --param cppo:delta=0.2)")
    parser.add_argument("--bin", type=positive_int(), default=None, metavar="N",
                        help="position bin width in tokens (default: auto, about 40 bins over the longest response)")
    add_steps_argument(parser)
    add_updates_argument(parser)
    parser.add_argument("--profile", action="append", default=[], metavar="NAME",
                        help="also recompute CPPO under a named parameter set, repeatable (paper, unirl, verl-pr6731)")
    parser.add_argument("--no-whatif", action="store_true", help="skip the what-if sweep (faster)")
    parser.add_argument("--title", default="cppo-diag report", help="HTML title")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args) -> int:
    from cppo_diag.analyses.cli_util import check_out_dir, check_rule_params, parse_params
    from cppo_diag.analyses.report import write_report
    from cppo_diag.analyses.updates import updates_arg

    params: dict[str, dict] = {}
    for item in args.param:
        rule, sep, kv = item.partition(":")
        if not sep:
            print(f"cppo-diag report: --param expected RULE:NAME=VALUE, found {item!r}", file=sys.stderr)
            return 2
        params.setdefault(rule, {}).update(parse_params([kv]))
        check_rule_params(rule, params[rule])
    check_out_dir(args.out)
    try:
        path = write_report(args.runs, args.out, rules=args.rules, params=params, bin_width=args.bin,
                            step_range=args.steps, whatif=not args.no_whatif, progress=not args.no_progress,
                            title=args.title, updates=updates_arg(args.updates), profiles=tuple(args.profile))
    except (ValueError, TypeError, KeyError, FileNotFoundError) as exc:
        print(f"cppo-diag report: {exc}", file=sys.stderr)
        return 2
    n_png = len(list(path.parent.glob("*.png")))
    print(f"wrote {path} and {n_png} PNG figures in {path.parent}")
    return 0
