"""Widgets and labels shared by several pages (step range, statistics, rule parameters).

Labels of divergences and defaults of rule parameters come from the analyses package and the rule
registry, so the app cannot drift from them.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from cppo_diag.analyses.binning import BIN_WIDTHS, auto_bin_width
from cppo_diag.app import data
from cppo_diag.masks.reasons import REASON_LABELS  # noqa: F401  (the pages' legend of reason codes)

STATISTICS = {
    "mean": "mean",
    "p90": "p90",
    "top10_mean": "top-decile mean",
    "p99": "p99",
    "surv": "survival P(D > x)",
}
ADV_SIGNS = {"all": "all tokens", "pos": "A > 0", "neg": "A < 0"}
SURVIVAL_XS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)  # x of the survival statistic P(D > x)

# Parameters the What-if and recompute widgets expose (name -> (min, max, step)).
PARAM_RANGES = {
    "delta": (0.001, 1.0, 0.005),
    "delta_b": (0.0, 0.2, 0.001),
    "w_min": (0.0, 1.0, 0.05),
    "eps_low": (0.0, 1.0, 0.01),
    "eps_high": (0.0, 5.0, 0.01),
}


def _metric_labels() -> dict[str, str]:
    from cppo_diag.analyses.position import METRIC_LABELS

    return {k: METRIC_LABELS[k] for k in ("tv", "abs_logratio", "k3", "k1") if k in METRIC_LABELS}


DIVERGENCES = _metric_labels()


def stat_column(stat: str, x: float) -> str:
    if stat == "surv":
        from cppo_diag.analyses.position import surv_name

        return surv_name(float(x))
    return stat


def stat_label(stat: str, x: float) -> str:
    return f"P(D > {x:g})" if stat == "surv" else STATISTICS[stat]


# Default windows (the latest steps up to this many tokens) of the views whose cost grows with the data.
# Recomputing a rule costs about 1-3 s per 300k tokens on the 2-core dev CPU and the position statistics
# about 1 s per 5M tokens (docs/benchmarks.md, "App"), so on a 50M-token run the defaults answer in about a
# second; widen the step range to see more (computed once, then cached).
RECOMPUTE_TOKENS = 300_000
AGGREGATE_TOKENS = 5_000_000


def step_range(path: str, key: str, *, default_tokens: int | None = None, label: str = "Steps",
               what: str = "") -> tuple[int, int] | None:
    """Inclusive (lo, hi) over the run's completed steps (None: the run has no complete step yet).

    ``default_tokens``: start with the latest steps holding at most that many tokens (at least one step)
    and say how many tokens the chosen range holds (``what`` names the computation in that caption).
    """
    steps = data.completed_steps(path) or data.token_steps(path)
    if not steps:
        return None
    lo, hi = steps[0], steps[-1]
    if lo == hi:
        st.caption(f"Step {lo} (the only step)")
        return (lo, hi)
    default = (lo, hi)
    if default_tokens is not None:
        default = data.recent_window(path, default_tokens) or default
    value = st.session_state.get(key)
    if not (isinstance(value, tuple) and lo <= value[0] <= value[1] <= hi):
        st.session_state[key] = default
    chosen = tuple(st.slider(label, min_value=lo, max_value=hi, key=key))
    if default_tokens is not None:
        counts = data.tokens_per_step(path)
        n = sum(v for s, v in counts.items() if chosen[0] <= s <= chosen[1])
        st.caption(f"{what or 'Computed'} on {n:,} tokens of steps {chosen[0]}-{chosen[1]}"
                   + (f" (by default the latest steps up to {default_tokens:,} tokens; widen the range for more, "
                      "slower on big runs)." if chosen != (lo, hi) else "."))
    return chosen


def rule_specs() -> dict[str, Any]:
    from cppo_diag.masks import list_rules

    return {spec.name: spec for spec in list_rules()}


def recompute_rules() -> list[str]:
    return list(rule_specs())


def default_rules(path: str) -> list[str]:
    """GRPO clip, DPPO and CPPO, less the rule the run applied when its mask was logged (drawn as applied)."""
    applied = applied_rule(path) if has_applied(path) else None
    return [r for r in ("grpo_clip", "dppo", "cppo") if r in rule_specs() and r != applied]


def applied_rule(path: str) -> str | None:
    return (data.get_run(path).meta or {}).get("rule")


def rule_defaults(path: str, rule: str = "cppo") -> dict[str, Any]:
    """The rule's registered defaults (``cppo_diag.masks.rule_defaults``), overridden by the run's
    rule_params when the run applied that rule (a CPPO variant counts for "cppo"). The CPPO parameters the
    pages' overlays need (delta, w_min, delta_b) fall back to cppo's defaults where still None."""
    from cppo_diag.masks import rule_defaults as registered

    params: dict[str, Any] = dict(registered(rule)) if rule in rule_specs() else {}
    meta = data.get_run(path).meta
    if meta.rule == rule or (rule == "cppo" and str(meta.rule or "").startswith("cppo")):
        params.update(meta.rule_params)
    cppo = registered("cppo")
    for name in ("delta", "w_min", "delta_b"):
        if params.get(name) is None:
            params[name] = cppo[name]
    return params


def has_applied(path: str) -> bool:
    return "keep_applied" in data.token_columns(path)


def rule_params_widget(path: str, key: str) -> dict[str, float]:
    """delta / delta_b / w_min / eps inputs for recomputed rules (in an expander). Returns plain floats."""
    defaults = rule_defaults(path)
    grpo = rule_defaults(path, "grpo_clip")
    out: dict[str, float] = {}
    with st.expander("Parameters of the recomputed rules"):
        cols = st.columns(5)
        for col, name in zip(cols, PARAM_RANGES):
            lo, hi, step = PARAM_RANGES[name]
            base = defaults.get(name, grpo.get(name))
            if base is None:
                continue
            out[name] = float(col.number_input(name, min_value=lo, max_value=hi, value=float(base), step=step,
                                               format="%.3f", key=f"{key}_{name}"))
    return out


def params_for(rule: str, flat: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``flat`` parameters that ``rule`` accepts (its registered parameter names)."""
    spec = rule_specs().get(rule)
    return {k: v for k, v in flat.items() if spec is None or k in spec.params}


def bin_width(auto: int, key: str, container: Any = st) -> int:
    """Bin-width picker whose first option, "auto", follows the runs shown (``auto`` tokens: about 40 bins
    over the longest response), so switching to a longer run does not keep a bin width meant for a short one."""
    options = ["auto", *BIN_WIDTHS]
    choice = container.select_slider("Bin width (tokens)", options, value="auto", key=key,
                                     format_func=lambda v: f"auto ({auto})" if v == "auto" else str(v))
    return int(auto if choice == "auto" else choice)


def default_bin_width(path: str) -> int:
    return auto_bin_width(data.max_position(path) + 1)


# -- which optimiser updates a page pools (analyses.updates) ---------------------------------------------------


def run_default_updates(path: str) -> str:
    """The run's default (``analyses.updates.default_updates``): "lagged" when it records lag, else "after_first"
    when it logged several updates per batch, else "all" (cached)."""
    return data.analysis("default_updates", path)


def updates_widget(paths: str | list[str], key: str, container: Any = st) -> str | None:
    """Which updates the page pools. Shown only when a run records lag or logged several updates per batch (the
    default is then the run's own: the tokens with lag > 0, or the updates after the first); with one run the
    choice is returned, with several None means "each run's default". A caption says what is pooled."""
    from cppo_diag.analyses.updates import UPDATE_LABELS, UPDATES, updates_note

    many = isinstance(paths, list)
    defaults = [run_default_updates(p) for p in (paths if many else [paths])]
    if all(d == "all" for d in defaults):
        return None if many else "all"
    # "lagged" needs the lag column: offered only when every run records it
    options = (["auto"] if many else []) + [u for u in UPDATES if u != "lagged" or all(d == "lagged" for d in defaults)]
    labels = {"auto": "each run's default", **UPDATE_LABELS}
    if st.session_state.get(key) not in options:
        st.session_state[key] = "auto" if many else defaults[0]
    choice = container.radio("Updates", options, format_func=labels.get, horizontal=True, key=key,
                             help="A run with several optimiser updates per batch logs each update's tokens. Where "
                                  "the run records lag, 'lagged' pools the tokens the policy had moved on since "
                                  "sampling; the first update of a batch holds the engine mismatch, plus the "
                                  "policy lag when rollouts are stale (Attribution page).")
    if choice == "auto":
        container.caption("Runs that record lag: the tokens with lag > 0; other runs with several updates per batch: "
                          "the updates after the first; other runs: all.")
        return None
    container.caption(updates_note(choice))
    return choice


@st.cache_resource(max_entries=data.MAX_BATCH_SETS, ttl=data.TTL_S, show_spinner=False)
def _update_batch_set(path: str, version: tuple, step_range: tuple | None, updates: str):
    from cppo_diag.analyses.recomputation import load_batches
    from cppo_diag.analyses.updates import select_updates

    return select_updates(load_batches(data.get_run(path), step_range=step_range), updates)


@st.cache_data(max_entries=data.MAX_AGGREGATES, ttl=data.TTL_S, show_spinner=False)
def _recompute_updates(path: str, version: tuple, step_range: tuple | None, updates: str, rule: str,
                       params: tuple, bin_width: int) -> Any:
    from cppo_diag import analyses
    from cppo_diag.analyses.updates import select_updates

    lo, hi = step_range if step_range is not None else (None, None)
    n = sum(v for s, v in data.tokens_per_step(path).items() if (lo is None or s >= lo) and (hi is None or s <= hi))
    if n <= data.WHATIF_BATCH_TOKENS:
        source = _update_batch_set(path, version, step_range, updates)
    else:
        source = select_updates(data.get_run(path), updates, step_range=step_range)
    return analyses.recompute(source, rule, params=dict(params), step_range=step_range, bin_width=bin_width,
                              rule_metrics=False, progress=False)


def recompute_steps(path: str, *, rule: str, params: dict[str, Any], step_range: tuple[int, int] | None,
                    bin_width: int, updates: str = "all") -> Any:
    """``data.recompute_steps`` restricted to the updates ``updates`` selects (the batches of the chosen steps
    and updates are rebuilt once, so a slider move only re-runs the rule)."""
    if updates == "all":
        return data.recompute_steps(path, rule=rule, params=params, step_range=step_range, bin_width=bin_width)
    p = str(data.confine(path))
    return _recompute_updates(p, data.run_version(p), None if step_range is None else tuple(step_range), updates,
                              rule, tuple(sorted(params.items())), int(bin_width))


# -- named parameter sets of CPPO (cppo_diag.masks.registry profiles) ------------------------------------------


def cppo_profiles() -> list[str]:
    from cppo_diag.masks.registry import list_profiles

    return [p.name for p in list_profiles("cppo")]


def profile_params(path: str, profile: str) -> dict[str, Any]:
    """Every CPPO parameter under ``profile`` on this run (verl-pr6731: horizon = the run's max length)."""
    return dict(data.analysis("run_profile_params", path, rule="cppo", profile=profile))


def profile_caption(path: str, profile: str) -> str:
    """What a profile reproduces and the parameters it sets on this run, in one line."""
    from cppo_diag.masks.registry import get_profile, get_rule

    spec, params, defaults = get_profile("cppo", profile), profile_params(path, profile), get_rule("cppo").params
    diff = {k: v for k, v in params.items() if v != defaults.get(k)}
    return f"**{profile}**: {spec.source}. " + (
        "Sets " + ", ".join(f"{k} = {v}" for k, v in diff.items()) + "." if diff else "The rule's defaults.")
