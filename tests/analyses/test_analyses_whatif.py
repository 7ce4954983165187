"""What-if grid points equal individual compute_mask calls; budget tables equal a direct computation."""

import numpy as np
import polars as pl
import pytest

from cppo_diag.analyses.budget import budget_exhaustion
from cppo_diag.analyses.mismatch import mismatch_by_position
from cppo_diag.analyses.recomputation import iter_batches
from cppo_diag.analyses.synthetic import write_synthetic_run
from cppo_diag.analyses.tokens import MissingColumnError
from cppo_diag.analyses.whatif import whatif_sweep
from cppo_diag.masks import Reason, compute_mask


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("runs") / "syn", n_tokens=10_000, seqs_per_step=10,
                               max_len=200, noise=0.02, seed=5)


def _direct_counts(run, params):
    n_valid = n_masked = n_budget = 0
    for b in iter_batches(run):
        r = compute_mask("cppo", logp=b.logp, logp_rollout=b.logp_rollout, advantages=b.advantages,
                         response_mask=b.response_mask, **params)
        masked = b.response_mask & ~r.keep
        n_valid += int(b.response_mask.sum())
        n_masked += int(masked.sum())
        n_budget += int((r.reason == Reason.BUDGET).sum())
    return n_valid, n_masked, n_budget


@pytest.mark.parametrize("base", [{}, {"delta_b_mode": "fixed"}, {"weight_length": "horizon", "horizon": 64},
                                  {"delta_b_cap": 3.0, "delta_b_quantile": 0.8}])
def test_grid_points_equal_compute_mask(run, base):
    deltas, dbs, wms = (0.05, 0.15), (0.005, 0.02), (0.5, 0.8, 1.0)
    sweep = whatif_sweep(run, deltas=deltas, delta_bs=dbs, w_mins=wms, base_params=base, progress=False)
    assert sweep.height == len(deltas) * len(dbs) * len(wms)
    assert sweep["n_masked"].n_unique() > 1  # the grid actually moves the mask
    for row in sweep.iter_rows(named=True):
        params = {**base, "delta": row["delta"], "delta_b": row["delta_b"], "w_min": row["w_min"]}
        n_valid, n_masked, n_budget = _direct_counts(run, params)
        assert (row["n_valid"], row["n_masked"], row["n_budget"]) == (n_valid, n_masked, n_budget), params
        if n_masked:
            assert row["budget_share"] == pytest.approx(n_budget / n_masked)


def test_sweep_rejects_unknown_base_param(run):
    with pytest.raises(ValueError, match="base_params"):
        whatif_sweep(run, base_params={"eps_low": 0.2}, progress=False)


def test_budget_tables_match_internals(run):
    res = budget_exhaustion(run, params={"delta": 0.1}, bin_width=50, progress=False)
    per_step, events, censored = {}, [], []
    c_all, pos_all = [], []
    for b in iter_batches(run):
        r = compute_mask("cppo", logp=b.logp, logp_rollout=b.logp_rollout, advantages=b.advantages,
                         response_mask=b.response_mask, return_internals=True, delta=0.1)
        rows = b.response_mask.any(1)
        per_step.setdefault(b.step, []).extend(r.internals["delta_b"][rows].tolist())
        for i in range(b.response_mask.shape[0]):
            m = b.response_mask[i]
            if not m.any():
                continue
            hit = ((r.reason[i] == Reason.BUDGET) & m).nonzero()
            (events if len(hit) else censored).append(int(hit[0]) if len(hit) else int(m.sum()))
        c_all.append(r.internals["c"][b.response_mask].numpy())
        pos_all.append(b.positions[b.response_mask.numpy()])
    for row in res.by_step.iter_rows(named=True):
        assert row["delta_b_mean"] == pytest.approx(np.mean(per_step[row["step"]]), rel=1e-6)
    # Kaplan-Meier by a plain loop over positions
    surv, s = [], 1.0
    for p in range(res.first_reject.height):
        at_risk = sum(e >= p for e in events) + sum(t > p for t in censored)
        ev = sum(e == p for e in events)
        s *= 1 - ev / at_risk if at_risk else 1.0
        surv.append(s)
    np.testing.assert_allclose(res.first_reject["survival"].to_numpy(), surv)
    assert len(events) > 0 and res.first_reject["events"].sum() == len(events)
    c, pos = np.concatenate(c_all), np.concatenate(pos_all)
    for row in res.slack.iter_rows(named=True):
        sel = pos // 50 == row["bin"]
        assert row["count"] == sel.sum()
        assert row["c_mean"] == pytest.approx(c[sel].astype(np.float64).mean(), rel=1e-6)
        assert row["c_min"] == pytest.approx(c[sel].min())
        assert row["frac_negative"] == pytest.approx((c[sel] < 0).mean())


def test_budget_needs_a_budget_rule(run):
    with pytest.raises(ValueError, match="prefix budget"):
        budget_exhaustion(run, rule="dppo", progress=False)


def test_mismatch_by_position(run, tmp_path):
    out = mismatch_by_position(run, bin_width=100)
    df = pl.read_parquet(sorted((run / "tokens").glob("*/*.parquet")))
    d = np.abs(np.exp(df["logp_old"].to_numpy().astype(np.float64)) - np.exp(df["logp_rollout"].to_numpy().astype(np.float64)))
    bins = df["pos"].to_numpy() // 100
    tv = out.filter(pl.col("metric") == "mismatch_tv")
    for row in tv.iter_rows(named=True):
        assert row["mean"] == pytest.approx(d[bins == row["bin"]].mean(), rel=1e-4)
        assert row["p90"] == pytest.approx(np.quantile(d[bins == row["bin"]], 0.9), rel=1e-4)
    no_old = write_synthetic_run(tmp_path / "noold", n_tokens=500, seqs_per_step=4, max_len=40, with_logp_old=False)
    with pytest.raises(MissingColumnError, match="logp_old"):
        mismatch_by_position(no_old)


def test_every_analysis_accepts_an_empty_run(tmp_path):
    from cppo_diag.analyses.compare import compare_runs
    from cppo_diag.analyses.position import position_stats
    from cppo_diag.analyses.report import write_report
    from cppo_diag.analyses.synthetic import empty_run

    r = empty_run(tmp_path / "empty")
    assert position_stats(r).is_empty()
    bud = budget_exhaustion(r, progress=False)
    assert bud.by_step.is_empty() and bud.first_reject.is_empty() and bud.slack.is_empty()
    sweep = whatif_sweep(r, deltas=(0.1,), delta_bs=(0.02,), w_mins=(0.8,), progress=False)
    assert sweep["n_valid"].to_list() == [0] and sweep["masked_frac"].to_list() == [None]
    assert compare_runs([r], ("cppo",), progress=False).summary["n_valid"].to_list() == [0]
    page = write_report([r], tmp_path / "rep", whatif=False, progress=False).read_text()
    assert "no token rows" in page
