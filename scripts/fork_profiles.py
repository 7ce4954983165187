#!/usr/bin/env python
"""Emergent or built in? The rise of |pi - mu| along the answer under the two fork profiles (issue 20).

The ``long`` preset's forks grow denser along the answer (``task.fork_profile = rising``), so a divergence that
rises along the answer may be built into the task rather than emerge from training. This script reads runs
of both profiles (``uniform``: the same number of forks, evenly spread, with its own warm start) and prints,
per run, |pi - mu| in the first and last third of each answer (relative position t/T) over all tokens, within
the forced tokens and within the fork tokens (the task's oracle, column ``fork``), and the share of the rise
that composition explains (``cppo_diag.analyses.attribution.position_strata``) with the fork oracle as strata
and with mu's probability as strata (what a run without an oracle can use).

    python scripts/fork_profiles.py RUN [RUN ...]                  # print the table
    python scripts/fork_profiles.py RUN ... --write docs/trainer.md  # replace the table between its markers

Each RUN must record the ``fork`` column (the bundled trainer does for the chain task with forks).
"""

from __future__ import annotations

from pathlib import Path

START, END = "<!-- fork-profiles:start (scripts/fork_profiles.py) -->", "<!-- fork-profiles:end -->"


def row(path: Path) -> str:
    from cppo_diag import open_run
    from cppo_diag.analyses.attribution import position_strata

    run = open_run(path)
    cfg = run.meta.config
    profile = (cfg.get("task") or {}).get("fork_profile", "rising")
    _, fork = position_strata(run, strata="fork")
    _, mu = position_strata(run, strata="mu")
    f, g = fork["by_stratum"]["forced"], fork["by_stratum"]["fork"]

    def pct(x):
        return "n/a" if x is None else f"{x:.0%}"

    return (f"| `{path.name}` | {run.meta.rule} | {profile} | {fork['first']:.4f} -> {fork['last']:.4f} | "
            f"{f['first']:.4f} -> {f['last']:.4f} | {g['first']:.4f} -> {g['last']:.4f} | "
            f"{fork['mix']['fork']:.0%} | {pct(fork['composition_share'])} | {pct(mu['composition_share'])} |")


def table(paths: list[Path]) -> str:
    head = ("| run | rule | fork profile | mean \\|pi - mu\\| first -> last third, all tokens | forced tokens | "
            "fork tokens | fork share of tokens | rise explained by composition (fork oracle) | "
            "(mu-probability strata) |\n|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head, *(row(p) for p in paths)])


def main(argv=None) -> int:
    from doc_markers import runs_table_main

    return runs_table_main(__doc__, table, START, END, argv)


if __name__ == "__main__":
    raise SystemExit(main())
