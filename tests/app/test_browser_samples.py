"""The shipped sample logs in a real headless Chromium (issue 10's check: the long regime's effect on the app's
pages), saved as ``artifacts/screenshots/sample_*.png``.

A module of its own: test_browser.py keeps one Playwright session open for its whole module, and Playwright's
sync API cannot start a second one in the same thread while it is open.
"""

from __future__ import annotations

import pytest

from tests.app.test_browser import (  # noqa: F401  (skips this module too when Chromium is missing)
    CHART,
    CHROMIUM,
    CHROMIUM_ARGS,
    REPO,
    TIMEOUT_MS,
    app_server,
    chart_signature,
    choose,
    goto,
    select_runs,
    selected_tags,
    shot,
    sync_api,
    wait_chart_change,
    wait_idle,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_sample_logs_in_chromium(tmp_path_factory):
    """The shipped sample logs (long regime) in a real browser: the divergence of `cppo-long` by position, its
    budget, and the Doctor's findings on `unstable-long`, saved as screenshots for a reader to check the effect
    (``artifacts/screenshots/sample_*.png``)."""
    with app_server([str(REPO / "sample_logs")]) as url:
        profile = tmp_path_factory.mktemp("chromium-profile-samples")
        with sync_api.sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1500, "height": 2000},
            )
            try:
                pg = ctx.pages[0] if ctx.pages else ctx.new_page()
                pg.set_default_timeout(TIMEOUT_MS)
                pg.goto(url + "/")
                pg.get_by_role("heading", name="Runs").first.wait_for()
                pg.get_by_test_id("stDataFrame").first.wait_for()
                wait_idle(pg)
                select_runs(pg, "cppo-long", "unstable-long")
                try:
                    _walk(pg)
                except BaseException:
                    shot(pg, "sample_failure")
                    raise
            finally:
                ctx.close()


def _walk(pg) -> None:
    goto(pg, "Divergence by position", 2)
    choose(pg, "Run", "cppo-long")
    wait_idle(pg)
    # the page's default statistic is the top-decile mean (issue 24); the mean and back redraw the chart
    assert pg.evaluate(f"() => document.querySelector('{CHART}').data[0].name") == "top-decile mean"
    before = chart_signature(pg, 0)
    choose(pg, "Statistic", "mean")
    wait_chart_change(pg, 0, before)
    wait_idle(pg)
    before = chart_signature(pg, 0)
    choose(pg, "Statistic", "top-decile")
    wait_chart_change(pg, 0, before)
    wait_idle(pg)
    assert "cppo-long" in pg.content()
    shot(pg, "sample_divergence")

    goto(pg, "Budget", 3)
    wait_idle(pg)
    shot(pg, "sample_budget")

    assert any("unstable-long" in t for t in selected_tags(pg)), selected_tags(pg)  # the selection held
    goto(pg, "Doctor", 0)
    pg.get_by_text("reward_collapse").first.wait_for(timeout=4 * TIMEOUT_MS)  # diagnose runs on first open
    wait_idle(pg)
    assert "unstable-long" in pg.content()
    shot(pg, "sample_doctor")
