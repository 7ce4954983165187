"""The first screen of every page in a real headless Chromium at 1400x900 (issue 24): each page's own URL
resolves (``/runs`` included), the page says what it shows and then shows it, with its figure on the first
screen above its controls, and the Divergence chart is at least half on the first screen with a tail statistic
(the top-decile mean) and delta / w_t drawn by default. Screenshots of the first screens go to
``artifacts/screenshots/first_screen_*.png``.

A module of its own: Playwright's sync API cannot start a second session in a thread while test_browser.py's
is open.
"""

from __future__ import annotations

import pytest

from tests.app.test_browser import (  # noqa: F401  (skips this module too when Chromium is missing)
    CHART,
    CHROMIUM,
    CHROMIUM_ARGS,
    SHOTS,
    TIMEOUT_MS,
    app_server,
    sync_api,
    wait_charts,
    wait_idle,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

VIEWPORT = {"width": 1400, "height": 900}

# url path -> (the page's title, a selector of its figure: what the page exists to show)
PAGES = {
    "": ("Runs", '[data-testid="stDataFrame"]'),
    "runs": ("Runs", '[data-testid="stDataFrame"]'),
    "divergence": ("Divergence by position", CHART),
    "attribution": ("Attribution", CHART),
    "budget": ("Budget", CHART),
    "compare": ("Compare runs", CHART),
    "inspector": ("Token inspector", ".tokens"),
    "whatif": ("What-if", CHART),
    # the first finding (its id, bold) or the "no finding" box
    "doctor": ("Doctor", '[data-testid="stMain"] [data-testid="stMarkdown"] strong code, '
                         '[data-testid="stMain"] [data-testid="stAlert"]'),
}
# The main area's input widgets: the page's controls.
CONTROLS = ", ".join(f'[data-testid="stMain"] [data-testid="{t}"]' for t in (
    "stSelectbox", "stMultiSelect", "stSlider", "stRadio", "stNumberInput", "stCheckbox", "stToggle"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.app_fixtures import build_root

    root = tmp_path_factory.mktemp("layout_runs")
    build_root(root, n_steps=6, seqs=16, max_len=64)
    with app_server([str(root)]) as url:
        yield url


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile-layout")
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                   args=CHROMIUM_ARGS, viewport=VIEWPORT)
        try:
            pg = ctx.pages[0] if ctx.pages else ctx.new_page()
            pg.set_default_timeout(TIMEOUT_MS)
            yield pg
        finally:
            ctx.close()


def _box(page, selector: str) -> dict | None:
    """The first match's box in viewport coordinates at the top of the page (no scrolling), or None."""
    return page.evaluate(
        "(sel) => { const e = document.querySelector(sel); if (!e) return null;"
        " const r = e.getBoundingClientRect(); return {top: r.top, bottom: r.bottom, height: r.height}; }", selector)


def _open(page, url: str, title: str, figure: str) -> None:
    page.goto(url)
    page.get_by_role("heading", name=title).first.wait_for()
    wait_idle(page)
    if figure == CHART:
        wait_charts(page, 1)
    page.locator(figure).first.wait_for()
    wait_idle(page)
    page.evaluate("() => window.scrollTo(0, 0)")
    assert page.locator('[data-testid="stException"]').count() == 0, page.locator(
        '[data-testid="stException"]').first.inner_text()


@pytest.mark.parametrize("path", list(PAGES))
def test_page_url_resolves_and_its_figure_leads(browser_page, server, path):
    title, figure = PAGES[path]
    page = browser_page
    try:
        _open(page, f"{server}/{path}", title, figure)
        assert "Page not found" not in page.content(), f"/{path} is not a page"
        # The page's own heading, then one sentence saying what it shows (a caption right under the title).
        assert page.locator('[data-testid="stMain"] h1').first.inner_text().strip() == title
        fig = _box(page, figure)
        assert fig is not None and fig["height"] > 0
        assert fig["top"] < VIEWPORT["height"], f"/{path}: the figure starts below the first screen ({fig})"
        ctl = _box(page, CONTROLS)
        if ctl is not None:
            assert fig["top"] < ctl["top"], f"/{path}: controls ({ctl}) above the figure ({fig})"
    finally:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"first_screen_{path or 'root'}.png"))


def test_divergence_chart_is_on_the_first_screen_with_a_tail_statistic(browser_page, server):
    page = browser_page
    _open(page, f"{server}/divergence", "Divergence by position", CHART)
    fig = _box(page, CHART)
    visible = min(fig["bottom"], VIEWPORT["height"]) - max(fig["top"], 0)
    assert visible >= 0.5 * fig["height"], f"only {visible:.0f} of the chart's {fig['height']:.0f} px on screen"
    names = page.evaluate(f"() => document.querySelector('{CHART}').data.map(t => String(t.name))")
    assert names[0] == "top-decile mean", names  # the default statistic is the tail, not the mean
    assert any(n.startswith("δ / w_t") for n in names), names  # drawn against CPPO's threshold
