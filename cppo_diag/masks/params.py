"""Rule parameters given as text (``--param delta=0.2``, ``--rule.param delta_b_mode=fixed``): the one parser,
used by the analyses CLI (``analyses.cli_util``: ``report``, ``recompute``) and the trainer's config loader
(``train.config``: ``--rule.param``, which the study runner's command lines also go through). The app takes rule
parameters through typed widgets, so it parses no text.

A value is read the way a user expects from a command line, case-insensitively for the words:

    none, null           -> None          (a parameter left at "no value", e.g. ``horizon=none``)
    true, false          -> True, False
    3, -1                -> int
    0.15, 1e-3, inf      -> float
    [1, 2], {"a": 1}     -> the JSON value
    anything else        -> the string, without surrounding blanks (``fixed``, ``sequence``)
"""

from __future__ import annotations

import json
from typing import Iterable

__all__ = ["parse_param_value", "parse_param_items"]


def parse_param_value(text: str):
    """'0.15' -> 0.15, '3' -> 3, 'true' -> True, 'none' / 'null' -> None, '[1,2]' -> [1, 2], else the string."""
    text = text.strip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text[:1] in ("[", "{"):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def parse_param_items(items: Iterable[str] | None, flag: str = "--param") -> dict:
    """['delta=0.2', 'delta_b_mode=fixed'] -> {'delta': 0.2, 'delta_b_mode': 'fixed'} (values by
    :func:`parse_param_value`); ValueError naming ``flag`` for an item without ``NAME=``."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{flag}: expected NAME=VALUE, found {item!r}")
        k, v = item.split("=", 1)
        if not k.strip():
            raise ValueError(f"{flag}: expected NAME=VALUE with a NAME, found {item!r}")
        out[k.strip()] = parse_param_value(v)
    return out
