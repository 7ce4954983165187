"""The doctor online: the same checks as ``diagnose`` (analyses/doctor.py), fed one step at a time.

``LiveDoctor.observe(step, reward=..., tail_top10=..., ...)`` takes one step's statistics and returns the findings
that fire at that step. Every test looks only at the newest point (the CUSUM keeps its running sum; the sequential
trend test looks at the latest ``trend_window`` points), so a step costs O(steps so far) at most for the robust
reference (a median), not a rerun of the offline tests; the finding itself, built once when a test fires, is the
offline check run on the steps so far, so its message and evidence are the offline ones. The alarm steps equal
``diagnose``'s on the same series (tests/analyses/test_doctor_live.py).

The reward check is ``reward_episodes`` on the steps so far: a dip is a ``reward_dip`` warning when it starts, and
becomes the critical ``reward_collapse`` once it has lasted ``collapse_min_after`` logged steps after its first (the
offline definition's "at least 5 steps left"); a recovery is reported as ``reward_recovered`` (info). The
divergence runaway (warning) fires the step the trailing median of the tail reaches the level, and the imminent
collapse (critical, the guard's halt) the first step after it at which the reward's moving average is below the
imminent fraction of its best: both through the offline functions (``runaway_finding``, ``imminent_finding``) on
the steps so far.

``live_step_stats(updates)`` computes a step's statistics from the trainer's per-update tensors, with the
definitions of ``step_series`` (the top-decile mean of |log pi - log mu| over the updates after the first, the
masked share there, mean k3 and |log ratio| of the first update's pi (or pi_old) against mu, the first update's
mean entropy).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from cppo_diag.analyses import doctor as D
from cppo_diag.analyses.doctor import DOCTOR_SETTINGS, DoctorSettings, Finding

__all__ = ["LiveDoctor", "live_step_stats", "tail_top10", "STAT_NAMES", "TAIL_METRIC"]

TAIL_METRIC = "cppo_diag/div_tail_top10"  # the TRL plug-in's per-step tail, which DoctorGuardCallback reads

STAT_NAMES = ("tail_top10", "mismatch_k3", "mismatch_abs_lr", "masked_frac", "entropy")


class _Sequential:
    """First alarms of the self-starting CUSUM and of the sequential trend test (``cusum_up`` / ``trend_up``),
    one new point at a time; ``transform`` maps a value to the tested series (log, arcsine-square-root)."""

    def __init__(self, s: DoctorSettings, *, transform: Callable[[float], float], scale_floor: float,
                 min_rise: float, accept: Callable[[float], bool]):
        self.s, self.transform, self.scale_floor, self.min_rise, self.accept = s, transform, scale_floor, min_rise, accept
        self.steps: list[int] = []
        self.values: list[float] = []
        self.y: list[float] = []
        self.S = 0.0
        self.cusum_alarm: int | None = None
        self.trend_alarm: int | None = None

    def add(self, step: int, value: float | None) -> list[str]:
        """Add a point; returns the tests ("cusum", "trend") whose first alarm is this point."""
        if value is None or not np.isfinite(value) or not self.accept(value):
            return []
        s = self.s
        self.steps.append(int(step))
        self.values.append(float(value))
        self.y.append(self.transform(float(value)))
        i = len(self.y) - 1
        fired = []
        if self.cusum_alarm is None and i >= s.cusum_warmup:
            past = np.asarray(self.y[:i])
            med = float(np.median(past))
            sd = max(1.4826 * float(np.median(np.abs(past - med))), self.scale_floor)
            z = min((self.y[i] - med) / sd, s.cusum_z_cap)
            self.S = max(0.0, self.S + z - s.cusum_k)
            if self.S > s.cusum_h:
                self.cusum_alarm = i
                fired.append("cusum")
        if self.trend_alarm is None and i >= s.min_steps - 1:
            lo = max(0, i + 1 - s.trend_window)
            ys, xs = np.asarray(self.y[lo:i + 1]), np.asarray(self.steps[lo:i + 1], dtype=np.float64)
            mk = D.mann_kendall(ys)
            if mk["p_increasing"] < s.trend_alpha:
                slope = D.theil_sen(xs, ys)
                rise = slope * (xs[-1] - xs[0])
                resid = ys - slope * xs
                noise = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
                if rise >= max(self.min_rise, s.trend_min_snr * noise):
                    self.trend_alarm = i
                    fired.append("trend")
        return fired


def _log(v: float) -> float:
    return math.log(v)


def _asin_sqrt(v: float) -> float:
    return float(np.arcsin(np.sqrt(np.clip(v, 0.0, 1.0))))


class LiveDoctor:
    """The detector online. ``rule``: the trained rule (for the masked-share check). ``observe`` returns the new
    findings of the step; ``findings`` holds every finding so far, in the order they fired."""

    def __init__(self, *, rule: str | None = None, settings: DoctorSettings = DOCTOR_SETTINGS):
        s = self.s = settings
        self.rule = rule
        self.findings: list[Finding] = []
        self._fired: set[str] = set()
        self._reward_steps: list[int] = []
        self._reward: list[float] = []
        self._heldout: dict[str, list] = {"steps": [], "values": []}
        self._open_dip: int | None = None
        self._tail = _Sequential(s, transform=_log, scale_floor=s.log_scale_floor, min_rise=s.trend_min_rise,
                                 accept=lambda v: v >= s.mismatch_floor and v > 0)
        self._mismatch = _Sequential(s, transform=_log, scale_floor=s.log_scale_floor, min_rise=s.trend_min_rise,
                                     accept=lambda v: v > 0)
        self._mm_abs_max = 0.0
        self._entropy = _Sequential(s, transform=_log, scale_floor=s.log_scale_floor, min_rise=s.trend_min_rise,
                                    accept=lambda v: v > 0)
        self._ent_all: tuple[list[int], list[float]] = ([], [])
        self._masked = _Sequential(s, transform=_asin_sqrt, scale_floor=0.05, min_rise=0.0, accept=lambda v: True)
        self._tail_all: tuple[list[int], list[float]] = ([], [])
        self._runaway: Finding | None = None
        self.steps_seen = 0

    # -- one step -----------------------------------------------------------------------------------------------
    def observe(self, step: int, *, reward: float | None, tail_top10: float | None = None,
                mismatch_k3: float | None = None, mismatch_abs_lr: float | None = None,
                masked_frac: float | None = None, entropy: float | None = None,
                heldout: float | None = None) -> list[Finding]:
        """One step's statistics (None: not measured this step); returns the findings that fire at this step.
        Raises ``ValueError`` when ``reward`` is None or not finite (the reward checks need one per step)."""
        if reward is None or not np.isfinite(reward):
            raise ValueError(f"doctor.live: step {step} has no reward (scalar 'reward/mean'); the live doctor needs "
                             f"one finite reward per step, found {reward!r}")
        self.steps_seen += 1
        new: list[Finding] = []
        self._reward_steps.append(int(step))
        self._reward.append(float(reward))
        if heldout is not None and np.isfinite(heldout):
            self._heldout["steps"].append(int(step))
            self._heldout["values"].append(float(heldout))
        new += self._reward_check(step)
        if tail_top10 is not None and self._tail.add(step, tail_top10):
            new += self._drift("divergence_tails_rising", self._tail, what="The top-decile mean of |log pi - log mu|",
                               unit="top-decile mean |log π − log μ| (nats)", page=D.PAGE_DIVERGENCE)
        if tail_top10 is not None and np.isfinite(tail_top10) and tail_top10 >= self.s.mismatch_floor:
            self._tail_all[0].append(int(step))
            self._tail_all[1].append(float(tail_top10))
            new += self._runaway_check()
        new += self._imminent_check()
        if mismatch_abs_lr is not None and np.isfinite(mismatch_abs_lr):
            self._mm_abs_max = max(self._mm_abs_max, float(mismatch_abs_lr))
        k3 = mismatch_k3 if (mismatch_abs_lr is None or mismatch_abs_lr >= self.s.mismatch_floor) else None
        if k3 is not None and self._mm_abs_max >= self.s.mismatch_floor and self._mismatch.add(step, k3):
            new += self._drift("mismatch_drift", self._mismatch,
                               what="The divergence pi / mu before the batch's updates (mean k3; it includes the "
                                    "engine mismatch and the policy lag)", unit="mean k3 (nats)", page=D.PAGE_DOCTOR)
        if entropy is not None and np.isfinite(entropy):
            self._ent_all[0].append(int(step))
            self._ent_all[1].append(float(entropy))
            if self._entropy.add(step, entropy):
                new += self._drift("entropy_surge", self._entropy, what="The policy entropy",
                                   unit="mean entropy (nats)", page=D.PAGE_RUNS)
            new += self._entropy_collapse()
        if masked_frac is not None and self._masked.add(step, masked_frac):
            new += self._masked_check()
        for f in new:
            f.settings_version = self.s.version
        self.findings.extend(new)
        return new

    # -- checks ---------------------------------------------------------------------------------------------------
    def _reward_check(self, step: int) -> list[Finding]:
        ep = D.reward_episodes(self._reward_steps, self._reward, settings=self.s)
        out: list[Finding] = []
        last = ep["dips"][-1] if ep["dips"] else None
        ongoing = last if last is not None and last["recovered"] is None else None
        if self._open_dip is not None and (ongoing is None or ongoing["start"] != self._open_dip):
            out.append(Finding("reward_recovered", "info", step,
                               f"The reward recovered at step {step} from the dip that began at step "
                               f"{self._open_dip}: its {self.s.collapse_window}-step moving average is back above "
                               f"{self.s.collapse_fraction:.0%} of its best so far.",
                               {"dip_step": self._open_dip, "recovered_step": step}, None, D.PAGE_RUNS,
                               (self._open_dip, step)))
            self._open_dip = None
        if ongoing is None:
            return out
        ho = self._heldout if len(self._heldout["steps"]) >= 2 else None
        ho = None if ho is None else {"metric": "eval/greedy_acc", **ho}
        if self._open_dip is None:
            self._open_dip = ongoing["start"]
            held, hev = D._heldout_sentence(ho, ongoing["start"])
            k = self.s.collapse_min_after
            out.append(Finding(
                "reward_dip", "warning", ongoing["start"],
                f"The reward dipped at step {ongoing['start']}: its {self.s.collapse_window}-step moving average "
                f"({ongoing['ma_at_start']:.3g}) fell below {self.s.collapse_fraction:.0%} of its best so far "
                f"({ongoing['max_at_start']:.3g}, step {ongoing['peak_step']}). It becomes a critical collapse if it "
                f"is still below after {k} more logged steps." + held,
                {"dip_step": ongoing["start"], "peak_step": ongoing["peak_step"], "moving_average": ongoing["ma_at_start"],
                 "running_max": ongoing["max_at_start"], "critical_after_steps": k, **hev},
                None, D.PAGE_RUNS, (ongoing["peak_step"], step)))
        col = ep["collapse"]
        if col is not None and "reward_collapse" not in self._fired:
            self._fired.add("reward_collapse")
            (f,) = [g for g in D._reward_findings((np.asarray(self._reward_steps), np.asarray(self._reward),
                                                    "reward/mean (live)"), ho, lambda fid: None, self.s)
                    if g.id == "reward_collapse"]
            f.first_step = col["start"]
            f.evidence["detected_at_step"] = step
            f.message = (f"The reward collapsed at step {col['start']}: still below half its best {col['steps_after']} "
                         f"logged steps later (at step {step}). " + f.message)
            out.append(f)
        return out

    def _drift(self, fid: str, seq: _Sequential, *, what: str, unit: str, page: str) -> list[Finding]:
        if fid in self._fired:
            return []
        self._fired.add(fid)
        steps, values = np.asarray(seq.steps), np.asarray(seq.values)
        f = D._drift_check(fid, steps, values, what=what, unit_label=unit, page=page, fig_path=None, collapse=None,
                           severity="info")
        if f is None:  # cannot happen: the offline tests alarm at this point too (tests/analyses/test_doctor_live.py)
            raise RuntimeError(f"doctor.live: {fid} fired online at step {steps[-1]} but not offline")
        return [f]

    def _runaway_check(self) -> list[Finding]:
        """``divergence_runaway`` (warning) the step the trailing median of the tail reaches the level."""
        if self._runaway is not None:
            return []
        steps, vals = self._tail_all
        # it had not run away before this point, so only the newest window can cross: O(points) per step
        if D.runaway_index(vals[-self.s.runaway_points:], settings=self.s) is None:
            return []
        f = D.runaway_finding(np.asarray(steps), np.asarray(vals), settings=self.s)
        f.message += (" " + D.REMEDIES[""] + " (Live: the Attribution page, or `cppo-diag stats RUN --family "
                      "attribution`, says whether the engine, the lag or the updates moved.)")
        self._runaway = f
        return [f]

    def _imminent_check(self) -> list[Finding]:
        """``collapse_imminent`` (critical) at the first step after the runaway where the reward falls below the
        imminent fraction of its best: the guard's halt."""
        if self._runaway is None or "collapse_imminent" in self._fired:
            return []
        rew = (np.asarray(self._reward_steps), np.asarray(self._reward), "reward/mean (live)")
        f = D.imminent_finding(rew, self._runaway, settings=self.s)
        if f is None:
            return []
        self._fired.add("collapse_imminent")
        f.evidence["detected_at_step"] = self._reward_steps[-1]
        return [f]

    def _entropy_collapse(self) -> list[Finding]:
        steps, vals = self._ent_all
        if "entropy_collapse" in self._fired or len(vals) < self.s.min_steps:
            return []
        early = float(np.nanmedian(vals[: self.s.cusum_warmup]))
        low = [i for i, v in enumerate(vals) if v < self.s.entropy_collapse_fraction * early]
        if early <= 0 or not low:
            return []
        self._fired.add("entropy_collapse")
        i = low[0]
        return [Finding("entropy_collapse", "warning", steps[i],
                        f"The policy entropy fell to {vals[i]:.3g} at step {steps[i]}, under "
                        f"{self.s.entropy_collapse_fraction:.0%} of its early level ({early:.3g}): the policy has "
                        "become nearly deterministic.",
                        {"early_median": early, "value": vals[i], "fraction": self.s.entropy_collapse_fraction,
                         "step": steps[i]}, None, D.PAGE_RUNS, (steps[0], steps[-1]))]

    def _masked_check(self) -> list[Finding]:
        if "masked_frac_rising" in self._fired:
            return []
        steps, vals = np.asarray(self._masked.steps), np.asarray(self._masked.values)
        f = D._masked_rising(steps, vals, self.rule, None, None)
        if f is None or f.first_step != int(steps[-1]):
            return []  # the candidate alarm was not confirmed (the offline check also skips it)
        self._fired.add("masked_frac_rising")
        backing = [g.id for g in self.findings if g.id in D.EARLY_WARNING_IDS and g.first_step is not None
                   and g.first_step <= f.first_step]
        if backing:
            f.evidence["corroborated_by"] = backing
        else:
            f.severity = "info"
            f.message += " The divergence did not run away with it, so this alone is not an early warning."
        return [f]

    # -- summary --------------------------------------------------------------------------------------------------
    def first(self, severity: str) -> Finding | None:
        """The first finding of ``severity`` so far (in the order they fired), or None."""
        return next((f for f in self.findings if f.severity == severity), None)


def tail_top10(d) -> float | None:
    """Mean of the values at or above their P90 (linear interpolation) of a 1-D torch tensor of |log pi - log mu|:
    the statistic of ``divergence_runaway`` (``doctor_series._top_decile_mean``); None when empty."""
    import torch

    d = d.detach().reshape(-1).double()
    n = d.numel()
    if not n:
        return None
    # P90 with linear interpolation from a sort: torch.quantile refuses inputs over 2^24 elements, and a real
    # step holds tens of millions of tokens (the guard must never break training)
    srt = torch.sort(d).values
    pos = 0.9 * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    q = srt[lo] + (srt[hi] - srt[lo]) * (pos - lo)
    return float(srt[srt >= q].mean())


def live_step_stats(updates: Sequence[Any]) -> dict[str, float | None]:
    """One step's statistics from its updates (objects with ``update``, ``logp``, ``logp_rollout``, ``logp_old``,
    ``mask``, ``keep``, ``entropy`` tensors of shape (b, T), as ``StepPool.updates``); the definitions of
    ``doctor.step_series``. None for a statistic the step cannot give (e.g. one update: no tail)."""
    import torch

    from cppo_diag.masks.logratio import kl_k3, log_ratio

    parts = [u for u in updates if bool(u.mask.any())]
    out: dict[str, float | None] = {k: None for k in STAT_NAMES}
    if not parts:
        return out
    with torch.no_grad():
        later = [u for u in parts if u.update > 0] or parts
        d = torch.cat([log_ratio(u.logp.float(), u.logp_rollout.float()).abs()[u.mask]
                       for u in later])  # (N,)
        if d.numel():
            out["tail_top10"] = tail_top10(d)
            masked = torch.cat([(~u.keep)[u.mask] for u in later])
            out["masked_frac"] = float(masked.double().mean())
        first = [u for u in parts if u.update == 0]
        if first:
            lr = torch.cat([log_ratio((u.logp_old if u.logp_old is not None else u.logp).float(),
                                      u.logp_rollout.float())[u.mask] for u in first]).double()
            out["mismatch_k3"] = float(kl_k3(lr).mean())
            out["mismatch_abs_lr"] = float(lr.abs().mean())
            ent = [u.entropy[u.mask] for u in first if u.entropy is not None]
            if ent:
                out["entropy"] = float(torch.cat(ent).double().mean())
    return out
