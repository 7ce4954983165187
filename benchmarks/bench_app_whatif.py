"""What-if slider latency of the app in a real headless Chromium (the same mechanism as tests/app/test_browser.py).

Starts ``cppo-diag app`` on a root, selects one run, opens What-if, then moves the δ slider ``--moves``
times by one step (ArrowRight: every value is new, so nothing is served from the result cache; δ rather than
δ_b because with the adaptive budget a slightly higher δ_b minimum often changes nothing) and times
each move from the key press until the "Masked fraction by position" chart shows new data. Prints each
latency, the median and the load average. Needs /usr/bin/chromium and playwright.

    python benchmarks/bench_app_whatif.py --root bench_data/app --run big-run --moves 8

The 50M-token run of docs/benchmarks.md ("App") is written by ``CPPO_DIAG_APP_BENCH_TOKENS=50000000 pytest
tests/app/test_browser.py`` (kept in bench_data/app/big-run) or ``cppo_diag.analyses.write_synthetic_run(path,
n_tokens=50_000_000, seqs_per_step=256, max_len=2048, with_keep_applied="cppo")``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(REPO / "bench_data" / "app"), help="run root holding the run")
    ap.add_argument("--run", default="big-run", help="name of the run to open on What-if")
    ap.add_argument("--moves", type=int, default=8, help="slider moves to time")
    ap.add_argument("--out", default=None, help="also write the latencies as JSON here")
    args = ap.parse_args()

    from playwright import sync_api

    from cppo_diag.cli.app_cmd import launch, wait_until_healthy
    from tests.app.test_browser import CHROMIUM, CHROMIUM_ARGS, _free_port, chart_signature, goto, wait_chart_change, \
        wait_idle

    port = _free_port()
    proc = launch([args.root], port=port, open_browser=False, quiet=True)
    lat: list[float] = []
    try:
        wait_until_healthy(port, proc, timeout=120)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 2000})
            page.set_default_timeout(300_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("heading", name="Runs").first.wait_for()
            wait_idle(page)
            box = page.get_by_test_id("stMultiSelect").filter(has_text="Selected runs").first
            box.locator("input").click()
            page.keyboard.type(args.run)
            page.keyboard.press("Enter")
            page.keyboard.press("Escape")
            wait_idle(page)
            t0 = time.perf_counter()
            goto(page, "What-if", 2)
            first = time.perf_counter() - t0
            slider = (page.get_by_test_id("stSlider").filter(has=page.get_by_text("δ", exact=True)).first
                      .get_by_role("slider"))
            for _ in range(args.moves):
                before = chart_signature(page, 0)
                t0 = time.perf_counter()
                slider.focus()
                slider.press("ArrowRight")
                wait_chart_change(page, 0, before)
                lat.append(round(time.perf_counter() - t0, 3))
                wait_idle(page)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    rec = {"first_load_s": round(first, 3), "slider_s": lat, "median_s": statistics.median(lat),
           "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    print(json.dumps(rec, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
