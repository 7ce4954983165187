"""Server-side first view of every app page on one big run (issue 26), through ``streamlit.testing.v1.AppTest``.

    python benchmarks/bench_app_pages.py --root DIR_WITH_ONE_RUN [--repeats 2]

Caches of earlier views beside the run are deleted first (the recorder's write-time aggregates stay). For each
page: the script run that renders it (the Runs page first, with the run selected), then the same page again (``second``: Streamlit's caches and this issue's per-step partials answer). Times are the server's
rerun only (no browser, no network, no chart drawing): ``tests/app/test_browser.py`` measures end to end in
Chromium. Figures belong in docs/benchmarks.md ("Scale").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("views/runs.py", "views/divergence.py", "views/budget.py", "views/compare.py", "views/inspector.py",
         "views/whatif.py", "views/doctor.py")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="a directory holding the run (or a link to it)")
    ap.add_argument("--pages", default=",".join(p.split("/")[1][:-3] for p in PAGES))
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    os.environ["CPPO_DIAG_ROOTS"] = str(args.root.resolve())
    sys.path.insert(0, str(ROOT))
    from streamlit.testing.v1 import AppTest

    from cppo_diag.storage.meta import is_run_dir

    runs = sorted(p for p in args.root.iterdir() if is_run_dir(p))
    if len(runs) != 1:
        raise SystemExit(f"--root: expected a directory with exactly one run, found {len(runs)}")
    # a first view: only what the recorder wrote beside the run (drop caches of earlier views)
    from cppo_diag.analyses.aggregate import drop_view_caches

    drop_view_caches(runs[0])
    at = AppTest.from_file(str(ROOT / "app" / "streamlit_app.py"), default_timeout=args.timeout)
    t0 = time.perf_counter()
    at.run()
    print(f"app start (Runs page): {time.perf_counter() - t0:.2f} s", flush=True)
    at.multiselect(key="selected_runs").set_value([str(runs[0].resolve())]).run()
    print(f"load average {os.getloadavg()[0]:.1f}")
    print("| page | first view s | second view s | errors |")
    print("|---|---:|---:|---|")
    for name in args.pages.split(","):
        page = f"views/{name}.py"
        times = []
        for _ in range(2):
            t = time.perf_counter()
            at.switch_page(page).run()
            times.append(time.perf_counter() - t)
            if name != "runs":
                at.switch_page("views/runs.py").run()
        errs = [e.value for e in at.exception] if at.exception else []
        print(f"| {name} | {times[0]:.2f} | {times[1]:.2f} | {'; '.join(str(e)[:80] for e in errs) or '-'} |",
              flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
