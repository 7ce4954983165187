"""Argument helpers shared by the analyses CLI commands (``cppo-diag report|recompute|stats``)."""

from __future__ import annotations

import argparse
import json


def parse_value(text: str):
    """'0.15' -> 0.15, '3' -> 3, 'true' -> True, 'none' -> None, '[1,2]' -> [1, 2], else the string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def parse_params(items) -> dict:
    """['delta=0.2', 'delta_b_mode=fixed'] -> {'delta': 0.2, 'delta_b_mode': 'fixed'}."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"--param: expected NAME=VALUE, found {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(v)
    return out


def parse_step_range(text: str | None):
    """'10:50' -> (10, 50) inclusive; '10:' -> (10, None); ':50' -> (None, 50); '7' -> (7, 7)."""
    if text is None:
        return None
    if ":" not in text:
        try:
            s = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--steps: expected LO:HI, LO:, :HI or STEP, found {text!r}") from None
        return (s, s)
    lo, hi = text.split(":", 1)
    try:
        return (int(lo) if lo.strip() else None, int(hi) if hi.strip() else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps: expected integers in LO:HI, found {text!r}") from None


def add_steps_argument(parser) -> None:
    parser.add_argument("--steps", type=parse_step_range, default=None, metavar="LO:HI",
                        help="inclusive step range, e.g. 10:50, 10: or :50 (default: all steps)")
