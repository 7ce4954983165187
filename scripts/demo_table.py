#!/usr/bin/env python
"""Regenerate the README's table of the shipped sample runs (greedy accuracy before -> after, masked fraction
after the first update of each batch, the tail ratio) from the runs themselves, nothing typed by hand.

Each row is one run of ``sample_logs/``; ``--seeds NAME=RUN,RUN`` adds reruns of that row at other seeds (same
preset and rule, ``--seed`` changed), whose figures are given beside seed 0 with their mean. The figures are
the ones ``scripts/check_long_preset.py`` checks (issue 10's criteria).

    python scripts/demo_table.py                                   # print the table
    python scripts/demo_table.py --seeds cppo-long=runs/cppo-s1,runs/cppo-s2 --write README.md
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = [  # sample run, label
    ("cppo-long", "CPPO"),
    ("grpo-long", "GRPO ratio clip"),
    ("dppo-long", "DPPO"),
    ("pg_is-long", "no trust region (pg_is)"),
    ("unstable-long", "unstable (GRPO clip, rising lr)"),
    ("unstable-noise-long", "unstable (DPPO, growing noise on the sampler's logits)"),
]
START, END = "<!-- demo-table:start (scripts/demo_table.py) -->", "<!-- demo-table:end -->"


def _criteria():
    spec = importlib.util.spec_from_file_location("check_long_preset", REPO / "scripts" / "check_long_preset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.long_criteria


def table(root: Path, seeds: dict[str, list[str]]) -> str:
    crit = _criteria()
    lines = ["| run (`sample_logs/`) | greedy accuracy before -> after | masked where the policy had moved since "
             "sampling (all tokens / median step) | top-10% \\|pi - mu\\| last / first third |",
             "|---|---|---|---|"]
    for name, label in ROWS:
        if not (root / name).is_dir():
            raise FileNotFoundError(f"{root / name}: expected the sample run {name!r} (scripts/make_sample_logs.py)")
        c = crit(root / name)
        acc = f"{c['greedy_acc_before']:.3f} -> {c['greedy_acc_after']:.3f}"
        masked = ("never masks" if c["rule"] == "pg_is"
                  else f"{c['masked_frac_after_first_update']:.1%} / {c['masked_frac_median_step']:.1%}")
        if seeds.get(name):
            others = [crit(r) for r in seeds[name]]
            accs = [c["greedy_acc_after"]] + [o["greedy_acc_after"] for o in others]
            acc += (f" (seeds 0-{len(accs) - 1}: " + ", ".join(f"{a:.3f}" for a in accs)
                    + f"; mean {sum(accs) / len(accs):.3f})")
            masked += " (other seeds: " + ", ".join(f"{o['masked_frac_after_first_update']:.1%}" for o in others) + ")"
        lines.append(f"| {label} (`{name}`) | {acc} | {masked} | {c['tv_top10_ratio']:.1f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(REPO / "sample_logs"), help="the sample runs")
    ap.add_argument("--seeds", action="append", default=[], metavar="NAME=RUN,RUN",
                    help="reruns of a row at other seeds (repeatable)")
    ap.add_argument("--write", default="", help="replace the table between the demo-table markers of this file")
    args = ap.parse_args(argv)
    seeds: dict[str, list[str]] = {}
    for spec in args.seeds:
        name, _, runs = spec.partition("=")
        if not runs:
            ap.error(f"--seeds: expected NAME=RUN[,RUN...], found {spec!r}")
        seeds[name] = [r for r in runs.split(",") if r]
    out = table(Path(args.root), seeds)
    if not args.write:
        print(out)
        return 0
    path = Path(args.write)
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path}: expected the markers {START!r} and {END!r} around the table")
    text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: f"{START}\n{out}\n{END}", text, flags=re.S)
    path.write_text(text)
    print(f"wrote the table into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
