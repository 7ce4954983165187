"""The study's figures: the seed bands (``curve_bands``) and the matplotlib builders they feed
(``cppo_diag.analyses.plots_mpl``: learning curves, per-rule small multiples, the ablation, the paired effects)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from cppo_diag.analyses import plots_mpl as M
from cppo_diag.study.analysis import curve_bands
from cppo_diag.study.stats import t_interval

LABELS = ["cppo", "dppo", "cppo_no_budget"]


@pytest.fixture(scope="module")
def curves():
    rng = np.random.default_rng(0)
    rows = [{"label": lab, "seed": seed, "step": step, "accuracy": float(np.clip(0.2 + 0.05 * step + rng.normal(0, .05), 0, 1))}
            for lab in LABELS for seed in range(3) for step in range(0, 10, 2)]
    rows.append({"label": "dppo", "seed": 3, "step": 10, "accuracy": 0.7})  # one seed only at the last step
    return pl.DataFrame(rows)


def test_curve_bands_are_the_t_interval_over_seeds_per_step(curves):
    bands = curve_bands(curves, 0.9)
    assert bands.height == curves.select("label", "step").unique().height
    for r in bands.iter_rows(named=True):
        iv = t_interval(curves.filter((pl.col("label") == r["label"]) & (pl.col("step") == r["step"]))["accuracy"]
                        .to_numpy(), 0.9)
        assert (r["mean"], r["n"]) == (pytest.approx(iv.mean), iv.n)
        assert (math.isnan(r["lo"]) and iv.n < 2) or r["lo"] == pytest.approx(iv.lo)
    for (label,), part in bands.group_by("label"):
        assert part["step"].is_sorted(), label
    assert curve_bands(curves.head(0), 0.9).columns == ["label", "step", "mean", "lo", "hi", "n"]


def test_study_curve_figures(curves, tmp_path):
    bands = curve_bands(curves, 0.95)
    fig = M.fig_learning_curves(bands, LABELS, threshold=0.5, title="t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cppo (n=3)", "dppo (n=3)", "cppo_no_budget (n=3)"]
    assert len(ax.collections) == 3  # one band per rule
    fig = M.fig_curves_by_rule(curves, bands, LABELS, confidence=0.95, threshold=0.5)
    visible = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in visible] == LABELS
    assert len(visible[1].lines) == 4 + 1 + 1  # four seeds, the mean, the threshold
    values = {lab: curves.filter((pl.col("label") == lab) & (pl.col("step") == 8))["accuracy"].to_numpy()
              for lab in ("cppo", "cppo_no_budget")}
    fig = M.fig_ablation(bands, list(values), values, {k: t_interval(v, 0.95) for k, v in values.items()},
                         metric_label="final", confidence=0.95)
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["cppo", "cppo_no_budget"]
    assert fig.axes[1].get_ylabel() == "final held-out accuracy"
    assert M.save_png(fig, tmp_path / "ablation.png").stat().st_size > 5_000


def test_effects_figure_colours_the_interval_by_sign():
    rows = [{"label": "vs a", "mean": 0.05, "lo": 0.01, "hi": 0.09, "note": "Holm p 0.03"},
            {"label": "vs b", "mean": -0.05, "lo": -0.09, "hi": -0.01, "note": "Holm p 0.04"},
            {"label": "vs c", "mean": 0.0, "lo": float("nan"), "hi": float("nan"), "note": "Holm p 1"}]
    fig = M.fig_effects([{"title": "final", "xlabel": "cppo minus rule", "rows": rows},
                         {"title": "best", "xlabel": "x", "rows": rows}], confidence=0.95)
    ax = fig.axes[0]
    points = [ln for ln in ax.lines if ln.get_marker() == "o"]
    assert [p.get_color() for p in points] == ["C2", "C3", "0.35"]  # above 0, below 0, no interval
    assert [t.get_text() for t in ax.texts] == ["Holm p 0.03", "Holm p 0.04", "Holm p 1"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["vs a", "vs b", "vs c"]
    assert list(ax.get_yticks()) == [2, 1, 0]  # the first row on top
