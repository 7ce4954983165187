"""Argument helpers shared by the analyses CLI commands (``cppo-diag report|recompute|stats``)."""

from __future__ import annotations

import argparse

from cppo_diag.masks.params import parse_param_items, parse_param_value as parse_value  # noqa: F401


def parse_params(items) -> dict:
    """['delta=0.2', 'delta_b_mode=fixed'] -> {'delta': 0.2, 'delta_b_mode': 'fixed'} (the rule library's parser:
    ``cppo_diag.masks.params``; none/null -> None, true/false -> bool, numbers -> int/float)."""
    return parse_param_items(items, "--param")


def check_rule_params(rule: str, params: dict, flag: str = "--param") -> None:
    """Refuse a parameter ``rule`` does not take (``compute_mask`` ignores those, so a typo would pass in
    silence): ValueError naming the parameter and the rule's parameters. Unknown rules raise as get_rule does."""
    from cppo_diag.masks.registry import get_rule

    takes = get_rule(rule).params
    unknown = sorted(k for k in params if k not in takes)
    if unknown:
        raise ValueError(f"{flag} {', '.join(unknown)}: rule {rule!r} takes no such parameter; its parameters are "
                         f"{', '.join(sorted(takes))}")


def check_out_file(path: str | None, flag: str = "--out") -> None:
    """``path`` must name a file that can be written: not a directory, inside an existing directory."""
    import os

    if path is None:
        return
    if os.path.isdir(path):
        raise ValueError(f"{flag}: expected a file path, found the directory {path!r}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{flag}: the directory {parent!r} of {path!r} does not exist")


def check_out_dir(path: str | None, flag: str = "--out") -> None:
    """``path`` must be a directory or a path a directory can be created at (not an existing file)."""
    import os

    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag}: expected a directory, found the file {path!r}")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{flag}: cannot create {path!r}: {probe!r} is a file")


def _number(text: str, kind=float):
    import math

    try:
        v = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"found {text!r}") from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, found {text!r}")
    return v


def positive_int():
    """argparse ``type=``: an integer >= 1 (argparse names the option in the error)."""
    def conv(text: str) -> int:
        v = _number(text, int)
        if v < 1:
            raise argparse.ArgumentTypeError(f"expected an integer >= 1, found {text!r}")
        return v
    return conv


def float_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False):
    """argparse ``type=``: a finite float in [lo, hi] (``lo_open``/``hi_open``: that end excluded)."""
    def conv(text: str) -> float:
        v = _number(text, float)
        if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            raise argparse.ArgumentTypeError(
                f"expected a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, "
                f"found {text!r}")
        return v
    return conv


def check_ray_address(address: str | None) -> None:
    """``--ray-address``: 'auto', 'local', HOST:PORT or ray://HOST:PORT (checked before Ray tries to connect)."""
    import re

    if address is None or address in ("auto", "local"):
        return
    m = re.fullmatch(r"(?:ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", address)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise ValueError(f"--ray-address: expected auto, local, HOST:PORT or ray://HOST:PORT, found {address!r}")


def parse_step_range(text: str | None):
    """'10:50' -> (10, 50) inclusive; '10:' -> (10, None); ':50' -> (None, 50); '7' -> (7, 7)."""
    if text is None:
        return None
    if ":" not in text:
        try:
            s = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--steps: expected LO:HI, LO:, :HI or STEP, found {text!r}") from None
        if s < 0:
            raise argparse.ArgumentTypeError(f"--steps: expected a step >= 0, found {text!r}")
        return (s, s)
    lo, hi = text.split(":", 1)
    try:
        out = (int(lo) if lo.strip() else None, int(hi) if hi.strip() else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps: expected integers in LO:HI, found {text!r}") from None
    if any(v is not None and v < 0 for v in out):
        raise argparse.ArgumentTypeError(f"--steps: expected steps >= 0, found {text!r}")
    if out[0] is not None and out[1] is not None and out[0] > out[1]:
        raise argparse.ArgumentTypeError(f"--steps: expected LO <= HI, found {text!r} (an empty range)")
    return out


def add_steps_argument(parser) -> None:
    parser.add_argument("--steps", type=parse_step_range, default=None, metavar="LO:HI",
                        help="inclusive step range, e.g. 10:50, 10: or :50 (default: all steps)")
