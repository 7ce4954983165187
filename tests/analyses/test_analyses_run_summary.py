"""cppo_diag.analyses.run_summary (the per-run facts the app's Runs, Compare and Budget pages show) on the sample logs,
against the computations the app made inline before they moved here."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from cppo_diag.analyses import run_summary as rs
from cppo_diag import open_run

SAMPLES = Path(__file__).resolve().parents[2] / "sample_logs"


@pytest.fixture(scope="module")
def cppo_run():
    return open_run(SAMPLES / "cppo-long")


@pytest.fixture(scope="module")
def grpo_run():
    return open_run(SAMPLES / "grpo-long")


def test_run_summary_is_the_runs_table_row(cppo_run):
    row = rs.run_summary(cppo_run)
    meta = cppo_run.meta
    steps = cppo_run.steps()
    assert row["name"] == str(meta.get("name") or cppo_run.name)
    assert row["rule"] == "cppo" and row["trainer"] == meta.get("trainer")
    assert row["rule_params"] == ", ".join(f"{k}={v}" for k, v in sorted(meta["rule_params"].items()))
    cfg = cppo_run.meta["config"]
    every = cfg["log"]["every_n_steps"]
    assert row["steps"] == len(cppo_run.completed_steps()) == len(range(0, cfg["steps"], every))
    assert row["tokens"] == cppo_run.tokens().collect().height
    last = steps["reward/mean"].drop_nulls().drop_nans()[-1]
    assert row["last_reward"] == pytest.approx(float(last))
    assert row["status"] == str(meta.get("status") or "finished")


def test_last_reward_takes_the_first_logged_key_and_skips_nan():
    steps = pl.DataFrame({"step": [0, 1, 2], "reward": [0.1, 0.5, float("nan")], "rewards/mean": [9.0, 9.0, 9.0]})
    assert rs.last_reward(steps) == 0.5
    assert rs.last_reward(pl.DataFrame({"step": [0]})) is None
    assert rs.format_params(None) == "" and rs.format_params({"b": 1, "a": 0.2}) == "a=0.2, b=1"


def test_tokens_per_step_and_the_recent_window(cppo_run):
    counts = rs.tokens_per_step(cppo_run)
    expected = cppo_run.tokens().group_by("step").len().collect()
    assert counts == dict(zip(expected["step"].to_list(), expected["len"].to_list()))
    assert rs.token_steps(cppo_run) == sorted(counts)
    assert rs.max_position(cppo_run) == cppo_run.tokens().select(pl.col("pos").max()).collect().item()
    steps = sorted(counts)
    # the latest steps that fit the budget, at least one even when a single step exceeds it
    assert rs.recent_window(counts, 1) == (steps[-1], steps[-1])
    two = counts[steps[-1]] + counts[steps[-2]]
    assert rs.recent_window(counts, two) == (steps[-2], steps[-1])
    assert rs.recent_window(counts, two - 1) == (steps[-1], steps[-1])
    assert rs.recent_window(counts, sum(counts.values())) == (steps[0], steps[-1])
    assert rs.recent_window({}, 10) is None
    assert rs.tokens_in_range(counts, (steps[-2], steps[-1])) == two
    assert rs.tokens_in_range(counts, None) == sum(counts.values())


def test_reward_curves_keep_the_reward_and_accuracy_scalars(cppo_run):
    steps = cppo_run.steps()
    curves = rs.reward_curves(steps)
    expected = [c for c in steps.columns if c == "step" or c.startswith(("reward", "accuracy", "acc", "eval/"))
                or c == "correct/mean"]
    assert curves.columns == expected and {"reward/mean", "acc/mean", "eval/greedy_acc"} <= set(curves.columns)
    assert "mask/cppo/budget_share" not in curves.columns
    assert rs.reward_curves(steps.select("step", "mask/cppo/budget_share")) is None
    assert rs.reward_curves(steps.head(0)) is None


def test_logged_budget_by_step_for_cppo_runs_only(cppo_run, grpo_run):
    steps = cppo_run.steps()
    table = rs.logged_budget_by_step(steps, "cppo")
    expected = steps.select("step", delta_b_mean="cppo/delta_b_mean", budget_share="mask/cppo/budget_share").drop_nulls()
    assert table.equals(expected) and table.height > 0
    assert rs.logged_budget_by_step(grpo_run.steps(), "grpo_clip") is None  # no prefix budget
    assert rs.logged_budget_by_step(steps, None) is None
    assert rs.logged_budget_by_step(steps.drop("cppo/delta_b_mean"), "cppo") is None
