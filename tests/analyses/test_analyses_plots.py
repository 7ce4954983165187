"""Figure builders (matplotlib and plotly) on real aggregated tables and on empty ones."""

import polars as pl
import pytest

from cppo_diag.analyses import plots_mpl as M
from cppo_diag.analyses import plots_plotly as PP
from cppo_diag.analyses.budget import budget_exhaustion
from cppo_diag.analyses.compare import compare_runs
from cppo_diag.analyses.mismatch import mismatch_by_position
from cppo_diag.analyses.position import position_stats
from cppo_diag.analyses.synthetic import write_synthetic_run
from cppo_diag.analyses.whatif import whatif_sweep


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    run = write_synthetic_run(tmp_path_factory.mktemp("runs") / "syn", n_tokens=6_000, seqs_per_step=8,
                              max_len=120, with_keep_applied="cppo", seed=2)
    pos = position_stats(run, bin_width=16, delta=0.15)
    bud = budget_exhaustion(run, bin_width=16, progress=False)
    cmp = compare_runs([run], ("grpo_clip", "cppo"), bin_width=16, progress=False)
    return {
        "position": pos, "budget": bud, "compare": cmp,
        "whatif": whatif_sweep(run, deltas=(0.1, 0.2), delta_bs=(0.01, 0.02), w_mins=(0.8,), progress=False),
        "mismatch": mismatch_by_position(run, bin_width=16),
        "run": run,
    }


def _calls(t):
    """Every builder of the report's (matplotlib) figures, on real tables."""
    return [
        ("fig_position_divergence", t["position"], {"tail": "p90"}),
        ("fig_position_divergence", t["position"], {"metric": "k3"}),
        ("fig_position_survival", t["position"], {}),
        ("fig_position_hill", t["position"], {}),
        ("fig_position_hill", t["position"], {"metric": "k3"}),
        ("fig_masked_by_position", t["compare"].by_position, {}),
        ("fig_masked_by_step", t["compare"].by_step, {}),
        ("fig_budget_by_step", t["budget"].by_step, {}),
        ("fig_first_reject", t["budget"].first_reject, {}),
        ("fig_slack", t["budget"].slack, {"delta": 0.15}),
        ("fig_whatif", t["whatif"], {}),
        ("fig_whatif", t["whatif"], {"value": "budget_share"}),
        ("fig_mismatch", t["mismatch"], {}),
        ("fig_compare", t["compare"].summary, {}),
    ]


# The app draws these plotly twins of report figures (Budget and What-if pages); its other figures are below.
PLOTLY_TWINS = ("fig_budget_by_step", "fig_first_reject", "fig_slack", "fig_whatif")


def _plotly_calls(t):
    return [c for c in _calls(t) if c[0] in PLOTLY_TWINS]


@pytest.mark.slow
def test_mpl_figures_have_labelled_axes_and_data(tables, tmp_path):
    for name, table, kw in _calls(tables):
        fig = getattr(M, name)(table, **kw)
        ax = fig.axes[0]
        assert ax.get_xlabel() and ax.get_ylabel(), name
        assert ax.lines or ax.images or ax.patches, name
        M.save_png(fig, tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 5_000
    fig = M.fig_position_divergence(tables["position"])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("top-10% mean" in lab for lab in labels) and any("threshold" in lab for lab in labels)


def test_plotly_figures_have_traces(tables):
    for name, table, kw in _plotly_calls(tables):
        fig = getattr(PP, name)(table, **kw)
        assert len(fig.data) >= 1, name
        assert fig.layout.xaxis.title.text, name


def _message(fig) -> str:
    """The text a figure shows instead of data ('' when it shows none)."""
    if isinstance(fig, M.Figure):
        return " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    return " ".join(a.text or "" for a in fig.layout.annotations)


@pytest.mark.parametrize("module", [M, PP])
def test_empty_tables_give_a_message_not_an_error(tables, module):
    for name, table, kw in (_calls if module is M else _plotly_calls)(tables):
        fig = getattr(module, name)(table.head(0) if isinstance(table, pl.DataFrame) else table, **kw)
        msg = _message(fig)
        assert msg.strip(), name  # a sentence, not a blank figure
        assert any(w in msg for w in ("no ", "nothing", "empty", "No ")), (name, msg)


def test_fig2_threshold_shares_the_divergence_axis(tables):
    """|pi - mu| and delta / w_t are both probabilities: one y-axis, so a crossing on the figure is a real one."""
    fig = M.fig_position_divergence(tables["position"], metric="tv")
    assert len(fig.axes) == 1
    labels = [ln.get_label() for ln in fig.axes[0].lines]
    assert any("threshold" in lab for lab in labels)
    lo, hi = fig.axes[0].get_ylim()
    thr = tables["position"].filter(pl.col("metric") == "tv")["threshold_mean"].to_numpy()
    assert lo <= thr.min() and thr.max() <= hi
    # the threshold bounds |pi - mu|, not a log-ratio: not drawn beside k3
    fig = M.fig_position_divergence(tables["position"], metric="k3")
    assert not any("threshold" in (ln.get_label() or "") for ln in fig.axes[0].lines)


def test_hill_figure_explains_bounded_metric_and_too_few_exceedances(tables):
    pos = tables["position"]
    assert pos.filter(pl.col("metric") == "tv")["hill_alpha"].null_count() == pos.filter(pl.col("metric") == "tv").height
    assert "bounded" in _message(M.fig_position_hill(pos, metric="tv"))
    drawn = M.fig_position_hill(pos, metric="abs_logratio")
    assert not _message(drawn)
    # too few tokens above the tail threshold in every bin: a sentence saying so, not a blank plot
    few = pos.with_columns(pl.lit(None, pl.Float64).alias("hill_alpha"), pl.lit(2, pl.Int64).alias("hill_k"))
    assert "Too few tokens" in _message(M.fig_position_hill(few, metric="abs_logratio"))


def test_plotly_legends_sit_below_the_plot_not_on_the_title(tables):
    """A legend anchored above the plot area (y > 1) collides with the title once it wraps."""
    for name, table, kw in _plotly_calls(tables):
        fig = getattr(PP, name)(table, **kw)
        legend = fig.layout.legend
        assert legend.y is not None and legend.y < 0 and legend.yanchor == "top", name
        assert fig.layout.margin.b >= 100, name  # room for the x-axis title and the legend


@pytest.mark.parametrize("values", [[0.031], [0.028, 0.033, 0.03], [0.0, 0.0]])
def test_plotly_budget_axis_fits_small_delta_b(values):
    """One step (or a few) of delta_b near 0.03: the axis spans 0..just above the largest value, instead of
    plotly's autorange around a single point (about -0.5..1), which flattens the curve."""
    by_step = pl.DataFrame({"step": list(range(len(values))), "delta_b_mean": values,
                            "budget_share": [0.4] * len(values)})
    fig = PP.fig_budget_by_step(by_step)
    lo, hi = fig.layout.yaxis.range
    assert lo == 0 and max(values) <= hi <= max(max(values) * 1.5, 1e-5)
    assert fig.layout.yaxis2.range == (0, 100)


# -- the app pages' figures ----------------------------------------------------------------------------------


def test_position_statistic_draws_the_statistic_mean_and_threshold(tables):
    tv = tables["position"].filter(pl.col("metric") == "tv")
    fig = PP.fig_position_statistic(tv, column="p90", label="p90", title="t", relative=False, show_mean=True,
                                    threshold_name="δ / w_t")
    assert [t.name for t in fig.data] == ["p90", "mean", "δ / w_t"]
    assert list(fig.data[0].x) == tv["bin_start"].to_list() and list(fig.data[0].y) == tv["p90"].to_list()
    assert fig.data[2].line.dash == "dash" and fig.layout.yaxis.title.text == "p90"
    assert fig.layout.xaxis.title.text == "position (token index, bin start)"
    bare = PP.fig_position_statistic(tv, column="mean", label="mean", title="t", relative=True)
    assert len(bare.data) == 1 and bare.layout.xaxis.title.text.startswith("relative position")
    assert list(bare.data[0].x) == ((tv["bin_start"] + tv["bin_end"]) / 2).to_list()


def test_runs_by_rule_colours_runs_and_dashes_rules(tables):
    by_step = pl.concat([tables["compare"].by_step.with_columns(run=pl.lit(r)) for r in ("a", "b")])
    rules = ["grpo_clip", "cppo"]
    fig = PP.fig_runs_by_rule(by_step, x="step", y="masked_frac", title="Masked fraction by step", x_title="step",
                              runs=["a", "b"], rules=rules)
    lines = {t.name: t.line for t in fig.data}
    assert lines["a · cppo"].color == lines["a · grpo_clip"].color != lines["b · cppo"].color
    assert lines["a · grpo_clip"].dash == PP.DASHES[1] and lines["a · cppo"].dash == PP.DASHES[2]
    assert lines["a · applied:cppo"].dash == "solid"
    assert fig.layout.yaxis.tickformat == ".1%" and "colour: run" in fig.layout.title.text


def test_runs_by_rule_panels_one_panel_per_run_one_colour_per_rule(tables):
    by_pos = pl.concat([tables["compare"].by_position.with_columns(run=pl.lit(r)) for r in ("a", "b", "c", "d")])
    fig = PP.fig_runs_by_rule_panels(by_pos, x="bin_start", y="masked_frac", title="Masked fraction by position",
                                     x_title="position", runs=["b", "a", "c", "d"], rules=["grpo_clip", "cppo"])
    rules = set(by_pos["rule"].to_list())
    assert len(fig.data) == 4 * len(rules)  # every (run, rule) once
    # panels in the runs' order, 3 to a row: b, a, c on the first row, d alone on the second
    axes = {t.meta: (t.xaxis, t.yaxis) for t in fig.data}
    assert axes["b"] == ("x", "y") and axes["a"] == ("x2", "y2") and axes["d"] == ("x4", "y4")
    titles = [a.text for a in fig.layout.annotations]
    applied = next(r for r in rules if r.startswith("applied")).split(":", 1)[1]
    assert titles == [f"{r} (applied: {applied})" for r in ("b", "a", "c", "d")]
    # one colour per rule across the panels, black for the applied mask, and the legend lists each rule once
    colour = {}
    for t in fig.data:
        assert colour.setdefault(t.name, t.line.color) == t.line.color
    assert colour["applied mask"] == "#222222" and colour["grpo_clip"] != colour["cppo"]
    assert sorted(t.name for t in fig.data if t.showlegend) == sorted(colour)
    assert fig.layout.yaxis.tickformat == ".1%" and fig.layout.yaxis2.matches == "y"  # shared y axis


def test_masked_by_rule_and_metric_family_draw_one_line_each(tables):
    from cppo_diag.analyses.mismatch import mismatch_metrics

    by_pos = tables["compare"].by_position
    fig = PP.fig_masked_by_rule(by_pos, relative=False)
    assert sorted(t.name for t in fig.data) == sorted(set(by_pos["rule"].to_list()))
    table = mismatch_metrics(tables["run"], by="position", bin_width=16)
    fig = PP.fig_metric_family(table, ["kl_k3", "chi2_token"], by="position")
    assert [t.name for t in fig.data] == ["kl_k3", "chi2_token"]
    assert fig.layout.xaxis.title.text.startswith("position")


def test_run_curves_one_line_per_run_and_scalar():
    curves = pl.DataFrame({"step": [0, 1, 0, 1], "run": ["a", "a", "b", "b"], "reward/mean": [0.1, 0.2, 0.3, None],
                           "acc/mean": [0.5, 0.6, 0.7, 0.8]})
    fig = PP.fig_run_curves(curves, ["reward/mean", "acc/mean"], runs=["a", "b"])
    assert [t.name for t in fig.data] == ["a · reward/mean", "b · reward/mean", "a · acc/mean", "b · acc/mean"]
    assert list(fig.data[1].y) == [0.3]  # nulls dropped


def test_whatif_page_figures_set_results_side_by_side(tables):
    from cppo_diag.analyses import recompute

    results = {name: recompute(tables["run"], rule, bin_width=16, progress=False)
               for name, rule in (("cppo (what-if)", "cppo"), ("reference", "grpo_clip"))}
    by_pos = PP.fig_whatif_by_position(results)
    assert [t.name for t in by_pos.data] == list(results)
    by_step = PP.fig_whatif_by_step(results)
    assert [t.type for t in by_step.data] == ["bar", "bar"] and by_step.layout.barmode == "group"
    assert list(by_step.data[0].y) == results["cppo (what-if)"].by_step.sort("step")["masked_frac"].to_list()


def test_sequence_internals_panels():
    seq = pl.DataFrame({"pos": [0, 1, 2], "tv": [0.1, 0.4, 0.05], "m_keep": [True, False, None],
                        "Z": [0.1, 0.3, 0.0], "c": [0.2, -0.1, -0.1], "w": [1.0, 0.9, 0.8], "S": [0.1, 0.4, 0.4]})
    fig = PP.fig_sequence_internals(seq, delta=0.15)
    names = [t.name for t in fig.data]
    assert names == ["|π−μ|", "Z_t", "masked", "c_t", "w_t", "S_t"]
    assert list(fig.data[2].x) == [1]  # only the masked token is crossed (a null keep is not a mask)
    assert fig.layout.yaxis.range == (0, 0.4 * 1.15)


# -- the doctor's figures ------------------------------------------------------------------------------------


def test_doctor_figures(tables, tmp_path):
    import numpy as np

    steps = np.arange(10)
    fig = M.fig_step_series(steps, np.exp(steps / 3), ylabel="mean k3", title="t", alarm_step=7, start_step=4,
                            log=True, collapse=8, extra=(steps, np.ones(10), "reference"))
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["mean k3", "reference", "steps the test used", "alarm at step 7", "reward collapse at step 8"]
    assert ax.get_yscale() == "log"
    assert M.fig_step_series(steps, steps - 1.0, ylabel="v", title="t", log=True).axes[0].get_yscale() == "linear"
    from cppo_diag.analyses.position import position_stats

    along = position_stats(tables["run"], metrics=("tv",), relative=True, n_rel_bins=10).filter(pl.col("count") > 0)
    fig = M.fig_divergence_along_response(along)
    assert [ln.get_label() for ln in fig.axes[0].lines] == ["bin mean", "top-10% mean (mean of D ≥ P90)"]
    from cppo_diag.analyses.mismatch import mismatch_metrics

    series = {u: mismatch_metrics(tables["run"], by="step", updates=u) for u in ("first", "after_first")}
    fig = M.fig_mismatch_by_update(series)
    assert len(fig.axes[0].lines) == sum(df.height > 0 for df in series.values()) >= 1
    assert M.save_png(fig, tmp_path / "mm.png").stat().st_size > 5_000
