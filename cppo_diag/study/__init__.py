"""Reproduction studies: a grid of trust-region rules x seeds x parameter settings, run with the bundled
trainer, analysed with confidence intervals and paired comparisons (``cppo-diag study``, ``docs/study.md``).

- ``cppo_diag.study.config``    load a study (preset ``long`` / ``cpu`` / ``ci-tiny`` / ``gpu`` / ``gpu-smoke`` or a TOML/YAML file)
- ``cppo_diag.study.runner``    run the grid resumably in 1..N worker processes
- ``cppo_diag.study.stats``     t-intervals, paired t-test, Cohen's d_z, exact sign-flip test, BCa, Holm, Kaplan-Meier restricted mean
- ``cppo_diag.study.analysis``  results table, figures and the results page
"""

from cppo_diag.study.config import PRESETS, Cell, StudyConfig, StudyConfigError, load_study
from cppo_diag.study.runner import TrainerLauncher, cell_state, run_study

__all__ = [
    "PRESETS",
    "Cell",
    "StudyConfig",
    "StudyConfigError",
    "TrainerLauncher",
    "cell_state",
    "load_study",
    "run_study",
]
