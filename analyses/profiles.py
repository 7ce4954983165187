"""A rule's named parameter sets (``cppo_diag.masks.registry`` profiles) applied to a recorded run.

A profile may need a fact of the run: ``verl-pr6731`` takes T in w_t to be the padded response width, i.e.
the run's maximum response length (``weight_length="horizon"``). :func:`run_max_response_length` reads it
from the run's configuration (the trainer's cap on generated tokens) and falls back to the longest logged
response.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from cppo_diag.analyses.tokens import load_tokens, run_meta

# meta.json paths (in "config") of a trainer's cap on response tokens: the bundled trainer, the TRL plug-in
MAX_LENGTH_KEYS = (("rollout", "max_new_tokens"), ("max_completion_length",), ("max_response_length",))


def run_max_response_length(source: Any) -> int | None:
    """The run's maximum response length: the cap its trainer recorded in ``meta.json`` ("config"), else the
    longest logged response (max ``pos`` + 1); None for a run without tokens or such a cap."""
    cfg = run_meta(source).get("config") or {}
    for path in MAX_LENGTH_KEYS:
        node: Any = cfg
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, int) and not isinstance(node, bool) and node >= 1:
            return node
    top = load_tokens(source).select(pl.col("pos").max()).collect().item()
    return None if top is None else int(top) + 1


def profile_label(rule: str, profile: str) -> str:
    """How tables and legends name a rule recomputed under a profile: ``cppo[verl-pr6731]``."""
    return f"{rule}[{profile}]"


def run_profile_params(source: Any, rule: str, profile: str) -> dict[str, Any]:
    """Every parameter of ``rule`` under ``profile`` on this run (raises, listing the known profiles, on an
    unknown name); the run's maximum response length is read only when the profile needs it."""
    from cppo_diag.masks.registry import get_profile

    spec = get_profile(rule, profile)
    facts = {}
    if "max_response_length" in spec.from_run.values():
        facts["max_response_length"] = run_max_response_length(source)
    return spec.resolve(**facts)


def profile_specs(source: Any, rule: str, profiles) -> dict[str, tuple[str, dict]]:
    """{label: (rule, params)} of ``rule`` under each profile, for ``compare_runs`` / ``recompute_many``."""
    return {profile_label(rule, p): (rule, run_profile_params(source, rule, p)) for p in profiles}
