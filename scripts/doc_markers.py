"""Replace the generated part of a doc between two marker comments (the scripts that write docs/ use it, so no
number in a generated table is typed by hand). Imported by the scripts beside it (``python scripts/x.py`` puts
this folder on ``sys.path``)."""

from __future__ import annotations

import re
from pathlib import Path


def write_between(path: str | Path, start: str, end: str, body: str) -> None:
    """Put ``body`` between the lines ``start`` and ``end`` of ``path``; SystemExit naming both when absent."""
    path = Path(path)
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path}: expected the markers {start!r} and {end!r} around the generated text")
    path.write_text(re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: f"{start}\n{body}\n{end}", text,
                           flags=re.S))
    print(f"wrote {path}")


def runs_table_main(doc: str, table, start: str, end: str, argv=None) -> int:
    """The command line of a script that tables run directories: ``RUN [RUN ...] [--write FILE]``; prints
    ``table(list of paths)`` and, with ``--write``, puts it between ``start`` and ``end`` of FILE."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories")
    ap.add_argument("--write", default="", help="replace the table between its markers of FILE")
    args = ap.parse_args(argv)
    out = table(args.runs)
    print(out)
    if args.write:
        write_between(args.write, start, end, out)
    return 0
