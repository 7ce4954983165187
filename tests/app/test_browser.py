"""The app in a real headless Chromium (Playwright driving the system /usr/bin/chromium).

Starts the server with ``cppo-diag app``'s ``launch`` on a free 127.0.0.1 port over a root of real runs,
opens every page through the sidebar navigation (one browser session, so the run selection carries over),
waits for the plotly charts by selector, selects two runs on Compare, changes a widget on each analysis page
and times the wait from the change until the chart (or text) shows new data. Screenshots go to
``artifacts/screenshots/`` and the latencies to ``artifacts/app_latency.json`` (CI keeps both).

Bigger data for the speed figures in docs/benchmarks.md: ``CPPO_DIAG_APP_BENCH_TOKENS=50000000`` adds a
synthetic run of that many tokens (``cppo_diag.analyses.write_synthetic_run``, CPPO applied) as a second root and the
latencies are measured on it; ``CPPO_DIAG_APP_BENCH_DIR`` (default ``bench_data/app``) keeps it between runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"
SHOTS = ARTIFACTS / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BENCH_TOKENS = int(os.environ.get("CPPO_DIAG_APP_BENCH_TOKENS", "0"))
BENCH_DIR = Path(os.environ.get("CPPO_DIAG_APP_BENCH_DIR", str(REPO / "bench_data" / "app")))
# Hang guards, far above a wait on a loaded box (CPPO_DIAG_BROWSER_TIMEOUT_MS overrides them, e.g. to debug).
TIMEOUT_MS = int(os.environ.get("CPPO_DIAG_BROWSER_TIMEOUT_MS", 600_000 if BENCH_TOKENS else 300_000))

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (install Debian's chromium: apt-get install -y chromium)",
                allow_module_level=True)
from playwright import sync_api  # noqa: E402  (a dev dependency: missing it is an error, not a skip)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from tests.app_fixtures import build_root

    r = tmp_path_factory.mktemp("browser_runs")
    build_root(r, n_steps=6, seqs=16, max_len=64)
    return r


@pytest.fixture(scope="module")
def roots(root) -> list[str]:
    if not BENCH_TOKENS:
        return [str(root)]
    big = BENCH_DIR / "big-run"
    if not (big / "meta.json").exists():
        from cppo_diag.analyses import write_synthetic_run

        write_synthetic_run(big, n_tokens=BENCH_TOKENS, seqs_per_step=256, max_len=2048, with_keep_applied="cppo",
                            progress=True)
    return [str(root), str(BENCH_DIR)]


@contextlib.contextmanager
def app_server(roots: list[str]):
    """The app on a free 127.0.0.1 port, serving ``roots``; yields its URL and always stops it."""
    from cppo_diag.cli.app_cmd import launch, wait_until_healthy

    port = _free_port()
    proc = launch(roots, port=port, open_browser=False, quiet=True)
    try:
        wait_until_healthy(port, proc, timeout=300)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except Exception:  # noqa: BLE001
            proc.kill()


@pytest.fixture(scope="module")
def server(roots):
    with app_server(roots) as url:
        yield url


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")  # fresh --user-data-dir
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1500, "height": 2000},
        )
        pg = ctx.pages[0] if ctx.pages else ctx.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        external: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.on("request", lambda req: None if req.url.startswith(("http://127.0.0.1", "data:", "blob:"))
              else external.append(req.url))
        pg._cppo_errors = errors  # type: ignore[attr-defined]
        pg._cppo_external = external  # type: ignore[attr-defined]
        yield pg
        ctx.close()


# -- helpers ---------------------------------------------------------------------------------------------------

CHART = '[data-testid="stPlotlyChart"] .js-plotly-plot'


def wait_idle(page) -> None:
    """Wait until the script run finished: no 'running' status widget, no stale elements."""
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
        " && !document.querySelector('[data-stale=\"true\"]')",
        timeout=TIMEOUT_MS,
    )


def wait_charts(page, n: int) -> None:
    page.wait_for_function(
        f"() => [...document.querySelectorAll('{CHART}')].filter(g => g.data && g.data.length).length >= {n}",
        timeout=TIMEOUT_MS,
    )


def chart_signature(page, i: int = 0) -> str:
    return page.evaluate(
        f"(i) => {{ const g = document.querySelectorAll('{CHART}')[i];"
        " return g && g.data ? JSON.stringify(g.data.map(t => [t.name, t.x, t.y])) : ''; }", i)


def wait_chart_change(page, i: int, before: str) -> None:
    page.wait_for_function(
        f"([i, before]) => {{ const g = document.querySelectorAll('{CHART}')[i];"
        " return g && g.data && JSON.stringify(g.data.map(t => [t.name, t.x, t.y])) !== before; }",
        arg=[i, before], timeout=TIMEOUT_MS,
    )


def wait_trace_named(page, i: int, prefix: str) -> None:
    page.wait_for_function(
        f"([i, prefix]) => {{ const g = document.querySelectorAll('{CHART}')[i];"
        " return g && g.data && g.data.some(t => String(t.name).includes(prefix)"
        " || String(t.meta).includes(prefix)); }",
        arg=[i, prefix], timeout=TIMEOUT_MS,
    )


def goto(page, title: str, n_charts: int) -> None:
    page.locator('[data-testid="stSidebarNav"] a', has_text=title).first.click()
    page.get_by_role("heading", name=title).first.wait_for()
    wait_idle(page)
    if n_charts:
        wait_charts(page, n_charts)
    assert page.locator('[data-testid="stException"]').count() == 0, page.locator(
        '[data-testid="stException"]').first.inner_text()


def choose(page, label: str, option: str) -> None:
    page.get_by_test_id("stSelectbox").filter(has_text=label).first.click()
    page.get_by_role("option", name=option, exact=False).first.click()


def selected_tags(page) -> list[str]:
    """The runs shown as chosen in the sidebar's "Selected runs" multiselect."""
    box = page.get_by_test_id("stMultiSelect").filter(has_text="Selected runs").first
    return [t.strip() for t in box.locator('[data-testid="stMultiSelectTagsContainer"] [data-tag]').all_inner_texts()]


def select_runs(page, *names: str) -> None:
    """Add runs to the sidebar's "Selected runs" multiselect (type the name, Enter) and check they stay chosen.

    On a loaded box a keystroke can land while the previous choice's rerun is still redrawing the widget, and
    the choice is lost: each name is retried (up to 3 times) until its tag shows, and the selection is checked
    at the end, so a later page fails here rather than waiting for a run that was never selected."""
    for name in names:
        for _ in range(3):
            box = page.get_by_test_id("stMultiSelect").filter(has_text="Selected runs").first
            box.locator("input").click()
            page.keyboard.type(name)
            page.keyboard.press("Enter")
            # close the list by a click on the sidebar's roots caption, not Escape: on the Runs page Escape can
            # reach the runs table once the rerun moved the focus, and it clears the table's selection
            page.get_by_test_id("stSidebar").get_by_text("Roots:").first.click()
            wait_idle(page)
            if any(name in t for t in selected_tags(page)):
                break
    page.wait_for_timeout(500)  # let a late rerun land, then check that every choice held
    wait_idle(page)
    tags = selected_tags(page)
    assert all(any(n in t for t in tags) for n in names), f"selected {tags}, wanted {names}"


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def timed(latencies: dict, name: str, action, wait) -> None:
    t0 = time.perf_counter()
    action()
    wait()
    latencies[name] = round(time.perf_counter() - t0, 3)


# -- the test ---------------------------------------------------------------------------------------------------


def test_every_page_in_chromium(page, server, roots, monkeypatch):
    try:
        _walk_every_page(page, server)
    except BaseException:
        shot(page, "failure")
        raise
    if BENCH_TOKENS:
        _server_side_latency(roots, monkeypatch)


def _walk_every_page(page, server) -> None:
    latencies: dict[str, float] = {}
    t0 = time.perf_counter()
    page.goto(server + "/")
    page.get_by_role("heading", name="Runs").first.wait_for()
    page.get_by_test_id("stDataFrame").first.wait_for()
    wait_idle(page)
    latencies["first_load_runs"] = round(time.perf_counter() - t0, 3)
    focus = "big-run" if BENCH_TOKENS else "cppo-run"

    select_runs(page, focus)  # the run the single-run pages show
    shot(page, "1_runs")

    t0 = time.perf_counter()
    goto(page, "Divergence by position", 2)
    latencies["first_load_divergence"] = round(time.perf_counter() - t0, 3)
    before = chart_signature(page, 0)
    timed(latencies, "divergence_statistic", lambda: choose(page, "Statistic", "p90"),
          lambda: wait_chart_change(page, 0, before))
    before = chart_signature(page, 0)
    timed(latencies, "divergence_advantage_sign", lambda: choose(page, "Advantage sign", "A > 0"),
          lambda: wait_chart_change(page, 0, before))
    wait_idle(page)
    shot(page, "2_divergence")

    before = chart_signature(page, 0)
    timed(latencies, "divergence_kind", lambda: choose(page, "Divergence", "k3"),
          lambda: wait_chart_change(page, 0, before))
    wait_idle(page)

    t0 = time.perf_counter()
    goto(page, "Budget", 3)
    latencies["first_load_budget"] = round(time.perf_counter() - t0, 3)
    before = chart_signature(page, 0)
    field = page.get_by_test_id("stNumberInput").filter(has_text="δ_b (min / fixed)").first.locator("input")
    timed(latencies, "budget_delta_b", lambda: (field.fill("0.03"), field.press("Enter")),
          lambda: wait_chart_change(page, 0, before))
    wait_idle(page)
    shot(page, "3_budget")

    t0 = time.perf_counter()
    goto(page, "Compare runs", 2)
    latencies["first_load_compare"] = round(time.perf_counter() - t0, 3)
    # Select exactly two runs: clear the list, then type two names.
    box = page.get_by_test_id("stMultiSelect").filter(has_text="Runs to compare").first
    box.get_by_role("button", name="Clear all").click()
    page.get_by_text("Pick at least one run").first.wait_for()
    wait_idle(page)
    box.locator("input").click()
    second = "big-run" if BENCH_TOKENS else "grpo-run"
    page.keyboard.type("dppo-run")
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    wait_idle(page)
    wait_trace_named(page, 0, "dppo-run")
    box.locator("input").click()
    page.keyboard.type(second)
    timed(latencies, "compare_add_run", lambda: page.keyboard.press("Enter"),
          lambda: wait_trace_named(page, 0, second))
    page.keyboard.press("Escape")
    wait_idle(page)
    wait_charts(page, 2)
    # one panel per run: a trace's meta is its run (the name is the rule)
    names = page.evaluate(f"() => document.querySelectorAll('{CHART}')[0].data.map(t => String(t.meta))")
    assert any("dppo-run" in n for n in names) and any(second in n for n in names)
    assert not any("cppo-run" in n for n in names)
    shot(page, "4_compare")

    t0 = time.perf_counter()
    goto(page, "Token inspector", 1)
    latencies["first_load_inspector"] = round(time.perf_counter() - t0, 3)
    page.locator(".tokens .tok").first.wait_for()
    assert page.locator(".tokens .tok").count() > 5
    if not BENCH_TOKENS:  # the fixture's token strings are shown exactly as written ('&', '<script>' as text)
        from tests.app_fixtures import VOCAB

        shown = page.evaluate("() => [...document.querySelectorAll('.tokens .tok')].map(s => s.textContent)")
        assert set(shown) <= {v.replace("\n", "↵") for v in VOCAB}, set(shown) - set(VOCAB)
        assert page.locator(".tokens script, .tokens b").count() == 0
    def pick_second(name: str, label: str) -> None:
        """Choose the second option of the select box labelled ``label``; time it until the tokens change."""
        first = page.locator(".tokens").first.inner_html()
        timed(latencies, name,
              lambda: (page.get_by_test_id("stSelectbox").filter(has_text=label).first.click(),
                       page.get_by_role("option").nth(1).click()),
              lambda: page.wait_for_function(
                  "(before) => { const t = document.querySelector('.tokens'); return t && t.innerHTML !== before; }",
                  arg=first, timeout=TIMEOUT_MS))
        wait_idle(page)

    pick_second("inspector_next_sequence", "Sequence (")
    pick_second("inspector_other_step", "Step")
    shot(page, "5_inspector")

    t0 = time.perf_counter()
    goto(page, "What-if", 2)
    latencies["first_load_whatif"] = round(time.perf_counter() - t0, 3)
    before = chart_signature(page, 0)
    slider = page.get_by_test_id("stSlider").filter(has_text="δ_b").first.get_by_role("slider")
    timed(latencies, "whatif_delta_b_slider", lambda: (slider.focus(), slider.press("ArrowRight")),
          lambda: wait_chart_change(page, 0, before))
    wait_idle(page)
    shot(page, "6_whatif")

    assert not page._cppo_errors, page._cppo_errors
    assert not page._cppo_external, f"the app requested external resources: {page._cppo_external}"
    ARTIFACTS.mkdir(exist_ok=True)
    record = {"bench_tokens": BENCH_TOKENS, "focus_run": focus, "latency_s": latencies,
              "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    (ARTIFACTS / "app_latency.json").write_text(json.dumps(record, indent=2))
    print("\napp latencies (s):", json.dumps(latencies, indent=2))


def _server_side_latency(roots: list[str], monkeypatch) -> None:
    """Bench only (CPPO_DIAG_APP_BENCH_TOKENS set): the same interactions through AppTest, which times the
    script reruns on the server without the browser's rendering, on the big run."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CPPO_DIAG_ROOTS", os.pathsep.join(roots))
    big = str((BENCH_DIR / "big-run").resolve())
    res: dict[str, float] = {}

    def run(name: str, at) -> None:
        t0 = time.perf_counter()
        at.run()
        res[name] = round(time.perf_counter() - t0, 3)
        assert not at.exception, [e.message for e in at.exception]

    at = AppTest.from_file(str(REPO / "app" / "streamlit_app.py"), default_timeout=900)
    run("first_load_runs", at)
    at.multiselect(key="selected_runs").set_value([big])
    run("select_run", at)
    at.switch_page("views/divergence.py")
    run("first_load_divergence", at)
    at.selectbox(key="div_stat").set_value("p90")
    run("divergence_statistic", at)
    at.selectbox(key="div_kind").set_value("k3")
    run("divergence_kind", at)
    at.selectbox(key="div_adv").set_value("pos")
    run("divergence_advantage_sign", at)
    at.select_slider(key="div_bw").set_value(128)
    run("divergence_bin_width", at)
    at.switch_page("views/budget.py")
    run("first_load_budget", at)
    at.number_input(key="bud_delta_b").set_value(0.03)
    run("budget_delta_b", at)
    at.switch_page("views/inspector.py")
    run("first_load_inspector", at)
    box = at.selectbox(key="insp_seq")
    box.set_value(f"0:0:{int(box.options[1].split(' · ')[0].removeprefix('seq '))}")
    run("inspector_next_sequence", at)
    at.selectbox(key="insp_step").set_value(int(at.selectbox(key="insp_step").options[1]))
    run("inspector_other_step", at)
    at.switch_page("views/whatif.py")
    run("first_load_whatif", at)
    at.slider(key="wi_delta").set_value(0.2)
    run("whatif_delta", at)
    at.switch_page("views/compare.py")
    run("first_load_compare", at)
    ARTIFACTS.mkdir(exist_ok=True)
    record = {"bench_tokens": BENCH_TOKENS, "latency_s": res, "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    (ARTIFACTS / "app_latency_server.json").write_text(json.dumps(record, indent=2))
    print("\nserver-side latencies (s):", json.dumps(res, indent=2))

