"""``diagnose``: plain-language findings about a recorded run, each with the numbers behind it and a figure.

A finding says what is wrong (or what the logs cannot tell), from which step it holds, and where to look.
The checks read only what any trainer can log (token log-probs, advantages, the applied mask, entropy,
``reward/mean``); each one is listed in docs/analyses.md, "Doctor", with its statistic.

The alarms (docs/analyses.md, "Doctor: severity"; validated out of sample there):

* ``divergence_runaway`` (warning): the top-decile mean of |log pi - log mu| over the tokens of the updates after
  the first (where the policy has moved away from the sampler), as the median of the latest 3 logged steps,
  reaches ``runaway_level`` (0.75 nats: the top tenth of the tokens' probabilities moved by a factor of about 2).
  The attribution (when the run logged its columns) says whether the engine mismatch, the policy lag or the
  updates moved.
* ``collapse_imminent`` (critical): after a runaway, the 5-step moving average of ``reward/mean`` falls below
  ``imminent_fraction`` (65%) of its running maximum. The live guard halts on it (``--doctor.on_critical halt``),
  before the reward has fallen to half. A finished run that did not then collapse for good reports it as a warning.
* ``reward_collapse`` (critical): a *sustained* collapse: the first step >= 10 at which the 5-step moving average
  of ``reward/mean`` falls below half of its running maximum and stays below that half for the rest of the run,
  with at least 5 steps left (``reward_episodes``). A dip that recovers, or that the run ends too soon after to
  tell, is the warning ``reward_dip``, which says when it recovered. Online (the live guard) the same definition
  runs on the steps so far, so a dip stays a warning until it has lasted 5 steps after its first.
* ``entropy_collapse`` (warning), and ``masked_frac_rising``, a warning only when the divergence ran away by its
  step (alone, a rule that masks more while the divergence holds is doing its job: ``info``).
* ``info``: a property of the run, or what the logs cannot tell. The change-point tests (a one-sided CUSUM on
  per-step statistics standardised against the run's own earlier steps, and a sequential Mann-Kendall trend test)
  report ``divergence_tails_rising``, ``mismatch_drift`` (mean k3 of pi_old, or the first update's pi, against
  mu: the engine mismatch plus the policy lag) and ``entropy_surge`` as info: on the long regime's healthy runs
  the divergence rises as the policy sharpens, so a change alone is no alarm.

Every setting lives in ``DOCTOR_SETTINGS`` (one frozen, versioned dataclass); each finding carries its version.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl

from cppo_diag.analyses.tokens import load_tokens, run_meta, run_name
from cppo_diag import metric_names as M

SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class DoctorSettings:
    """Every setting of the detector, in one place (docs/analyses.md, "Doctor"). Frozen before validation:
    scripts/validate_doctor.py records ``version`` with its results, and every finding carries it. Change a value
    -> bump ``version`` and rerun the validation."""

    version: str = "3.0"
    min_steps: int = 10  # logged steps a per-step trend test needs (and the live guard's shortest run)
    cusum_warmup: int = 8  # points that only form the reference before the test starts
    cusum_k: float = 1.0  # allowance, in robust standard deviations
    cusum_h: float = 5.0  # decision interval, in robust standard deviations
    cusum_z_cap: float = 3.0  # one point adds at most this much: a single outlier never raises an alarm alone
    log_scale_floor: float = 0.1  # smallest robust sd of a log-series (changes under ~10% are not a change)
    mismatch_floor: float = 1e-5  # mean |log x - log mu| below this is float32 rounding of log-probs
    collapse_window: int = 5  # trailing moving average of reward/mean
    collapse_fraction: float = 0.5  # ... below this fraction of its running maximum: a dip
    collapse_min_step: int = 10  # a collapse needs a healthy phase: its step is >= this
    collapse_min_after: int = 5  # sustained: below for the rest of the run, with at least this many steps left;
    #                              live: a dip is critical once it has lasted this many steps after its first
    alpha: float = 0.01  # significance level of the Mann-Kendall trend tests
    trend_alpha: float = 0.001  # one-sided level of the sequential Mann-Kendall early warning (one look per step)
    trend_window: int = 60  # the sequential trend test looks at the latest this many logged steps
    trend_min_rise: float = math.log(2.0)  # ... and needs the Theil-Sen fit to at least double over that window
    trend_min_snr: float = 2.0  # ... and to rise by at least twice the robust sd of the points around the fit
    entropy_collapse_fraction: float = 0.1  # entropy below 10% of its early level
    budget_early_fraction: float = 0.25  # median first budget rejection within the first quarter of the response
    runaway_level: float = 0.75  # divergence runaway: the top-decile mean |log pi - log mu| (updates after the
    #                              first) reaches this many nats (a probability ratio of about e^0.75 = 2.1) ...
    runaway_points: int = 3  # ... as the median of the latest this many logged points (one outlier never fires)
    imminent_fraction: float = 0.65  # collapse imminent: after a runaway, the reward's moving average below this
    #                                  fraction of its running maximum (at a step >= collapse_min_step)


DOCTOR_SETTINGS = DoctorSettings()
_S = DOCTOR_SETTINGS
# Module-level names of the settings (read-only aliases of DOCTOR_SETTINGS).
MIN_STEPS = _S.min_steps
CUSUM_WARMUP = _S.cusum_warmup
CUSUM_K = _S.cusum_k
CUSUM_H = _S.cusum_h
CUSUM_Z_CAP = _S.cusum_z_cap
LOG_SCALE_FLOOR = _S.log_scale_floor
MISMATCH_FLOOR = _S.mismatch_floor
COLLAPSE_WINDOW = _S.collapse_window
COLLAPSE_FRACTION = _S.collapse_fraction
COLLAPSE_MIN_STEP = _S.collapse_min_step
COLLAPSE_MIN_AFTER = _S.collapse_min_after
ALPHA = _S.alpha
TREND_ALPHA = _S.trend_alpha
TREND_WINDOW = _S.trend_window
TREND_MIN_RISE = _S.trend_min_rise
TREND_MIN_SNR = _S.trend_min_snr
ENTROPY_COLLAPSE_FRACTION = _S.entropy_collapse_fraction
BUDGET_EARLY_FRACTION = _S.budget_early_fraction
EARLY_WARNING_IDS = ("divergence_runaway",)  # corroborates masked_frac_rising

# Pages of the app that show each finding's evidence (app/streamlit_app.py titles).
PAGE_DIVERGENCE = "Divergence by position"
PAGE_BUDGET = "Budget"
PAGE_RUNS = "Runs"
PAGE_DOCTOR = "Doctor"
PAGE_COMPARE = "Compare runs"


@dataclass
class Finding:
    """One finding. ``evidence``: the numbers behind the sentence; ``figure``: the PNG that shows it (None
    when figures were not written); ``page`` / ``steps``: where in the app to look (inclusive step range)."""

    id: str
    severity: str
    first_step: int | None
    message: str
    evidence: dict = field(default_factory=dict)
    figure: str | None = None
    page: str = PAGE_DOCTOR
    steps: tuple[int, int] | None = None
    settings_version: str = DOCTOR_SETTINGS.version  # the DoctorSettings that produced it

    def to_json(self) -> dict:
        """The JSON object of ``cppo-diag doctor --format json`` (id, severity, first_step, message,
        evidence, figure)."""
        d = asdict(self)
        out = {k: _jsonable(d[k]) for k in ("id", "severity", "first_step", "message", "evidence", "figure")}
        out["settings_version"] = self.settings_version
        return out


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return None if not math.isfinite(f) else round(f, 6)
    return v


# -- statistics -------------------------------------------------------------------------------------------------


def moving_average(x: Sequence[float], window: int = COLLAPSE_WINDOW) -> np.ndarray:
    """Trailing mean over the last ``window`` values (over the values so far for the first ``window - 1``
    points, so a run that collapses at its very start is seen collapsing there)."""
    x = np.asarray(x, dtype=np.float64)
    c = np.cumsum(np.insert(x, 0, 0.0))
    i = np.arange(1, x.size + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


def collapse_step(steps: Sequence[int], reward: Sequence[float], *, window: int = COLLAPSE_WINDOW,
                  fraction: float = COLLAPSE_FRACTION) -> dict:
    """First step where the ``window``-step trailing mean of the reward is below ``fraction`` times its running
    maximum (steps with a null reward are dropped first). Returns {"step": int or None, "ma", "running_max",
    "peak_step"} (the arrays over ``steps``)."""
    steps = np.asarray(steps, dtype=np.int64)
    r = np.asarray(reward, dtype=np.float64)
    ok = np.isfinite(r)
    steps, r = steps[ok], r[ok]
    ma = moving_average(r, window)
    run_max = np.fmax.accumulate(np.where(np.isnan(ma), -np.inf, ma)) if ma.size else ma
    hit = np.flatnonzero(np.isfinite(ma) & (run_max > 0) & (ma < fraction * run_max))
    step = int(steps[hit[0]]) if hit.size else None
    peak = None
    if hit.size:
        upto = ma[: hit[0] + 1]
        peak = int(steps[int(np.nanargmax(upto))])
    return {"step": step, "steps": steps, "ma": ma, "running_max": run_max, "peak_step": peak}


def reward_trend(steps: Sequence[int], reward: Sequence[float], *, window: int = COLLAPSE_WINDOW
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, the ``window``-step trailing moving average of the reward, its running maximum), NaN rewards
    dropped first: what the dip, collapse and imminent-collapse rules compare."""
    steps = np.asarray(steps, dtype=np.int64)
    r = np.asarray(reward, dtype=np.float64)
    ok = np.isfinite(r)
    ma = moving_average(r[ok], window)
    return steps[ok], ma, (np.fmax.accumulate(ma) if ma.size else ma)


def reward_episodes(steps: Sequence[int], reward: Sequence[float], *, settings: DoctorSettings = DOCTOR_SETTINGS
                    ) -> dict:
    """The reward's dips and its sustained collapse (docs/analyses.md, "Doctor: severity").

    A dip is a maximal run of consecutive logged steps at which the ``collapse_window``-step trailing mean of the
    reward is below ``collapse_fraction`` times its running maximum (NaN rewards dropped first). A dip is the
    *sustained collapse* when it starts at a step >= ``collapse_min_step``, lasts to the last logged step, and has
    at least ``collapse_min_after`` logged steps after its first. Run on the steps so far (the live guard), the
    same rule makes a dip critical once it has lasted ``collapse_min_after`` steps.

    Returns {"steps", "ma", "running_max" (arrays over the kept steps), "dips": [{"start", "last" (last step
    below), "recovered" (first step back at or above the line, None if none), "steps_after" (logged steps after
    its first), "peak_step", "ma_at_start", "max_at_start", "min_ma", "sustained", "critical_at" (the step at which
    the rule on the steps so far first calls it sustained, None if it never does)}], "collapse": the sustained dip
    or None}."""
    s = settings
    steps, ma, run_max = reward_trend(steps, reward, window=s.collapse_window)
    below = (run_max > 0) & (ma < s.collapse_fraction * run_max)
    dips, i, n = [], 0, int(steps.size)
    while i < n:
        if not below[i]:
            i += 1
            continue
        j = i
        while j + 1 < n and below[j + 1]:
            j += 1
        to_end = j == n - 1
        after = n - 1 - i
        dip = {"start": int(steps[i]), "last": int(steps[j]), "recovered": None if to_end else int(steps[j + 1]),
               "steps_after": after, "peak_step": int(steps[int(np.argmax(ma[: i + 1]))]),
               "ma_at_start": float(ma[i]), "max_at_start": float(run_max[i]), "min_ma": float(ma[i:j + 1].min()),
               "sustained": bool(to_end and after >= s.collapse_min_after and steps[i] >= s.collapse_min_step),
               # where the same rule, on the steps so far (the live guard), first calls this dip sustained
               "critical_at": (int(steps[i + s.collapse_min_after])
                               if j - i >= s.collapse_min_after and steps[i] >= s.collapse_min_step else None)}
        dips.append(dip)
        i = j + 1
    collapse = next((d for d in dips if d["sustained"]), None)
    return {"steps": steps, "ma": ma, "running_max": run_max, "dips": dips, "collapse": collapse}


def trailing_median(x: Sequence[float], points: int) -> np.ndarray:
    """Median of the latest ``points`` values at each index (NaN until ``points`` values exist), NaNs skipped."""
    x = np.asarray(x, dtype=np.float64)
    out = np.full(x.size, np.nan)
    for i in range(points - 1, x.size):
        w = x[i + 1 - points: i + 1]
        if np.isfinite(w).any():
            out[i] = float(np.nanmedian(w))
    return out


def runaway_index(tail: Sequence[float], *, settings: DoctorSettings = DOCTOR_SETTINGS) -> int | None:
    """Index of the first logged point at which the divergence runs away: the median of the latest
    ``runaway_points`` values of the top-decile mean |log pi - log mu| reaches ``runaway_level`` nats."""
    m = trailing_median(tail, settings.runaway_points)
    hit = np.flatnonzero(np.isfinite(m) & (m >= settings.runaway_level))
    return int(hit[0]) if hit.size else None


def imminent_step(steps: Sequence[int], reward: Sequence[float], runaway_step: int | None, *,
                  settings: DoctorSettings = DOCTOR_SETTINGS) -> dict | None:
    """The predicted collapse: the first logged reward step >= ``collapse_min_step`` and >= the divergence runaway's
    step at which the ``collapse_window``-step moving average of the reward is below ``imminent_fraction`` of its
    running maximum. Returns {"step", "moving_average", "running_max", "peak_step"} or None (no runaway, or the
    reward held)."""
    if runaway_step is None:
        return None
    s = settings
    steps, ma, run_max = reward_trend(steps, reward, window=s.collapse_window)
    hit = np.flatnonzero((steps >= max(runaway_step, s.collapse_min_step)) & (run_max > 0)
                         & (ma < s.imminent_fraction * run_max))
    if not hit.size:
        return None
    i = int(hit[0])
    return {"step": int(steps[i]), "moving_average": float(ma[i]), "running_max": float(run_max[i]),
            "peak_step": int(steps[int(np.argmax(ma[: i + 1]))])}


def runaway_finding(steps: np.ndarray, tail: np.ndarray, *, fig_path=None, collapse: int | None = None,
                    settings: DoctorSettings = DOCTOR_SETTINGS, extra_evidence: dict | None = None) -> Finding | None:
    """``divergence_runaway`` (warning) on the per-step top-decile mean |log pi - log mu| (``runaway_index``);
    its change starts at the first step whose trailing median reached half the level."""
    s = settings
    i = runaway_index(tail, settings=s)
    if i is None:
        return None
    m = trailing_median(tail, s.runaway_points)
    half = np.flatnonzero(np.isfinite(m[: i + 1]) & (m[: i + 1] >= s.runaway_level / 2))
    start = int(steps[half[0]]) if half.size else int(steps[i])
    step = int(steps[i])
    ev = {"alarm_step": step, "change_start_step": start, "value_at_alarm": float(m[i]), "level": s.runaway_level,
          "points": s.runaway_points, "ratio_at_level": math.exp(s.runaway_level), **(extra_evidence or {})}
    msg = (f"The divergence runs away: the top-decile mean of |log pi - log mu| (median of the latest "
           f"{s.runaway_points} logged steps) reached {m[i]:.3g} nats at step {step}, past {s.runaway_level:g} "
           f"nats (a probability ratio of about {math.exp(s.runaway_level):.1f}: healthy runs of the long regime stay "
           f"under it, collapsing ones pass it first); it passed half of that at step {start}.")
    fig = _series_figure(fig_path, steps, tail, ylabel="top-decile mean |log π − log μ| (nats)",
                         title="Top-decile mean of |log π − log μ| per step", alarm_step=step, start_step=start,
                         log=True, collapse=collapse, span_label="on the way to the level", level=s.runaway_level,
                         level_label=f"runaway level {s.runaway_level:g} nats")
    return Finding("divergence_runaway", "warning", step, msg, ev, fig, PAGE_DIVERGENCE, (start, int(steps[-1])))


def imminent_finding(rew, runaway: Finding | None, *, fig_path=None,
                     settings: DoctorSettings = DOCTOR_SETTINGS) -> Finding | None:
    """``collapse_imminent`` (critical): a divergence runaway, then the reward falling below ``imminent_fraction``
    of its best (``imminent_step``). The live guard halts on it (``--doctor.on_critical halt``)."""
    if rew is None or runaway is None:
        return None
    s = settings
    rs, rv, rsrc = rew
    im = imminent_step(rs, rv, runaway.first_step, settings=s)
    if im is None:
        return None
    ev = {**im, "runaway_step": runaway.first_step, "fraction": s.imminent_fraction, "window": s.collapse_window,
          "source": rsrc}
    msg = (f"A collapse is imminent at step {im['step']}: after the divergence ran away (step {runaway.first_step}) "
           f"the reward's {s.collapse_window}-step moving average ({im['moving_average']:.3g}) fell below "
           f"{s.imminent_fraction:.0%} of its best so far ({im['running_max']:.3g}, step {im['peak_step']}). On the "
           "validation runs this came before every sustained collapse; `--doctor.on_critical halt` stops here.")
    ok = np.isfinite(rv)
    fig = _series_figure(fig_path, rs[ok], rv[ok], ylabel="reward/mean", title="Reward per step",
                         alarm_step=im["step"], extra=(rs[ok], moving_average(rv[ok], s.collapse_window),
                                                      f"{s.collapse_window}-step moving average"))
    return Finding("collapse_imminent", "critical", im["step"], msg, ev, fig, PAGE_RUNS,
                   (runaway.first_step, int(rs[-1])))


def heldout_accuracy(scalars: pl.DataFrame | None) -> dict | None:
    """The held-out accuracy a run logged (``eval/greedy_acc``, else the first ``eval/*acc*`` scalar): {"metric",
    "steps", "values"}, or None when it logged fewer than two evaluations."""
    if scalars is None:
        return None
    names = [M.EVAL_GREEDY_ACC] + sorted(c for c in scalars.columns if c.startswith(M.EVAL) and "acc" in c)
    for c in names:
        if c in scalars.columns:
            df = scalars.select("step", c).drop_nulls().sort("step")
            if df.height >= 2:
                return {"metric": c, "steps": df["step"].to_list(), "values": [float(v) for v in df[c].to_list()]}
    return None


def _heldout_sentence(ho: dict | None, around: int) -> tuple[str, dict]:
    """A sentence on the held-out accuracy before and after step ``around`` (its best up to there, its last)."""
    if ho is None:
        return "", {}
    st, v = np.asarray(ho["steps"]), np.asarray(ho["values"])
    pre = v[st <= around]
    best = float(pre.max()) if pre.size else float(v[0])
    last = float(v[-1])
    ev = {"heldout_metric": ho["metric"], "heldout_best_before": best, "heldout_last": last,
          "heldout_last_step": int(st[-1]), "heldout_points": [[int(a), float(b)] for a, b in zip(st, v)]}
    held = "held" if last >= best * DOCTOR_SETTINGS.collapse_fraction else "collapsed"
    return (f" Held-out accuracy ({ho['metric']}): best {best:.3g} up to step {around}, {last:.3g} at step "
            f"{int(st[-1])} ({held}).", ev)


def cusum_up(y: Sequence[float], *, warmup: int = CUSUM_WARMUP, k: float = CUSUM_K, h: float = CUSUM_H,
             z_cap: float = CUSUM_Z_CAP, scale_floor: float = LOG_SCALE_FLOOR) -> dict:
    """Self-starting one-sided (upward) CUSUM with a robust reference.

    Point i >= ``warmup`` is standardised against the points before it: z_i = (y_i - median(y_<i)) / s_i with
    s_i = max(1.4826 MAD(y_<i), ``scale_floor``), capped at ``z_cap``; S_i = max(0, S_{i-1} + z_i - k), and the
    alarm is the first i with S_i > h. Returns {"alarm": index or None, "start": index where the CUSUM last
    left 0 before the alarm (the estimated change point), "S": array, "z": array, "ref", "scale" at the alarm}.
    """
    y = np.asarray(y, dtype=np.float64)
    n = y.size
    S = np.zeros(n)
    z = np.full(n, np.nan)
    s_prev, start, ref, scale = 0.0, None, None, None
    for i in range(warmup, n):
        past = y[:i][np.isfinite(y[:i])]
        if past.size < warmup or not np.isfinite(y[i]):
            S[i] = s_prev
            continue
        med = float(np.median(past))
        sd = max(1.4826 * float(np.median(np.abs(past - med))), scale_floor)
        z[i] = min((y[i] - med) / sd, z_cap)
        cur = max(0.0, s_prev + z[i] - k)
        if s_prev == 0.0 and cur > 0.0:
            start = i
        S[i] = cur
        s_prev = cur
        if cur > h:
            return {"alarm": i, "start": start if start is not None else i, "S": S, "z": z, "ref": med, "scale": sd}
    return {"alarm": None, "start": None, "S": S, "z": z, "ref": ref, "scale": scale}


def trend_up(steps: Sequence[int], y: Sequence[float], *, alpha: float = TREND_ALPHA, window: int = TREND_WINDOW,
             min_rise: float = TREND_MIN_RISE, min_snr: float = TREND_MIN_SNR, min_points: int = MIN_STEPS) -> dict:
    """Sequential trend test: the first index i (>= ``min_points`` - 1) at which the latest ``window`` points up to
    i show a Mann-Kendall increasing trend with one-sided p < ``alpha`` and a Theil-Sen fit whose rise over those
    points is at least ``min_rise`` (in y's units; log 2 = doubling on a log-series) and at least ``min_snr`` robust
    standard deviations (1.4826 MAD) of the points around the fit. Returns {"alarm": index or None, "start": first
    index of the window, "p", "z", "rise", "noise"}."""
    steps, y = np.asarray(steps, dtype=np.float64), np.asarray(y, dtype=np.float64)
    for i in range(min_points - 1, y.size):
        lo = max(0, i + 1 - window)
        ys, xs = y[lo:i + 1], steps[lo:i + 1]
        mk = mann_kendall(ys)
        if mk["p_increasing"] >= alpha:
            continue
        slope = theil_sen(xs, ys)
        rise = slope * (xs[-1] - xs[0])
        resid = ys - slope * xs
        noise = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
        if rise >= max(min_rise, min_snr * noise):
            return {"alarm": i, "start": lo, "p": mk["p_increasing"], "z": mk["z"], "rise": rise, "noise": noise}
    return {"alarm": None, "start": None, "p": None, "z": None, "rise": None, "noise": None}


def mann_kendall(y: Sequence[float]) -> dict:
    """Mann-Kendall trend test (normal approximation with the tie correction): statistic S, z and the one-sided
    p-values of an increasing and of a decreasing trend. NaN values are dropped."""
    y = np.asarray(y, dtype=np.float64)
    y = y[np.isfinite(y)]
    n = y.size
    if n < 3:
        return {"n": n, "S": 0, "z": 0.0, "p_increasing": 1.0, "p_decreasing": 1.0}
    diff = np.sign(y[None, :] - y[:, None])
    s = float(np.triu(diff, 1).sum())
    _, counts = np.unique(y, return_counts=True)
    var = (n * (n - 1) * (2 * n + 5) - float(np.sum(counts * (counts - 1) * (2 * counts + 5)))) / 18.0
    zval = 0.0 if var <= 0 else (s - np.sign(s)) / math.sqrt(var)
    return {"n": n, "S": int(s), "z": zval, "p_increasing": 0.5 * math.erfc(zval / math.sqrt(2)),
            "p_decreasing": 0.5 * math.erfc(-zval / math.sqrt(2))}


def theil_sen(x: Sequence[float], y: Sequence[float]) -> float:
    """Median of the pairwise slopes (y_j - y_i) / (x_j - x_i), i < j, x_j != x_i."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    i, j = np.triu_indices(x.size, 1)
    dx = x[j] - x[i]
    keep = dx != 0
    return float(np.median((y[j] - y[i])[keep] / dx[keep])) if keep.any() else float("nan")


# -- per-step series from the tokens ----------------------------------------------------------------------------


def step_series(source: Any, *, cache: bool = True, progress: bool = False) -> dict:
    """Per-step statistics the checks use, as one table per token subset, plus what the run logged: from the
    per-step rows of ``cppo_diag.analyses.doctor_series`` (cached beside a run directory, written by the
    recorder as steps complete; one pass over the steps no block covers)."""
    from cppo_diag.analyses.doctor_series import doctor_rows, series

    return series(doctor_rows(source, cache=cache, progress=progress))


def _scalar_series(source: Any) -> pl.DataFrame | None:
    run = source
    if isinstance(source, (str, Path)):
        from cppo_diag import open_run

        run = open_run(source)
    if not hasattr(run, "steps"):
        return None
    try:
        df = run.steps()
    except Exception:  # noqa: BLE001 - scalars are optional; token checks still run
        return None
    return df if df.height else None


def _reward_series(source: Any, scalars: pl.DataFrame | None, info: dict) -> tuple[np.ndarray, np.ndarray, str] | None:
    if scalars is not None and M.REWARD_MEAN in scalars.columns:
        df = scalars.select("step", M.REWARD_MEAN).drop_nulls().sort("step")
        if df.height:
            return df["step"].to_numpy(), df[M.REWARD_MEAN].to_numpy().astype(np.float64), f"{M.REWARD_MEAN} (scalars)"
    if "reward" in info["columns"]:  # token table: one reward per sequence, its first update
        one_per_seq = (pl.col("update") == 0) & (pl.col("pos") == 0) & pl.col("reward").is_not_null()
        df = (load_tokens(source).filter(one_per_seq)
              .group_by("step").agg(pl.col("reward").cast(pl.Float64).mean()).sort("step").collect())
        if df.height:
            return df["step"].to_numpy(), df["reward"].to_numpy(), "token column 'reward' (logged steps only)"
    return None


# -- figures ----------------------------------------------------------------------------------------------------


def _figure(path: Path | None, build) -> str | None:
    """Write the figure ``build()`` returns (an ``cppo_diag.analyses.plots_mpl`` builder) to ``path``; None without a path
    (nothing is drawn)."""
    if path is None:
        return None
    from cppo_diag.analyses import plots_mpl as P

    return str(P.save_png(build(), path))


def _series_figure(path, steps, values, **kw) -> str | None:
    """``plots_mpl.fig_step_series(steps, values, **kw)`` written to ``path``."""
    from cppo_diag.analyses import plots_mpl as P

    return _figure(path, lambda: P.fig_step_series(steps, values, **kw))


# -- the checks -------------------------------------------------------------------------------------------------


def _span(steps: np.ndarray) -> tuple[int, int] | None:
    return (int(steps[0]), int(steps[-1])) if len(steps) else None


def _drift_check(fid: str, steps: np.ndarray, values: np.ndarray, *, what: str, unit_label: str, page: str,
                 fig_path, collapse: int | None, severity: str = "warning", extra_evidence: dict | None = None,
                 title: str | None = None):
    """Change-point (CUSUM) and sequential trend (Mann-Kendall + Theil-Sen) tests on log(values); a Finding at
    the first step either fires."""
    title = title or what
    ok = np.isfinite(values) & (values > 0)
    steps, values = steps[ok], values[ok]
    if steps.size < MIN_STEPS:
        return None
    y = np.log(values)
    cs = cusum_up(y)
    tr = trend_up(steps, y)
    fired = [(r["alarm"], name, r) for name, r in (("cusum", cs), ("trend", tr)) if r["alarm"] is not None]
    if not fired:
        return None
    a, test, res = min(fired, key=lambda t: t[0])
    s0 = res["start"]
    alarm_step, start_step = int(steps[a]), int(steps[s0])
    ref = float(np.median(values[s0:a])) if a > s0 else float(values[s0])
    if test == "cusum":
        ref = float(math.exp(cs["ref"]))
    mk = mann_kendall(y[s0:a + 1])
    ev = {"alarm_step": alarm_step, "test": test, "change_start_step": start_step, "value_at_alarm": float(values[a]),
          "reference_median": ref, "ratio_to_reference": float(values[a]) / ref if ref > 0 else None,
          "cusum_alarm_step": None if cs["alarm"] is None else int(steps[cs["alarm"]]),
          "trend_alarm_step": None if tr["alarm"] is None else int(steps[tr["alarm"]]),
          "cusum_h": CUSUM_H, "cusum_k": CUSUM_K, "trend_alpha": TREND_ALPHA,
          "mann_kendall_z": mk["z"], "mann_kendall_p": mk["p_increasing"],
          "theil_sen_rise_factor": float(math.exp(theil_sen(steps[s0:a + 1], y[s0:a + 1]) * (steps[a] - steps[s0]))),
          "logged_steps": int(steps.size), **(extra_evidence or {})}
    how = ("a sustained upward change (one-sided CUSUM)" if test == "cusum" else
           f"a significant upward trend (Mann-Kendall p = {mk['p_increasing']:.1g}, Theil-Sen fit x"
           f"{ev['theil_sen_rise_factor']:.1f})")
    msg = (f"{what} rose from about {ref:.3g} to {values[a]:.3g} between steps {start_step} and {alarm_step}: "
           f"{how}.")
    fig = _series_figure(fig_path, steps, values, ylabel=unit_label, title=f"{title} per step",
                         alarm_step=alarm_step, start_step=start_step, log=True, collapse=collapse,
                         span_label="CUSUM rising" if test == "cusum" else "trend-test window")
    return Finding(fid, severity, alarm_step, msg, ev, fig, page, (start_step, int(steps[-1])))


def diagnose(
    source: Any,
    *,
    out_dir=None,
    name: str | None = None,
    budget: bool = True,
    progress: bool = False,
) -> list[Finding]:
    """Findings about one run (most severe first, then by first step). ``out_dir``: where the figures go
    (``<name>_<finding id>.png``; None writes none). ``budget=False`` skips the CPPO budget recomputation (the
    slowest check). Raises ``ValueError`` naming the field when the token table lacks a required column."""
    name = name or run_name(source)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    def fig_path(fid: str):
        return out / f"{slug}_{fid}.png" if out is not None else None

    meta = run_meta(source)
    info = step_series(source)
    scalars = _scalar_series(source)
    findings: list[Finding] = []
    token_steps = info["counts"]["step"].to_numpy()
    if token_steps.size == 0:
        raise ValueError(f"doctor: run '{name}' has no token rows (field 'tokens/'): nothing to diagnose")

    # -- reward: sustained collapse (critical) or dips (warning) ---------------------------------------------
    collapse = None
    rew = _reward_series(source, scalars, info)
    findings.extend(_reward_findings(rew, heldout_accuracy(scalars), fig_path))
    crit = next((f for f in findings if f.id == "reward_collapse"), None)
    dip = next((f for f in findings if f.id == "reward_dip"), None)
    collapse = crit.first_step if crit is not None else (dip.first_step if dip is not None else None)
    if rew is None:
        findings.append(Finding("no_reward", "info", None,
                                "The run logged no reward (scalar 'reward/mean' or token column 'reward'), so a "
                                "reward collapse cannot be detected.", {"looked_for": ["reward/mean", "reward"]},
                                None, PAGE_RUNS, None))

    # -- what the logs can support ----------------------------------------------------------------------------
    n_steps = int(token_steps.size)
    if n_steps < MIN_STEPS:
        findings.append(Finding("too_few_steps", "info", int(token_steps[0]),
                                f"Only {n_steps} step(s) have token logs; the trend tests need at least {MIN_STEPS}, "
                                "so divergence, mismatch, entropy and masked-fraction trends were not tested.",
                                {"logged_steps": n_steps, "needed": MIN_STEPS}, None, PAGE_RUNS, _span(token_steps)))
    if not info["has_rollout"]:
        findings.append(Finding("no_rollout_logprobs", "info", None,
                                "The run has no rollout log-probs (column 'logp_rollout' is missing or empty), so "
                                "no divergence, tail or mismatch finding is possible.",
                                {"column": "logp_rollout"}, None, PAGE_RUNS, None))
        return _sorted(findings)
    if info["identical_rollout"]:
        findings.append(Finding("no_rollout_logprobs", "info", None,
                                "Every logged 'logp_rollout' equals 'logp' exactly: the rollout log-probs look like "
                                "a copy of the trainer's, so divergence and mismatch cannot be measured.",
                                {"column": "logp_rollout"}, None, PAGE_RUNS, None))
        return _sorted(findings)
    if info["tail_updates"] == "all":
        findings.append(Finding("single_update", "info", int(token_steps[0]),
                                "Every batch was trained with one update, so pi never moves away from the sampler "
                                "within a batch; the tail statistics use all updates (mismatch only).",
                                {"updates": "all"}, None, PAGE_DOCTOR, _span(token_steps)))

    # -- divergence tails over steps (the early warning) -------------------------------------------------------
    tail = info["tail"]
    tsteps, tvals = tail["step"].to_numpy(), tail["tail_top10"].to_numpy().astype(np.float64)
    # a step whose tail is at float32 rounding level (pi = mu) carries no information about the policy's movement
    f = _drift_check("divergence_tails_rising", tsteps, np.where(tvals >= MISMATCH_FLOOR, tvals, np.nan),
                     what="The top-decile mean of |log pi - log mu|",
                     unit_label="top-decile mean |log π − log μ| (nats)", page=PAGE_DIVERGENCE,
                     title="Top-decile mean of |log π − log μ| (updates after the first)",
                     fig_path=fig_path("divergence_tails_rising"), collapse=collapse,
                     extra_evidence={"updates": info["tail_updates"]}, severity="info")
    if f is not None:
        _name_cause(source, f, ("engine", "lag", "update"))
        findings.append(f)
    # the runaway (warning) and, after it, the reward falling (critical: the collapse is imminent)
    runaway = runaway_finding(tsteps, np.where(tvals >= MISMATCH_FLOOR, tvals, np.nan),
                              fig_path=fig_path("divergence_runaway"), collapse=collapse,
                              extra_evidence={"updates": info["tail_updates"]})
    if runaway is not None:
        _name_cause(source, runaway, ("engine", "lag", "update"))
        runaway.message += " " + REMEDIES.get(runaway.evidence.get("cause") or "", REMEDIES[""])
        findings.append(runaway)
        f = imminent_finding(rew, runaway, fig_path=fig_path("collapse_imminent"))
        if f is not None:
            findings.append(f)

    # -- the divergence pi / mu before the batch's updates (engine mismatch + policy lag) ------------------------
    mm = info["mismatch"]
    if mm.height:
        msteps, k3, abs_lr = mm["step"].to_numpy(), mm["k3"].to_numpy(), mm["abs_lr_mean"].to_numpy()
        if np.nanmax(abs_lr) < MISMATCH_FLOOR:
            pass  # at float32 rounding of the log-probs: nothing to drift
        else:
            f = _drift_check("mismatch_drift", msteps, np.where(abs_lr >= MISMATCH_FLOOR, k3, np.nan),
                             what=f"The divergence pi / mu before the batch's updates (mean k3 of "
                                  f"{info['mismatch_pair']}; it includes the engine mismatch and the policy lag)",
                             unit_label="mean k3 (nats)", page=PAGE_DOCTOR, fig_path=fig_path("mismatch_drift"),
                             title="Divergence π / μ before the updates (mean k3)", severity="info",
                             collapse=collapse, extra_evidence={"pair": info["mismatch_pair"]})
            if f is not None:
                _name_cause(source, f, ("engine", "lag"))
                findings.append(f)

    # -- entropy ----------------------------------------------------------------------------------------------
    ent = info.get("entropy")
    ent_src = "token column 'entropy' (first update)"
    if (ent is None or ent.height == 0) and scalars is not None:
        for c in (M.POLICY_ENTROPY, "entropy/mean", "actor/entropy"):
            if c in scalars.columns:
                ent = scalars.select("step", pl.col(c).alias("entropy")).drop_nulls().sort("step")
                ent_src = f"scalar '{c}'"
                break
    if ent is None or ent.height == 0:
        findings.append(Finding("no_entropy", "info", None,
                                "The run logged no entropy (token column 'entropy' or scalar 'policy/entropy'), so "
                                "entropy collapse or surge cannot be detected.", {}, None, PAGE_RUNS, None))
    else:
        esteps, evals = ent["step"].to_numpy(), ent["entropy"].to_numpy().astype(np.float64)
        f = _drift_check("entropy_surge", esteps, evals, what="The policy entropy", unit_label="mean entropy (nats)",
                         page=PAGE_RUNS, fig_path=fig_path("entropy_surge"), collapse=collapse,
                         extra_evidence={"source": ent_src}, severity="info")
        if f is not None:
            findings.append(f)
        if evals.size >= MIN_STEPS:
            early = float(np.nanmedian(evals[:CUSUM_WARMUP]))
            low = np.flatnonzero(evals < ENTROPY_COLLAPSE_FRACTION * early)
            if early > 0 and low.size:
                s = int(esteps[low[0]])
                ev = {"early_median": early, "value": float(evals[low[0]]), "fraction": ENTROPY_COLLAPSE_FRACTION,
                      "source": ent_src, "step": s}
                fig = _series_figure(fig_path("entropy_collapse"), esteps, evals, ylabel="mean entropy (nats)",
                                     title="Policy entropy per step", alarm_step=s, log=True, collapse=collapse)
                findings.append(Finding("entropy_collapse", "warning", s,
                                        f"The policy entropy fell to {ev['value']:.3g} at step {s}, under "
                                        f"{ENTROPY_COLLAPSE_FRACTION:.0%} of its early level ({early:.3g}): the "
                                        "policy has become nearly deterministic.", ev, fig, PAGE_RUNS,
                                        (int(esteps[0]), int(esteps[-1]))))

    # -- the applied mask -------------------------------------------------------------------------------------
    rule = meta.get("rule")
    if "masked_frac" not in tail.columns:
        findings.append(Finding("no_applied_mask", "info", None,
                                "The run did not log the applied mask (column 'keep_applied'), so masked-fraction "
                                "findings are not possible; `cppo-diag recompute` can rebuild it.",
                                {"column": "keep_applied"}, None, PAGE_COMPARE, None))
    else:
        mf = tail["masked_frac"].to_numpy().astype(np.float64)
        n_tok = int(tail["n_tokens"].sum())
        n_masked = float(np.nansum(mf * tail["n_tokens"].to_numpy()))
        # with one update per batch pi = mu and no rule can mask anything: single_update already says so
        if (rule_can_mask(rule) and n_masked == 0 and n_tok >= 1000
                and info["tail_updates"] == "after_first"):
            findings.append(Finding("rule_never_binds", "warning", int(tsteps[0]),
                                    f"The applied rule '{rule}' masked no token in {n_tok:,} tokens of the updates "
                                    f"after the first: its parameters {meta.get('rule_params') or {}} never bind, so "
                                    "it ran as an unconstrained policy gradient.",
                                    {"rule": rule, "rule_params": meta.get("rule_params") or {}, "tokens": n_tok},
                                    None, PAGE_COMPARE, _span(tsteps)))
        # arcsine-square-root puts a fraction on a scale where binomial noise is about constant
        f = _masked_rising(tsteps[np.isfinite(mf)], mf[np.isfinite(mf)], rule, fig_path("masked_frac_rising"),
                           collapse)
        if f is not None:
            # alone, a rule masking more is doing its job: a warning only when the divergence itself rose by then
            backing = [g for g in findings if g.id in EARLY_WARNING_IDS and g.first_step is not None
                       and g.first_step <= f.first_step]
            if backing:
                f.evidence["corroborated_by"] = [g.id for g in backing]
            else:
                f.severity = "info"
                f.message += (" The divergence did not run away with it, so this alone is not an early "
                              "warning.")
            findings.append(f)

    # -- tails along the sequence -----------------------------------------------------------------------------
    findings.extend(_along_sequence(source, info, fig_path("tails_along_sequence"), progress))

    # -- prefix budget ----------------------------------------------------------------------------------------
    if budget:
        f = _budget_check(source, meta, fig_path("budget_exhausted_early"), progress, info["counts"])
        if f is not None:
            findings.append(f)
    return _sorted(_in_hindsight(findings, meta, rew, heldout_accuracy(scalars)))


HINDSIGHT_IDS = ("divergence_runaway", "entropy_collapse", "masked_frac_rising")
FINISHED = ("finished", "halted")


def _heldout_collapsed(ho: dict | None) -> bool:
    """The held-out accuracy's last value is below ``collapse_fraction`` of its best (False when not logged)."""
    if ho is None:
        return False
    v = np.asarray(ho["values"], dtype=np.float64)
    return bool(v.size >= 2 and v.max() > 0 and v[-1] < DOCTOR_SETTINGS.collapse_fraction * v.max())


def _in_hindsight(findings: list[Finding], meta: dict, rew, ho: dict | None = None) -> list[Finding]:
    """What a finished run's outcome says about its alarms (each re-graded finding keeps ``online_severity``, what
    ``--doctor.live`` reported; scripts/validate_doctor.py counts the online one):

    * early warnings on a run whose reward never dipped below half its best, and whose held-out accuracy (when
      logged) held, were not followed by a collapse: ``info``;
    * ``collapse_imminent`` on a finished run without a sustained collapse: ``warning`` (the reward recovered, or
      the run ended too soon after to tell), ``info`` when the reward never dipped below half its best and the
      held-out accuracy held (a false alarm). A run the guard halted keeps it ``critical``.
    Runs still training keep what fired."""
    if rew is None or meta.status not in FINISHED:
        return findings
    ep = reward_episodes(rew[0], rew[1])
    held_out_fell = _heldout_collapsed(ho)
    for f in findings:
        if f.id == "collapse_imminent" and f.severity == "critical" and meta.status == "finished" \
                and ep["collapse"] is None:
            f.evidence.update(online_severity="critical", followed_by_collapse=False)
            f.severity = "warning"
            if not ep["dips"] and not held_out_fell:  # never below half its best: a false alarm, in hindsight
                f.severity = "info"
                f.message += (" In hindsight it was a false alarm: the reward's 5-step mean never fell below half its "
                              "best" + (" and the held-out accuracy held" if ho is not None else "")
                              + ", so this finished run reports it as info (online, with --doctor.live, it was "
                                "critical, and --doctor.on_critical halt would have stopped the run here).")
                continue
            later = [d for d in ep["dips"] if d["last"] >= f.first_step]
            if later and later[0]["recovered"] is not None:
                why = f"it dipped at step {later[0]['start']} and recovered at step {later[0]['recovered']}"
            elif later:
                why = (f"it dipped at step {later[0]['start']}, {later[0]['steps_after']} logged step(s) before the "
                       "run ended: too few to call it sustained")
            else:
                why = "its moving average never fell below half its best"
            f.message += (f" In hindsight the reward did not collapse for good ({why}), so this finished run reports "
                          "it as a warning (online it was critical).")
        elif f.id in HINDSIGHT_IDS and f.severity == "warning":
            f.evidence.update(early_warning=True, online_severity="warning", followed_by_dip=bool(ep["dips"]))
            if ep["dips"] or held_out_fell:
                continue
            f.severity = "info"
            f.message += (" The run finished without its reward's 5-step mean dipping below half its best"
                          + (" or its held-out accuracy falling" if ho is not None else "")
                          + ", so this change was not followed by a collapse (online, with --doctor.live, it was a "
                            "warning).")
    return findings


def _reward_findings(rew, ho: dict | None, fig_path, settings: DoctorSettings = DOCTOR_SETTINGS) -> list[Finding]:
    """``reward_collapse`` (critical: the sustained collapse) and ``reward_dip`` (warning: the first other dip,
    with when it recovered) from the reward series (``reward_episodes``)."""
    if rew is None:
        return []
    rs, rv, rsrc = rew
    ep = reward_episodes(rs, rv, settings=settings)
    out: list[Finding] = []
    w, frac, k, min_step = (settings.collapse_window, settings.collapse_fraction, settings.collapse_min_after,
                            settings.collapse_min_step)
    col = ep["collapse"]
    figure = lambda fid, at: _series_figure(  # noqa: E731
        fig_path(fid), ep["steps"], rv[np.isfinite(rv)], ylabel="reward/mean", title="Reward per step",
        collapse=at, extra=(ep["steps"], ep["ma"], f"{w}-step moving average"))
    base = {"window": w, "fraction": frac, "min_step": min_step, "min_steps_after": k, "source": rsrc,
            "dips": [[d["start"], d["recovered"]] for d in ep["dips"]]}
    if col is not None:
        held, hev = _heldout_sentence(ho, col["start"])
        ev = {**base, "collapse_step": col["start"], "peak_step": col["peak_step"], "moving_average": col["ma_at_start"],
              "running_max": col["max_at_start"], "min_moving_average": col["min_ma"],
              "steps_after": col["steps_after"], **hev}
        msg = (f"The reward collapsed at step {col['start']} and did not recover: its {w}-step moving average "
               f"({col['ma_at_start']:.3g}) fell below {frac:.0%} of its best so far ({col['max_at_start']:.3g}, step "
               f"{col['peak_step']}) and stayed below for the {col['steps_after']} remaining logged steps (lowest "
               f"{col['min_ma']:.3g}).{held}")
        out.append(Finding("reward_collapse", "critical", col["start"], msg, ev, figure("reward_collapse", col["start"]),
                           PAGE_RUNS, (col["peak_step"], int(ep["steps"][-1]))))
    other = [d for d in ep["dips"] if not d["sustained"]]
    if other:
        d = other[0]
        held, hev = _heldout_sentence(ho, d["start"])
        ev = {**base, "dip_step": d["start"], "recovered_step": d["recovered"], "last_step_below": d["last"],
              "peak_step": d["peak_step"], "moving_average": d["ma_at_start"], "running_max": d["max_at_start"],
              "min_moving_average": d["min_ma"], "healthy_phase": d["start"] >= min_step, **hev}
        msg = (f"The reward dipped at step {d['start']}: its {w}-step moving average ({d['ma_at_start']:.3g}) fell "
               f"below {frac:.0%} of its best so far ({d['max_at_start']:.3g}, step {d['peak_step']}), lowest "
               f"{d['min_ma']:.3g}")
        if d["recovered"] is not None:
            msg += f"; it recovered at step {d['recovered']} (back above that half), so this is not a collapse."
        elif d["start"] < min_step:
            msg += (f", before step {min_step}: the run never had a healthy phase, so it is not counted as a "
                    "collapse.")
        else:
            msg += (f"; the run ends {d['steps_after']} logged step(s) later, fewer than the {k} a sustained collapse "
                    "needs: train longer to tell.")
        if len(other) > 1:
            msg += f" It dipped {len(other)} times (steps {', '.join(str(x['start']) for x in other)})."
        live_at = next((x["critical_at"] for x in other if x["critical_at"] is not None), None)
        if live_at is not None:  # what --doctor.live reported: on the steps so far a long dip is a collapse
            ev.update(online_severity="critical", online_critical_step=live_at)
            msg += (f" Online (--doctor.live) it was critical at step {live_at}, once a dip had lasted {k} more "
                    "steps: the live guard cannot tell a long dip from a collapse before it recovers, and "
                    "--doctor.on_critical halt would have stopped the run there.")
        msg += held
        out.append(Finding("reward_dip", "warning", d["start"], msg, ev, figure("reward_dip", d["start"]), PAGE_RUNS,
                           (d["peak_step"], d["last"] if d["recovered"] is None else d["recovered"])))
    return out


def _masked_rising(f_steps: np.ndarray, vals: np.ndarray, rule, fig_path, collapse) -> Finding | None:
    """The masked fraction rises: the first step where the CUSUM or the sequential trend test (on the arcsine-square-
    root of the fraction) alarms, confirmed, on the steps up to that one, by a Mann-Kendall increasing trend at
    ``ALPHA`` and a Theil-Sen rise that at least doubles the earlier median and exceeds twice the scatter around
    the fit."""
    if f_steps.size < MIN_STEPS:
        return None
    y = np.arcsin(np.sqrt(np.clip(vals, 0, 1)))
    cands = [r["alarm"] for r in (cusum_up(y, scale_floor=0.05), trend_up(f_steps, y, min_rise=0.0))
             if r["alarm"] is not None]
    for a in sorted(set(cands)):
        xs, ys = f_steps[: a + 1], vals[: a + 1]
        mk = mann_kendall(ys)
        slope = theil_sen(xs, ys)
        rise = slope * (xs[-1] - xs[0])
        resid = ys - slope * xs
        noise = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
        ref = float(np.median(ys[:-1]))
        if mk["p_increasing"] >= ALPHA or rise < max(ref, TREND_MIN_SNR * noise):
            continue
        step = int(f_steps[a])
        ev = {"alarm_step": step, "masked_frac_at_alarm": float(vals[a]), "reference_median": ref,
              "theil_sen_rise": rise, "scatter": noise, "mann_kendall_z": mk["z"], "mann_kendall_p": mk["p_increasing"],
              "alpha": ALPHA, "rule": rule}
        fig = _series_figure(fig_path, f_steps, vals, ylabel="masked fraction",
                             title=f"Masked fraction of '{rule}' per step (updates after the first)", alarm_step=step,
                             collapse=collapse)
        return Finding("masked_frac_rising", "warning", step,
                       f"The share of tokens the rule masks rose from about {ref:.2%} to {vals[a]:.2%} by step {step} "
                       f"(Theil-Sen rise {rise:.2%}, Mann-Kendall p = {mk['p_increasing']:.2g}): the policy moves "
                       "further from the sampler every step.", ev, fig, PAGE_COMPARE,
                       (int(f_steps[0]), int(f_steps[-1])))
    return None


CAUSE_LABELS = {  # attribution terms (analyses/attribution.py): what moved, in the finding's words
    "engine": "engine mismatch rising (the sampler's log-probs against the trainer's for the same weights, "
              "logp_behavior - logp_rollout)",
    "lag": "policy lag rising (the batch's sampling policy falls further behind, logp_old - logp_behavior)",
    "update": "updates moving further per batch (logp - logp_old)",
}
TERM_WORDS = {"engine": "the engine mismatch", "lag": "the policy lag", "update": "the updates"}
REMEDIES = {  # what to do about a runaway, by its cause
    "engine": "Compare the sampler's numerics with the trainer's (precision, kernels, sampling noise); an importance "
              "correction or a trust region on pi / mu bounds what the mismatch costs.",
    "lag": "Fresher batches (less staleness), a lower learning rate or a trust region that binds keep it down.",
    "update": "Fewer or smaller steps per batch (a lower learning rate, fewer minibatches) or a tighter trust region "
              "keep it down.",
    "": "A trust region that binds, a lower learning rate or fresher batches keep it down.",
}


def _name_cause(source, f: Finding, components: tuple[str, ...]) -> None:
    """Add to a divergence finding which attribution term moved (``attribution(run, by="step")``: the term whose
    mean |T| per step grew most from before the change (median over the steps before ``change_start_step``, else
    the first three) to the change (median over change_start_step..alarm_step)), or say that the run's logs cannot
    tell its components apart. ``components``: the terms the finding's statistic contains."""
    ev = f.evidence
    start, alarm = ev.get("change_start_step"), ev.get("alarm_step")
    words = [TERM_WORDS[c] for c in components]
    apart = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    try:
        import importlib

        A = importlib.import_module("cppo_diag.analyses.attribution")  # the module (the package may export a function)

        attribution = getattr(A, "attribution", None) or A.attribution_by  # by="step": per-step rows, cached
    except (ImportError, AttributeError):
        ev["cause"] = None
        f.message += f" These logs cannot tell {apart} apart."
        return
    try:
        df = attribution(source, by="step").sort("step")
        terms = [c[: -len("_abs")] for c in df.columns if c.endswith("_abs") and c != "total_abs"]
    except (ValueError, KeyError) as exc:
        ev["cause"] = None
        f.message += f" The attribution is not available ({exc}), so {apart} cannot be told apart."
        return
    wanted = [t for t in terms if set(t.split("+")) & set(components) and f"{t}_abs" in df.columns]
    growth = {}
    steps = df["step"].to_numpy()
    for t in wanted:
        v = df[f"{t}_abs"].to_numpy().astype(np.float64)
        pre = v[steps < start] if start is not None and (steps < start).any() else v[:3]
        now = v[(steps >= (start if start is not None else steps[0])) & (steps <= alarm)]
        pre, now = pre[np.isfinite(pre)], now[np.isfinite(now)]
        if pre.size and now.size:
            growth[t] = {"before": float(np.median(pre)), "during": float(np.median(now)),
                         "growth": float(np.median(now) - np.median(pre))}
    ev["attribution"] = growth
    rising = {t: g for t, g in growth.items() if g["growth"] > 0}
    if not rising:
        ev["cause"] = None
        f.message += f" No attribution term ({', '.join(wanted) or 'none'}) grew with it."
        return
    top = max(rising, key=lambda t: rising[t]["growth"])
    ev["cause"] = top
    parts = [p for p in top.split("+") if p in components]
    if len(parts) > 1:
        w = [TERM_WORDS.get(p, p) for p in parts]
        f.message += (f" It is {', '.join(w[:-1])} and {w[-1]} together, which this run's logs cannot tell apart "
                      f"(the attribution's combined term '{top}': log logp_behavior and logp_old to separate them).")
    else:
        g = rising[top]
        f.message += (f" Cause: {CAUSE_LABELS.get(top, top)}: mean |{top}| per token {g['before']:.3g} -> "
                      f"{g['during']:.3g} nats.")


def rule_can_mask(rule: str | None) -> bool:
    """The rule's declared ``can_mask`` (``cppo_diag.masks.RuleFacts``); False for no rule or an unknown one."""
    from cppo_diag.masks import UnknownRuleError, get_rule

    try:
        return bool(rule) and get_rule(str(rule)).facts.can_mask
    except UnknownRuleError:
        return False


def rule_has_budget(rule: str | None) -> bool:
    """The rule's declared ``prefix_budget``; False for no rule or an unknown one."""
    from cppo_diag.masks import UnknownRuleError, get_rule

    try:
        return bool(rule) and get_rule(str(rule)).facts.prefix_budget
    except UnknownRuleError:
        return False


def _sorted(findings: list[Finding]) -> list[Finding]:
    rank = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    return sorted(findings, key=lambda f: (rank[f.severity], f.first_step if f.first_step is not None else -1))


N_POS_BINS = 10  # the along-the-response test: at least this many position bins (up to twice as many) ...
MIN_BIN_SHARE = 0.25  # ... each holding at least this share of the fullest bin's tokens (sparse ends are noise)


def _along_sequence(source, info, fig_path, progress) -> list[Finding]:
    """The divergence tail along the response: top-decile mean of |pi - mu| per absolute position bin,
    Mann-Kendall. Bins are a multiple of the recorder's aggregates' 32 tokens wide where the responses are
    long enough (``N_POS_BINS`` bins or more), so a recorded run merges its write-time aggregates; shorter
    responses get narrower bins from a scan. Either way the partials are cached beside the run
    (``cppo_diag.analyses.aggregate``; quantiles within 0.78%)."""
    from cppo_diag.analyses.aggregate import WRITE_SPEC_ARGS, AggSpec, aggregate_run, derive, stats_table

    updates = info["tail_updates"]
    base = AggSpec(metrics=("tv",), bin_width=WRITE_SPEC_ARGS["bin_width"])
    part = aggregate_run(source, base, progress=progress)
    fine = stats_table(part, updates=updates).filter(pl.col("count") > 0)
    if fine.height == 0:
        return []
    n_fine = int(fine["bin"].max()) + 1
    if n_fine >= N_POS_BINS:
        width = base.bin_width * (n_fine // N_POS_BINS)
        part = derive(part, AggSpec(metrics=("tv",), bin_width=width))
    else:
        width = math.ceil(base.bin_width * n_fine / N_POS_BINS)
        part = aggregate_run(source, AggSpec(metrics=("tv",), bin_width=width), progress=progress)
    table = stats_table(part, updates=updates)
    table = table.filter(pl.col("count") >= MIN_BIN_SHARE * table["count"].max()).sort("bin")
    if table.height < 5:
        return []
    top = table["top10_mean"].to_numpy().astype(np.float64)
    mk = mann_kendall(top)
    if mk["p_increasing"] >= ALPHA:
        return []
    third = max(1, table.height // 3)
    first, last = float(np.nanmean(top[:third])), float(np.nanmean(top[-third:]))
    ratio = last / first if first > 0 else float("inf")
    ev = {"updates": updates, "bin_width": width, "n_bins": table.height, "top10_mean_first_third": first,
          "top10_mean_last_third": last, "ratio": ratio, "mann_kendall_z": mk["z"],
          "mann_kendall_p": mk["p_increasing"], "alpha": ALPHA}
    tsteps = info["counts"]["step"].to_numpy()

    from cppo_diag.analyses import plots_mpl as P

    fig = _figure(fig_path, lambda: P.fig_divergence_along_response(table))
    return [Finding("tails_along_sequence", "info", int(tsteps[0]),
                    f"The divergence tail grows along the response: the top-decile mean of |pi - mu| is "
                    f"{ratio:.1f}x larger in the last third of the position bins than in the first (Mann-Kendall p = "
                    f"{mk['p_increasing']:.2g}); a position-aware trust region (CPPO) addresses exactly this.",
                    ev, fig, PAGE_DIVERGENCE, _span(tsteps))]


BUDGET_TOKENS = 20_000_000  # the budget check recomputes CPPO on the latest steps holding at most this many tokens


def _budget_window(counts: pl.DataFrame) -> tuple[tuple[int, int] | None, int, int]:
    """(step range, tokens in it, tokens in the run): the latest steps holding at most ``BUDGET_TOKENS``
    tokens (at least one step); None when that is the whole run."""
    steps, n = counts["step"].to_numpy(), counts["n"].to_numpy().astype(np.int64)
    total = int(n.sum())
    if total <= BUDGET_TOKENS:
        return None, total, total
    keep = np.cumsum(n[::-1]) <= BUDGET_TOKENS
    k = max(1, int(keep.sum()))
    return (int(steps[-k]), int(steps[-1])), int(n[-k:].sum()), total


def _budget_check(source, meta, fig_path, progress, counts: pl.DataFrame) -> Finding | None:
    from cppo_diag.analyses import plots_mpl as P
    from cppo_diag.analyses.budget import budget_exhaustion
    from cppo_diag.masks import get_rule

    rule = str(meta.get("rule") or "")
    params = {}
    own = rule_has_budget(rule)
    if own:
        known = get_rule(rule).params
        params = {k: v for k, v in (meta.get("rule_params") or {}).items() if k in known}
    window, n_checked, n_total = _budget_window(counts)
    lf = load_tokens(source)
    if window is not None:  # a big run: its latest steps (said in the message and the evidence)
        lf = lf.filter(pl.col("step").is_between(*window))
    if int(counts["n_after"].sum()):
        lf = lf.filter(pl.col("update") > 0)
    bud = budget_exhaustion(lf, rule=rule if own else "cppo", params=params, progress=progress)
    fr = bud.first_reject
    if fr.is_empty() or not bud.by_step.height:
        return None
    lengths = (lf.group_by("step", "update", "rank", "seq_id").agg(pl.col("pos").max() + 1).collect()["pos"])
    median_len = float(lengths.median())
    below = fr.filter(pl.col("survival") <= 0.5)
    if below.is_empty():
        return None
    median_first = int(below["pos"][0])
    if median_first >= BUDGET_EARLY_FRACTION * median_len:
        return None
    steps = bud.by_step["step"].to_numpy()
    ev = {"median_first_budget_rejection_pos": median_first, "median_response_length": median_len,
          "fraction": BUDGET_EARLY_FRACTION, "budget_share": bud.overall.get("budget_share"),
          "resp_rejected_frac": bud.overall.get("resp_rejected_frac"), "params": params or "defaults",
          "tokens_checked": n_checked, "tokens_in_run": n_total, "steps_checked": window or "all"}
    fig = None
    if fig_path is not None:
        fig = str(P.save_png(P.fig_first_reject(fr), fig_path))
    applied = "as applied" if own else "recomputed with its defaults"
    return Finding("budget_exhausted_early", "info", int(steps[0]),
                   f"CPPO's prefix budget ({applied}) runs out early: half of the responses have their first "
                   f"budget rejection by position {median_first}, within the first {BUDGET_EARLY_FRACTION:.0%} of a "
                   f"median response ({median_len:.0f} tokens); later away tokens are then masked by the budget."
                   + (f" Checked on steps {window[0]}-{window[1]}: the latest {n_checked:,} of the run's {n_total:,} "
                      "tokens." if window is not None else ""),
                   ev, fig, PAGE_BUDGET, _span(steps))


def diagnose_runs(sources: Sequence[Any], *, out_dir=None, names: Sequence[str] | None = None, budget: bool = True,
                  progress: bool = False) -> dict:
    """``{"runs": [{"run": NAME, "findings": [...]}]}`` for several runs (the JSON of ``cppo-diag doctor``)."""
    runs = []
    for i, src in enumerate(sources):
        name = names[i] if names else run_name(src, f"run{i}")
        fs = diagnose(src, out_dir=out_dir, name=name, budget=budget, progress=progress)
        runs.append({"run": name, "findings": [f.to_json() for f in fs]})
    return {"runs": runs}


def findings_table(findings: Sequence[Finding]) -> pl.DataFrame:
    """One row per finding: severity, id, first_step, message, page, steps (for the report and the app)."""
    return pl.DataFrame(
        {"severity": [f.severity for f in findings], "id": [f.id for f in findings],
         "first_step": [f.first_step for f in findings], "message": [f.message for f in findings],
         "page": [f.page for f in findings],
         "steps": ["" if f.steps is None else f"{f.steps[0]}-{f.steps[1]}" for f in findings]},
        schema={"severity": pl.Utf8, "id": pl.Utf8, "first_step": pl.Int64, "message": pl.Utf8, "page": pl.Utf8,
                "steps": pl.Utf8},
    )


# -- report section -----------------------------------------------------------------------------------------------


def _mismatch_summary(source) -> pl.DataFrame:
    """The mismatch family pooled over the run, one row per update filter (report table)."""
    from cppo_diag.analyses.mismatch import mismatch_metrics

    rows = []
    for updates in ("first", "after_first"):
        df = mismatch_metrics(source, by="step", updates=updates)
        if not df.height:
            continue
        w = df["n_tokens"].cast(pl.Float64)
        row = {"updates": updates, "steps": df.height, "tokens": int(w.sum())}
        for c in ("kl_k1", "kl_k3", "chi2_token", "ess_token", "is_frac_gt_2", "is_frac_lt_0.5", "toward_mu_frac",
                  "masked_frac_pos_adv", "masked_frac_neg_adv", "chi2_seq", "ess_seq", "log_ppl_diff"):
            v = df[c]
            row[c] = float((v * w).sum() / w.filter(v.is_not_null()).sum()) if v.is_not_null().any() else None
        rows.append(row)
    return pl.DataFrame(rows)


def _mismatch_figure(source, path: Path) -> str | None:
    from cppo_diag.analyses.mismatch import mismatch_metrics

    series = {u: mismatch_metrics(source, by="step", updates=u) for u in ("first", "after_first")}

    from cppo_diag.analyses import plots_mpl as P

    return _figure(path, lambda: P.fig_mismatch_by_update(series))


def report_section(sources: Sequence[Any], names: Sequence[str], out_dir, *, progress: bool = False) -> str:
    """HTML for ``write_report``: each run's doctor findings (with their figures embedded) and its mismatch
    metric family pooled by update filter."""
    import base64
    import html

    out = Path(out_dir)
    parts = ["<h2>Doctor: findings</h2>",
             "<p>What <code>cppo-diag doctor</code> finds in each run (statistics: docs/analyses.md, \"Doctor\"). "
             "Severity <b>critical</b>: a sustained reward collapse (the only critical finding); <b>warning</b>: a dip "
             "that recovered, or a sustained change that precedes failures; <b>info</b>: a property of the run, "
             "something the logs cannot tell, or an early warning of a finished run that never dipped.</p>"]
    for name, src in zip(names, sources):
        parts.append(f"<h3>{html.escape(name)}</h3>")
        try:
            fs = diagnose(src, out_dir=out, name=name, progress=progress)
        except ValueError as exc:
            parts.append(f"<p class='note'>{html.escape(str(exc))}</p>")
            continue
        if not fs:
            parts.append("<p>No finding: nothing looks wrong in what this run logged.</p>")
        for f in fs:
            at = f" from step {f.first_step}" if f.first_step is not None else ""
            where = f" See the app's <i>{html.escape(f.page)}</i> page" + (
                f", steps {f.steps[0]}–{f.steps[1]}." if f.steps else ".")
            parts.append(f"<p><b>[{f.severity.upper()}] {html.escape(f.id)}</b>{at}: "
                         f"{html.escape(f.message)}{where}</p>")
            ev = ", ".join(f"{html.escape(str(k))} = {html.escape(str(v))}" for k, v in f.to_json()["evidence"].items())
            if ev:
                parts.append(f"<p style='font-size:.85em;color:#555'>evidence: {ev}</p>")
            if f.figure:
                data = base64.b64encode(Path(f.figure).read_bytes()).decode("ascii")
                parts.append(f"<figure><img alt='{html.escape(f.id)}' src='data:image/png;base64,{data}'></figure>")
        try:
            summary = _mismatch_summary(src)
        except Exception as exc:  # noqa: BLE001 - e.g. no logp_rollout: the findings above already say so
            parts.append(f"<p class='note'>Mismatch metrics: {html.escape(str(exc))}</p>")
            continue
        if summary.height:
            parts.append("<p>Mismatch metric family over the run (token-weighted means of the per-step values; "
                         "definitions and the trainers' names in docs/analyses.md):</p>")
            head = "".join(f"<th>{html.escape(c)}</th>" for c in summary.columns)
            body = "".join("<tr>" + "".join(
                f"<td>{v:.4g}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>"
                for r in summary.iter_rows())
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"
            fig = _mismatch_figure(src, out / f"{slug}_mismatch_by_step.png")
            if fig:
                data = base64.b64encode(Path(fig).read_bytes()).decode("ascii")
                parts.append(f"<figure><img alt='mismatch by step' src='data:image/png;base64,{data}'>"
                             "<figcaption>Mean k3 per step, first update vs later updates.</figcaption></figure>")
    return "".join(parts)
