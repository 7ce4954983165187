"""Every page of the app on one big run, in a real headless Chromium: each page's first view and one interaction
after it (issue 26: goals < 10 s and < 2 s on 2 cores).

Starts ``cppo-diag app`` on ``--root`` (a directory holding the one run to measure), drops the caches earlier
views left beside the run (what the recorder wrote stays: a first view), selects the run and walks the pages
through the sidebar in one browser session. A first view is timed from the click on the page's link until its
heading, its charts (with data) and an idle script run are there; an interaction from the widget change until
the chart (or the token text) shows new data. Also prints each page's coverage caption where the page covers
less than the run. Needs /usr/bin/chromium and playwright (the dev extra).

    python benchmarks/bench_app_browser.py --root bench_data/scale-1e9 --out artifacts/app_1e9.json

The run is written by ``benchmarks/bench_scale.py --tokens N`` (``bench_data/recorded_N``) or
``cppo_diag.analyses.synthetic.write_recorded_run``; put it (or a symlink to it) alone in the root.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="a directory holding exactly one run")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for one view (default 900)")
    ap.add_argument("--keep-caches", action="store_true", help="do not drop earlier views' caches (a warm walk)")
    ap.add_argument("--out", type=Path, default=None, help="also write the timings as JSON here")
    args = ap.parse_args()

    from cppo_diag.storage.meta import is_run_dir

    runs = sorted(p for p in args.root.iterdir() if is_run_dir(p))
    if len(runs) != 1:
        raise SystemExit(f"--root: expected a directory with exactly one run, found {len(runs)}")
    run = runs[0]
    if not args.keep_caches:
        from cppo_diag.analyses.aggregate import drop_view_caches

        drop_view_caches(run.resolve())
    os.environ["CPPO_DIAG_BROWSER_TIMEOUT_MS"] = str(int(args.timeout * 1000))
    from playwright import sync_api

    from tests.app import test_browser as B

    first: dict[str, float] = {}
    inter: dict[str, float] = {}
    captions: dict[str, list[str]] = {}

    def view(title: str, n_charts: int, key: str) -> None:
        t0 = time.perf_counter()
        B.goto(page, title, n_charts)
        first[key] = round(time.perf_counter() - t0, 2)
        # what the page says it covers where that is less than the run (controls.step_range's caption)
        captions[key] = page.get_by_text(re.compile(r"tokens of steps \d+-\d+")).all_inner_texts()
        print(f"  {title}: first view {first[key]:.2f} s", flush=True)

    def act(key: str, action, wait) -> None:
        B.timed(inter, key, action, wait)
        B.wait_idle(page)
        print(f"    {key}: {inter[key]:.2f} s", flush=True)

    def chart_changes(i: int = 0):
        before = B.chart_signature(page, i)
        return lambda: B.wait_chart_change(page, i, before)

    def radio(label: str, option: str):
        return lambda: page.get_by_test_id("stRadio").filter(has_text=label).first.get_by_text(option, exact=True).click()

    with B.app_server([str(args.root)]) as url, sync_api.sync_playwright() as p:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
            ctx = p.chromium.launch_persistent_context(profile, executable_path=B.CHROMIUM, headless=True,
                                                       args=B.CHROMIUM_ARGS, viewport={"width": 1500, "height": 2000})
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.set_default_timeout(args.timeout * 1000)
            t0 = time.perf_counter()
            page.goto(url + "/")
            page.get_by_role("heading", name="Runs").first.wait_for()
            page.get_by_test_id("stDataFrame").first.wait_for()
            B.wait_idle(page)
            first["runs"] = round(time.perf_counter() - t0, 2)
            print(f"  Runs: first view {first['runs']:.2f} s", flush=True)
            B.select_runs(page, run.name)

            view("Divergence by position", 2, "divergence")
            wait = chart_changes()
            act("divergence: statistic -> p90", lambda: B.choose(page, "Statistic", "p90"), wait)
            view("Budget", 3, "budget")
            field = page.get_by_test_id("stNumberInput").filter(has_text="δ_b (min / fixed)").first.locator("input")
            wait = chart_changes()
            act("budget: delta_b -> 0.03", lambda: (field.fill("0.03"), field.press("Enter")), wait)
            view("Compare runs", 2, "compare")
            view("Token inspector", 1, "inspector")
            page.locator(".tokens .tok").first.wait_for()
            before = page.locator(".tokens").first.inner_html()
            act("inspector: next sequence",
                lambda: (page.get_by_test_id("stSelectbox").filter(has_text="Sequence (").first.click(),
                         page.get_by_role("option").nth(1).click()),
                lambda: page.wait_for_function("(b) => { const t = document.querySelector('.tokens');"
                                               " return t && t.innerHTML !== b; }", arg=before))
            view("What-if", 2, "whatif")
            # δ, not δ_b: on a run whose budget never binds a δ_b move changes no chart
            slider = (page.get_by_test_id("stSlider").filter(has=page.get_by_text("δ", exact=True)).first
                      .get_by_role("slider"))
            wait = chart_changes()
            act("whatif: delta slider", lambda: (slider.focus(), slider.press("ArrowRight")), wait)
            view("Doctor", 1, "doctor")  # findings, then the mismatch family chart
            wait = chart_changes()
            box = page.get_by_test_id("stMultiSelect").filter(has_text="Metrics").first
            act("doctor: add a metric", lambda: (box.locator("input").click(), page.keyboard.type("ess_token"),
                                                 page.keyboard.press("Enter")), wait)
            view("Attribution", 1, "attribution")
            wait = chart_changes()
            act("attribution: value -> signed mean", radio("Value", "signed mean"), wait)
            errors = page.locator('[data-testid="stException"]').all_inner_texts()
            ctx.close()

    tokens = _tokens(run)
    rec = {"run": str(run), "tokens": tokens, "first_view_s": first, "interaction_s": inter,
           "coverage_captions": captions, "exceptions": errors, "load_average": os.getloadavg(),
           "cpus": os.cpu_count()}
    print(f"\n{tokens:,} tokens; load average now {os.getloadavg()[0]:.1f}\n")
    print("| page | first view s | interaction | s |")
    print("|---|---:|---|---:|")
    acts = {k.split(":")[0]: (k, v) for k, v in inter.items()}
    for k, v in first.items():
        a = acts.get(k)
        print(f"| {k} | {v:.2f} | {a[0].split(': ', 1)[1] if a else '-'} | {f'{a[1]:.2f}' if a else '-'} |")
    for k, c in captions.items():
        for t in c:
            print(f"{k}: {t}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rec, indent=2))
    return 0 if not errors else 1


def _tokens(run: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in (run / "tokens").glob("step=*/*.parquet"))


if __name__ == "__main__":
    raise SystemExit(main())
