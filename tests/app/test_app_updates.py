"""App pages on a run with two updates per batch (the first at pi = mu): they pool the updates after the
first by default and say so (issue 11 item 5); the What-if and Compare pages offer CPPO's named parameter
sets (issue 10 item 6); the Fig. 2 overlay shares the divergence axis (issue 11 item 6)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from tests.app.test_app import APP, TIMEOUT, _ok, charts, traces  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from cppo_diag.analyses.synthetic import write_synthetic_run

    r = tmp_path_factory.mktemp("runs2")
    run = write_synthetic_run(r / "two-updates", n_tokens=6_000, seqs_per_step=8, max_len=64, updates=2,
                              with_keep_applied="cppo", seed=3, noise=0.05)
    for f in (run / "tokens").glob("step=*/*-u0-*.parquet"):  # the first update of each batch: pi = mu
        pl.read_parquet(f).with_columns(pl.col("logp_rollout").alias("logp"), pl.lit(True).alias("keep_applied"),
                                        pl.lit(0, pl.UInt8).alias("reason_applied")).write_parquet(f)
    write_synthetic_run(r / "one-update", n_tokens=3_000, seqs_per_step=8, max_len=64, with_keep_applied="cppo",
                        seed=4, noise=0.05)
    return r


@pytest.fixture
def page(root, monkeypatch):
    monkeypatch.setenv("CPPO_DIAG_ROOTS", str(root))

    def make(path: str, run: str = "two-updates") -> AppTest:
        at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
        at.run()
        at.multiselect(key="selected_runs").set_value([str((root / run).resolve())]).run()
        at.switch_page(path).run()
        _ok(at)
        return at

    return make


def _captions(at) -> str:
    return " ".join(c.value for c in at.caption)


def test_divergence_page_defaults_to_updates_after_the_first(page):
    at = page("views/divergence.py")
    assert at.radio(key="div_updates").value == "after_first"
    assert "after the first" in _captions(at)
    assert at.selectbox(key="div_stat").value == "top10_mean"  # the page's default: a tail statistic (issue 24)
    at.selectbox(key="div_stat").set_value("mean").run()  # the dilution below is the mean's
    _ok(at)
    later = sum(c[0] for c in traces(at)[0]["customdata"])
    mean_later = traces(at)[0]["y"]
    at.radio(key="div_updates").set_value("all").run()
    _ok(at)
    assert sum(c[0] for c in traces(at)[0]["customdata"]) > 1.8 * later
    assert all(a < b for a, b in zip(traces(at)[0]["y"], mean_later))  # the first update dilutes the mean
    # one axis: the delta / w_t overlay sits on the |pi - mu| axis
    spec = charts(at)[0]
    assert "yaxis2" not in spec["layout"] and all(t.get("yaxis") in (None, "y") for t in spec["data"])
    assert any(str(t.get("name", "")).startswith("δ / w_t") for t in spec["data"])


def test_single_update_run_has_no_updates_choice(page):
    at = page("views/divergence.py", run="one-update")
    assert not [r for r in at.radio if r.key == "div_updates"]


def test_budget_and_whatif_pages_pool_updates_after_the_first(page):
    at = page("views/budget.py")
    assert at.radio(key="bud_updates").value == "after_first"
    later = at.dataframe[0].value["n_valid"].sum()
    at.radio(key="bud_updates").set_value("all").run()
    _ok(at)
    assert at.dataframe[0].value["n_valid"].sum() > 1.8 * later

    at = page("views/whatif.py")
    assert at.radio(key="wi_updates").value == "after_first"
    n_later = int(at.metric[3].value.replace(",", ""))
    at.radio(key="wi_updates").set_value("all").run()
    _ok(at)
    assert int(at.metric[3].value.replace(",", "")) > 1.8 * n_later


def test_whatif_offers_the_cppo_parameter_sets(page):
    at = page("views/whatif.py")
    box = at.selectbox(key="wi_profile")
    assert box.options == ["paper", "unirl", "verl-pr6731"] and box.value == "paper"
    paper = at.metric[0].value
    box.set_value("verl-pr6731").run()
    _ok(at)
    assert "weight_length = horizon" in _captions(at) and "delta_b_cap = 5.0" in _captions(at)
    assert at.metric[0].value != paper
    at.toggle(key="wi_profiles").set_value(True).run()
    _ok(at)
    table = at.dataframe[0].value
    assert list(table["parameter set"]) == ["paper", "unirl", "verl-pr6731"]
    n = len(charts(at))
    at.toggle(key="wi_sweep").set_value(True).run()  # the grid sweeps under the chosen parameter set
    _ok(at)
    assert len(charts(at)) == n + 1


def test_compare_offers_the_cppo_parameter_sets(page, root):
    at = page("views/compare.py")
    at.multiselect(key="cmp_runs").set_value([str((root / n).resolve()) for n in ("two-updates", "one-update")]).run()
    at.multiselect(key="cmp_profiles").set_value(["unirl", "verl-pr6731"]).run()
    _ok(at)
    summary = at.dataframe[0].value
    assert {"cppo[unirl]", "cppo[verl-pr6731]"} <= set(summary["rule"])
    by_run = summary.groupby("run")["updates"].first().to_dict()
    assert by_run == {"two-updates": "after_first", "one-update": "all"}  # each run's default
