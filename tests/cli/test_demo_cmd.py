"""The demo command's plan and its last lines (issue 24), without training: ``--quick`` keeps the preset's
regime and cuts its length and batch, and the closing sentence explains exact accuracy against the partial-credit reward
from the task's own settings."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from cppo_diag import metric_names as M
from cppo_diag.cli import demo_cmd
from cppo_diag.train import build_config


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


def _cfg(*argv: str):
    args = _args(*argv)
    return build_config(args.preset, overrides=demo_cmd.overrides(args, "cppo", {}, Path("out"), "demo-cppo-x"))


def test_quick_keeps_the_regime_and_cuts_its_length():
    full, quick = _cfg(), _cfg("--quick")
    assert quick.rollout.prompts_per_step == demo_cmd.QUICK_PROMPTS < build_config("long").rollout.prompts_per_step
    assert (quick.steps, quick.task.eval_size, quick.log.eval_every) == (demo_cmd.QUICK_STEPS,
                                                                          demo_cmd.QUICK_EVAL_SIZE, 0)
    assert quick.steps < full.steps and quick.task.eval_size < full.task.eval_size
    # what makes the phenomenon is the preset's own: task, answer length, forks, staleness, bf16 sampling, rule
    for section in ("optim", "rule"):
        assert getattr(quick, section) == getattr(full, section), section
    assert quick.rollout == dataclasses.replace(full.rollout, prompts_per_step=demo_cmd.QUICK_PROMPTS)
    assert (quick.task.kind, quick.task.forks, quick.task.detour_credit) == (full.task.kind, full.task.forks,
                                                                             full.task.detour_credit)
    assert quick.log.out_dir == "out" and quick.log.name == "demo-cppo-x"
    assert _cfg("--quick", "--steps", "3").steps == 3  # --steps wins


def test_why_apart_follows_the_task():
    long = _cfg().task
    assert long.kind == "chain" and long.forks > 0
    text = demo_cmd.why_apart(long)
    if long.detour_credit == 0:
        assert "earns no partial credit" in text
    long.detour_credit = 0.5
    assert "earns only 0.5 of a digit's partial credit" in demo_cmd.why_apart(long)
    long.detour_credit = 1.0  # full credit: detours no longer split the two numbers
    assert "detour" not in demo_cmd.why_apart(long)
    fib = _cfg("--preset", "demo").task
    assert "detour" not in demo_cmd.why_apart(fib) and "partial-credit reward" in demo_cmd.why_apart(fib)
    fib.reward = "exact"
    assert "exact answers only" in demo_cmd.why_apart(fib)


def test_summary_line_names_both_numbers():
    line = demo_cmd.summary_line("cppo", {M.SUMMARY_GREEDY_ACC_BEFORE: 0.484, M.SUMMARY_GREEDY_ACC_AFTER: 0.523,
                                          M.SUMMARY_GREEDY_REWARD_BEFORE: 0.806, M.SUMMARY_GREEDY_REWARD_AFTER: 0.724})
    assert line == ("cppo: on held-out problems, greedy exact accuracy 0.484 -> 0.523, partial-credit reward "
                    "0.806 -> 0.724")
    assert "nan -> nan" in demo_cmd.summary_line("cppo", {})


def test_quick_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        _args("--help")
    assert "--quick" in capsys.readouterr().out


def test_compare_trains_the_no_trust_region_control_right_after_cppo():
    assert [r for _, r, _ in demo_cmd.plan(_args())] == ["cppo"]
    rules = [r for _, r, _ in demo_cmd.plan(_args("--compare"))]
    assert rules[:2] == ["cppo", "pg_is"] and set(rules[2:]) == {"grpo_clip", "dppo"}
    labels = [lab for lab, _, _ in demo_cmd.plan(_args("--compare"))]
    assert len(set(labels)) == len(labels)  # one run directory each
