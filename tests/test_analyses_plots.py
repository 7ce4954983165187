"""Figure builders (matplotlib and plotly) on real aggregated tables and on empty ones."""

import polars as pl
import pytest

from analyses import plots_mpl as M
from analyses import plots_plotly as PP
from analyses.budget import budget_exhaustion
from analyses.compare import compare_runs
from analyses.mismatch import mismatch_by_position
from analyses.position import position_stats
from analyses.synthetic import write_synthetic_run
from analyses.whatif import whatif_sweep


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
    }


def _calls(t):
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
    for name, table, kw in _calls(tables):
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
    for name, table, kw in _calls(tables):
        fig = getattr(module, name)(table.head(0) if isinstance(table, pl.DataFrame) else table, **kw)
        msg = _message(fig)
        assert msg.strip(), name  # a sentence, not a blank figure
        assert any(w in msg for w in ("no ", "nothing", "empty", "No ")), (name, msg)


@pytest.mark.parametrize("module", [M, PP])
def test_fig2_threshold_shares_the_divergence_axis(tables, module):
    """|pi - mu| and delta / w_t are both probabilities: one y-axis, so a crossing on the figure is a real one."""
    fig = module.fig_position_divergence(tables["position"], metric="tv")
    if module is M:
        assert len(fig.axes) == 1
        labels = [ln.get_label() for ln in fig.axes[0].lines]
        assert any("threshold" in lab for lab in labels)
        lo, hi = fig.axes[0].get_ylim()
        thr = tables["position"].filter(pl.col("metric") == "tv")["threshold_mean"].to_numpy()
        assert lo <= thr.min() and thr.max() <= hi
    else:
        assert any("threshold" in (t.name or "") for t in fig.data)
        assert all(t.yaxis in (None, "y") for t in fig.data)
        assert "yaxis2" not in fig.to_dict()["layout"]
    # the threshold bounds |pi - mu|, not a log-ratio: not drawn beside k3
    fig = module.fig_position_divergence(tables["position"], metric="k3")
    names = [ln.get_label() for ln in fig.axes[0].lines] if module is M else [t.name for t in fig.data]
    assert not any("threshold" in (n or "") for n in names)


@pytest.mark.parametrize("module", [M, PP])
def test_hill_figure_explains_bounded_metric_and_too_few_exceedances(tables, module):
    pos = tables["position"]
    assert pos.filter(pl.col("metric") == "tv")["hill_alpha"].null_count() == pos.filter(pl.col("metric") == "tv").height
    assert "bounded" in _message(module.fig_position_hill(pos, metric="tv"))
    drawn = module.fig_position_hill(pos, metric="abs_logratio")
    assert not _message(drawn)
    # too few tokens above the tail threshold in every bin: a sentence saying so, not a blank plot
    few = pos.with_columns(pl.lit(None, pl.Float64).alias("hill_alpha"), pl.lit(2, pl.Int64).alias("hill_k"))
    assert "Too few tokens" in _message(module.fig_position_hill(few, metric="abs_logratio"))


def test_plotly_legends_sit_below_the_plot_not_on_the_title(tables):
    """A legend anchored above the plot area (y > 1) collides with the title once it wraps."""
    for name, table, kw in _calls(tables):
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
