"""Print per-position divergence statistics of a run as CSV or JSON (for scripts).

One row per (metric, position bin): count, mean, p50, p90, p99 (linear-interpolation quantiles, numpy's
default), top10_mean (mean of the tokens with D >= the bin's P90), surv_<x> = P(D > x), hill_alpha (Hill
tail index over the exceedances of the bin's P90) and hill_k. Metrics: tv = |pi - mu|, abs_logratio =
|log pi - log mu|, k3 = rho - 1 - log rho; with --mismatch, |pi_old - mu| and |log pi_old - log mu|.

By default the statistics come from mergeable partial aggregates (``cppo_diag.analyses.aggregate``): exact counts and
means, quantiles and tail statistics from a log-bucket sketch within --relative-accuracy (default 1%,
buckets 0.78%), computed by --engine local (processes over shard groups) or ray, and cached beside the run
(RUN/_cache/aggregates/) so a growing run is only aggregated for its new steps. A run written by RunRecorder
already holds each step's aggregate (tv, abs_logratio, k3 at 32-token bins): a first view of those metrics
at any multiple of 32 merges them without reading a token; other bin widths scan (and say so on stderr).
--no-cache always scans. --exact gives the exact
order statistics (two streaming passes, one process); --mismatch is always exact.

Which optimiser updates are pooled: by default the tokens the policy had moved on, i.e. with lag > 0 where
the run records the ``lag`` column (all of them in a stale-rollout run), else the updates after the first;
--updates all|first|after_first|lagged chooses. hill_alpha is null for the bounded |pi - mu|.

--family attribution splits log pi - log mu into engine (sampler vs trainer numerics), lag (the sampling
weights vs those at the batch's first update) and update (this batch's own updates), by step, position bin,
lag or update, with each term's mean, mean |.| and share of mean |total| (docs/analyses.md "Attribution"); a
run without logp_behavior or logp_old reports the terms it cannot separate as one combined term, named so.
--family strata splits the rise of |pi - mu| along the answer into composition (more uncertain tokens later)
and within-stratum growth; strata from mu's probability (--strata mu), the entropy, or the task's fork oracle.

Examples:
  cppo-diag stats runs/demo --by position --bin 64 --format csv > pos.csv
  cppo-diag stats runs/demo --updates all --format csv
  cppo-diag stats runs/demo --by relative --bin 20 --format json --adv-sign pos
  cppo-diag stats runs/demo --mismatch --format csv
  cppo-diag stats runs/big --engine ray --ray-address auto --metric tv
  cppo-diag stats runs/demo --exact
  cppo-diag stats runs/demo --family mismatch --by step --format csv   (k1/k2/k3, chi2, ESS, ... per step)
  cppo-diag stats runs/demo --family attribution --by step --format csv   (engine / lag / update per step)
  cppo-diag stats runs/demo --family attribution --by position --bin 32
  cppo-diag stats runs/demo --family strata --strata fork --bin 32 --format json
"""

from __future__ import annotations

import json
import sys

HELP = "per-position divergence statistics of a run as CSV or JSON"


def add_arguments(parser) -> None:
    from cppo_diag.analyses.cli_util import add_steps_argument, float_in, positive_int
    from cppo_diag.analyses.updates import add_updates_argument

    parser.add_argument("run", help="run directory")
    parser.add_argument("--by", choices=["position", "relative", "step", "lag", "update"], default="position",
                        help="absolute position bins (--bin tokens wide), relative position t/T (--bin equal bins), "
                             "training step (--family mismatch/attribution), lag or update (--family attribution)")
    parser.add_argument("--family", choices=["divergence", "mismatch", "attribution", "strata"], default="divergence",
                        help="divergence (default): the statistics above; mismatch: the mismatch metric family "
                             "(k1/k2/k3 KL, chi2 per token and sequence, ESS, IS-weight tails, log-ppl difference, "
                             "toward-mu and masked fractions; docs/analyses.md) by step or position bin; "
                             "attribution: engine / lag / update terms of log pi - log mu; strata: |pi - mu| by "
                             "position per uncertainty stratum and the share of its rise that composition explains")
    parser.add_argument("--strata", choices=["mu", "entropy", "fork"], default="mu",
                        help="--family strata: strata from mu's probability of the sampled token (default), the "
                             "logged entropy, or the task's fork oracle (column fork)")
    parser.add_argument("--bin", type=positive_int(), default=64, metavar="N",
                        help="bin width in tokens (--by position) or number of bins (--by relative); default 64")
    parser.add_argument("--format", choices=["csv", "json"], default="csv", help="output format (default csv)")
    parser.add_argument("--metric", action="append", default=None, choices=["tv", "abs_logratio", "k3", "k1"],
                        help="metric(s) to include, repeatable (default tv, abs_logratio, k3)")
    parser.add_argument("--adv-sign", choices=["all", "pos", "neg", "zero"], default="all",
                        help="only tokens with this advantage sign")
    parser.add_argument("--threshold", type=float_in(0.0, float("inf")), action="append", default=None, metavar="X",
                        help="survival thresholds P(D > X), repeatable (default 0.05 0.1 0.2 0.5)")
    parser.add_argument("--delta", type=float_in(0.0, float("inf")), default=None,
                        help="add threshold_mean = bin mean of CPPO's delta / w_t (with --w-min)")
    parser.add_argument("--w-min", type=float_in(0.0, 1.0), default=None,
                        help="w_min for --delta (default: the cppo rule's default)")
    parser.add_argument("--mismatch", action="store_true", help="train/rollout mismatch |pi_old - mu| instead")
    add_steps_argument(parser)
    add_updates_argument(parser)
    parser.add_argument("--exact", action="store_true",
                        help="exact order statistics (two streaming passes, one process) instead of the sketch")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local: processes on this machine (default); ray: Ray tasks over shard groups "
                             "(pip install 'cppo-diag[ray]')")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="with --engine ray: join this cluster (e.g. auto, ray://host:10001); default a local one")
    parser.add_argument("--workers", type=positive_int(), default=None, metavar="N",
                        help="processes (local; default one per 256 MB of shards, at most the CPU count) or CPUs "
                             "of the local Ray cluster (default the CPU count)")
    parser.add_argument("--relative-accuracy", type=float, default=0.01, metavar="A",
                        help="largest relative error of the sketch's quantiles (default 0.01)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write RUN/_cache/aggregates/")
    parser.add_argument("--out", default=None, metavar="FILE", help="write to FILE instead of stdout")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars (shown on stderr)")


def run(args) -> int:
    from cppo_diag.analyses.aggregate import position_summary
    from cppo_diag.analyses.mismatch import mismatch_by_position
    from cppo_diag.analyses.position import DEFAULT_THRESHOLDS, METRICS
    from cppo_diag.analyses.tokens import MissingColumnError
    from cppo_diag.analyses.updates import resolve_updates, updates_arg

    from cppo_diag.analyses.cli_util import check_out_file, check_ray_address

    relative = args.by == "relative"
    # the same checks as the cppo rule's (recompute): CPPO Eq. 9's delta >= 0 and w_min in [0, 1] (argparse)
    if args.w_min is not None and args.delta is None:
        raise ValueError("--w-min: only used by the threshold overlay; pass --delta too")
    check_out_file(args.out)
    if args.engine == "ray" or args.ray_address is not None:
        if args.engine != "ray":
            raise ValueError("--ray-address: only used with --engine ray")
        check_ray_address(args.ray_address)
    thresholds = tuple(args.threshold) if args.threshold else DEFAULT_THRESHOLDS
    common = dict(bin_width=args.bin if not relative else 64, relative=relative, n_rel_bins=args.bin,
                  step_range=args.steps, adv_sign=args.adv_sign, thresholds=thresholds,
                  progress=not args.no_progress)
    try:
        if args.family in ("attribution", "strata"):
            return _attribution(args)
        if args.by in ("lag", "update"):
            raise ValueError(f"--by {args.by}: only with --family attribution")
        if args.family == "mismatch":
            if relative:
                raise ValueError("--by: the mismatch family is by 'step' or 'position', found 'relative'")
            from cppo_diag.analyses.mismatch import mismatch_metrics

            updates = resolve_updates(args.run, updates_arg(args.updates))
            table = mismatch_metrics(args.run, by="step" if args.by == "step" else "position", bin_width=args.bin,
                                     updates=updates, step_range=args.steps, adv_sign=args.adv_sign)
        elif args.by == "step":
            raise ValueError("--by step needs --family mismatch or attribution")
        elif args.mismatch:  # |pi_old - mu| does not change between the updates of a batch
            table = mismatch_by_position(args.run, **common)
        else:
            table = position_summary(
                args.run, metrics=tuple(args.metric or METRICS), delta=args.delta, w_min=args.w_min,
                updates=updates_arg(args.updates), exact=args.exact, engine=args.engine, workers=args.workers,
                ray_address=args.ray_address, relative_accuracy=args.relative_accuracy, cache=not args.no_cache,
                **common)
    except (MissingColumnError, ValueError, FileNotFoundError, ImportError) as exc:
        print(f"cppo-diag stats: {exc}", file=sys.stderr)
        return 2
    if args.family == "divergence" and not (args.exact or args.mismatch or args.by == "step"):
        from cppo_diag.analyses.aggregate import LAST_INFO

        if LAST_INFO.note:  # e.g. a bin width that is not a multiple of the recorder's aggregates
            print(f"cppo-diag stats: note: {LAST_INFO.note}", file=sys.stderr)
    _emit(args, table.write_csv() if args.format == "csv" else json.dumps(table.to_dicts(), default=str) + "\n")
    return 0


def _emit(args, text: str) -> None:
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)


def _attribution(args) -> int:
    """--family attribution | strata (cppo_diag.analyses.attribution)."""
    import warnings

    from cppo_diag.analyses.attribution import attribution_by, position_strata
    from cppo_diag.analyses.updates import updates_arg

    updates = updates_arg(args.updates) or "all"  # attribution pools every update unless told otherwise
    if args.by == "relative":
        raise ValueError(f"--by: --family {args.family} is by step, position, lag or update, found 'relative'")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.family == "attribution":
            table = attribution_by(args.run, by=args.by, bin_width=args.bin, updates=updates, step_range=args.steps,
                                   adv_sign=args.adv_sign)
            combined = [c[: -len("_share")] for c in table.columns if c.endswith("_share") and "+" in c]
            if combined:
                lacks = [c for c, used_by in (("logp_behavior", ("engine+lag", "engine+lag+update")),
                                              ("logp_old", ("lag+update", "engine+lag+update")))
                         if any(t in used_by for t in combined)]
                print(f"cppo-diag stats: the run logs no {' and no '.join(lacks)}, so {', '.join(combined)} "
                      f"is reported as one combined term", file=sys.stderr)
            text = table.write_csv() if args.format == "csv" else json.dumps(table.to_dicts(), default=str) + "\n"
        else:
            if args.by != "position":
                raise ValueError(f"--by: --family strata is by position, found {args.by!r}")
            curves, summary = position_strata(args.run, strata=args.strata, bin_width=args.bin, updates=updates,
                                              step_range=args.steps, adv_sign=args.adv_sign)
            share = summary["composition_share"]
            print(f"cppo-diag stats: |pi - mu| first third {summary['first']:.4f} -> last third {summary['last']:.4f}; "
                  f"re-weighted to the run's stratum mix {summary['first_within']:.4f} -> {summary['last_within']:.4f}; "
                  f"composition explains {'n/a' if share is None else f'{share:.0%}'} of the rise", file=sys.stderr)
            text = (curves.write_csv() if args.format == "csv"
                    else json.dumps({"summary": summary, "curves": curves.to_dicts()}, default=str) + "\n")
    for w in caught:
        print(f"cppo-diag stats: warning: {w.message}", file=sys.stderr)
    _emit(args, text)
    return 0
