"""verl plug-in: cppo-diag rules in verl's policy-loss registry, with per-token capture.

Importing this module registers every cppo-diag rule (``cppo_diag.masks.list_rules()``) with verl's
``@register_policy_loss`` registry (``verl/trainer/ppo/core_algos.py``), so a verl run switches to CPPO with::

    actor_rollout_ref.actor.policy_loss.loss_mode=cppo        # or dppo, grpo_clip, cppo_soft, trm_max, ...

Names: each rule is registered as ``cppo_diag_<rule>`` and, where verl has no loss of that name already, as
``<rule>`` too (verl ships its own ``cispo``, ``dppo_tv`` and ``dppo_kl``; ours never replace them: use
``cppo_diag_cispo``). The module must be imported in every process that computes the loss (verl's actor
workers). Two ways without editing verl: set ``VERL_USE_EXTERNAL_MODULES=cppo_diag.integrations.verl`` (verl
imports it at start-up in each process), or rely on the ``verl.plugins`` entry point that cppo-diag's
``pyproject.toml`` declares (verl >= 0.9 loads that group automatically).

Parameters of the rule (JSON in ``CPPO_DIAG_RULE_PARAMS``, flat or per rule)::

    CPPO_DIAG_RULE_PARAMS='{"delta": 0.15, "w_min": 0.8}'
    CPPO_DIAG_RULE_PARAMS='{"cppo": {"delta": 0.2}, "grpo_clip": {"eps_high": 0.28}}'

A flat dict applies the keys the rule accepts and ignores the others; a per-rule dict must be exact. For
``grpo_clip``, unset ``eps_low``/``eps_high`` come from verl's own ``clip_ratio_low``/``clip_ratio_high``
(``clip_ratio`` when those are unset). Environment variables reach verl's Ray workers when they are set before
``ray.init`` (or through ``ray_kwargs.ray_init.runtime_env.env_vars``); ``configure(...)`` sets them from Python.

Anchor. verl hands a policy loss ``old_log_prob``, and the rule's ratio is taken against it:

* default ("decoupled") mode: ``old_log_prob`` is the actor's recomputed pi_old, so the run's ``anchor`` is
  ``"old"``; verl's rollout-correction weights (``rollout_is_weights``, TIS/MIS), when configured, multiply
  the per-token loss as in verl's own losses;
* bypass mode (``algorithm.rollout_correction.bypass_mode=true``) sets ``old_log_prob = rollout_log_probs``
  (mu, the sampler) but forces ``loss_mode=bypass_mode``; to get a cppo-diag rule anchored to mu (what CPPO and
  DPPO prescribe) set ``algorithm.rollout_correction.loss_type=cppo`` (any rule name): this module wraps verl's
  ``bypass_mode`` loss and dispatches those names to the rule (verl's rejection sampling / IS options of bypass
  mode are then not applied); ``ppo_clip`` and ``reinforce`` still go to verl's implementation unchanged.

Capture (optional): ``CPPO_DIAG_RUN_DIR`` (+ ``CPPO_DIAG_RUN_NAME``) makes every loss call record its batch
with ``RunRecorder`` (one shard writer per rank). A policy loss does not see verl's step counter, so the step
is, in order of preference: the value given to ``set_step(step)`` (call it from your trainer loop or a hook);
``CPPO_DIAG_CALLS_PER_STEP`` = the number of loss calls one training step makes on a rank (ppo_epochs x
mini-batches x micro-batches, fixed without dynamic batch sizes); else a new step starts when no loss call
happened for ``CPPO_DIAG_STEP_GAP_S`` seconds (default 10: the rollout phase between updates). ``update`` is
the index of the call within the step and ``seq_id = update * B + row``. ``meta.json`` names the method used.

Scalars under verl's names. Each loss call returns to verl (its dashboards) and records, beside cppo-diag's
``mask/<rule>/*`` and ``loss/*``: ``actor/pg_clipfrac`` (share of valid tokens the rule masked, what verl's
clipped losses report there) and ``actor/ppo_kl``; in bypass mode also verl's ``rollout_corr/*`` off-policy
diagnostics of the ratio against the rollout log-probs (``kl``, ``k3_kl``, ``training_ppl``, ``rollout_ppl``,
``log_ppl_diff``, ``chi2_token``; ``cppo_diag.integrations.names``), which verl's own bypass loss reports and
a rule in its place would otherwise drop. Recorded step scalars are the mean over the step's loss calls.

Live per-position metrics: each call's ``pos/*`` (``cppo_diag.capture.position_live``) go back in its metrics
dict, so they reach verl's tracker; the recorded ``pos/*`` are pooled over the step's calls. Sinks:
``CPPO_DIAG_SINKS=tensorboard,wandb`` (checked when the module is imported), the figure every
``CPPO_DIAG_POSITION_FIGURE_EVERY`` steps (default 10). ``meta.json`` ``config.rollout_correction`` holds verl's
rollout-correction settings as the loss's config carries them.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import threading
import time
import warnings
from typing import Any

import torch

try:
    from verl.trainer.ppo import core_algos
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError("cppo_diag.integrations.verl needs verl: pip install verl") from exc

from cppo_diag.capture import NullRecorder, RunRecorder
from cppo_diag import metric_names as M
from cppo_diag.capture.position_live import PositionWindow, figure_due, position_figure, position_scalars, position_tokens
from cppo_diag.capture.sinks import check_sinks_installed
from cppo_diag.integrations.names import verl_rollout_corr_scalars
from cppo_diag.loss import AGG_MODES, policy_loss
from cppo_diag.masks import compute_mask, get_rule, list_rules
from cppo_diag.masks.logratio import ratio
from cppo_diag.masks.reduce import masked_mean

logger = logging.getLogger(__name__)

__all__ = ["register", "registered_names", "configure", "set_step", "make_policy_loss", "PREFIX",
           "ENV_RULE_PARAMS", "ENV_RUN_DIR", "ENV_RUN_NAME", "ENV_CALLS_PER_STEP", "ENV_STEP_GAP_S", "ENV_SINKS",
           "ENV_POSITION_FIGURE_EVERY", "sink_names", "rollout_correction_settings"]

PREFIX = "cppo_diag_"
ENV_RULE_PARAMS = "CPPO_DIAG_RULE_PARAMS"
ENV_RUN_DIR = "CPPO_DIAG_RUN_DIR"
ENV_RUN_NAME = "CPPO_DIAG_RUN_NAME"
ENV_CALLS_PER_STEP = "CPPO_DIAG_CALLS_PER_STEP"
ENV_STEP_GAP_S = "CPPO_DIAG_STEP_GAP_S"
ENV_SINKS = "CPPO_DIAG_SINKS"  # comma-separated: tensorboard,wandb
ENV_POSITION_FIGURE_EVERY = "CPPO_DIAG_POSITION_FIGURE_EVERY"  # default 10; 0 = off

_REGISTERED: list[str] = []
_ORIGINAL_BYPASS = None


def sink_names() -> list[str]:
    """The sinks ``CPPO_DIAG_SINKS`` asks for, checked: an unknown name, or one whose package is missing, raises
    one line naming the extra to install."""
    raw = os.environ.get(ENV_SINKS, "")
    return check_sinks_installed([n.strip() for n in raw.split(",") if n.strip()], ENV_SINKS)


def _figure_every() -> int:
    raw = os.environ.get(ENV_POSITION_FIGURE_EVERY, "10").strip()
    if not raw.isdigit():
        raise ValueError(f"{ENV_POSITION_FIGURE_EVERY}: expected an integer >= 0, found {raw!r}")
    return int(raw)


def configure(*, rule_params: dict | None = None, run_dir: str | None = None, name: str | None = None,
              calls_per_step: int | None = None, step_gap_s: float | None = None, sinks: list[str] | None = None,
              position_figure_every: int | None = None) -> None:
    """Set the ``CPPO_DIAG_*`` environment variables of this process (inherited by workers started later).
    ``sinks`` is checked here (names, installed packages), before any worker starts."""
    if sinks is not None:
        check_sinks_installed(sinks, "configure(sinks=...)")
        os.environ[ENV_SINKS] = ",".join(sinks)
    if position_figure_every is not None:
        os.environ[ENV_POSITION_FIGURE_EVERY] = str(int(position_figure_every))
        _figure_every()
    if rule_params is not None:
        os.environ[ENV_RULE_PARAMS] = json.dumps(rule_params)
    if run_dir is not None:
        os.environ[ENV_RUN_DIR] = str(run_dir)
    if name is not None:
        os.environ[ENV_RUN_NAME] = str(name)
    if calls_per_step is not None:
        os.environ[ENV_CALLS_PER_STEP] = str(int(calls_per_step))
    if step_gap_s is not None:
        os.environ[ENV_STEP_GAP_S] = str(float(step_gap_s))


# -- parameters -----------------------------------------------------------------------------------------
def _config_get(config, key: str, default=None):
    if config is None:
        return default
    getter = getattr(config, "get", None)
    if getter is not None:
        try:
            return getter(key, default)
        except Exception:  # noqa: BLE001 - a strict config object: fall back to attribute access
            pass
    return getattr(config, key, default)


def _rule_params(rule: str, config) -> dict[str, Any]:
    """Parameters for ``rule``: CPPO_DIAG_RULE_PARAMS, then verl's clip ratios for grpo_clip."""
    accepted = get_rule(rule).params
    raw = os.environ.get(ENV_RULE_PARAMS, "").strip()
    try:
        env = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_RULE_PARAMS}: expected a JSON object, found {raw!r} ({exc})") from None
    if not isinstance(env, dict):
        raise ValueError(f"{ENV_RULE_PARAMS}: expected a JSON object, found {type(env).__name__}")
    if isinstance(env.get(rule), dict):
        params = dict(env[rule])  # per-rule: exact (compute_mask rejects unknown names)
    else:
        params = {k: v for k, v in env.items() if not isinstance(v, dict) and k in accepted}
    if rule == "grpo_clip":
        clip = _config_get(config, "clip_ratio")
        low = _config_get(config, "clip_ratio_low")
        high = _config_get(config, "clip_ratio_high")
        if "eps_low" not in params and (low if low is not None else clip) is not None:
            params["eps_low"] = float(low if low is not None else clip)
        if "eps_high" not in params and (high if high is not None else clip) is not None:
            params["eps_high"] = float(high if high is not None else clip)
    return params


def _plain(x, depth: int = 0):
    """A config object (omegaconf, dataclass, mapping) as JSON-able plain values."""
    if depth > 6:
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, dict) or hasattr(x, "items"):
        try:
            return {str(k): _plain(v, depth + 1) for k, v in x.items()}
        except Exception:  # noqa: BLE001
            pass
    if isinstance(x, (list, tuple)):
        return [_plain(v, depth + 1) for v in x]
    fields = getattr(x, "__dataclass_fields__", None)
    if fields:
        return {k: _plain(getattr(x, k, None), depth + 1) for k in fields if not k.startswith("_")}
    return str(x)


def rollout_correction_settings(config) -> dict | None:
    """verl's rollout-correction settings as the policy loss sees them (``config.policy_loss.rollout_correction``:
    ``rollout_is``, ``rollout_is_threshold``, ``rollout_rs``, ``bypass_mode``, ``loss_type``, ...), stored in
    meta.json's ``config.rollout_correction``; None when the loss's config carries none."""
    corr = _config_get(_config_get(config, "policy_loss"), "rollout_correction")
    return None if corr is None else _plain(corr)


# -- aggregation as verl does it (agg_loss) ----------------------------------------------------------------
def _verl_agg_kwargs(mask: torch.Tensor, loss_agg_mode: str, config) -> dict[str, Any]:
    """``policy_loss`` keywords that make ``cppo_diag.loss.agg_loss`` normalise as verl's ``agg_loss`` does.

    verl divides by global counts (``config.global_batch_info``: dp_size, batch_num_tokens, global_batch_size,
    loss_scale_factor) so the loss is invariant to how a mini-batch is split; without them, by this batch's.
    For "seq-mean-token-sum-norm" verl's N is the responses with a valid token and H the padded width (or
    ``loss_scale_factor``).
    """
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode: expected one of {list(AGG_MODES)}, found {loss_agg_mode!r}")
    info = dict(_config_get(config, "global_batch_info", None) or {})
    kw: dict[str, Any] = dict(agg=loss_agg_mode, dp_size=int(info.get("dp_size") or 1),
                              batch_num_tokens=info.get("batch_num_tokens"),
                              global_batch_size=info.get("global_batch_size"))
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale = info.get("loss_scale_factor")
        kw["max_len"] = mask.shape[-1] if scale is None else scale
        if kw["global_batch_size"] is None:
            kw["global_batch_size"] = mask.any(dim=-1).sum().clamp(min=1)
    return kw


# -- step clock and recorder (one per process) ------------------------------------------------------------
class _Capture:
    """Per-process recorder and step clock for the verl losses (see the module docstring)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.recorder = None
        self.explicit_step: int | None = None
        self.step = 0
        self.update = 0
        self.calls = 0
        self.last_call = None
        self.metric_sums: dict[str, list[float]] = {}
        self.positions = PositionWindow()  # the step's tokens: pos/* pooled over its loss calls
        self.figure_meta: tuple[str, dict] | None = None
        self.method = None

    def _rank(self) -> int:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return int(torch.distributed.get_rank())
        return int(os.environ.get("RANK", 0))

    def open(self, *, anchor: str, rule: str, params: dict, loss_config=None):
        if self.recorder is not None:
            return self.recorder
        run_dir = os.environ.get(ENV_RUN_DIR)
        if not run_dir:
            return _NULL  # not cached: a run directory configured later still takes effect
        per_step = os.environ.get(ENV_CALLS_PER_STEP)
        self.method = (
            "set_step()" if self.explicit_step is not None
            else f"{ENV_CALLS_PER_STEP}={per_step}" if per_step
            else f"idle gap > {self._gap()} s between loss calls"
        )
        config = {
            "verl_version": _verl_version(),
            "logp_rollout_source": "verl old_log_prob: rollout_log_probs (bypass mode)" if anchor == "rollout"
            else "verl old_log_prob: actor-recomputed pi_old (decoupled mode)",
            "step_source": self.method,
            "keys": "step = training step; update = loss call in the step; seq_id = update * B + row",
            "rollout_correction": rollout_correction_settings(loss_config),
            "rollout_is_weights": "multiplied into the loss when verl passes them (decoupled mode TIS/MIS)",
        }
        self.figure_meta = (rule, dict(params))
        import cppo_diag.analyses.aggregate  # noqa: F401 - registers the recorder's write-time aggregates
        self.recorder = RunRecorder(
            run_dir, name=os.environ.get(ENV_RUN_NAME) or None, config=config, trainer="verl", rule=rule,
            rule_params=params, anchor=anchor, rank=self._rank(), on_error="warn", sinks=sink_names(),
        )
        atexit.register(self.close)  # runs before the recorder's own atexit hook (LIFO)
        return self.recorder

    @staticmethod
    def _gap() -> float:
        return float(os.environ.get(ENV_STEP_GAP_S, "10"))

    def set_step(self, step: int) -> None:
        with self.lock:
            step = int(step)
            if self.explicit_step is None or step != self.explicit_step:
                self._advance(step)
            self.explicit_step = step

    def _advance(self, new_step: int) -> None:
        if new_step != self.step:
            self._flush_metrics()
            self.step, self.update = new_step, 0

    def tick(self) -> tuple[int, int]:
        """(step, update) for the loss call happening now."""
        with self.lock:
            now = time.monotonic()
            if self.explicit_step is None:
                per_step = os.environ.get(ENV_CALLS_PER_STEP)
                if per_step:
                    self._advance(self.calls // max(int(per_step), 1))
                elif self.last_call is not None and now - self.last_call > self._gap():
                    self._advance(self.step + 1)
            self.last_call = now
            self.calls += 1
            step, update = self.step, self.update
            self.update += 1
            return step, update

    def add_metrics(self, metrics: dict[str, float]) -> None:
        """Accumulate this loss call's metrics; their mean over the step's calls is logged when it ends."""
        with self.lock:
            for k, v in metrics.items():
                self.metric_sums.setdefault(k, []).append(float(v))

    def add_positions(self, logp, logp_rollout, mask, keep) -> None:
        with self.lock:
            self.positions.add(logp, logp_rollout, mask, keep)

    def _flush_metrics(self) -> None:
        tokens = self.positions.tokens()
        self.positions.clear()
        if self.recorder is not None:
            values = {k: sum(v) / len(v) for k, v in self.metric_sums.items() if not k.startswith(M.POS)}
            if tokens is not None:
                values.update(position_scalars(tokens))  # pooled over the step's loss calls
            if values:
                self.recorder.log_scalars(self.step, values)
            if tokens is not None and self.recorder.has_sinks and figure_due(self.step, _figure_every()):
                rule, params = self.figure_meta or (None, None)
                figure = position_figure(tokens, step=self.step, rule=rule, rule_params=params,
                                         renderer=_live_renderer())
                self.recorder.log_figure(self.step, M.POS_FIGURE, figure)
        self.metric_sums = {}

    def close(self) -> None:
        with self.lock:
            if self.recorder is None:
                return
            self._flush_metrics()
            self.recorder.close()
            self.recorder = None


_CAPTURE = _Capture()
_NULL = NullRecorder()


def set_step(step: int) -> None:
    """Tell the capture which training step the following loss calls belong to (overrides the heuristics)."""
    _CAPTURE.set_step(step)


def close() -> None:
    """Flush and close this process's recorder (also done at interpreter exit)."""
    _CAPTURE.close()


def _verl_version() -> str | None:
    try:
        import verl

        return getattr(verl, "__version__", None)
    except Exception:  # noqa: BLE001
        return None


# -- the loss -----------------------------------------------------------------------------------------------
def _rule_loss(rule: str, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
               rollout_is_weights, *, anchor: str):
    mask = response_mask.to(torch.bool)  # (B, T)
    params = _rule_params(rule, config)
    mu = old_log_prob.detach()  # (B, T): the anchor verl provides (pi_old, or mu in bypass mode)
    batch = log_prob.shape[0]
    rec = _CAPTURE.open(anchor=anchor, rule=rule, params=params, loss_config=config)
    step, update = _CAPTURE.tick() if rec else (None, 0)
    seq_ids = update * batch + torch.arange(batch)  # (B,): the keys logged below (cppo_shuffled seeds on them)
    res = compute_mask(rule, logp=log_prob.detach(), logp_rollout=mu, advantages=advantages,
                       response_mask=mask, seq_ids=seq_ids, step=step, **params)
    if rollout_is_weights is not None:  # verl's rollout correction (TIS/MIS) multiplies the per-token loss
        w = rollout_is_weights.detach().to(log_prob.dtype)
        if res.loss_form == "drpo":
            warnings.warn(f"cppo-diag rule {rule!r}: verl rollout_is_weights are ignored by the drpo loss form",
                          stacklevel=3)
        elif res.weight is not None:
            res.weight = res.weight.to(w.dtype) * w
        elif res.loss_form == "is_weight":  # the IS weight defaults to rho; keep it and apply verl's on top
            rho = ratio(log_prob.detach(), mu)  # (B, T)
            res.weight = rho * w
        else:
            res.weight = w
    loss, loss_metrics = policy_loss(log_prob, mu, advantages, mask, res, rule=rule,
                                     **_verl_agg_kwargs(mask, loss_agg_mode, config))
    metrics = {**res.metrics, **loss_metrics}
    # verl's dashboards read these two names for every policy loss
    metrics["actor/pg_clipfrac"] = 1.0 - float(loss_metrics.get(M.LOSS_KEPT_FRAC, 1.0))
    metrics["actor/ppo_kl"] = float(masked_mean(mu - log_prob.detach(), mask))
    if anchor == "rollout":  # bypass mode: verl's own bypass loss reports these off-policy diagnostics
        metrics.update(verl_rollout_corr_scalars(log_prob.detach(), mu, mask))
    # pos/* of this call reach verl's tracker through the metrics dict (verl averages them over calls);
    # the recorded ones are pooled over the step's calls. Non-finite ratios are left out of verl's dict.
    pos = position_scalars(position_tokens(log_prob, mu, mask, res.keep))
    metrics.update({k: v for k, v in pos.items() if math.isfinite(v)})
    if rec:
        _CAPTURE.add_positions(log_prob, mu, mask, res.keep)
        rec.log_tokens(
            step=step, update=update, seq_ids=seq_ids, logp=log_prob.detach(),
            logp_rollout=mu, advantages=advantages, response_mask=mask, keep_applied=res.keep,
            reason_applied=res.reason,
        )
        _CAPTURE.add_metrics(metrics)
    return loss, metrics


def make_policy_loss(rule: str):
    """A verl ``PolicyLossFn`` for cppo-diag rule ``rule`` (anchored to verl's ``old_log_prob``)."""
    get_rule(rule)  # raises, listing the known rules

    def cppo_diag_policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config=None,
        rollout_is_weights: torch.Tensor | None = None,
        **_ignored,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return _rule_loss(rule, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                          rollout_is_weights, anchor="old")

    cppo_diag_policy_loss.__name__ = f"cppo_diag_policy_loss_{rule}"
    cppo_diag_policy_loss.__doc__ = f"cppo-diag rule {rule!r} as a verl policy loss (see cppo_diag.integrations.verl)."
    return cppo_diag_policy_loss


def _rule_from_loss_type(loss_type) -> str | None:
    if not isinstance(loss_type, str):
        return None
    name = loss_type[len(PREFIX):] if loss_type.startswith(PREFIX) else loss_type
    try:
        get_rule(name)
    except Exception:  # noqa: BLE001 - not one of ours: verl's own loss type
        return None
    return name


def _bypass_mode_with_rules(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                            config=None, rollout_is_weights=None, **kwargs):
    """verl's ``bypass_mode`` loss, plus: ``rollout_correction.loss_type=<cppo-diag rule>`` runs that rule
    anchored to the rollout log-probs (bypass mode sets ``old_log_prob = rollout_log_probs``)."""
    policy_cfg = _config_get(config, "policy_loss")
    corr = _config_get(policy_cfg, "rollout_correction")
    rule = _rule_from_loss_type(_config_get(corr, "loss_type"))
    if rule is None:
        return _ORIGINAL_BYPASS(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode=loss_agg_mode,
                                config=config, rollout_is_weights=rollout_is_weights, **kwargs)
    return _rule_loss(rule, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, None,
                      anchor="rollout")


def register() -> list[str]:
    """Register cppo-diag's rules (and the bypass-mode dispatch) with verl; idempotent. Returns the names.
    ``CPPO_DIAG_SINKS`` is checked here, when a worker imports the plug-in, not at the first loss call."""
    global _ORIGINAL_BYPASS
    sink_names()
    _figure_every()
    registry = core_algos.POLICY_LOSS_REGISTRY
    for spec in list_rules():
        fn = make_policy_loss(spec.name)
        names = [PREFIX + spec.name]
        existing = registry.get(spec.name)
        if existing is None or getattr(existing, "__name__", "").startswith("cppo_diag_policy_loss_"):
            names.append(spec.name)
        for name in names:
            core_algos.register_policy_loss(name)(fn)
            if name not in _REGISTERED:
                _REGISTERED.append(name)
    bypass = registry.get("bypass_mode")
    if bypass is not None and bypass is not _bypass_mode_with_rules:
        _ORIGINAL_BYPASS = bypass
        registry["bypass_mode"] = _bypass_mode_with_rules
    return list(_REGISTERED)


def registered_names() -> list[str]:
    """Loss-mode names this module registered in verl."""
    return list(_REGISTERED)


register()


def _live_renderer():
    """The live figure's renderer (analyses sit above capture, which only holds the figure's data)."""
    from cppo_diag.analyses.plots_mpl import fig_live_position

    return fig_live_position
