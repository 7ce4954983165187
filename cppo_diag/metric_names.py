"""The step-scalar names of cppo-diag, defined once (docs/trainer.md "Scalars logged per step" lists them).

Names are slash-namespaced and fixed. The bundled trainer logs them, ``train/step_stats.py`` pools them, the
study, the CLI, the app and the docs read them from here, so a renamed scalar is one edit and a test
(``tests/test_metric_names.py``) checks that the docs list every name.

Families (``<rule>`` is the rule's registered name, ``<d>`` its divergence's short name):

* the rollout batch: ``reward/*``, ``acc/mean``, ``response/*``, ``batch/*``, ``rollout/staleness``
* the updates: ``policy/entropy``, ``loss/*`` (``cppo_diag.loss.policy_loss``), ``grad/*``, ``optim/lr``
* the rule (``cppo_diag.masks.metrics``): ``mask/<rule>/*``, ``<rule>/*`` (CPPO family), ``div/<d>/*``
* per position (``cppo_diag.capture.position_live``): ``pos/tv_top10/*``, ``pos/masked_frac/*``
* ``after_first/<name>``: the same pooled over the updates after the first of the step
* time: ``time/*``, ``throughput/tokens_per_s``
* held-out evaluation ``eval/*`` and the run summary ``summary/*`` (returned by ``train()``)

Pure constants and string helpers: no imports, so any layer may use it.
"""

from __future__ import annotations

# -- the rollout batch -------------------------------------------------------------------------------------------
REWARD_MEAN = "reward/mean"
REWARD_STD = "reward/std"
ACC_MEAN = "acc/mean"
RESPONSE_LEN_MEAN = "response/len_mean"
RESPONSE_LEN_MAX = "response/len_max"
BATCH_KEPT_SEQS = "batch/kept_seqs"
BATCH_SKIPPED_GROUPS = "batch/skipped_groups"
BATCH_UPDATES = "batch/updates"
ROLLOUT_STALENESS = "rollout/staleness"

# -- the updates -------------------------------------------------------------------------------------------------
POLICY_ENTROPY = "policy/entropy"
LOSS_POLICY = "loss/policy"
LOSS_RATIO_MEAN = "loss/ratio_mean"
LOSS_RATIO_MAX = "loss/ratio_max"
LOSS_KEPT_FRAC = "loss/kept_frac"
LOSS_KL_K3 = "loss/kl_k3"
LOSS_ADV_MEAN = "loss/adv_mean"
LOSS_WEIGHT_MEAN = "loss/weight_mean"
LOSS_TRUNC_FRAC = "loss/trunc_frac"
GRAD_NORM = "grad/norm"
GRAD_NORM_MAX = "grad/norm_max"
OPTIM_LR = "optim/lr"

# -- time --------------------------------------------------------------------------------------------------------
TIME_ROLLOUT_S = "time/rollout_s"
TIME_UPDATE_S = "time/update_s"
TIME_RULE_S = "time/rule_s"
TIME_LOG_TOKENS_S = "time/log_tokens_s"
TIME_STEP_S = "time/step_s"
TIME_ROLLOUT_FRAC = "time/rollout_frac"
THROUGHPUT_TOKENS_PER_S = "throughput/tokens_per_s"

# -- held-out evaluation and the run summary ---------------------------------------------------------------------
EVAL = "eval/"
SUMMARY = "summary/"
EVAL_GREEDY_ACC = "eval/greedy_acc"
EVAL_GREEDY_REWARD = "eval/greedy_reward"
# tasks with a per-digit validity check (the chain task): the share of answer digits valid under some branch,
# greedy decoding; far less noisy than exact match over long answers
EVAL_GREEDY_VALID_SHARE = "eval/greedy_valid_share"
EVAL_HELDOUT_SIZE = "eval/heldout_size"
EVAL_DOMAIN_SIZE = "eval/domain_size"


def eval_avg_at(k: int) -> str:
    """``eval/avg@k``: mean exact accuracy over k samples per held-out prompt."""
    return f"{EVAL}avg@{int(k)}"


def summary_name(eval_name: str, when: str | None = None) -> str:
    """The summary scalar of an evaluation scalar: ``eval/greedy_acc`` -> ``summary/greedy_acc_before`` (when
    "before" or "after" training), ``eval/heldout_size`` -> ``summary/heldout_size`` (when None)."""
    base = eval_name.split("/", 1)[-1]
    if when is None:
        return SUMMARY + base
    if when not in ("before", "after"):
        raise ValueError(f"when: expected 'before', 'after' or None, found {when!r}")
    return f"{SUMMARY}{base}_{when}"


SUMMARY_GREEDY_ACC_BEFORE = summary_name(EVAL_GREEDY_ACC, "before")
SUMMARY_GREEDY_ACC_AFTER = summary_name(EVAL_GREEDY_ACC, "after")
SUMMARY_GREEDY_REWARD_BEFORE = summary_name(EVAL_GREEDY_REWARD, "before")
SUMMARY_GREEDY_REWARD_AFTER = summary_name(EVAL_GREEDY_REWARD, "after")
SUMMARY_GREEDY_VALID_SHARE_BEFORE = summary_name(EVAL_GREEDY_VALID_SHARE, "before")
SUMMARY_GREEDY_VALID_SHARE_AFTER = summary_name(EVAL_GREEDY_VALID_SHARE, "after")
SUMMARY_HELDOUT_SIZE = summary_name(EVAL_HELDOUT_SIZE)
SUMMARY_DOMAIN_SIZE = summary_name(EVAL_DOMAIN_SIZE)

# -- the rule's metrics (computed by cppo_diag.masks; named here) ------------------------------------------------
AFTER_FIRST = "after_first/"
MASK_KEYS = ("frac", "frac_pos_adv", "frac_neg_adv", "away_frac", "budget_share", "token_share", "seq_frac",
             "n_valid", "n_masked")
CPPO_KEYS = ("delta_b_mean", "delta_b_at_min_frac", "delta_b_at_cap_frac", "c_neg_frac", "z_mean")
DIV_STATS = ("mean", "p90", "max")


def mask_name(rule: str, key: str = "frac") -> str:
    """``mask/<rule>/<key>``: e.g. ``mask_name("cppo")`` is the masked fraction ``mask/cppo/frac``."""
    return f"mask/{rule}/{key}"


def rule_name(rule: str, key: str) -> str:
    """``<rule>/<key>``: a rule's own per-response statistics (CPPO family: ``cppo/delta_b_mean``, ...)."""
    return f"{rule}/{key}"


def div_name(short: str, stat: str) -> str:
    """``div/<d>/<stat>``: the rule's divergence D_t over valid tokens (stat: mean, p90, max)."""
    return f"div/{short}/{stat}"


def after_first(name: str) -> str:
    """The same scalar pooled over the updates after the first of the step."""
    return AFTER_FIRST + name


def is_after_first_kind(name: str) -> bool:
    """The pooled scalars that also get an ``after_first/`` twin: divergences, fractions, shares, delta_b_mean."""
    return name.startswith("div/") or "frac" in name or "share" in name or name.endswith("delta_b_mean")


# -- what the bundled trainer logs every step (besides the rule's and evaluation's) ------------------------------
BATCH_SCALARS = (REWARD_MEAN, REWARD_STD, ACC_MEAN, RESPONSE_LEN_MEAN, RESPONSE_LEN_MAX, BATCH_KEPT_SEQS,
                 BATCH_SKIPPED_GROUPS, BATCH_UPDATES, ROLLOUT_STALENESS, OPTIM_LR)
TIME_SCALARS = (TIME_ROLLOUT_S, TIME_UPDATE_S, TIME_RULE_S, TIME_LOG_TOKENS_S, TIME_STEP_S, TIME_ROLLOUT_FRAC,
                THROUGHPUT_TOKENS_PER_S)
LOSS_SCALARS = (LOSS_POLICY, LOSS_RATIO_MEAN, LOSS_RATIO_MAX, LOSS_KEPT_FRAC, LOSS_KL_K3, LOSS_ADV_MEAN,
                LOSS_WEIGHT_MEAN, LOSS_TRUNC_FRAC)
UPDATE_SCALARS = (POLICY_ENTROPY, GRAD_NORM, GRAD_NORM_MAX) + LOSS_SCALARS
EVAL_SCALARS = (EVAL_GREEDY_ACC, EVAL_GREEDY_REWARD, EVAL_GREEDY_VALID_SHARE, EVAL_HELDOUT_SIZE, EVAL_DOMAIN_SIZE)
SUMMARY_SCALARS = (SUMMARY_GREEDY_ACC_BEFORE, SUMMARY_GREEDY_ACC_AFTER, SUMMARY_GREEDY_REWARD_BEFORE,
                   SUMMARY_GREEDY_REWARD_AFTER, SUMMARY_GREEDY_VALID_SHARE_BEFORE, SUMMARY_GREEDY_VALID_SHARE_AFTER,
                   SUMMARY_HELDOUT_SIZE, SUMMARY_DOMAIN_SIZE)


def trainer_scalar_names(rule: str = "<rule>", divergence: str = "<d>", k: int | str = "k") -> list[str]:
    """Every step-scalar name the bundled trainer can log, with placeholders by default (the docs' spelling)."""
    names = [*BATCH_SCALARS, *UPDATE_SCALARS, *TIME_SCALARS, *EVAL_SCALARS, f"{EVAL}avg@{k}", *SUMMARY_SCALARS]
    names += [mask_name(rule, key) for key in MASK_KEYS]
    names += [rule_name(rule, key) for key in CPPO_KEYS]
    names += [div_name(divergence, s) for s in DIV_STATS]
    names += list(POS_SCALARS)
    return names

# -- per-position (cppo_diag.capture.position_live): thirds of the relative position t / T ---------------------
POS = "pos/"
POS_THIRDS = ("first", "middle", "last")
POS_TV_TOP10 = tuple(f"pos/tv_top10/{t}" for t in POS_THIRDS)  # top-decile mean of |pi - mu| per third
POS_TV_TOP10_LAST_OVER_FIRST = "pos/tv_top10/last_over_first"
POS_MASKED_FRAC = tuple(f"pos/masked_frac/{t}" for t in POS_THIRDS)  # masked / valid per third
POS_MASKED_FRAC_LAST_OVER_FIRST = "pos/masked_frac/last_over_first"
POS_SCALARS = (*POS_TV_TOP10, POS_TV_TOP10_LAST_OVER_FIRST, *POS_MASKED_FRAC, POS_MASKED_FRAC_LAST_OVER_FIRST)
POS_FIGURE = "pos/divergence_by_position"  # the figure's tag (TensorBoard image, W&B image), not a scalar
