"""The one parser of rule parameters given as text (``cppo_diag.masks.params``), and its two callers."""

from __future__ import annotations

import argparse

import pytest

from cppo_diag.masks.params import parse_param_items, parse_param_value


@pytest.mark.parametrize("text, expected", [
    ("none", None), ("None", None), ("NULL", None), (" null ", None),
    ("true", True), ("False", False),
    ("3", 3), ("-1", -1), ("0.15", 0.15), ("1e-3", 1e-3),
    ("[1, 2]", [1, 2]), ('{"a": 1}', {"a": 1}),
    ("fixed", "fixed"), (" sequence ", "sequence"), ("[not json", "[not json"),
])
def test_parse_param_value(text, expected):
    got = parse_param_value(text)
    assert got == expected and type(got) is type(expected)


def test_parse_param_items_names_the_flag():
    assert parse_param_items(["delta=0.2", "delta_b_mode=fixed", "horizon=none"]) == {
        "delta": 0.2, "delta_b_mode": "fixed", "horizon": None}
    assert parse_param_items(None) == {}
    with pytest.raises(ValueError, match=r"--rule\.param: expected NAME=VALUE"):
        parse_param_items(["delta"], "--rule.param")
    with pytest.raises(ValueError, match="with a NAME"):
        parse_param_items(["=1"])


def test_cli_and_config_loader_read_values_alike():
    from cppo_diag.analyses.cli_util import parse_params
    from cppo_diag.train.config import add_config_arguments, overrides_from_args

    items = ["delta=0.2", "horizon=none", "delta_b_mode=fixed", "shuffle=true", "n=3"]
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args([a for kv in items for a in ("--rule.param", kv)])
    assert overrides_from_args(args)["rule"]["params"] == parse_params(items) == {
        "delta": 0.2, "horizon": None, "delta_b_mode": "fixed", "shuffle": True, "n": 3}
