"""Attribution (issue 20): behaviour log-probs recorded by the bundled trainer, the exact engine + lag + update
split, the lag-aware update filter, and the position-or-uncertainty decomposition."""

from __future__ import annotations

import io
import warnings

import numpy as np
import polars as pl
import pytest
import torch

from cppo_diag import open_run
from cppo_diag.analyses.attribution import (AttributionInputError, attribution_by, attribution_summary,
                                            attribution_terms, position_strata)
from cppo_diag.analyses.updates import default_updates, filter_updates, select_updates
from cppo_diag.cli.main import main as cli_main
from cppo_diag.train import build_config, train
from cppo_diag.train.rollout import RolloutBatch
from cppo_diag.train.tasks import warmstart_key
from cppo_diag.train.tasks.chain import ChainTask, fork_positions
from cppo_diag.train.trainer import pack_queue, unpack_queue


def _run(tmp_path_factory, staleness: int, precision: str):
    root = tmp_path_factory.mktemp(f"attr-s{staleness}-{precision}")
    cfg = build_config("tiny", overrides={"steps": 4, "threads": 1,
                                          "rollout": {"staleness": staleness, "precision": precision},
                                          "log": {"out_dir": str(root), "name": "r", "behavior_logp": True}})
    train(cfg)
    return open_run(root / "r")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {(s, p): _run(tmp_path_factory, s, p) for s, p in ((2, "bf16"), (0, "fp32"), (0, "bf16"), (2, "fp32"))}


def _terms(run) -> dict[str, np.ndarray]:
    t = run.tokens().collect()
    lp, mu, old, beh = (t[c].cast(pl.Float64).to_numpy() for c in ("logp", "logp_rollout", "logp_old", "logp_behavior"))
    return {"engine": beh - mu, "lag": old - beh, "update": lp - old, "lag_steps": t["lag"].to_numpy()}


def test_stale_bf16_run_has_all_three_terms(runs):
    t = _terms(runs[(2, "bf16")])
    for name in ("engine", "lag", "update"):
        assert np.abs(t[name]).mean() > 1e-4, name
    assert t["lag_steps"].max() >= 4  # 2 iterations x 2 updates behind, plus the update index


def test_on_policy_fp32_run_has_no_engine_and_no_lag(runs):
    t = _terms(runs[(0, "fp32")])
    assert np.abs(t["engine"]).mean() <= 1e-4
    assert np.all(t["lag"] == 0.0)  # same weights, same numerics: logp_old is logp_behavior
    assert set(np.unique(t["lag_steps"])) == {0, 1}  # two updates per batch, on-policy


def test_on_policy_bf16_run_has_engine_and_no_lag(runs):
    t = _terms(runs[(0, "bf16")])
    assert np.all(t["lag"] == 0.0)
    assert np.abs(t["engine"]).mean() > 1e-4


def test_stale_fp32_run_has_lag_and_no_engine(runs):
    t = _terms(runs[(2, "fp32")])
    assert np.abs(t["engine"]).mean() <= 1e-4
    assert np.abs(t["lag"]).mean() > 1e-3


def test_stats_family_attribution_equals_numpy(runs, capsys):
    run = runs[(2, "bf16")]
    assert cli_main(["stats", str(run.path), "--family", "attribution", "--by", "step", "--format", "csv"]) == 0
    got = pl.read_csv(io.StringIO(capsys.readouterr().out))
    t = run.tokens().collect()
    lp, mu, old, beh = (t[c].cast(pl.Float64).to_numpy() for c in ("logp", "logp_rollout", "logp_old", "logp_behavior"))
    steps = t["step"].to_numpy()
    for row in got.iter_rows(named=True):
        m = steps == row["step"]
        total, parts = lp[m] - mu[m], {"engine": beh[m] - mu[m], "lag": old[m] - beh[m], "update": lp[m] - old[m]}
        assert row["tokens"] == m.sum()
        assert row["total_abs"] == pytest.approx(np.abs(total).mean(), rel=1e-9, abs=1e-12)
        for name, v in parts.items():
            assert row[f"{name}_mean"] == pytest.approx(v.mean(), rel=1e-9, abs=1e-12)
            assert row[f"{name}_abs"] == pytest.approx(np.abs(v).mean(), rel=1e-9, abs=1e-12)
            want = (v * np.sign(total)).mean() / np.abs(total).mean()
            assert row[f"{name}_share"] == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert sum(row[f"{n}_share"] for n in parts) == pytest.approx(1.0)


def test_attribution_by_lag_and_position(runs):
    run = runs[(2, "fp32")]
    by_lag = attribution_by(run, by="lag")
    zero = by_lag.filter(pl.col("lag") == 0)
    assert zero["lag_abs"][0] == 0.0 and zero["update_abs"][0] == pytest.approx(0.0, abs=1e-6)
    moved = by_lag.filter(pl.col("lag") > 0)  # lag steps count updates too: the lag *term* is sampling vs pi_old
    assert (moved["lag_abs"] + moved["update_abs"]).min() > 0
    assert moved["lag_abs"].max() > 0
    by_pos = attribution_by(run, by="position", bin_width=8)
    assert by_pos["tokens"].sum() == run.tokens().select(pl.len()).collect().item()
    assert list(by_pos["pos_bin"]) == sorted(by_pos["pos_bin"])


def test_missing_columns_give_named_combined_terms(runs, tmp_path):
    t = runs[(2, "bf16")].tokens().collect()
    assert attribution_terms(t.drop("logp_behavior")) == ["engine+lag", "update"]
    assert attribution_terms(t.drop("logp_old")) == ["engine", "lag+update"]
    assert attribution_terms(t.drop("logp_old", "logp_behavior")) == ["engine+lag+update"]
    s = attribution_summary(t.drop("logp_behavior"))
    assert s["engine+lag_share"] + s["update_share"] == pytest.approx(1.0)
    mixed = t.with_columns(pl.when(pl.col("step") == 3).then(None).otherwise(pl.col("logp_behavior")).alias("logp_behavior"))
    with pytest.raises(AttributionInputError, match="logp_behavior.*steps 3..3"):
        attribution_by(mixed)
    assert attribution_by(mixed, step_range=(0, 2))["step"].to_list() == [0, 1, 2]  # the steps that have it
    with pytest.raises(ValueError, match="by: expected"):
        attribution_by(t, by="sequence")


def test_non_finite_and_impossible_values_are_excluded_with_a_count(runs):
    t = runs[(2, "bf16")].tokens().collect()
    n = t.height
    bad = t.with_columns(pl.when(pl.int_range(pl.len()) < 3).then(float("inf")).otherwise(pl.col("logp_behavior"))
                         .alias("logp_behavior"),
                         pl.when(pl.int_range(pl.len()) == 5).then(0.5).otherwise(pl.col("logp")).alias("logp"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = attribution_summary(bad)
    assert s["tokens"] == n - 4 and np.isfinite(s["total_abs"])
    assert any("4 token(s)" in str(w.message) for w in caught)


def test_default_updates_follow_the_recorded_lag(runs):
    stale, onpol = runs[(2, "bf16")], runs[(0, "fp32")]
    assert default_updates(stale) == "lagged" and default_updates(onpol) == "lagged"
    lf = onpol.tokens()
    # on-policy: lag > 0 is exactly "after the first update"
    a = filter_updates(lf, "lagged").select(pl.len()).collect().item()
    b = filter_updates(lf, "after_first").select(pl.len()).collect().item()
    assert a == b > 0
    # stale: update 0 has lag too (all but the very first batch's first update)
    lagged = filter_updates(stale.tokens(), "lagged").collect()
    assert (lagged["update"] == 0).any()
    assert default_updates(stale.tokens().collect().drop("lag")) == "after_first"
    with pytest.raises(ValueError, match="'lag'"):
        filter_updates(stale.tokens().collect().drop("lag").lazy(), "lagged")
    kept = {(b.step, b.update) for b in select_updates(stale, "lagged").batches}
    assert (0, 0) not in kept and (1, 0) in kept


def test_queue_roundtrip_keeps_behavior_logprobs_and_clock():
    b = RolloutBatch(prompt_ids=[[1, 2], [3]], response_ids=torch.tensor([[4, 5], [6, 0]]),
                     response_mask=torch.tensor([[True, True], [True, False]]),
                     logp_rollout=torch.tensor([[-0.1, -0.2], [-0.3, 0.0]]),
                     logp_behavior=torch.tensor([[-0.11, -0.19], [-0.31, 0.0]]), opt_step=7)
    back = unpack_queue(pack_queue({5: (b, 3)}))[5]
    assert back[1] == 3 and back[0].opt_step == 7
    assert torch.equal(back[0].logp_behavior, b.logp_behavior)


def test_recorder_refuses_a_negative_lag_and_keeps_a_good_one(tmp_path):
    from cppo_diag import RunRecorder

    lp = -np.full((2, 3), 0.1, np.float32)
    with RunRecorder(tmp_path, name="r", on_error="raise") as rec:
        with pytest.raises(ValueError, match="lag"):
            rec.log_tokens(step=0, logp=lp, logp_rollout=lp, advantages=np.ones(2, np.float32), lag=np.array([-1, 0]))
        rec.log_tokens(step=1, logp=lp, logp_rollout=lp, advantages=np.ones(2, np.float32), lag=np.array([3, 0]),
                       fork=np.zeros((2, 3), bool), logp_behavior=lp)
    t = open_run(tmp_path / "r").tokens().collect()
    assert t["lag"].to_list() == [3, 3, 3, 0, 0, 0] and t["lag"].dtype == pl.Int32


# -- position or uncertainty -------------------------------------------------------------------------------
def _synthetic(within: bool, n_seq: int = 400, T: int = 90, seed: int = 0) -> pl.DataFrame:
    """Tokens whose |pi - mu| depends on the stratum only (within=False: uncertain tokens grow denser along
    the answer) or on position only within each stratum (within=True: a constant stratum mix)."""
    rng = np.random.default_rng(seed)
    pos = np.tile(np.arange(T), n_seq)
    seq = np.repeat(np.arange(n_seq), T)
    frac = pos / T
    p_fork = np.full(pos.shape, 0.25) if within else 0.05 + 0.5 * frac
    fork = rng.random(pos.shape) < p_fork
    mu = np.where(fork, 0.5, 0.99)
    d = np.where(fork, 0.10, 0.005) * ((1 + 2 * frac) if within else 1.0)
    pi = mu - d
    return pl.DataFrame({"step": np.zeros_like(pos), "seq_id": seq, "pos": pos.astype(np.int32),
                         "logp": np.log(pi).astype(np.float32), "logp_rollout": np.log(mu).astype(np.float32),
                         "advantage": np.ones(pos.shape, np.float32), "fork": fork})


@pytest.mark.parametrize("strata", ["fork", "mu"])
def test_composition_explains_a_rise_made_of_denser_uncertain_tokens(strata):
    _, s = position_strata(_synthetic(within=False), strata=strata, bin_width=30)
    assert s["rise"] > 0.02
    assert s["composition_share"] == pytest.approx(1.0, abs=0.05)
    assert abs(s["rise_within"]) < 0.05 * s["rise"]


@pytest.mark.parametrize("strata", ["fork", "mu"])
def test_within_stratum_growth_is_not_composition(strata):
    curves, s = position_strata(_synthetic(within=True), strata=strata, bin_width=30)
    assert s["rise"] > 0.02
    assert s["composition_share"] == pytest.approx(0.0, abs=0.1)
    assert set(curves["stratum"]) >= {"all", "reweighted"}


def test_strata_need_their_column():
    df = _synthetic(within=True).drop("fork")
    with pytest.raises(KeyError, match="fork"):
        position_strata(df, strata="fork")
    with pytest.raises(ValueError, match="strata: expected"):
        position_strata(df, strata="length")


# -- the chain task's fork profiles and oracle ---------------------------------------------------------------
def test_fork_profiles_place_the_same_count_differently():
    rising, uniform = fork_positions(160, 0.5, "rising"), fork_positions(160, 0.5, "uniform")
    assert len(rising) == len(uniform) == 40
    thirds = lambda f: [sum(a <= x < b for x in f) for a, b in ((0, 53), (53, 107), (107, 160))]  # noqa: E731
    assert thirds(rising)[2] > 4 * thirds(rising)[0]
    assert max(thirds(uniform)) - min(thirds(uniform)) <= 1
    with pytest.raises(ValueError, match="fork_profile"):
        fork_positions(160, 0.5, "falling")


def test_fork_oracle_and_valid_share():
    task = ChainTask(min_len=32, max_len=32, forks=0.5, fork_profile="uniform", eval_size=4)
    p = task.eval_set()[0]
    flags = task.fork_flags(p, 33)
    assert flags.shape == (33,) and flags.sum() == len(fork_positions(32, 0.5, "uniform")) and not flags[32]
    assert task.valid_share(p, p.answer) == 1.0
    assert task.valid_share(p, p.answer[:16]) == pytest.approx(0.5)
    assert ChainTask(min_len=32, max_len=32, eval_size=4).fork_flags(p, 33) is None


def test_warmstart_key_per_profile():
    cfg = build_config("long").task
    assert warmstart_key(cfg) == "chain_forks"
    cfg.fork_profile = "uniform"
    assert warmstart_key(cfg) == "chain_forks_uniform"


# -- the app's Attribution page ------------------------------------------------------------------------------
def test_attribution_page_draws_terms_and_strata(runs, monkeypatch):
    import json

    pytest.importorskip("streamlit")
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    run = runs[(2, "bf16")]
    monkeypatch.setenv("CPPO_DIAG_ROOTS", str(Path(run.path).parent))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py"), default_timeout=120)
    at.run()
    at.switch_page("views/attribution.py").run()
    assert not at.exception, [e.message for e in at.exception]
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert len(specs) == 2
    assert {t["name"] for t in specs[0]["data"]} >= {"engine", "lag", "update"}
    assert any("re-weighted" in t["name"] for t in specs[1]["data"])
    at.radio(key="attr_by").set_value("lag").run()
    assert not at.exception
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert "lag" in spec["layout"]["xaxis"]["title"]["text"]
