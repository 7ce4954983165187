"""TRL plug-in: per-token capture for ``GRPOTrainer`` and, optionally, any cppo-diag rule as its loss.

Usage (a drop-in replacement for ``trl.GRPOTrainer``)::

    from cppo_diag.integrations.trl import CppoDiagConfig, CppoDiagGRPOTrainer

    trainer = CppoDiagGRPOTrainer(
        model=model, reward_funcs=reward_fn, args=GRPOConfig(...), train_dataset=ds,
        cppo_diag=CppoDiagConfig(run_dir="runs", name="grpo-cppo",
                                 rule="cppo", rule_params={"delta": 0.15}),   # rule=None: TRL's own loss
    )
    trainer.train()            # then: cppo_diag.open_run("runs/grpo-cppo").tokens()

If you already subclass ``GRPOTrainer``, put ``CppoDiagGRPOMixin`` first in the bases instead.

What is recorded, per micro-batch that reaches ``_compute_loss`` (training only, not evaluation):

========================  ==================================================================================
column                    TRL source
========================  ==================================================================================
``logp``                  ``per_token_logps`` of the current policy at loss time (detached)
``logp_rollout``          ``sampling_per_token_logps`` (vLLM, the sampler mu) if present, else
                          ``old_per_token_logps`` (pi_old = the generating model when TRL samples with
                          ``model.generate``), else the detached current log-probs (``num_iterations == 1``
                          without vLLM: TRL skips the old-policy pass because pi_old == pi at that point)
``logp_old``              TRL-loss mode: the pi_old TRL's ratio used (``old_per_token_logps``, or the detached
                          current log-probs where TRL skips that pass, exactly as TRL substitutes them); rule
                          mode: ``old_per_token_logps`` when TRL computed it
``advantage``             ``advantages`` (one value per sequence)
valid tokens              ``completion_mask`` (times ``tool_mask`` when tools are used)
``token_id``/``entropy``  ``completion_ids`` / the entropies TRL computes in the same forward pass
``reward``/``group_id``   the weighted reward sum of each completion and its prompt group (see below)
``keep_applied``          rule mode: the rule's mask. TRL-loss mode, token-level ``grpo``/``bnpo``/``dr_grpo``/
                          ``dapo``/``luspo``: False where TRL's clip zeroes the gradient (ratio vs pi_old
                          outside [1-eps_low, 1+eps_high] on the advantage's side, or above ``args.delta``)
========================  ==================================================================================

Keys: ``step`` = ``trainer.state.global_step`` (the optimiser step being computed), ``update`` = the index
of the micro-batch inside that optimiser step (gradient accumulation), ``seq_id`` = ``update * B + row``.
``meta.json`` records what the applied mask was anchored to, so ``cppo-diag report`` / ``recompute`` work on
the run without options: in TRL-loss mode ``anchor`` is "old" (TRL's clip ratio is taken against pi_old,
always written as ``logp_old``) and, for token-level clipped losses without ``delta``, ``rule`` is
``grpo_clip`` with TRL's own ``epsilon_low`` / ``epsilon_high`` as ``rule_params`` (TRL's clip *is* that rule;
``config.loss`` names TRL's loss type); in rule mode ``anchor`` is "rollout" (the rule's ratio is taken
against ``logp_rollout``). ``config.logp_rollout_source`` says which source filled ``logp_rollout``.

Step scalars: cppo-diag's own metrics (rule mode: the rule's ``mask/<rule>/*`` and the loss's ``loss/*``);
beside them, under TRL's names, ``clip_ratio/{low,high,region}_mean`` computed from the recorded mask
whenever it is a ratio clip (``cppo_diag.integrations.names``), so they can be laid next to TRL's dashboard;
and TRL's own logged values under ``trl/<name>`` (``trl/clip_ratio/region_mean`` ...), except those that
only echo cppo-diag's metrics back (rule mode), which are not recorded twice. With several processes ours
are this process's shares, TRL's are pooled over processes.

Live per-position metrics (``cppo_diag.capture.position_live``): ``pos/*`` of every training micro-batch go into
TRL's own logs (its ``report_to``), and pooled over the optimiser step into the recorded scalars;
``CppoDiagConfig.sinks`` sends the recorded scalars and, every ``position_figure_every`` steps, the
divergence-by-position figure to TensorBoard / W&B through ``RunRecorder``'s sinks.

vLLM (``use_vllm=True``, TRL-loss mode): ``logp_rollout`` is vLLM's sampling log-probs and TRL's importance-
sampling correction is recorded as TRL applied it (``importance_sampling_ratio`` from TRL's batch):
``loss_weight`` = the ratio per token; in ``*_mask`` modes the tokens it zeroes are masked in ``keep_applied``
with reason ``token`` / ``sequence``; ``meta.json`` ``config.vllm_importance_sampling`` holds the settings
and ``vllm_is_correction`` recomputes it from recorded columns. A server answer without log-probs raises a
clear error at the first generation.

An existing run directory is refused unless ``CppoDiagConfig.if_exists`` says "overwrite" (replace it) or
"resume" (append to it, e.g. with ``resume_from_checkpoint``). Rule names, ``rule_params`` keys and values,
``agg`` and ``trunc_cap`` are checked when the trainer is built, before any generation.

The private methods wrapped (``_HOOKS``, and with vLLM ``_VLLM_HOOKS``) are checked when the trainer is built:
a TRL release that removed one or renamed its parameters is refused, naming the version and the method.

Why a ``GRPOTrainer`` subclass and not only a ``TrainerCallback``: callbacks see the state, the model and the
logged scalars, never the per-token tensors of a loss computation. The plug-in therefore wraps three methods
that have kept their names and return values across TRL's recent releases (``_compute_loss``,
``_get_per_token_logps_and_entropies`` and ``_generate_and_score_completions``) and leaves their bodies to TRL:
in recording mode it only observes (the first ``_get_per_token_logps_and_entropies`` call inside
``_compute_loss`` is the loss-time forward), so TRL's loss, metrics and gradients are untouched. Step scalars
(TRL's logged metrics, prefixed ``trl/``) and step completion go through ``CppoDiagCallback``.

Rule mode (``CppoDiagConfig.rule`` set) replaces TRL's clipped surrogate with
``cppo_diag.masks.compute_mask`` + ``cppo_diag.loss.policy_loss`` anchored to mu (``logp_rollout`` above);
TRL's ``loss_type``/``epsilon`` are then unused, TRL's separate vLLM importance-sampling correction is not
applied (the ratio is already taken against the sampler), and a KL term (``beta > 0``) is added as TRL does.
Options that would silently change which tokens train (``top_entropy_quantile < 1``,
``off_policy_mask_threshold``, an entropy bonus, sequence-level importance sampling) are refused.
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

try:  # TRL is an optional dependency: the error below names the extra to install.
    import trl as _trl
    from transformers import TrainerCallback
    from trl import GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without TRL
    raise ImportError(
        "cppo_diag.integrations.trl needs TRL and transformers: pip install 'cppo-diag[trl]'"
    ) from exc

from cppo_diag import metric_names as M
from cppo_diag.capture import NullRecorder, RunRecorder
from cppo_diag.capture.position_live import PositionWindow, figure_due, position_figure, position_scalars, position_tokens
from cppo_diag.capture.sinks import check_sinks_installed
from cppo_diag.integrations.names import clip_ratio_scalars
from cppo_diag.masks.logratio import kl_k3, log_ratio
from cppo_diag.masks.reasons import Reason
from cppo_diag.storage.meta import is_run_dir

logger = logging.getLogger(__name__)

__all__ = ["CppoDiagConfig", "CppoDiagGRPOMixin", "CppoDiagGRPOTrainer", "CppoDiagCallback"]

# TRL loss types whose per-token clip we can reproduce as keep_applied (token-level importance sampling).
_CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# Multimodal / extra forward inputs that TRL passes from `inputs` to its log-prob forward.
_FORWARD_EXTRAS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)
IF_EXISTS = ("error", "overwrite", "resume")
# TRL's private methods the plug-in wraps, with the parameters it relies on (checked when the trainer is built).
_HOOKS = {
    "_compute_loss": ("model", "inputs"),
    "_get_per_token_logps_and_entropies": ("model", "input_ids", "attention_mask", "logits_to_keep"),
    "_generate_and_score_completions": (),
    "_calculate_rewards": (),
}
_VLLM_HOOKS = {"_generate_single_turn": ("prompt_ids", "num_generations")}  # use_vllm: its log-probs are checked
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
_GROUP_KEY = "cppo_diag_group_id"
_REWARD_KEY = "cppo_diag_reward"


def _response_mask(inputs) -> torch.Tensor:
    """(B, T) bool: the completion tokens TRL trains on (``completion_mask`` times ``tool_mask`` if present)."""
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    return mask.bool()


@dataclass
class CppoDiagConfig:
    """Configuration of the TRL plug-in (all fields optional; the defaults record nothing extra).

    Attributes:
        run_dir: root directory of runs (with ``name``) or the run directory itself. ``None`` disables
            recording (a ``NullRecorder``); rule mode still works.
        name: run name (the run directory is ``run_dir / name``).
        rule: a registered cppo-diag rule (``cppo_diag.masks.list_rules()``) that replaces TRL's clipped
            loss; ``None`` keeps TRL's loss and only records.
        rule_params: keyword parameters of the rule (SPEC.md names: ``delta``, ``w_min``, ``eps_high`` ...).
        agg: loss aggregation of ``cppo_diag.loss.policy_loss`` ("token-mean" | "seq-mean-token-sum-norm").
        trunc_cap: truncation cap C of the policy loss (None: the loss module's default).
        record_sequences: also record prompt/completion text, token strings and rewards per sequence.
        every_n_steps, seq_fraction, on_error: passed to ``RunRecorder``.
        task: free-form task name stored in ``meta.json``.
        if_exists: what to do when the run directory already holds a run: "error" (default: refuse, naming
            the two other choices), "overwrite" (delete that run first) or "resume" (append to it; steps it
            already completed are not written again).
        sinks: also send the recorded step scalars (and the divergence-by-position figure) to these
            (``"tensorboard"``, ``"wandb"``), through ``RunRecorder``'s sink code: a sink that fails warns once
            and is switched off, the run's own scalars stay complete. A sink whose package is missing is
            refused when the trainer is built, naming the extra to install.
        position_figure_every: with a sink, the divergence-by-position figure every n optimiser steps (0: off).
    """

    run_dir: str | Path | None = None
    name: str | None = None
    rule: str | None = None
    rule_params: dict[str, Any] = field(default_factory=dict)
    agg: str = "token-mean"
    trunc_cap: float | None = None
    record_sequences: bool = True
    every_n_steps: int = 1
    seq_fraction: float = 1.0
    on_error: str = "warn"
    task: str | None = None
    if_exists: str = "error"
    sinks: list[str] = field(default_factory=list)
    position_figure_every: int = 10

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, the expected and the found value (before any training)."""
        from cppo_diag.loss import AGG_MODES
        from cppo_diag.masks import compute_mask, get_rule

        check_sinks_installed(self.sinks, "CppoDiagConfig.sinks")  # unknown name, or the extra to install
        if isinstance(self.position_figure_every, bool) or not isinstance(self.position_figure_every, int) \
                or self.position_figure_every < 0:
            raise ValueError("CppoDiagConfig.position_figure_every: expected an integer >= 0, found "
                             f"{self.position_figure_every!r}")
        if self.if_exists not in IF_EXISTS:
            raise ValueError(f"CppoDiagConfig.if_exists: expected one of {list(IF_EXISTS)}, found {self.if_exists!r}")
        if self.agg not in AGG_MODES:
            raise ValueError(f"CppoDiagConfig.agg: expected one of {list(AGG_MODES)}, found {self.agg!r}")
        if self.trunc_cap is not None and not (isinstance(self.trunc_cap, (int, float)) and self.trunc_cap > 0):
            raise ValueError(f"CppoDiagConfig.trunc_cap: expected None or a number > 0, found {self.trunc_cap!r}")
        if self.rule is None:
            if self.rule_params:
                raise ValueError("CppoDiagConfig.rule_params: expected {} when rule is None (TRL's own loss), "
                                 f"found {dict(self.rule_params)!r}; set rule to apply them")
            return
        accepted = get_rule(self.rule).params  # raises, listing the known rules
        unknown = sorted(set(self.rule_params) - set(accepted))
        if unknown:
            raise ValueError(f"CppoDiagConfig.rule_params: rule {self.rule!r} takes {sorted(accepted)}, "
                             f"found unknown key(s) {unknown}")
        try:  # the values: run the rule once on a two-token batch
            compute_mask(self.rule, logp=torch.zeros(1, 2), logp_rollout=torch.zeros(1, 2),
                         advantages=torch.ones(1), response_mask=torch.ones(1, 2, dtype=torch.bool),
                         **self.rule_params)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"CppoDiagConfig.rule_params of rule {self.rule!r}: {exc}") from None


class CppoDiagCallback(TrainerCallback):
    """Step bookkeeping for the plug-in: TRL's logged scalars -> ``trl/<name>``, step completion, close.

    Added automatically by ``CppoDiagGRPOMixin``; it only observes (never touches ``control``).
    """

    def __init__(self, trainer: "CppoDiagGRPOMixin"):
        self._trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self._trainer._cd_step_finished(state.global_step - 1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or state.global_step < 1:
            return
        values = {}
        echoed = self._trainer._cd_echoed
        for key, value in logs.items():
            if key in echoed:  # rule mode: our own metric that TRL logs back; already recorded per step
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            values[f"trl/{key}"] = float(value)
        if values:
            self._trainer._cd_recorder.log_scalars(state.global_step - 1, values)
        self._trainer._cd_end_pending()

    def on_step_begin(self, args, state, control, **kwargs):
        self._trainer._cd_end_pending()

    def on_train_end(self, args, state, control, **kwargs):
        self._trainer._cd_end_pending()
        self._trainer._cd_recorder.close()


class CppoDiagGRPOMixin:
    """Mixin for ``GRPOTrainer`` (or a subclass of it): per-token capture + optional cppo-diag rule loss.

    Keyword argument ``cppo_diag``: a ``CppoDiagConfig`` (or a dict of its fields). Everything else goes to
    the trainer unchanged.
    """

    def __init__(self, *args, cppo_diag: CppoDiagConfig | dict | None = None, **kwargs):
        cfg = cppo_diag if isinstance(cppo_diag, CppoDiagConfig) else CppoDiagConfig(**(cppo_diag or {}))
        cfg.validate()  # before the model loads and long before the first generation
        check_trl_hooks(type(self), vllm=_wants_vllm(args, kwargs))
        self._cd_cfg = cfg
        self._cd_echoed: set[str] = set()  # our metrics pushed into TRL's logs (rule mode)
        self._cd_capture: dict[str, Any] | None = None
        self._cd_micro = 0
        self._cd_micro_step = -1
        self._cd_pending: set[int] = set()
        self._cd_step_metrics: dict[str, list[float]] = {}
        self._cd_positions = PositionWindow()  # the step's tokens, for the pooled pos/* scalars
        self._cd_generation_round = 0
        self._cd_rewards_per_func: torch.Tensor | None = None
        self._cd_recorder = NullRecorder()
        super().__init__(*args, **kwargs)
        if cfg.rule is not None:
            self._cd_check_rule_mode()
        if getattr(self, "use_vllm", False):
            self._cd_watch_vllm()
        self._cd_recorder = self._cd_open_recorder()
        self.add_callback(CppoDiagCallback(self))

    # -- set-up ---------------------------------------------------------------------------------------
    def _cd_check_rule_mode(self) -> None:
        args = self.args
        problems = []
        if getattr(self, "top_entropy_quantile", 1.0) < 1.0:
            problems.append(f"top_entropy_quantile: expected 1.0, found {self.top_entropy_quantile}")
        if getattr(self, "off_policy_mask_threshold", None) is not None:
            problems.append(f"off_policy_mask_threshold: expected None, found {self.off_policy_mask_threshold}")
        if getattr(self, "_entropy_bonus_enabled", False):
            problems.append("entropy bonus: expected disabled (entropy_coef 0, no adaptive entropy)")
        if getattr(self, "importance_sampling_level", "token") != "token":
            problems.append(f"importance_sampling_level: expected 'token', found {self.importance_sampling_level!r}")
        if getattr(args, "use_liger_kernel", False) or getattr(args, "use_liger_loss", False):
            problems.append("use_liger_kernel: expected False (Liger computes its own fused loss)")
        if problems:
            raise ValueError(
                f"CppoDiagConfig.rule={self._cd_cfg.rule!r} replaces TRL's loss; these GRPOConfig options "
                "would change which tokens train behind the rule's back: " + "; ".join(problems)
            )

    def _cd_anchor(self) -> tuple[str, str]:
        """(meta anchor, description of what fills logp_rollout): what the applied mask's ratio used."""
        if getattr(self, "use_vllm", False):
            source = "sampling_per_token_logps (vLLM sampler)"
        else:
            source = ("old_per_token_logps (pi_old = the generating model), or the detached current log-probs "
                      "where TRL skips that pass (pi_old == pi)")
        return ("rollout" if self._cd_cfg.rule is not None else "old"), source

    def _cd_trl_clip_is_grpo_clip(self) -> bool:
        """TRL's own loss masks exactly what cppo-diag's ``grpo_clip`` masks (anchored to pi_old)."""
        return (self._cd_cfg.rule is None and getattr(self, "loss_type", None) in _CLIPPED_LOSS_TYPES
                and getattr(self, "importance_sampling_level", "token") == "token"
                and getattr(self.args, "delta", None) is None)

    def _cd_applied_rule(self) -> tuple[str | None, dict | None]:
        """(meta rule, rule_params): the cppo-diag rule, or ``grpo_clip`` at TRL's epsilons for TRL's clip."""
        cfg = self._cd_cfg
        if cfg.rule is not None:
            return cfg.rule, dict(cfg.rule_params)
        if self._cd_trl_clip_is_grpo_clip():
            return "grpo_clip", {"eps_low": float(self.epsilon_low), "eps_high": float(self.epsilon_high)}
        return None, None

    def _cd_prepare_run_dir(self, run_dir: Path) -> None:
        """Apply ``if_exists`` to an existing run (every process checks before any opens its recorder)."""
        mode = self._cd_cfg.if_exists
        exists = is_run_dir(run_dir)
        if exists and mode == "error":
            raise FileExistsError(
                f"CppoDiagConfig: run directory {run_dir} already holds a run; pass if_exists='overwrite' to "
                "replace it, if_exists='resume' to append to it (e.g. with resume_from_checkpoint), or another name"
            )
        if exists and mode == "overwrite" and self.accelerator.is_main_process:
            import shutil

            shutil.rmtree(run_dir)
        self.accelerator.wait_for_everyone()

    def _cd_open_recorder(self):
        cfg = self._cd_cfg
        if cfg.run_dir is None:
            return NullRecorder()
        anchor, source = self._cd_anchor()
        rule, rule_params = self._cd_applied_rule()
        self._cd_prepare_run_dir(Path(cfg.run_dir) / cfg.name if cfg.name else Path(cfg.run_dir))
        model_name = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
        config = {
            "trl_version": getattr(_trl, "__version__", None),
            "logp_rollout_source": source,
            "loss": f"cppo-diag rule {cfg.rule}" if cfg.rule else f"trl loss_type={getattr(self, 'loss_type', None)}"
                    + (" (its clip = grpo_clip at TRL's epsilons)" if rule and not cfg.rule else ""),
            "num_generations": getattr(self, "num_generations", None),
            "num_iterations": getattr(self, "num_iterations", None),
            "steps_per_generation": getattr(self.args, "steps_per_generation", None),
            "gradient_accumulation_steps": getattr(self.args, "gradient_accumulation_steps", None),
            "per_device_train_batch_size": getattr(self.args, "per_device_train_batch_size", None),
            "max_completion_length": getattr(self, "max_completion_length", None),
            "epsilon_low": getattr(self, "epsilon_low", None),
            "epsilon_high": getattr(self, "epsilon_high", None),
            "beta": getattr(self, "beta", None),
            "use_vllm": getattr(self, "use_vllm", False),
            "vllm_importance_sampling": self._cd_vllm_is_settings(),
            "cppo_diag": {k: v for k, v in asdict(cfg).items() if k not in ("run_dir",)},
            "keys": "step = optimiser step; update = micro-batch in the step; seq_id = update * B + row",
        }
        import cppo_diag.analyses.aggregate  # noqa: F401 - registers the recorder's write-time aggregates
        return RunRecorder(
            cfg.run_dir, name=cfg.name, config=config, trainer="trl", rule=rule, rule_params=rule_params,
            model=model_name, task=cfg.task, anchor=anchor, rank=self.accelerator.process_index,
            on_error=cfg.on_error, every_n_steps=cfg.every_n_steps, seq_fraction=cfg.seq_fraction,
            sinks=list(cfg.sinks),
        )

    # -- step bookkeeping (called by CppoDiagCallback) ------------------------------------------------
    def _cd_step_finished(self, step: int) -> None:
        means = {k: sum(v) / len(v) for k, v in self._cd_step_metrics.items() if v}
        self._cd_step_metrics = {}
        tokens = self._cd_positions.tokens()
        self._cd_positions.clear()
        if tokens is not None:
            means.update(position_scalars(tokens))  # pooled over the step's micro-batches (not a mean of them)
        if means:
            self._cd_recorder.log_scalars(step, means)
        rec = self._cd_recorder
        if tokens is not None and getattr(rec, "has_sinks", False) and figure_due(step, self._cd_cfg.position_figure_every):
            meta_rule, meta_params = self._cd_applied_rule()
            rec.log_figure(step, M.POS_FIGURE, position_figure(tokens, step=step, rule=meta_rule,
                                                               rule_params=meta_params, renderer=_live_renderer()))
        self._cd_pending.add(step)

    def _cd_end_pending(self) -> None:
        for step in sorted(self._cd_pending):
            self._cd_recorder.end_step(step)
        self._cd_pending.clear()

    # -- wrapped TRL methods ----------------------------------------------------------------------------
    def _calculate_rewards(self, *args, **kwargs):
        rewards_per_func = super()._calculate_rewards(*args, **kwargs)
        self._cd_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, *args, **kwargs):
        output = super()._generate_and_score_completions(*args, **kwargs)
        try:
            self._cd_tag_generation(output)
        except Exception as exc:  # tagging is diagnostics only: never break generation
            logger.warning("cppo-diag: could not tag generation batch with group ids/rewards: %r", exc)
        return output

    def _cd_tag_generation(self, output: dict) -> None:
        """Add per-row group ids and rewards to TRL's batch dict (shuffled/split with it by TRL)."""
        completion_ids = output["completion_ids"]
        n_local = completion_ids.shape[0]
        device = completion_ids.device
        rank = self.accelerator.process_index
        world = self.accelerator.num_processes
        # TRL's sampler puts each prompt's num_generations completions next to each other in the global
        # batch (rewards are grouped with .view(-1, num_generations)), and this process holds rows
        # [rank * n_local, (rank + 1) * n_local) of it.
        global_rows = rank * n_local + torch.arange(n_local, device=device)
        offset = self._cd_generation_round * world * n_local
        output[_GROUP_KEY] = (offset + global_rows) // int(self.num_generations)  # (B,)
        self._cd_generation_round += 1
        rpf = self._cd_rewards_per_func
        self._cd_rewards_per_func = None
        if rpf is not None and rpf.shape[0] == world * n_local:
            weights = self.reward_weights.to(rpf.device, rpf.dtype)
            rewards = (rpf * weights.unsqueeze(0)).nansum(dim=1)  # (B_global,)
            rewards = rewards[rank * n_local:(rank + 1) * n_local]
            output[_REWARD_KEY] = rewards.to(device=device, dtype=torch.float32)  # (B,)

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        cap = self._cd_capture
        if cap is not None and "logp" not in cap:  # first call inside _compute_loss = loss-time forward
            cap["logp"] = out[0].detach()
            cap["entropy"] = out[1].detach() if len(out) > 1 and out[1] is not None else None
        return out

    def _compute_loss(self, model, inputs):
        if self._cd_cfg.rule is not None:
            return self._cd_rule_loss(model, inputs)
        self._cd_capture = {}
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            captured, self._cd_capture = self._cd_capture, None
        if self.model.training and "logp" in captured:
            keep = self._cd_trl_keep(captured["logp"], inputs)
            if keep is not None and self._cd_trl_clip_is_grpo_clip():
                self._cd_add_step_metrics(clip_ratio_scalars(keep, inputs["advantages"], _response_mask(inputs)))
            reason = None if keep is None else torch.where(keep, Reason.KEPT, Reason.TOKEN).to(torch.uint8)
            weight = None
            applied = self._cd_vllm_is_applied(inputs)
            if applied is not None:  # TRL's vLLM importance-sampling correction, as TRL multiplied it in
                mask = _response_mask(inputs)  # (B, T)
                weight = applied.to(torch.float32).expand(mask.shape)  # (B, T): (B, 1) in sequence modes
                is_masked = (weight == 0) & mask if self.vllm_importance_sampling_mode.endswith("_mask") else None
                if is_masked is not None:
                    code = Reason.SEQUENCE if self.vllm_importance_sampling_mode.startswith("sequence") else Reason.TOKEN
                    keep = (~is_masked) if keep is None else keep & ~is_masked
                    reason = torch.where(keep, Reason.KEPT, Reason.TOKEN).to(torch.uint8) if reason is None else reason
                    reason = torch.where(is_masked & (reason == Reason.KEPT), code, reason).to(torch.uint8)
            self._cd_record(inputs, captured["logp"], captured.get("entropy"), keep=keep, reason=reason,
                            loss_weight=weight)
        return loss

    # -- vLLM ---------------------------------------------------------------------------------------------
    def _cd_vllm_is_settings(self) -> dict | None:
        """TRL's vLLM importance-sampling correction as this trainer runs it (None without vLLM): meta.json's
        ``config.vllm_importance_sampling``, which ``vllm_is_correction`` reads to recompute it."""
        if not getattr(self, "use_vllm", False):
            return None
        args = self.args
        return {
            "correction": bool(getattr(self, "vllm_importance_sampling_correction", False)),
            "applied": self._cd_vllm_is_on(),
            "mode": getattr(self, "vllm_importance_sampling_mode", None),
            "clip_min": getattr(self, "vllm_importance_sampling_clip_min", None),
            "clip_max": getattr(self, "vllm_importance_sampling_clip_max", None),
            "deprecated_cap_given": getattr(args, "vllm_importance_sampling_cap", None) is not None,
            "vllm_mode": getattr(args, "vllm_mode", None),
            "top_p": getattr(self, "top_p", None), "top_k": getattr(self, "top_k", None),
            "temperature": getattr(self, "temperature", None),
        }

    def _cd_vllm_is_on(self) -> bool:
        """Whether TRL multiplies its loss by the vLLM IS ratio (TRL-loss mode; TRL's vespo uses it differently)."""
        return (self._cd_cfg.rule is None and bool(getattr(self, "use_vllm", False))
                and bool(getattr(self, "vllm_importance_sampling_correction", False))
                and getattr(self, "loss_type", None) != "vespo")

    def _cd_vllm_is_applied(self, inputs) -> torch.Tensor | None:
        """(B, T) or (B, 1): the IS ratio TRL's loss multiplied in, read from TRL's own batch."""
        if not self._cd_vllm_is_on():
            return None
        ratio = inputs.get("importance_sampling_ratio")
        return None if ratio is None else ratio.detach()

    def _cd_watch_vllm(self) -> None:
        """Refuse a vLLM server answer without sampling log-probs with a clear error (TRL would fail on a
        ``None`` deep inside its generation step): they are ``logp_rollout`` and TRL's IS correction needs them."""
        gen = getattr(self, "vllm_generation", None)
        if gen is None or not hasattr(gen, "generate"):
            return
        inner = gen.generate

        def generate(*args, **kwargs):
            out = inner(*args, **kwargs)
            completions, logprobs = out[1], out[2]
            if completions and (logprobs is None or any(lp is None for lp in logprobs)):
                where = getattr(getattr(gen, "vllm_client", None), "base_url", None) or getattr(gen, "mode", "vLLM")
                raise RuntimeError(
                    f"cppo-diag: the vLLM server ({where}) returned completions without sampling log-probs; they are "
                    "recorded as logp_rollout and TRL's importance-sampling correction needs them: the request asks "
                    "for logprobs=0, so the server must honour it (vllm serve: --max-logprobs >= 1, and "
                    "--logprobs-mode processed_logprobs)")
            return out

        gen.generate = generate

    def _cd_add_step_metrics(self, metrics: dict[str, float]) -> None:
        """Metrics of one training micro-batch; their mean over the step is logged when it ends."""
        for key, value in metrics.items():
            self._cd_step_metrics.setdefault(key, []).append(float(value))

    # -- rule mode --------------------------------------------------------------------------------------
    def _cd_forward_kwargs(self, inputs) -> dict:
        sig = getattr(self, "_cd_sig", None)
        if sig is None:
            sig = self._cd_sig = inspect.signature(super()._get_per_token_logps_and_entropies).parameters
        kwargs = {k: inputs.get(k) for k in _FORWARD_EXTRAS if k in sig and inputs.get(k) is not None}
        if "compute_entropy" in sig:
            kwargs["compute_entropy"] = True
        if "compute_aux_loss" in sig:
            kwargs["compute_aux_loss"] = bool(getattr(self, "aux_loss_enabled", False))
        return kwargs

    def _cd_rule_loss(self, model, inputs):
        """cppo-diag rule + policy loss in place of TRL's clipped surrogate (SPEC.md "Loss")."""
        from cppo_diag.loss import policy_loss
        from cppo_diag.masks import compute_mask
        from cppo_diag.masks.reduce import masked_mean

        cfg = self._cd_cfg
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P+T)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (B, P+T)
        logits_to_keep = completion_ids.size(1)
        mask = _response_mask(inputs)  # (B, T)
        out = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, **self._cd_forward_kwargs(inputs)
        )
        logp = out[0]  # (B, T), carries grad
        entropy = out[1] if len(out) > 1 else None
        aux_loss = out[2] if len(out) > 2 else None
        logp_rollout, logp_old = self._cd_rollout_and_old(logp, inputs)
        advantages = inputs["advantages"]  # (B,) or (B, T)
        step, seq_ids = self._cd_next_ids(logp.shape[0])  # the keys _cd_record will log (cppo_shuffled seeds)
        res = compute_mask(
            cfg.rule, logp=logp.detach(), logp_rollout=logp_rollout, advantages=advantages,
            response_mask=mask, logp_old=logp_old, seq_ids=seq_ids, step=step, **cfg.rule_params,
        )
        loss_kwargs = {"agg": cfg.agg, "max_len": getattr(self, "max_completion_length", None), "rule": cfg.rule}
        if cfg.trunc_cap is not None:
            loss_kwargs["trunc_cap"] = cfg.trunc_cap
        loss, loss_metrics = policy_loss(logp, logp_rollout, advantages, mask, res, **loss_kwargs)
        mode = "train" if self.model.training else "eval"
        if getattr(self, "beta", 0.0) != 0.0:
            ref = inputs["ref_per_token_logps"]  # (B, T)
            per_token_kl = kl_k3(ref - logp)  # k3 of KL(pi || ref), as TRL (exp(x) - x - 1)
            kl = masked_mean(per_token_kl, mask)
            loss = loss + self.beta * kl
            self._metrics[mode]["kl"].append(float(kl.detach()))
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss
        if mode == "train":  # TRL scales for gradient accumulation itself (HF auto-scaling is off)
            loss = loss / self.current_gradient_accumulation_steps
        for key, value in {**res.metrics, **loss_metrics}.items():
            value = float(value)
            self._metrics[mode][key].append(value)  # shows up in TRL's logs / report_to
            self._cd_echoed.add(key)
            if mode == "train":
                self._cd_step_metrics.setdefault(key, []).append(value)
        if mode == "train" and cfg.rule == "grpo_clip":  # TRL's names for the same clip
            self._cd_add_step_metrics(clip_ratio_scalars(res.keep, advantages, mask))
        if entropy is not None:
            self._metrics[mode]["entropy"].append(float(masked_mean(entropy.detach(), mask)))
        if self.model.training:
            self._cd_record(inputs, logp.detach(), entropy.detach() if entropy is not None else None,
                            keep=res.keep, reason=res.reason)
        return loss

    # -- recording --------------------------------------------------------------------------------------
    def _cd_rollout_and_old(self, logp: torch.Tensor, inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        old = inputs.get("old_per_token_logps")
        sampling = inputs.get("sampling_per_token_logps")
        if sampling is not None:
            rollout = sampling
        elif old is not None:
            rollout = old
        else:  # num_iterations == 1 without vLLM: pi_old == pi (TRL skips the pass for this reason)
            rollout = logp.detach()
        return rollout, old

    def _cd_trl_keep(self, logp: torch.Tensor, inputs) -> torch.Tensor | None:
        """The mask TRL's own clip applied (False = zero gradient), for token-level clipped loss types."""
        if getattr(self, "loss_type", None) not in _CLIPPED_LOSS_TYPES:
            return None
        if getattr(self, "importance_sampling_level", "token") != "token":
            return None
        from cppo_diag.masks import compute_mask, ratio

        old = inputs.get("old_per_token_logps")
        old = logp if old is None else old
        mask = _response_mask(inputs)  # (B, T)
        with torch.no_grad():
            # TRL's clip is grpo_clip anchored to pi_old (check_finite=False: capture never stops training)
            res = compute_mask("grpo_clip", logp=logp, logp_rollout=old, advantages=inputs["advantages"],
                               response_mask=mask, eps_low=float(self.epsilon_low), eps_high=float(self.epsilon_high),
                               check_finite=False)
            keep = res.keep | ~mask  # (B, T); padding counts as kept, as TRL's own mask
            delta = getattr(self.args, "delta", None)
            if delta is not None:  # two-sided clipping: the ratio is clamped at delta on the unclipped branch
                adv = inputs["advantages"]
                adv = adv.unsqueeze(1) if adv.dim() == 1 else adv  # (B, 1) or (B, T)
                keep &= ~((ratio(logp.float(), old.float()) > delta) & (adv < 0))
        return keep

    def _cd_next_ids(self, batch: int):
        """(step, seq_ids (B,)) that the next ``_cd_record`` call will log, without advancing the counter."""
        step = int(self.state.global_step)
        update = self._cd_micro if step == self._cd_micro_step else 0
        return step, update * batch + torch.arange(batch)

    def _cd_record(self, inputs, logp, entropy, *, keep, reason, loss_weight=None) -> None:
        rec = self._cd_recorder
        if not rec:
            return
        step = int(self.state.global_step)
        if step != self._cd_micro_step:
            self._cd_micro_step, self._cd_micro = step, 0
        update = self._cd_micro
        self._cd_micro += 1
        completion_ids = inputs["completion_ids"]  # (B, T)
        mask = _response_mask(inputs)  # (B, T)
        batch = completion_ids.shape[0]
        seq_ids = update * batch + torch.arange(batch)  # (B,)
        logp_rollout, logp_old = self._cd_rollout_and_old(logp, inputs)
        if self._cd_cfg.rule is None and logp_old is None:
            logp_old = logp  # TRL's pi_old when it skips that pass (pi_old == pi): what its clip ratio used
        reason_applied = reason
        if reason is None and keep is not None:
            reason_applied = torch.where(keep, Reason.KEPT, Reason.TOKEN).to(torch.uint8)  # TRL's clip: a token threshold
        self._cd_log_positions(logp, logp_rollout, mask, keep)
        rec.log_tokens(
            step=step, update=update, seq_ids=seq_ids, logp=logp, logp_rollout=logp_rollout, logp_old=logp_old,
            advantages=inputs["advantages"], response_mask=mask, token_ids=completion_ids, entropy=entropy,
            reward=inputs.get(_REWARD_KEY), group_id=inputs.get(_GROUP_KEY), keep_applied=keep,
            reason_applied=reason_applied, loss_weight=loss_weight,
        )
        if self._cd_cfg.record_sequences:
            self._cd_record_sequences(step, seq_ids, inputs, mask)

    def _cd_log_positions(self, logp, logp_rollout, mask, keep) -> None:
        """pos/* of this micro-batch into TRL's logs (its report_to; TRL averages them over its logging window)
        and its tokens into the step's window (the recorded pos/* are pooled over the step)."""
        self._cd_positions.add(logp, logp_rollout, mask, keep)
        for key, value in position_scalars(position_tokens(logp, logp_rollout, mask, keep)).items():
            if math.isfinite(value):
                self._metrics["train"][key].append(value)
                self._cd_echoed.add(key)
        # the live doctor's runaway statistic: DoctorGuardCallback reads it from TRL's logs
        from cppo_diag.analyses.doctor_live import TAIL_METRIC, tail_top10
        d = log_ratio(logp.detach().float(), logp_rollout.float()).abs()[mask.bool()]
        tail = tail_top10(d)
        if tail is not None:
            self._metrics["train"][TAIL_METRIC].append(tail)
            self._cd_echoed.add(TAIL_METRIC)

    def _cd_record_sequences(self, step: int, seq_ids, inputs, mask) -> None:
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        try:
            prompt_ids, prompt_mask = inputs["prompt_ids"].cpu(), inputs["prompt_mask"].bool().cpu()
            completion_ids, mask = inputs["completion_ids"].cpu(), mask.cpu()
            prompts, completions, tokens = [], [], []
            for row in range(completion_ids.shape[0]):
                p = prompt_ids[row][prompt_mask[row]].tolist()
                c = completion_ids[row][mask[row]].tolist()
                # The text the reward functions saw (TRL decodes with skip_special_tokens=True); the token
                # strings keep every trained token (the EOS too: it has a token row).
                prompts.append(tok.decode(p, skip_special_tokens=True))
                completions.append(tok.decode(c, skip_special_tokens=True))
                tokens.append([str(t) for t in tok.convert_ids_to_tokens(c)])
        except Exception as exc:  # text is a convenience; token data is already recorded
            warnings.warn(f"cppo-diag: could not decode sequences at step {step}: {exc!r}", stacklevel=2)
            return
        rewards = inputs.get(_REWARD_KEY)
        group_ids = inputs.get(_GROUP_KEY)
        self._cd_recorder.log_sequences(
            step=step, seq_ids=seq_ids, prompts=prompts, completions=completions, tokens=tokens,
            rewards=rewards.cpu() if rewards is not None else None, lengths=mask.sum(dim=1),
            group_ids=group_ids.cpu() if group_ids is not None else None,
        )


def _wants_vllm(args, kwargs) -> bool:
    targs = kwargs.get("args", args[2] if len(args) > 2 else None)
    return bool(getattr(targs, "use_vllm", False))


def check_trl_hooks(cls, *, vllm: bool = False) -> None:
    """Refuse, before the model loads, a TRL whose private methods the plug-in wraps are gone or renamed their
    parameters (``_HOOKS``; with vLLM also ``_VLLM_HOOKS``), naming the TRL version and the method."""
    version = getattr(_trl, "__version__", "?")
    hooks = {**_HOOKS, **(_VLLM_HOOKS if vllm else {})}
    for name, params in hooks.items():
        fn = None
        for base in cls.__mro__:
            if base.__module__.startswith("cppo_diag.") or name not in vars(base):
                continue
            fn = vars(base)[name]
            break
        if fn is None:
            raise RuntimeError(f"cppo-diag's TRL plug-in: TRL {version} has no GRPOTrainer.{name}, a private hook the "
                               "plug-in wraps; use a TRL release it supports (pyproject.toml extra 'trl')")
        found = list(inspect.signature(fn).parameters)
        missing = [p for p in params if p not in found]
        if missing:
            raise RuntimeError(f"cppo-diag's TRL plug-in: TRL {version} changed GRPOTrainer.{name}, a private hook the "
                               f"plug-in wraps: expected parameters {list(params)}, found {found[1:]}")


def vllm_is_correction(logp_old: torch.Tensor, logp_rollout: torch.Tensor, response_mask: torch.Tensor, *,
                       mode: str, clip_min: float | None, clip_max: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's vLLM importance-sampling correction, recomputed from recorded columns: (weight (B, T), masked (B, T)).

    rho = exp(logp_old - logp_rollout) per valid token (``token_*``) or exp(sum over the response) (``sequence_*``;
    a NaN rollout log-prob counts as 0 difference); ``*_truncate``: clamp(rho, clip_min, clip_max);
    ``*_mask``: rho outside [clip_min, clip_max] (None = unbounded) -> 0, and those tokens masked. The formula
    is TRL's documented one (``GRPOConfig.vllm_importance_sampling_mode``); ``logp_old`` is TRL's pi_old (the
    trainer's recomputed log-probs of the sampled batch), ``logp_rollout`` vLLM's sampling log-probs.
    """
    if mode not in VLLM_IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode: expected one of {list(VLLM_IS_MODES)}, found {mode!r}")
    mask = response_mask.bool()  # (B, T)
    diff = torch.nan_to_num(torch.where(mask, logp_old.double() - logp_rollout.double(), 0.0), nan=0.0)  # (B, T)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)  # (B, 1)
    rho = torch.exp(diff).expand(mask.shape)  # (B, T)
    lo = -math.inf if clip_min is None else float(clip_min)
    hi = math.inf if clip_max is None else float(clip_max)
    if mode.endswith("_truncate"):
        return rho.clamp(min=lo, max=hi), torch.zeros_like(mask)
    masked = ((rho < lo) | (rho > hi)) & mask
    return rho.masked_fill(masked, 0.0), masked


class CppoDiagGRPOTrainer(CppoDiagGRPOMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with cppo-diag capture (and an optional cppo-diag rule): see the module docstring."""


def _live_renderer():
    """The live figure's renderer (analyses sit above capture, which only holds the figure's data)."""
    from cppo_diag.analyses.plots_mpl import fig_live_position

    return fig_live_position
