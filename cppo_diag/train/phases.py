"""The phases of one training iteration, each readable alone (SPEC.md "Loss"; ``trainer.train`` runs them).

1. ``rollout``     P prompts x n responses with mu recorded at sampling time (from the staleness queue), scored;
                   the sampled text is recorded (``log_sequences``)
2. ``advantages``  group advantages A = r - mean(group) (optionally / std); zero-variance groups dropped
3. ``update``      ``epochs * updates_per_batch`` minibatch updates: recompute pi, the rule through the public
                   ``compute_mask``, the loss from ``policy_loss``, one AdamW step; the tokens the rule saw are
                   recorded (``log_tokens``); then the lr schedule steps
4. ``log``         the step's scalars (pooled over its updates, ``step_stats.StepPool``) and evaluations
5. ``checkpoint``  weights, AdamW, schedule, summary and the rollout queue (rank 0 writes; all ranks wait)

``seq_id`` is the response's row in the step's rollout batch (0..P*n-1, group = seq_id // n): the same id in
the token table (every update), the sequence table, and the key of ``cppo_shuffled``'s permutation.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from cppo_diag import metric_names as M
from cppo_diag.loss import applied_weight, policy_loss
from cppo_diag.masks import compute_mask

from .checkpoint import queue_file, save_checkpoint
from .config import to_dict
from .evaluate import evaluate
from .rollout import RolloutBatch, left_pad
from .runtime import Run, StepClock, all_ranks_sum, barrier, step_rng, torch_gen
from .step_stats import StepPool
from .tasks.base import heldout_scalars


# -- tensors of a batch --------------------------------------------------------------------------------------
def sequence_logprobs(policy, module, batch: RolloutBatch, *, temperature: float, autocast, with_entropy: bool):
    """pi's log-probs of the sampled tokens (B, T) (carries grad) and, optionally, the entropy (B, T) (no grad).

    Same layout as generation (left-padded prompt, then the response), so with the sampling weights it gives
    mu up to the sampler's numerics (the ``logp_behavior`` of attribution).
    """
    device = batch.response_ids.device
    p_ids, p_mask = left_pad(batch.prompt_ids, policy.pad_id, device)  # (B, Lp)
    Lp, T = p_ids.shape[1], batch.response_ids.shape[1]
    ids = torch.cat([p_ids, batch.response_ids], dim=1)  # (B, Lp + T)
    attn = torch.cat([p_mask, batch.response_mask], dim=1)  # (B, Lp + T)
    pos = (attn.long().cumsum(1) - 1).clamp(min=0)  # (B, Lp + T)
    ctx = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    with ctx:
        logits, _ = policy.forward(module, ids, attn, pos)  # (B, Lp + T, V)
    logits = logits[:, Lp - 1 : Lp - 1 + T].float() / temperature  # (B, T, V): position i predicts token i+1
    logz = torch.logsumexp(logits, dim=-1)  # (B, T)
    logp = logits.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1) - logz  # (B, T)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            probs = (logits - logz.unsqueeze(-1)).exp()
            entropy = logz - (probs * logits).sum(-1)  # (B, T)
    return logp.masked_fill(~batch.response_mask, 0.0), entropy


def index_batch(batch: RolloutBatch, idx: list[int]) -> RolloutBatch:
    t = torch.as_tensor(idx, dtype=torch.long, device=batch.response_ids.device)
    return RolloutBatch(prompt_ids=[batch.prompt_ids[i] for i in idx], response_ids=batch.response_ids[t],
                        response_mask=batch.response_mask[t], logp_rollout=batch.logp_rollout[t],
                        logp_behavior=None if batch.logp_behavior is None else batch.logp_behavior[t],
                        opt_step=batch.opt_step)


def optimizer_steps(optimizer) -> int:
    """Optimiser steps taken so far (AdamW's own per-parameter counter, so it survives a resume): the clock of
    the run-format column ``lag``."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st and "step" in st:
                return int(st["step"])
    return 0


def pack_queue(queue: dict[int, tuple[RolloutBatch, int]]) -> dict[str, torch.Tensor]:
    """Queued batches {iteration: (batch, policy version that sampled it)} as flat tensors for safetensors."""
    out: dict[str, torch.Tensor] = {}
    for j, (b, version) in queue.items():
        lens = torch.tensor([len(p) for p in b.prompt_ids], dtype=torch.long)  # (B,)
        prompts = torch.zeros((len(lens), int(lens.max())), dtype=torch.long)  # (B, Lp) right-padded
        for i, p in enumerate(b.prompt_ids):
            prompts[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        out.update({f"{j}.prompt_ids": prompts, f"{j}.prompt_len": lens,
                    **{f"{j}.{k}": getattr(b, k).detach().cpu().clone() for k in ("response_ids", "response_mask", "logp_rollout")},
                    f"{j}.version": torch.tensor([version], dtype=torch.long),
                    f"{j}.opt_step": torch.tensor([b.opt_step], dtype=torch.long)})
        if b.logp_behavior is not None:
            out[f"{j}.logp_behavior"] = b.logp_behavior.detach().cpu().clone()
    return out


def unpack_queue(tensors: dict[str, torch.Tensor]) -> dict[int, tuple[RolloutBatch, int]]:
    """Inverse of ``pack_queue``."""
    queue = {}
    for j in sorted({int(k.split(".")[0]) for k in tensors}):
        t = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".")[0] == str(j)}
        prompts = [row[:n].tolist() for row, n in zip(t["prompt_ids"].cpu(), t["prompt_len"].tolist())]
        queue[j] = (RolloutBatch(prompt_ids=prompts, response_ids=t["response_ids"], response_mask=t["response_mask"].bool(),
                                 logp_rollout=t["logp_rollout"], logp_behavior=t.get("logp_behavior"),
                                 opt_step=int(t["opt_step"][0]) if "opt_step" in t else 0), int(t["version"][0]))
    return queue


# -- 1. rollout ----------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """One iteration's sampled, scored batch (all P x n rows, zero-variance groups included)."""

    batch: RolloutBatch
    version: int  # the iteration whose policy sampled it
    rows: list  # the P x n problems; group g = rows g*n .. g*n+n-1
    rewards: np.ndarray  # (B,)
    correct: np.ndarray  # (B,) bool
    fork: torch.Tensor | None = None  # (B, T) bool, the task's fork oracle (tasks with ``fork_flags``), else None


def fork_oracle(task, rows: list, T: int, device) -> torch.Tensor | None:
    """(B, T) bool: the positions the task knows admit two right tokens (``Task.fork_flags``), or None."""
    flags = getattr(task, "fork_flags", None)
    if flags is None or not rows:
        return None
    per_row = [flags(p, T) for p in rows]
    if per_row[0] is None:
        return None
    return torch.as_tensor(np.stack(per_row), device=device)


def _logit_noise(cfg, j: int) -> float:
    """The sd of the sampler's logit noise at iteration ``j`` (``rollout.logit_noise`` under its schedule)."""
    if cfg.rollout.logit_noise_schedule == "constant":
        return cfg.rollout.logit_noise
    return cfg.rollout.logit_noise * j / max(cfg.steps - 1, 1)


def _problems(run: Run, j: int) -> list:
    """Iteration j's P prompts, each repeated n times: they derive from (seed, j, rank)."""
    cfg = run.cfg
    problems = run.task.sample(cfg.rollout.prompts_per_step, step_rng(cfg.seed, j, run.d.rank, 0))
    return [p for p in problems for _ in range(cfg.rollout.n)]


def sample_batch(run: Run, j: int) -> RolloutBatch:
    """Iteration j's rollout batch from the current weights; the sampling noise derives from (seed, j, rank).

    With ``log.behavior_logp`` the same weights then score the sampled tokens with the trainer's numerics
    (``logp_behavior``: what mu would be without the sampler's engine), and the batch remembers the optimiser
    step count of those weights (the clock of ``lag``)."""
    cfg, policy = run.cfg, run.policy
    rows = _problems(run, j)
    run.module.eval()
    b = run.sampler.generate([policy.encode_prompt(p.prompt) for p in rows], max_new_tokens=cfg.rollout.max_new_tokens,
                             temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                             generator=torch_gen(cfg.seed, j, run.d.rank, run.device),
                             **({"logit_noise": _logit_noise(cfg, j)} if cfg.rollout.logit_noise > 0 else {}))
    run.module.train()
    b.opt_step = optimizer_steps(run.optimizer)
    if cfg.log.behavior_logp:
        with torch.no_grad():
            b.logp_behavior, _ = sequence_logprobs(policy, run.module, b, temperature=cfg.rollout.temperature,
                                                   autocast=run.amp, with_entropy=False)
    return b


def rollout(run: Run, step: int, log, clock: StepClock) -> Rollout:
    """Sample, score and record this iteration's batch. With ``rollout.staleness = k`` the sampler runs k
    iterations ahead: the current policy samples iteration step+k's batch now, and this iteration trains on the
    batch sampled k iterations ago (fewer at the start: the lag available)."""
    cfg, policy = run.cfg, run.policy
    for j in range(step, min(step + cfg.rollout.staleness, cfg.steps - 1) + 1):
        if j not in run.queue:
            run.queue[j] = (sample_batch(run, j), step)
    batch, version = run.queue.pop(step)
    rows = _problems(run, step)
    ids_list, mask_list = batch.response_ids.tolist(), batch.response_mask.tolist()
    resp = [[t for t, v in zip(ids, m) if v] for ids, m in zip(ids_list, mask_list)]
    texts = [policy.decode([t for t in r if t != policy.eos_id]) for r in resp]
    scored = [run.task.score(p, c) for p, c in zip(rows, texts)]
    rewards = np.array([s[0] for s in scored], dtype=np.float32)  # (B,)
    correct = np.array([s[1] for s in scored], dtype=bool)
    clock.rollout_s = clock.elapsed()
    n = cfg.rollout.n  # seq_id = row in the rollout batch (dropped zero-variance rows included)
    log.log_sequences(step=step, seq_ids=list(range(len(rows))), prompts=[p.prompt for p in rows], completions=texts,
                      tokens=[policy.token_strings(r) for r in resp], rewards=rewards, lengths=[len(r) for r in resp],
                      group_ids=[i // n for i in range(len(rows))], correct=correct)
    return Rollout(batch, version, rows, rewards, correct,
                   fork=fork_oracle(run.task, rows, batch.response_ids.shape[1], batch.response_ids.device))


# -- 2. advantages -------------------------------------------------------------------------------------------
def group_advantages(rewards: np.ndarray, n: int, std_norm: bool) -> tuple[np.ndarray, np.ndarray]:
    """(advantage per response (B,), zero-variance flag per response (B,)) for groups of n consecutive rows."""
    r = rewards.reshape(-1, n)  # (P, n)
    adv = r - r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, keepdims=True)
    if std_norm:
        adv = adv / (std + 1e-6)
    zero = np.repeat(std[:, 0] < 1e-9, n)
    return adv.reshape(-1).astype(np.float32), zero


@dataclass
class TrainBatch:
    """The rows that train this iteration (zero-variance groups dropped), on the device."""

    batch: RolloutBatch  # (B', T)
    rows: list[int]  # (B',) their seq_id (row in the rollout batch)
    seq_ids: torch.Tensor  # (B',) the same, as a tensor
    advantages: torch.Tensor  # (B',)
    rewards: torch.Tensor  # (B',)
    group_ids: torch.Tensor  # (B',)
    fork: torch.Tensor | None  # (B', T) bool fork oracle, or None
    n_zero_var: int  # responses in zero-variance groups (all of the rollout batch)
    global_rows: int  # rows kept over every rank (every rank must take the same number of optimiser steps)


def advantages(run: Run, ro: Rollout) -> TrainBatch:
    """Group advantages; zero-variance groups carry no signal and are dropped (``optim.skip_zero_var``)."""
    cfg, device = run.cfg, run.device
    adv, zero = group_advantages(ro.rewards, cfg.rollout.n, cfg.optim.adv_std_norm)
    keep = [i for i in range(len(ro.rows)) if not (cfg.optim.skip_zero_var and zero[i])]
    return TrainBatch(
        batch=index_batch(ro.batch, keep), rows=keep,
        seq_ids=torch.as_tensor(keep, dtype=torch.long, device=device),
        advantages=torch.as_tensor(adv[keep], device=device),
        rewards=torch.as_tensor(ro.rewards[keep], device=device),
        group_ids=torch.as_tensor([i // cfg.rollout.n for i in keep], device=device),
        fork=None if ro.fork is None else ro.fork[torch.as_tensor(keep, dtype=torch.long, device=ro.fork.device)],
        n_zero_var=int(zero.sum()), global_rows=all_ranks_sum(run.d, len(keep), device),
    )


# -- 3. update -----------------------------------------------------------------------------------------------
def update(run: Run, step: int, ro: Rollout, tb: TrainBatch, log, clock: StepClock) -> tuple[StepPool, int]:
    """The minibatch updates: the policy leaves mu, the rule decides which tokens still count. Returns the
    step's pool of updates and their count; then the lr schedule steps (per iteration, even one with no update)."""
    cfg = run.cfg
    logp_old = _recompute_old(run, tb)
    t_start = clock.now()
    pool = StepPool(cfg.rule.name, run.rule_params, anchor=cfg.rule.anchor, step=step, agg=cfg.optim.agg,
                    trunc_cap=cfg.optim.trunc_cap, max_len=cfg.rollout.max_new_tokens)
    u = 0
    if tb.global_rows > 0:
        for _epoch in range(cfg.optim.epochs):
            for chunk in np.array_split(np.arange(len(tb.rows)), cfg.optim.updates_per_batch):
                if chunk.size:
                    _minibatch_update(run, step, u, chunk, tb, logp_old, pool, log, clock)
                else:
                    _zero_loss_update(run, ro.batch)
                u += 1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        run.scheduler.step()
    clock.update_s = clock.now() - t_start
    return pool, u


def _recompute_old(run: Run, tb: TrainBatch) -> torch.Tensor | None:
    """pi_old's log-probs (B', T), computed once before any update, when the rule anchors on them
    (rule.anchor = "old") or the run records attribution (log.behavior_logp); else None. When no optimiser
    step separates the sampling from now (staleness 0), pi_old is the behaviour policy itself: same weights,
    same numerics, so its log-probs are ``logp_behavior`` and the lag term is exactly 0."""
    cfg = run.cfg
    if not tb.rows or not (cfg.rule.anchor == "old" or cfg.log.behavior_logp):
        return None
    if tb.batch.logp_behavior is not None and optimizer_steps(run.optimizer) == tb.batch.opt_step:
        return tb.batch.logp_behavior
    with torch.no_grad():
        logp_old, _ = sequence_logprobs(run.policy, run.module, tb.batch, temperature=run.cfg.rollout.temperature,
                                        autocast=run.amp, with_entropy=False)
    return logp_old


def _minibatch_update(run: Run, step: int, u: int, chunk: np.ndarray, tb: TrainBatch, logp_old, pool: StepPool,
                      log, clock: StepClock) -> None:
    """One optimiser update on the rows ``chunk`` of the train batch; records its tokens and adds it to the pool."""
    cfg = run.cfg
    idx, seq_ids = chunk.tolist(), tb.seq_ids[chunk]
    mb = index_batch(tb.batch, idx)
    adv, mask = tb.advantages[chunk], mb.response_mask  # (b,), (b, T)
    logp, entropy = sequence_logprobs(run.policy, run.train_module, mb, temperature=cfg.rollout.temperature,
                                      autocast=run.amp, with_entropy=True)  # (b, T) each
    old_all = None if logp_old is None else logp_old[chunk]  # (b, T) pi_old, whenever computed
    old = old_all if cfg.rule.anchor == "old" else None  # what the rule anchors on
    anchor_lp = mb.logp_rollout if old is None else old
    lag = torch.full((len(idx),), optimizer_steps(run.optimizer) - mb.opt_step, dtype=torch.int32)  # before this step
    t0 = clock.now()
    res = compute_mask(cfg.rule.name, logp=logp.detach(), logp_rollout=mb.logp_rollout, advantages=adv,
                       response_mask=mask, logp_old=old, anchor=cfg.rule.anchor, seq_ids=seq_ids, step=step,
                       **run.rule_params)
    loss, lmetrics = policy_loss(logp, anchor_lp, adv, mask, res, agg=cfg.optim.agg, trunc_cap=cfg.optim.trunc_cap,
                                 max_len=cfg.rollout.max_new_tokens, rule=cfg.rule.name)
    clock.rule_s += clock.now() - t0
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(run.module.parameters(),
                                           cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
    run.optimizer.step()

    pool.add(update=u, logp=logp, logp_rollout=mb.logp_rollout, logp_old=old, advantages=adv, mask=mask,
             seq_ids=seq_ids, keep=res.keep, entropy=entropy, loss=lmetrics[M.LOSS_POLICY], grad_norm=float(gnorm))
    t0 = clock.now()
    log.log_tokens(step=step, update=u, seq_ids=seq_ids, logp=logp.detach(), logp_rollout=mb.logp_rollout,
                   advantages=adv, response_mask=mask, logp_old=old_all, keep_applied=res.keep, reason_applied=res.reason,
                   token_ids=mb.response_ids, entropy=entropy, reward=tb.rewards[chunk], group_id=tb.group_ids[chunk],
                   loss_weight=applied_weight(res, cfg.optim.trunc_cap), logp_behavior=mb.logp_behavior, lag=lag,
                   fork=None if tb.fork is None else tb.fork[chunk])
    clock.log_tokens_s += clock.now() - t0


def _zero_loss_update(run: Run, batch: RolloutBatch) -> None:
    """DDP: a rank with no rows in this minibatch still joins the gradient all-reduce, with a zero loss."""
    lp0, _ = sequence_logprobs(run.policy, run.train_module, index_batch(batch, [0]),
                               temperature=run.cfg.rollout.temperature, autocast=run.amp, with_entropy=False)
    run.optimizer.zero_grad(set_to_none=True)
    (lp0.sum() * 0.0).backward()
    run.optimizer.step()


# -- 4. log --------------------------------------------------------------------------------------------------
def run_eval(run: Run, step: int) -> dict:
    """Held-out evaluation (``eval/*``), each accuracy logged with the size of its held-out set."""
    cfg = run.cfg
    out = evaluate(run.policy, run.eval_sampler, run.task.eval_set(), run.task.score,
                   max_new_tokens=cfg.rollout.max_new_tokens, k=cfg.log.eval_k, temperature=cfg.log.eval_temperature,
                   top_p=cfg.log.eval_top_p, generator=torch_gen(cfg.seed, step, 10_000 + run.d.rank, run.device),
                   valid_share=getattr(run.task, "valid_share", None))
    return {**out, **heldout_scalars(run.task)}


def evaluate_before(run: Run) -> None:
    """Step 0 of a fresh run (rank 0): the held-out evaluation before training, into the scalars and summary."""
    ev = run_eval(run, 0)
    run.summary[M.SUMMARY_GREEDY_ACC_BEFORE] = ev[M.EVAL_GREEDY_ACC]
    run.summary[M.SUMMARY_GREEDY_REWARD_BEFORE] = ev[M.EVAL_GREEDY_REWARD]
    if M.EVAL_GREEDY_VALID_SHARE in ev:
        run.summary[M.SUMMARY_GREEDY_VALID_SHARE_BEFORE] = ev[M.EVAL_GREEDY_VALID_SHARE]
    run.summary.update(heldout_scalars(run.task, prefix=M.SUMMARY))
    if not run.rec.is_done(0):
        run.rec.log_scalars(0, ev)


def log_step(run: Run, step: int, ro: Rollout, tb: TrainBatch, pool: StepPool, n_updates: int, log,
             clock: StepClock) -> dict:
    """The step's scalars (docs/trainer.md "Scalars logged per step"), evaluations where due; ends the step."""
    cfg, d = run.cfg, run.d
    pooled = pool.scalars()  # the rule's and the loss's, over the step's pooled updates
    n_tok = int(ro.batch.response_mask.sum())
    lens = ro.batch.response_mask.sum(1).float()
    scalars = {
        M.REWARD_MEAN: float(ro.rewards.mean()), M.REWARD_STD: float(ro.rewards.std()),
        M.ACC_MEAN: float(ro.correct.mean()),
        M.RESPONSE_LEN_MEAN: float(lens.mean()), M.RESPONSE_LEN_MAX: float(lens.max()),
        M.BATCH_KEPT_SEQS: len(tb.rows), M.BATCH_SKIPPED_GROUPS: tb.n_zero_var // cfg.rollout.n,
        M.BATCH_UPDATES: n_updates, M.ROLLOUT_STALENESS: step - ro.version,
        M.OPTIM_LR: run.optimizer.param_groups[0]["lr"],
        M.TIME_ROLLOUT_S: clock.rollout_s, M.TIME_UPDATE_S: clock.update_s, M.TIME_RULE_S: clock.rule_s,
        M.TIME_LOG_TOKENS_S: clock.log_tokens_s, M.TIME_STEP_S: clock.elapsed(),
        M.TIME_ROLLOUT_FRAC: clock.rollout_s / max(clock.elapsed(), 1e-9),
        M.THROUGHPUT_TOKENS_PER_S: n_tok / max(clock.elapsed(), 1e-9),
    }
    scalars.update(pooled)
    last = step + 1 == cfg.steps
    if d.main and cfg.log.eval_every and (step + 1) % cfg.log.eval_every == 0 and not last:
        scalars.update(run_eval(run, step + 1))
    if last and d.main:
        ev = run_eval(run, step + 1)
        scalars.update(ev)
        run.summary[M.SUMMARY_GREEDY_ACC_AFTER] = ev[M.EVAL_GREEDY_ACC]
        run.summary[M.SUMMARY_GREEDY_REWARD_AFTER] = ev[M.EVAL_GREEDY_REWARD]
        if M.EVAL_GREEDY_VALID_SHARE in ev:
            run.summary[M.SUMMARY_GREEDY_VALID_SHARE_AFTER] = ev[M.EVAL_GREEDY_VALID_SHARE]
        scalars.update(run.summary)
    log.log_scalars(step, scalars)
    pool.log_position_figure(log, cfg.log.position_figure_every)  # pos/ figure to TensorBoard / W&B
    log.end_step(step)
    return scalars


# -- 5. checkpoint -------------------------------------------------------------------------------------------
def checkpoint(run: Run, step: int) -> None:
    """Every ``ckpt.every`` iterations and at the end: weights, AdamW, schedule, summary and the batches already
    sampled for later iterations (each rank's queue; other ranks' go in before rank 0 renames the checkpoint)."""
    cfg, d = run.cfg, run.d
    last = step + 1 == cfg.steps
    if not ((cfg.ckpt.every and (step + 1) % cfg.ckpt.every == 0) or last):
        return
    qt = pack_queue(run.queue) if run.queue else None
    move_in = []
    if qt is not None and d.world > 1:
        qdir = run.run_dir / "checkpoints" / f".queue-step={step:06d}"
        if not d.main:
            from safetensors.torch import save_file

            qdir.mkdir(parents=True, exist_ok=True)
            save_file(qt, str(qdir / queue_file(d.rank)))
        barrier(d)
        move_in = [qdir / queue_file(r) for r in range(1, d.world)]
    if d.main:
        save_checkpoint(run.run_dir, step, run.module, run.optimizer, run.scheduler,
                        extra={"summary": run.summary, "config": to_dict(cfg),
                               "queue": [[j, v] for j, (_, v) in sorted(run.queue.items())]},
                        keep=max(cfg.ckpt.keep, 1), queue=qt, move_in=move_in)
        if move_in:
            move_in[0].parent.rmdir()
    barrier(d)
