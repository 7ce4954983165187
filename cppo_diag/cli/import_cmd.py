"""Convert another trainer's per-token dump into a cppo-diag run.

Sources and what is read (each importer's module docstring has the details and the upstream files):

  prime-rl  SRC = prime-rl's output dir (or a step_<n>/ dir, one file). Preferred: the trainer's token export
            token_exports/step_<n>/rank_<r>.jsonl: logp = trainer_logprobs (pi at loss time), logp_rollout =
            inference_logprobs, keep_applied = not is_masked (prime-rl's mask), entropy; steps without STABLE
            are skipped. Without it: the filesystem transport's rollouts/step_<n>/rank_<r>.bin micro-batches
            (packed samples, split at position_ids == 0) or rollouts.bin, which hold only the inference
            engine's log-probs: logp is a copy of logp_rollout (flagged in meta.json).
  slime     SRC = a .pt file or a directory of them written by --save-debug-train-data; logp = logp_old =
            the actor's recomputed log_probs (pi_old), logp_rollout = rollout_log_probs (SGLang).
  nemo-rl   SRC = a log directory holding train_data_step<N>.jsonl (NeMo-RL GRPO); logp = logp_old =
            prev_logprobs (pi_old), logp_rollout = generation_logprobs; response = token_loss_mask span.

The run is written to DST/NAME (NAME defaults to SRC's directory name) through cppo_diag.RunRecorder, so it
reads back with cppo_diag.open_run and every other cppo-diag command (report, recompute, app).

Examples:
  cppo-diag import --from nemo-rl logs/exp_001 runs --name nemo-exp1 --group-size 16
  cppo-diag import --from slime dumps/ runs --name slime-dapo
  cppo-diag import --from prime-rl outputs/ runs
"""

from __future__ import annotations

import sys
from pathlib import Path

HELP = "convert prime-rl / slime / NeMo-RL per-token dumps into a cppo-diag run"


def add_arguments(parser) -> None:
    from cppo_diag.importers import IMPORTERS

    parser.add_argument("--from", dest="source", required=True, choices=sorted(IMPORTERS),
                        help="which trainer wrote SRC")
    parser.add_argument("src", metavar="SRC", help="the dump: a file or a directory searched recursively")
    parser.add_argument("dst", metavar="DST", help="root directory for the run (the run is DST/NAME)")
    parser.add_argument("--name", default=None,
                        help="run name (default: SRC's directory name); use --name '' to write into DST itself")
    parser.add_argument("--group-size", type=int, default=None,
                        help="responses per prompt, when consecutive samples form GRPO groups (sets group_id)")
    parser.add_argument("--model", default=None, help="model name stored in meta.json")
    parser.add_argument("--task", default=None, help="task name stored in meta.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run at the destination")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from cppo_diag.importers import ImportFormatError, import_run

    src = Path(args.src)
    name = args.name
    if name is None:
        base = src if src.is_dir() else src.parent
        name = base.resolve().name or "imported"
    try:
        run_dir, stats = import_run(args.source, src, args.dst, name=name or None, group_size=args.group_size,
                                    model=args.model, task=args.task, overwrite=args.overwrite,
                                    progress=not args.no_progress)
    except (ImportFormatError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"cppo-diag import: {exc}", file=sys.stderr)
        return 1
    print(f"imported {args.source} -> {run_dir}: {stats.summary()}")
    for note in stats.notes:
        print(f"note: {note}")
    return 0
