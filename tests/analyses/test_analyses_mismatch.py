"""The mismatch metric family (analyses/mismatch.py ``mismatch_metrics``) against a plain numpy loop."""

import math

import numpy as np
import polars as pl
import pytest
import torch

from cppo_diag.analyses.mismatch import IS_HIGH, IS_LOW, is_gt_name, is_lt_name, mismatch_metrics
from cppo_diag.analyses.tokens import MissingColumnError
from cppo_diag.masks import compute_mask


def _frame(seed=0, n_steps=3, seqs=5, updates=2, with_old=True, with_keep=True):
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(n_steps):
        for u in range(updates):
            for s in range(seqs):
                T = int(rng.integers(3, 40))
                lq = np.log(rng.uniform(0.02, 1.0, T))
                # update 0: pi = mu up to float noise; later updates drift, with heavy tails
                scale = 1e-6 if u == 0 else 0.4
                lp = np.minimum(lq + rng.standard_t(3, T) * scale, 0.0)
                lo = np.minimum(lq + rng.normal(0, 0.01, T), 0.0)
                adv = float(rng.choice([-1.0, 0.0, 0.5, 1.0]))
                keep = rng.random(T) > 0.2
                for t in range(T):
                    rows.append((step, u, s, t, lp[t], lq[t], lo[t], adv, bool(keep[t])))
    df = pl.DataFrame(rows, schema={"step": pl.Int64, "update": pl.Int32, "seq_id": pl.Int64, "pos": pl.Int32,
                                    "logp": pl.Float32, "logp_rollout": pl.Float32, "logp_old": pl.Float32,
                                    "advantage": pl.Float32, "keep_applied": pl.Boolean}, orient="row")
    if not with_old:
        df = df.drop("logp_old")
    if not with_keep:
        df = df.drop("keep_applied")
    return df


def _direction32(part, x_col):
    """sign of A (rho - 1) as the rules evaluate it: float32 columns, rho = exp(clamp(log x - log mu, -20, 20))."""
    def t(c):
        return torch.from_numpy(part[c].to_numpy().astype(np.float32))

    rho = torch.exp(torch.clamp(t(x_col) - t("logp_rollout"), -20.0, 20.0))
    return torch.sign(t("advantage") * (rho - 1.0)).numpy()


def _np_token(lr, adv, masked, direction):
    rho = np.exp(lr)
    out = {
        "n_tokens": lr.size, "kl_k1": np.mean(-lr), "kl_k2": np.mean(lr ** 2 / 2), "kl_k3": np.mean(rho - 1 - lr),
        "chi2_token": np.mean(rho ** 2) - 1, "ess_token": rho.sum() ** 2 / (lr.size * np.sum(rho ** 2)),
        "toward_mu_frac": np.mean(direction < 0), "away_frac": np.mean(direction > 0),
    }
    for x in IS_HIGH:
        out[is_gt_name(x)] = np.mean(rho > x)
    for x in IS_LOW:
        out[is_lt_name(x)] = np.mean(rho < x)
    if masked is not None:
        out["masked_frac"] = masked.mean()
        out["masked_frac_pos_adv"] = masked[adv > 0].mean() if (adv > 0).any() else None
        out["masked_frac_neg_adv"] = masked[adv < 0].mean() if (adv < 0).any() else None
    return out


def _np_seq(df, lr):
    keys = list(zip(df["step"], df["update"], df["seq_id"]))
    groups = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    L = np.array([lr[idx].sum() for idx in groups.values()])
    d = np.array([np.mean(-lr[idx]) for idx in groups.values()])
    w = np.exp(np.clip(L, -20, 20))
    return {"n_seqs": len(groups), "chi2_seq": np.mean(np.exp(2 * np.clip(L, -20, 20))) - 1,
            "ess_seq": w.sum() ** 2 / (len(w) * np.sum(w ** 2)), "log_ppl_diff": d.mean()}


def _check(row, want):
    for k, v in want.items():
        got = row[k]
        if v is None:
            assert got is None, k
        else:
            assert got == pytest.approx(float(v), rel=1e-9, abs=1e-12), k


def _subset(df, updates):
    if updates == "first":
        return df.filter(pl.col("update") == 0)
    if updates == "after_first":
        return df.filter(pl.col("update") > 0)
    return df


@pytest.mark.parametrize("updates", ["all", "first", "after_first"])
@pytest.mark.parametrize("pair", ["pi", "old"])
def test_by_step_matches_numpy(updates, pair):
    df = _frame()
    out = mismatch_metrics(df, by="step", updates=updates, pair=pair)
    sub = _subset(df, updates)
    assert out["step"].to_list() == sorted(set(sub["step"].to_list()))
    for step in out["step"].to_list():
        part = sub.filter(pl.col("step") == step)
        x = part["logp" if pair == "pi" else "logp_old"].to_numpy().astype(np.float64)
        lr = np.clip(x - part["logp_rollout"].to_numpy().astype(np.float64), -20, 20)
        adv = part["advantage"].to_numpy().astype(np.float64)
        masked = ~part["keep_applied"].to_numpy()
        row = out.filter(pl.col("step") == step).to_dicts()[0]
        _check(row, _np_token(lr, adv, masked, _direction32(part, "logp" if pair == "pi" else "logp_old")))
        _check(row, _np_seq(part, lr))


@pytest.mark.parametrize("bin_width", [1, 8])
def test_by_position_matches_numpy(bin_width):
    df = _frame(seed=3)
    out = mismatch_metrics(df, by="position", bin_width=bin_width, updates="after_first")
    sub = _subset(df, "after_first")
    bins = sub["pos"].to_numpy() // bin_width
    assert out["bin"].to_list() == sorted(set(bins.tolist()))
    assert "chi2_seq" not in out.columns  # sequence-level metrics have no position
    for b in out["bin"].to_list():
        part = sub.filter((pl.col("pos") // bin_width) == b)
        lr = np.clip(part["logp"].to_numpy().astype(np.float64) - part["logp_rollout"].to_numpy().astype(np.float64),
                     -20, 20)
        row = out.filter(pl.col("bin") == b).to_dicts()[0]
        assert row["bin_start"] == b * bin_width and row["bin_end"] == (b + 1) * bin_width
        _check(row, _np_token(lr, part["advantage"].to_numpy().astype(np.float64), ~part["keep_applied"].to_numpy(),
                              _direction32(part, "logp")))


def test_first_update_is_near_zero_and_after_first_is_not():
    df = _frame(seed=5)
    first = mismatch_metrics(df, updates="first")
    after = mismatch_metrics(df, updates="after_first")
    assert first["kl_k3"].max() < 1e-9 and first["ess_token"].min() == pytest.approx(1.0)
    assert after["kl_k3"].min() > 1e-3 and after["ess_token"].max() < 1.0


def test_clamp_and_extreme_ratios():
    """log-ratios beyond +-20 are clamped as SPEC says (rho = exp(clamp(.)))."""
    df = pl.DataFrame({"step": [0, 0], "seq_id": [0, 0], "pos": [0, 1], "logp": [-0.1, -30.0],
                       "logp_rollout": [-30.0, -0.1], "advantage": [1.0, -1.0]},
                      schema_overrides={"pos": pl.Int32, "logp": pl.Float32, "logp_rollout": pl.Float32,
                                        "advantage": pl.Float32})
    row = mismatch_metrics(df).to_dicts()[0]
    lr = np.array([20.0, -20.0])
    assert row["kl_k1"] == pytest.approx(0.0)
    assert row["chi2_token"] == pytest.approx(np.mean(np.exp(2 * lr)) - 1)
    assert row["chi2_seq"] == pytest.approx(0.0)  # the sequence's log-ratios cancel: L = 0
    assert row["masked_frac"] is None  # keep_applied not logged
    assert row["toward_mu_frac"] == pytest.approx(0.0) and row["away_frac"] == pytest.approx(1.0)
    assert math.isfinite(row["ess_token"])


def test_away_frac_is_the_rules_away_test_at_tiny_log_ratios():
    """A log-ratio of one float32 ulp makes rho round to exactly 1: the rules call such a token neither away
    nor toward mu, and so does the metric family (a float64 A * log-ratio test called it away / toward)."""
    lq = np.array([-0.01, -0.01, -0.5, -0.5], dtype=np.float32)  # one ulp of 0.01 is ~1e-9
    lp = np.array([np.nextafter(lq[0], np.float32(0)), np.nextafter(lq[1], np.float32(-1)), -0.3, -0.7],
                  dtype=np.float32)
    adv = np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32)
    df = pl.DataFrame({"step": [0] * 4, "seq_id": [0] * 4, "pos": [0, 1, 2, 3], "logp": lp, "logp_rollout": lq,
                       "advantage": adv}, schema_overrides={"pos": pl.Int32})
    row = mismatch_metrics(df).to_dicts()[0]
    res = compute_mask("dppo", logp=torch.from_numpy(lp)[None], logp_rollout=torch.from_numpy(lq)[None],
                       advantages=torch.from_numpy(adv)[None], return_internals=True)
    away = res.internals["away"][0].tolist()
    assert away == [False, False, True, False]
    assert np.all(lp.astype(np.float64) != lq.astype(np.float64))  # a float64 test sees a direction everywhere
    assert row["away_frac"] == pytest.approx(0.25) and row["toward_mu_frac"] == pytest.approx(0.25)


def test_errors_name_the_field():
    df = _frame(with_old=False)
    with pytest.raises(MissingColumnError, match="logp_old"):
        mismatch_metrics(df, pair="old")
    with pytest.raises(ValueError, match="updates"):
        mismatch_metrics(df, updates="second")
    with pytest.raises(ValueError, match="pair"):
        mismatch_metrics(df, pair="ref")
    with pytest.raises(ValueError, match="by"):
        mismatch_metrics(df, by="bin")
    with pytest.raises(MissingColumnError, match="logp_rollout"):
        mismatch_metrics(df.drop("logp_rollout"))


def test_run_directory_source(tmp_path):
    from cppo_diag.analyses.synthetic import write_synthetic_run

    run = write_synthetic_run(tmp_path / "r", n_tokens=3000, seqs_per_step=8, max_len=64, updates=2,
                              with_keep_applied="dppo")
    out = mismatch_metrics(run, updates="after_first")
    assert out.height > 0 and out["n_tokens"].min() > 0
    assert out["masked_frac"].is_not_null().all()
