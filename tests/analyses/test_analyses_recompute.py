"""Offline recompute: equals direct compute_mask calls, agrees 100% with the applied mask, edge cases."""

import numpy as np
import polars as pl
import pytest
import torch

from cppo_diag.analyses.recomputation import iter_batches, recompute, recompute_many
from cppo_diag.analyses.synthetic import empty_run, write_synthetic_run
from cppo_diag.analyses.tokens import MissingColumnError
from cppo_diag.masks import compute_mask
from cppo_diag.storage import batch_from_frame


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("runs") / "syn", n_tokens=12_000, seqs_per_step=12,
                               max_len=160, updates=2, with_keep_applied="cppo", seed=3)


def _loop_batches(df: pl.DataFrame):
    """Plain-loop reference: one padded batch per (step, update, rank), row = seq_id, column = pos."""
    out = {}
    for (step, update, rank), part in df.group_by(["step", "update", "rank"]):
        B = int(part["seq_id"].max()) + 1
        T = int(part["pos"].max()) + 1
        lp, lr, adv = np.zeros((B, T), np.float32), np.zeros((B, T), np.float32), np.zeros((B, T), np.float32)
        m = np.zeros((B, T), bool)
        for r in part.iter_rows(named=True):
            i, t = r["seq_id"], r["pos"]
            lp[i, t], lr[i, t], adv[i, t], m[i, t] = r["logp"], r["logp_rollout"], r["advantage"], True
        out[(step, update, rank)] = (torch.from_numpy(lp), torch.from_numpy(lr), torch.from_numpy(adv),
                                     torch.from_numpy(m))
    return out


@pytest.mark.parametrize("rule,params", [("cppo", {}), ("dppo", {"delta": 0.05}), ("grpo_clip", {}),
                                         ("cppo_shuffled", {"seed": 7}), ("trm_max", {})])
def test_recompute_equals_direct_compute_mask(run, tmp_path, rule, params):
    side = tmp_path / "side.parquet"
    res = recompute(run, rule, params=params, side_table=side, progress=False)
    got = pl.read_parquet(side)
    df = pl.read_parquet(sorted((run / "tokens").glob("*/*.parquet")))
    assert got.height == df.height == res.overall["n_valid"]
    n_masked = 0
    for (step, update, rank), (lp, lr, adv, m) in _loop_batches(df).items():
        r = compute_mask(rule, logp=lp, logp_rollout=lr, advantages=adv, response_mask=m,
                         seq_ids=torch.arange(lp.shape[0]), step=step, **params)  # row = seq_id
        mine = got.filter((pl.col("step") == step) & (pl.col("update") == update) & (pl.col("rank") == rank))
        keep = r.keep.numpy()[mine["seq_id"].to_numpy(), mine["pos"].to_numpy()]
        reason = r.reason.numpy()[mine["seq_id"].to_numpy(), mine["pos"].to_numpy()]
        np.testing.assert_array_equal(mine["keep"].to_numpy(), keep)
        np.testing.assert_array_equal(mine["reason"].to_numpy(), reason)
        n_masked += int((m & ~r.keep).sum())
    assert res.overall["n_masked"] == n_masked
    assert res.by_step["n_masked"].sum() == n_masked == res.by_position["n_masked"].sum()
    assert res.by_adv_sign["n_masked"].sum() == n_masked


def test_agreement_with_applied_mask_is_total(run):
    res = recompute(run, "cppo", progress=False)
    assert res.agreement["agreement"] == 1.0 and res.agreement["first_mismatch"] is None
    other = recompute(run, "cppo", params={"delta": 0.01}, progress=False)
    assert other.agreement["agreement"] < 1.0 and other.agreement["first_mismatch"] is not None


def test_summaries_consistent(run):
    res = recompute(run, "cppo", bin_width=32, progress=False)
    o = res.overall
    assert o["masked_frac"] == pytest.approx(o["n_masked"] / o["n_valid"])
    assert o["n_token"] + o["n_budget"] + o["n_sequence"] == o["n_masked"]
    assert o["budget_share"] == pytest.approx(o["n_budget"] / o["n_masked"])
    assert res.by_position["bin_start"].to_list() == [32.0 * b for b in res.by_position["bin"].to_list()]
    steps = sorted({int(p.parent.name.split("=")[1]) for p in (run / "tokens").glob("*/*.parquet")})
    assert res.by_step["step"].to_list() == steps
    assert "mask/cppo/frac" in res.metrics_by_step.columns
    sub = recompute(run, "cppo", step_range=(1, 2), progress=False)
    assert sub.by_step["step"].to_list() == [1, 2]


def test_recompute_many_matches_single(run):
    many = recompute_many(run, {"a": ("cppo", {}), "b": ("dppo", {"delta": 0.1})}, progress=False)
    assert many["a"].overall == recompute(run, "cppo", progress=False).overall
    assert many["b"].overall["n_masked"] == recompute(run, "dppo", params={"delta": 0.1}, progress=False).overall["n_masked"]


def test_sparse_seq_ids_give_compact_rows_and_the_same_shuffled_mask():
    """seq_ids that are not 0..B-1 (a minibatch of the step's responses, or sampled-out sequences) become
    compact rows in seq_id order; cppo_shuffled, keyed on (step, seq_id), masks each response as it does in
    the full batch; padding is never valid."""
    rng = np.random.default_rng(0)
    rows = []
    for sid in range(8):
        for t in range(20 + sid):
            rows.append((3, sid, t, float(np.log(rng.uniform(0.05, 1))), float(np.log(rng.uniform(0.05, 1))),
                         1.0 if sid % 2 else -1.0))
    full = pl.DataFrame(rows, schema={"step": pl.Int64, "seq_id": pl.Int64, "pos": pl.Int32, "logp": pl.Float32,
                                      "logp_rollout": pl.Float32, "advantage": pl.Float32}, orient="row")
    df = full.filter(pl.col("seq_id").is_in([1, 4, 5])).sample(fraction=1.0, shuffle=True, seed=1)
    (batch,) = list(iter_batches(df))
    assert batch.seq_ids.tolist() == [1, 4, 5]
    assert batch.response_mask.sum(1).tolist() == [21, 24, 25]
    order_vals = df["logp"].to_numpy()[batch.order]
    np.testing.assert_array_equal(batch.unpad(batch.logp), order_vals)
    key = ["seq_id", "pos"]
    params = {"seed": 2, "delta": 0.05}
    a = pl.DataFrame(recompute_rows(df, params)).sort(key)
    b = pl.DataFrame(recompute_rows(full, params)).sort(key).filter(pl.col("seq_id").is_in([1, 4, 5]))
    assert a["keep"].to_list() == b["keep"].to_list() and (~a["keep"]).sum() > 0


def recompute_rows(df, params):
    (batch,) = list(iter_batches(df))
    from cppo_diag.analyses.recomputation import run_rule

    res = run_rule(batch, "cppo_shuffled", params)
    return {**{k: v for k, v in batch.token_keys().items() if k in ("seq_id", "pos")}, "keep": batch.unpad(res.keep)}


def test_duplicate_token_rejected():
    df = pl.DataFrame({"step": [0, 0], "seq_id": [0, 0], "pos": [0, 0], "logp": [-0.1, -0.1],
                       "logp_rollout": [-0.1, -0.1], "advantage": [1.0, 1.0], "update": [0, 0], "rank": [0, 0]})
    with pytest.raises(ValueError, match=r"seq_id 0, pos 0\) logged twice"):
        batch_from_frame(df)


def test_empty_run(tmp_path):
    r = empty_run(tmp_path / "empty")
    res = recompute(r, "cppo", side_table=tmp_path / "s.parquet", progress=False)
    assert res.overall["n_valid"] == 0 and res.by_step.is_empty() and res.agreement is None
    assert pl.read_parquet(tmp_path / "s.parquet").height == 0


def test_single_step_minimal_columns(tmp_path):
    """A frame with only the required columns (no update/rank/logp_old/keep_applied) recomputes."""
    df = pl.DataFrame({"step": [5] * 4, "seq_id": [0, 0, 1, 1], "pos": [0, 1, 0, 1],
                       "logp": [-0.1, -2.0, -0.5, -0.05], "logp_rollout": [-0.1, -0.3, -0.5, -0.9],
                       "advantage": [1.0, 1.0, -1.0, -1.0]})
    res = recompute(df, "dppo", params={"delta": 0.15}, progress=False)
    assert res.by_step["step"].to_list() == [5] and res.agreement is None
    direct = compute_mask("dppo", logp=torch.tensor([[-0.1, -2.0], [-0.5, -0.05]]),
                          logp_rollout=torch.tensor([[-0.1, -0.3], [-0.5, -0.9]]),
                          advantages=torch.tensor([1.0, -1.0]), delta=0.15)
    assert res.overall["n_masked"] == int((~direct.keep).sum())
    with pytest.raises(MissingColumnError, match="'logp_rollout'"):
        recompute(df.drop("logp_rollout"), "cppo", progress=False)
    with pytest.raises(ValueError, match="logp_old"):
        recompute(df, "cppo", anchor="old", progress=False)
    with pytest.raises(ValueError, match="unknown rule"):
        recompute(df, "no_such_rule", progress=False)


def test_run_recorded_with_runrecorder(tmp_path):
    """A run written through the public RunRecorder (left padding) recomputes to the applied mask."""
    from cppo_diag import RunRecorder

    g = torch.Generator().manual_seed(0)
    B, T = 6, 30
    with RunRecorder(tmp_path, name="rec", rule="cppo", on_error="raise") as rec:
        for step in range(3):
            mask = torch.zeros(B, T, dtype=torch.bool)
            for i in range(B):
                n = int(torch.randint(5, T + 1, (1,), generator=g))
                mask[i, T - n:] = True  # left padding
            lr = torch.log(torch.rand(B, T, generator=g) * 0.9 + 0.1)
            lp = (lr + 0.2 * torch.randn(B, T, generator=g)).clamp(max=0)
            adv = torch.randn(B, generator=g)
            res = compute_mask("cppo", logp=lp, logp_rollout=lr, advantages=adv, response_mask=mask)
            rec.log_tokens(step=step, logp=lp, logp_rollout=lr, advantages=adv, response_mask=mask,
                           keep_applied=res.keep, reason_applied=res.reason)
            rec.end_step(step)
    out = recompute(tmp_path / "rec", "cppo", progress=False)
    assert out.agreement["agreement"] == 1.0 and out.overall["n_masked"] > 0


def test_package_attribute_recompute_stays_the_function():
    """The module is ``recomputation`` and the function ``recompute``: importing every submodule keeps
    ``analyses.recompute`` the function (no module of that name can shadow it)."""
    import importlib

    from cppo_diag import analyses

    importlib.import_module("cppo_diag.analyses.budget")
    importlib.import_module("cppo_diag.analyses.recomputation")
    assert callable(analyses.recompute) and analyses.recompute.__name__ == "recompute"
    from cppo_diag.analyses.recomputation import iter_batches as ib

    assert callable(ib)


def test_relative_position_bins_match_a_plain_loop_and_position_stats(run):
    """relative=True: bin = ceil(n * t / T) - 1 with t = pos + 1, T = the response's max(pos) + 1, as in
    position_stats(relative=True) (same token counts per bin)."""
    from cppo_diag.analyses.position import position_stats

    n_bins = 10
    res = recompute(run, "dppo", params={"delta": 0.05}, relative=True, n_rel_bins=n_bins, progress=False)
    df = pl.read_parquet(sorted((run / "tokens").glob("*/*.parquet")))
    key = ["step", "update", "rank", "seq_id"]
    T = df.group_by(key).agg(T=pl.col("pos").max() + 1)
    counts = np.zeros(n_bins)
    for pos, t_len in df.join(T, on=key).select("pos", "T").iter_rows():
        counts[min(max(int(np.ceil(n_bins * (pos + 1) / t_len)), 1), n_bins) - 1] += 1
    bp = res.by_position.sort("bin")
    np.testing.assert_array_equal(bp["n_valid"].to_numpy(), counts)
    assert bp["bin_start"].to_list() == pytest.approx([i / n_bins for i in range(n_bins)])
    assert res.relative and res.by_position["n_masked"].sum() == res.overall["n_masked"]
    ps = position_stats(run, metrics=("tv",), relative=True, n_rel_bins=n_bins).sort("bin")
    np.testing.assert_array_equal(ps["count"].to_numpy(), counts)


def test_batch_set_gives_the_same_results_as_the_run(run):
    from cppo_diag.analyses.recomputation import BatchSet, load_batches

    steps = sorted(pl.read_parquet(sorted((run / "tokens").glob("*/*.parquet")))["step"].unique().to_list())
    sr = (steps[1], steps[-1])
    bs = load_batches(run, step_range=sr)
    assert isinstance(bs, BatchSet) and bs.n_tokens > 0 and bs.meta.get("rule") == "cppo"
    for params in ({"delta": 0.1}, {"delta": 0.2, "delta_b": 0.05}):
        a = recompute(run, "cppo", params=params, step_range=sr, progress=False)
        b = recompute(bs, "cppo", params=params, step_range=sr, progress=False)
        assert a.overall == b.overall and a.agreement == b.agreement
        assert a.by_position.equals(b.by_position) and a.by_step.equals(b.by_step)
    # A narrower step range on the set yields only its steps.
    c = recompute(bs, "cppo", step_range=(steps[-1], steps[-1]), progress=False)
    assert c.by_step["step"].to_list() == [steps[-1]]


def test_compare_runs_relative_positions(run):
    """compare_runs(relative=True): the recomputed rules' by_position equals recompute(relative=True), and
    the applied mask's row is binned by t / T too (checked against a plain computation)."""
    from cppo_diag.analyses.compare import compare_runs

    n_bins = 8
    cmp = compare_runs([run], ("dppo",), params={"dppo": {"delta": 0.05}}, relative=True, n_rel_bins=n_bins,
                       progress=False)
    rec = recompute(run, "dppo", params={"delta": 0.05}, relative=True, n_rel_bins=n_bins, progress=False)
    mine = cmp.by_position.filter(pl.col("rule") == "dppo").sort("bin")
    np.testing.assert_allclose(mine["masked_frac"].to_numpy(), rec.by_position.sort("bin")["masked_frac"].to_numpy())
    assert float(cmp.by_position["bin_end"].max()) == pytest.approx(1.0)

    df = pl.read_parquet(sorted((run / "tokens").glob("*/*.parquet")))
    key = ["step", "update", "rank", "seq_id"]
    df = df.join(df.group_by(key).agg(T=pl.col("pos").max() + 1), on=key)
    b = np.clip(np.ceil(n_bins * (df["pos"].to_numpy() + 1) / df["T"].to_numpy()), 1, n_bins).astype(int) - 1
    masked = ~df["keep_applied"].to_numpy()
    expect = [masked[b == i].mean() for i in range(n_bins)]
    applied = cmp.by_position.filter(pl.col("rule").str.starts_with("applied:")).sort("bin")
    assert applied["bin"].to_list() == list(range(n_bins))
    np.testing.assert_allclose(applied["masked_frac"].to_numpy(), expect)
    # Absolute bins stay the default.
    assert float(compare_runs([run], ("dppo",), progress=False).by_position["bin_end"].max()) > 1
