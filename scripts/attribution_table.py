#!/usr/bin/env python
"""The attribution of log pi - log mu on runs (issue 20): per run, over all its recorded tokens and over the
first update of each batch only, mean |log pi - log mu| and the share of it each term carries (engine: the
sampler's numerics; lag: the sampling weights against those at the batch's first update; update: this batch's
own updates; ``cppo_diag.analyses.attribution``).

    python scripts/attribution_table.py sample_logs/*-long                     # print the table
    python scripts/attribution_table.py sample_logs/*-long --write docs/trainer.md
"""

from __future__ import annotations

from pathlib import Path

START, END = "<!-- attribution-table:start (scripts/attribution_table.py) -->", "<!-- attribution-table:end -->"


def _shares(s: dict) -> str:
    return ", ".join(f"{t} {s[f'{t}_share']:.0%}" for t in s["terms"] if s.get(f"{t}_share") is not None)


def table(paths: list[Path]) -> str:
    from cppo_diag import open_run
    from cppo_diag.analyses.attribution import attribution_summary

    lines = ["| run | mean \\|log pi - log mu\\|, all tokens | shares | first update of each batch: mean \\|.\\| | "
             "its shares |", "|---|---|---|---|---|"]
    for p in paths:
        run = open_run(p)
        a, f = attribution_summary(run), attribution_summary(run, updates="first")
        lines.append(f"| `{p.name}` | {a['total_abs']:.4f} | {_shares(a)} | {f['total_abs']:.4f} | {_shares(f)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from doc_markers import runs_table_main

    return runs_table_main(__doc__, table, START, END, argv)


if __name__ == "__main__":
    raise SystemExit(main())
