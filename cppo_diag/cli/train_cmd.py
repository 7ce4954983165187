"""Train a policy with the bundled RLVR trainer and record the run for the app and the analyses.

GRPO-style groups (P prompts x n responses), mu recorded at sampling time, group advantages, several
minibatch updates per batch, per-token loss from any registered trust-region rule (see `cppo-diag rules`).
Every token the rule saw is logged with the mask it applied, so `cppo-diag recompute` and the app can check
and explain it. Settings come from (in increasing precedence) the defaults, --preset, --config FILE
(TOML/YAML/JSON with the same sections as below) and --section.field options. The run directory is
<log.out_dir>/<log.name>; re-running the same command resumes it from its last checkpoint.

Examples:
  cppo-diag train --preset demo                                   # CPPO on the CPU demo task (~2 min)
  cppo-diag train --preset demo --rule.name dppo --rule.param delta=0.15
  cppo-diag train --preset demo --rule.name grpo_clip --optim.lr 3e-3 --log.name unstable
  cppo-diag train --preset long                                   # 160-digit answers with forks, 6-step-stale bf16 rollouts
  cppo-diag train --preset demo --rollout.staleness 1 --rollout.precision bf16   # off-policy knobs
  cppo-diag train --config my.toml --steps 200
  torchrun --nproc_per_node 2 -m cppo_diag.cli.main train --preset demo     # DDP (gloo on CPU)
  cppo-diag train --preset table3-qwen3-8b-base --model.path /models/Qwen3-8B-Base --task.path dapo.parquet
  cppo-diag train --preset long --doctor.live true --doctor.on_critical halt   # stop at a sustained collapse

Exit codes: 0 trained; 3 the live doctor halted the run (--doctor.on_critical halt: meta.json status 'halted', findings in RUN/findings.jsonl, the checkpoint from
before the first warning in RUN/checkpoints/before-warning-step=NNNNNN).

Presets: demo, long, tiny, table3-qwen3-1.7b, table3-qwen3-1.7b-base, table3-qwen3-8b-base, table3-qwen3-30b-a3b-base.
"""

from __future__ import annotations

import json

HELP = "train with the bundled GRPO-style RLVR trainer (any rule; CPU demo or HF models on CUDA)"


def add_arguments(parser) -> None:
    from cppo_diag.train.config import PRESETS, add_config_arguments

    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="named settings to start from")
    parser.add_argument("--config", default=None, metavar="FILE", help="TOML / YAML / JSON config file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    add_config_arguments(parser)


def run(args) -> int:
    from cppo_diag.train.config import build_config, overrides_from_args, to_dict

    cfg = build_config(args.preset, args.config, overrides_from_args(args))
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    import sys

    from cppo_diag.train import train
    from cppo_diag.train.guard import HALT_EXIT_CODE, DoctorHalt
    from cppo_diag.train.regime import regime_warnings

    cfg.validate()  # an invalid value is the error, before any warning about the regime
    for line in regime_warnings(cfg, args.preset):
        print(f"warning: {line}", file=sys.stderr)

    try:
        summary = train(cfg)
    except DoctorHalt as halt:
        print(str(halt), file=sys.stderr)
        return HALT_EXIT_CODE
    if summary:
        print(json.dumps(summary, indent=2))
    return 0
