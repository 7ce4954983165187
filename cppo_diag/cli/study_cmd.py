"""Run a reproduction study - trust-region rules x seeds x parameter settings with the bundled trainer - and
write its results page. The page opens with a paragraph saying whether CPPO's ordering (above GRPO-clip and
DPPO; each ablation below CPPO) holds, with the effects and their intervals and what each rule masked. Primary
metric: final held-out accuracy (mean of the last 3 evaluations); best-so-far is secondary (biased upward).
Comparisons are paired by seed (t interval, paired t-test, exact sign-flip test, d_z; BCa bootstrap only
from 10 pairs on), steps to a threshold is a Kaplan-Meier restricted mean, and Holm adjusts the whole
comparison table at once. Figures: learning curves with seed bands, a Fig. 5-style ablation figure and, per
rule, the paper's Fig. 2 and Fig. 7 diagnostics over the updates after the first.

CONFIG_OR_PRESET is a study file (TOML or YAML; format in docs/study.md) or a preset:

  long      grpo_clip, dppo, cppo and its three ablations x 8 seeds on the trainer's `long` preset
            (long answers, off-policy batches, two updates per batch); budget about 2 hours with
            --workers 2 on a 2-core CPU (`make study-long`)
  cpu       the same rules x 5 seeds x 120 steps on the demo task (the short regime); about 25 minutes
  ci-tiny   the long study's rules and analysis x 2 seeds x 4 tiny steps (used by the test suite)
  gpu       the paper's Table 3 settings for a local Hugging Face model and a math dataset file
            (edit the model/dataset paths first; see docs/study.md)
  gpu-smoke a shortened GPU check needing no downloads (see docs/study.md)

Every run is written directly under --root, so `cppo-diag app ROOT` browses them. The study is
resumable: finished runs are skipped, interrupted ones continue from their last checkpoint.

Examples:
  cppo-diag study long --root runs/study-long --workers 2 --results docs/results.md
  cppo-diag study long --root runs/study-long --analyse-only --results docs/results.md
  cppo-diag study my_study.toml --root runs/my-study --dry-run
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

HELP = "run a rules x seeds study with the bundled trainer and write its results page"


def add_arguments(parser) -> None:
    parser.add_argument("config", metavar="CONFIG_OR_PRESET",
                        help="study file (.toml/.yaml) or preset name: long, cpu, ci-tiny, gpu, gpu-smoke")
    parser.add_argument("--root", required=True, type=Path,
                        help="directory that holds every run of the study (plus _study/ with the manifest and logs)")
    parser.add_argument("--workers", type=int, default=1,
                        help="training processes at once (default 1); torch threads per process = CPUs // workers")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OMP threads per training process (default: CPUs // workers)")
    parser.add_argument("--analyse-only", "--analyze-only", dest="analyse_only", action="store_true",
                        help="do not train; analyse the runs already under --root")
    parser.add_argument("--no-analyse", dest="no_analyse", action="store_true",
                        help="train only; skip the results page")
    parser.add_argument("--results", type=Path, default=None,
                        help="results page to write (figures go to a folder of the same name without .md); "
                             "default ROOT/results.md. The long study's page lives at docs/results.md")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the grid and the first training command, run nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _unknown_trainer_preset(study) -> str | None:
    """Why the study's trainer preset cannot run (before any of its runs is launched), or None."""
    if not study.trainer_preset:
        return None
    from cppo_diag.train.config import PRESETS

    if study.trainer_preset in PRESETS:
        return None
    return (f"{study.source}: field 'trainer.preset': expected a preset of the bundled trainer "
            f"({', '.join(sorted(PRESETS))}), found {study.trainer_preset!r}")


def run(args) -> int:
    from cppo_diag.study.config import StudyConfigError, load_study
    from cppo_diag.study.runner import STUDY_DIR, TrainerLauncher, cell_state, run_study, write_manifest

    try:
        study = load_study(args.config)
    except StudyConfigError as exc:
        print(f"cppo-diag study: {exc}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"cppo-diag study: --workers: expected >= 1, found {args.workers}", file=sys.stderr)
        return 2
    root: Path = args.root
    cells = study.cells()

    if args.dry_run:
        launcher = TrainerLauncher()
        print(f"study {study.name} ({study.source}): {len(cells)} runs, {study.steps} steps each, root {root}")
        for c in cells:
            state = cell_state(root / c.run_name, study.steps).status
            print(f"  {c.run_name:<40} rule={c.rule} seed={c.seed} {state}")
        if cells:
            print("first command:\n  " + shlex.join(launcher.argv(cells[0], study, root)))
        return 0

    rc = 0
    if not args.analyse_only:
        problem = _unknown_trainer_preset(study)
        if problem:
            print(f"cppo-diag study: {problem}", file=sys.stderr)
            return 2
        report = run_study(study, root, workers=args.workers, threads_per_worker=args.threads,
                           progress=not args.no_progress)
        print(
            f"study {study.name}: {len(report.ran)} runs trained, {len(report.skipped)} already finished, "
            f"{len(report.failed)} failed, in {report.seconds / 60:.1f} min; runs under {root} "
            f"(browse: cppo-diag app {root}; logs: {root / STUDY_DIR / 'logs'})"
        )
        for name, why in report.failed.items():
            print(f"  FAILED {name}: {why}", file=sys.stderr)
        rc = 1 if report.failed else 0
    elif not root.is_dir():
        print(f"cppo-diag study: --root: expected an existing study directory with --analyse-only, "
              f"found {root} missing", file=sys.stderr)
        return 2
    else:
        write_manifest(study, root)  # the analysis reads the grid from the manifest

    if args.no_analyse:
        return rc
    from cppo_diag.study.analysis import analyse_study

    out_md = args.results or root / "results.md"
    command = shlex.join(["cppo-diag", "study", str(args.config), "--root", str(root),
                          "--workers", str(args.workers), "--results", str(out_md)])
    page = analyse_study(root, out_md, analysis=study.analysis, progress=not args.no_progress, command=command)
    print(f"results: {page} (figures in {page.with_suffix('')}/)")
    return rc
