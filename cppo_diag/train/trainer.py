"""The bundled RLVR trainer: GRPO-style groups, several updates per batch, any registered trust-region rule.

Reads top to bottom (cleanrl / nanoGPT style). Per iteration (SPEC.md "Loss"):

1. sample P prompts x n responses with the rollout policy; record mu (the sampler's log-probs) at sampling time;
   with ``rollout.staleness = k`` the batch trained at iteration t was sampled by the policy of iteration t - k
   (asynchronous RL: the sampler runs k iterations ahead; the queued batches are part of the checkpoint);
2. reward each response; group advantages A = r - mean(group) (optionally / std); drop zero-variance groups;
3. for each of ``epochs * updates_per_batch`` minibatch updates: recompute pi, apply the rule through the public
   ``cppo_diag.masks.compute_mask``, take the loss from ``cppo_diag.loss.policy_loss``, one AdamW step;
   log the tokens the rule saw (``keep_applied``/``reason_applied``, ``loss_weight`` where the rule weights the
   loss) through the public ``cppo_diag.RunRecorder``;
4. log per-step scalars (pooled over the step's updates, ``step_stats.StepPool``) and per-sequence text;
   checkpoint.

``seq_id`` is the response's row in the step's rollout batch (0..P*n-1, group = seq_id // n): the same id in
the token table (every update), the sequence table, and the key of ``cppo_shuffled``'s permutation.

All randomness derives from (seed, step, rank), so a resumed run replays exactly. Steps the recorder already
holds (``is_done``) are replayed to rebuild the state but not logged again.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cppo_diag.capture import NullRecorder, RunRecorder
from cppo_diag.loss import applied_weight, policy_loss
from cppo_diag.masks import PARAMETERS, compute_mask, get_rule

from .checkpoint import drop_checkpoints, list_checkpoints, load_checkpoint, load_queue, queue_file, save_checkpoint
from .config import TrainConfig, to_dict
from .evaluate import evaluate
from .models import build_policy
from .rollout import RolloutBatch, TorchSampler, left_pad
from .step_stats import StepPool
from .tasks import build_task, warmstart_key
from .tasks.base import heldout_scalars


# -- setup helpers -------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: start a process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(cfg: TrainConfig, d: Dist) -> torch.device:
    if cfg.device == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        kind = cfg.device
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: 'cuda' requested, but torch.cuda.is_available() is False")
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    if kind != "cpu":
        raise ValueError(f"device: expected auto | cpu | cuda, found {cfg.device!r}")
    return torch.device("cpu")


def autocast_dtype(cfg: TrainConfig, device: torch.device):
    p = cfg.precision
    if p == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if p == "bf16":
        return torch.bfloat16
    if p == "fp32":
        return None
    raise ValueError(f"precision: expected auto | fp32 | bf16, found {p!r}")


def rollout_autocast_dtype(cfg: TrainConfig, amp):
    """The sampler's autocast dtype: ``rollout.precision`` auto (the trainer's ``amp``) | fp32 | bf16."""
    p = cfg.rollout.precision
    if p == "auto":
        return amp
    if p == "bf16":
        return torch.bfloat16
    if p == "fp32":
        return None
    raise ValueError(f"rollout.precision: expected auto | fp32 | bf16, found {p!r}")


def lr_lambda(cfg: TrainConfig):
    warm, total, kind = cfg.optim.warmup_steps, max(cfg.steps, 1), cfg.optim.schedule
    if kind not in ("constant", "cosine", "linear"):
        raise ValueError(f"optim.schedule: expected constant | cosine | linear, found {kind!r}")

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = min(1.0, (step - warm) / max(1, total - warm))
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * frac))
        if kind == "linear":
            return 1.0 - frac
        return 1.0

    return f


def default_run_name(cfg: TrainConfig) -> str:
    return cfg.log.name or f"{cfg.rule.name}-{cfg.task.kind}-s{cfg.seed}"


def step_rng(seed: int, step: int, rank: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, rank, purpose])


def torch_gen(seed: int, step: int, rank: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.default_rng([seed, step, rank, 7]).integers(2**62)))
    return g


# -- the per-token forward -----------------------------------------------------------------------------------
def sequence_logprobs(policy, module, batch: RolloutBatch, *, temperature: float, autocast, with_entropy: bool):
    """pi's log-probs of the sampled tokens (B, T) (carries grad) and, optionally, the entropy (B, T) (no grad).

    Same layout as generation (left-padded prompt, then the response), so pi == mu up to numerics before the
    first update.
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


def group_advantages(rewards: np.ndarray, n: int, std_norm: bool) -> tuple[np.ndarray, np.ndarray]:
    """(advantage per response (B,), zero-variance flag per response (B,)) for groups of n consecutive rows."""
    r = rewards.reshape(-1, n)  # (P, n)
    adv = r - r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, keepdims=True)
    if std_norm:
        adv = adv / (std + 1e-6)
    zero = np.repeat(std[:, 0] < 1e-9, n)
    return adv.reshape(-1).astype(np.float32), zero


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
                    f"{j}.version": torch.tensor([version], dtype=torch.long)})
    return out


def unpack_queue(tensors: dict[str, torch.Tensor]) -> dict[int, tuple[RolloutBatch, int]]:
    """Inverse of ``pack_queue``."""
    queue = {}
    for j in sorted({int(k.split(".")[0]) for k in tensors}):
        t = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".")[0] == str(j)}
        prompts = [row[:n].tolist() for row, n in zip(t["prompt_ids"].cpu(), t["prompt_len"].tolist())]
        queue[j] = (RolloutBatch(prompt_ids=prompts, response_ids=t["response_ids"], response_mask=t["response_mask"].bool(),
                                 logp_rollout=t["logp_rollout"]), int(t["version"][0]))
    return queue


def index_batch(batch: RolloutBatch, idx: list[int]) -> RolloutBatch:
    t = torch.as_tensor(idx, dtype=torch.long, device=batch.response_ids.device)
    return RolloutBatch(prompt_ids=[batch.prompt_ids[i] for i in idx], response_ids=batch.response_ids[t],
                        response_mask=batch.response_mask[t], logp_rollout=batch.logp_rollout[t])


# -- training ------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, *, recorder_factory=None) -> dict:
    """Run RL training; returns the summary scalars (``summary/...``). ``recorder_factory(run_dir_parent, name,
    **meta) -> recorder`` replaces RunRecorder (benchmarks pass one returning a NullRecorder)."""
    # ---- setup: processes, device, seeds, model, task, optimiser
    kind = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
    d = setup_distributed(kind)
    device = resolve_device(cfg, d)
    amp = autocast_dtype(cfg, device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    get_rule(cfg.rule.name)  # unknown rule names raise here, listing the known ones
    rule_params = dict(cfg.rule.params)
    unknown = sorted(set(rule_params) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"rule.params: unknown parameter(s) {unknown} for rule {cfg.rule.name!r}; "
                         f"rule parameters are {sorted(get_rule(cfg.rule.name).params)} (see `cppo-diag rules`)")
    if cfg.rule.anchor not in ("rollout", "old"):
        raise ValueError(f"rule.anchor: expected 'rollout' or 'old', found {cfg.rule.anchor!r}")
    if cfg.rollout.engine != "torch":
        raise ValueError(f"rollout.engine: expected 'torch' (the only engine built in), found {cfg.rollout.engine!r}")
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ValueError(f"rollout.top_p: expected a value in (0, 1], found {cfg.rollout.top_p!r}")
    if cfg.rollout.staleness < 0:
        raise ValueError(f"rollout.staleness: expected an integer >= 0, found {cfg.rollout.staleness}")
    if cfg.optim.epochs < 1 or cfg.optim.updates_per_batch < 1:
        raise ValueError(f"optim.epochs / optim.updates_per_batch: expected >= 1, found {cfg.optim.epochs}, {cfg.optim.updates_per_batch}")

    task = build_task(cfg.task)
    policy = build_policy(cfg.model, warmstart_key(cfg.task), device)
    module = policy.module
    module.train()
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        train_module = module
    rollout_amp = rollout_autocast_dtype(cfg, amp)

    def make_sampler(dtype):
        return TorchSampler(lambda ids, attn, pos, cache: policy.forward(module, ids, attn, pos, cache, use_cache=True),
                            eos_id=policy.eos_id, pad_id=policy.pad_id, device=device, autocast_dtype=dtype,
                            empty_cache=policy.empty_cache)

    sampler = make_sampler(rollout_amp)  # the rollout engine (rollout.precision)
    eval_sampler = sampler if rollout_amp == amp else make_sampler(amp)  # evaluation in the trainer's numerics
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

    # ---- run directory, resume, recorder
    name = default_run_name(cfg)
    run_dir = Path(cfg.log.out_dir) / name
    start, summary = 0, {}
    # rollout queue for rollout.staleness = k: {iteration j: (batch sampled for j, policy version that sampled it)}
    queue: dict[int, tuple[RolloutBatch, int]] = {}
    ckpts = list_checkpoints(run_dir) if cfg.ckpt.resume else []
    if ckpts:
        state = load_checkpoint(ckpts[-1][1], module, optimizer, scheduler)
        start, summary = state["step"] + 1, dict(state.get("summary", {}))
        if cfg.rollout.staleness > 0 and state.get("queue"):
            queue = unpack_queue(load_queue(ckpts[-1][1], d.rank, device))
    meta = dict(config=to_dict(cfg), trainer="cppo-diag", rule=cfg.rule.name, rule_params=rule_params,
                model=policy.name, task=task.name, anchor=cfg.rule.anchor, rank=d.rank)
    sinks = [n for n, on in (("tensorboard", cfg.log.tensorboard), ("wandb", cfg.log.wandb)) if on]
    if sinks and not cfg.log.record:
        raise ValueError(f"log.{sinks[0]}: mirrors the recorder's scalars, so it needs log.record true (found false)")
    if not cfg.log.record:
        rec = NullRecorder()
    elif recorder_factory is not None:
        rec = recorder_factory(cfg.log.out_dir, name, **meta)
    else:
        rec = RunRecorder(cfg.log.out_dir, name=name, every_n_steps=cfg.log.every_n_steps,
                          seq_fraction=cfg.log.seq_fraction, on_error="raise", sinks=sinks, **meta)
    null = NullRecorder()
    # Steps the recorder does not sample (every_n_steps > 1) never get a done marker; on resume, a step whose
    # scalars are already on disk was logged before the interruption and is replayed without logging.
    scalar_steps: set[int] = set()
    if start > 0 and cfg.log.record and cfg.log.every_n_steps > 1 and (run_dir / "meta.json").exists():
        from cppo_diag import open_run

        scalar_steps = set(open_run(run_dir).steps()["step"].to_list())

    def run_eval(step: int) -> dict:
        out = evaluate(policy, eval_sampler, task.eval_set(), task.score, max_new_tokens=cfg.rollout.max_new_tokens,
                       k=cfg.log.eval_k, temperature=cfg.log.eval_temperature, top_p=cfg.log.eval_top_p,
                       generator=torch_gen(cfg.seed, step, 10_000 + d.rank, device))
        return {**out, **heldout_scalars(task)}  # every accuracy is logged with the size of its held-out set

    def sample_batch(j: int) -> RolloutBatch:
        """Iteration j's rollout batch from the current weights: prompts and sampling noise derive from (seed, j, rank)."""
        problems = task.sample(cfg.rollout.prompts_per_step, step_rng(cfg.seed, j, d.rank, 0))
        rows = [p for p in problems for _ in range(cfg.rollout.n)]
        module.eval()
        b = sampler.generate([policy.encode_prompt(p.prompt) for p in rows], max_new_tokens=cfg.rollout.max_new_tokens,
                             temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                             generator=torch_gen(cfg.seed, j, d.rank, device))
        module.train()
        return b

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {name}", disable=not (cfg.log.progress and d.main),
               dynamic_ncols=True)
    try:
        if start == 0 and d.main:
            ev = run_eval(0)
            summary["summary/greedy_acc_before"] = ev["eval/greedy_acc"]
            summary["summary/greedy_reward_before"] = ev["eval/greedy_reward"]
            summary.update(heldout_scalars(task, prefix="summary/"))
            if not rec.is_done(0):
                rec.log_scalars(0, ev)
        n_updates = cfg.optim.epochs * cfg.optim.updates_per_batch
        for step in range(start, cfg.steps):
            logged = rec.is_done(step) or (step % cfg.log.every_n_steps != 0 and step in scalar_steps)
            log = null if logged else rec  # replayed steps rebuild state without logging twice
            t_step = time.perf_counter()

            # ---- 1. rollout: P prompts x n responses, mu recorded at sampling time. With staleness k the sampler
            # runs k iterations ahead: the current policy samples iteration step+k's batch now, and this iteration
            # trains on the batch sampled k iterations ago (fewer at the start: the lag available).
            for j in range(step, min(step + cfg.rollout.staleness, cfg.steps - 1) + 1):
                if j not in queue:
                    queue[j] = (sample_batch(j), step)
            batch, version = queue.pop(step)
            problems = task.sample(cfg.rollout.prompts_per_step, step_rng(cfg.seed, step, d.rank, 0))
            rows = [p for p in problems for _ in range(cfg.rollout.n)]  # group g = rows g*n .. g*n+n-1
            ids_list, mask_list = batch.response_ids.tolist(), batch.response_mask.tolist()
            resp = [[t for t, v in zip(ids, m) if v] for ids, m in zip(ids_list, mask_list)]
            texts = [policy.decode([t for t in r if t != policy.eos_id]) for r in resp]
            scored = [task.score(p, c) for p, c in zip(rows, texts)]
            rewards = np.array([s[0] for s in scored], dtype=np.float32)  # (B,)
            correct = np.array([s[1] for s in scored], dtype=bool)
            t_rollout = time.perf_counter() - t_step

            # ---- 2. group advantages; zero-variance groups carry no signal and are dropped
            adv, zero = group_advantages(rewards, cfg.rollout.n, cfg.optim.adv_std_norm)
            keep_rows = [i for i in range(len(rows)) if not (cfg.optim.skip_zero_var and zero[i])]
            n_keep = len(keep_rows)
            if d.world > 1:  # every rank must take the same number of optimiser steps
                import torch.distributed as dist

                t = torch.tensor([n_keep], device=device)
                dist.all_reduce(t)
                global_keep = int(t.item())
            else:
                global_keep = n_keep
            train_batch = index_batch(batch, keep_rows)
            adv_t = torch.as_tensor(adv[keep_rows], device=device)  # (B',)
            group_ids = torch.as_tensor([i // cfg.rollout.n for i in keep_rows], device=device)
            rew_t = torch.as_tensor(rewards[keep_rows], device=device)

            seq_t = torch.as_tensor(keep_rows, dtype=torch.long, device=device)  # (B',) seq_id of each trained row

            # ---- per-sequence text: seq_id = row in the rollout batch (dropped zero-variance rows included)
            log.log_sequences(step=step, seq_ids=list(range(len(rows))), prompts=[p.prompt for p in rows],
                              completions=texts, tokens=[policy.token_strings(r) for r in resp], rewards=rewards,
                              lengths=[len(r) for r in resp], group_ids=[i // cfg.rollout.n for i in range(len(rows))],
                              correct=correct)

            # ---- optional pi_old anchor: recompute the old policy once before any update
            logp_old_all = None
            if cfg.rule.anchor == "old" and n_keep:
                with torch.no_grad():
                    logp_old_all, _ = sequence_logprobs(policy, module, train_batch, temperature=cfg.rollout.temperature,
                                                        autocast=amp, with_entropy=False)

            # ---- 3. minibatch updates: the policy leaves mu, the rule decides which tokens still count
            t_upd = time.perf_counter()
            pool = StepPool(cfg.rule.name, rule_params, anchor=cfg.rule.anchor, step=step, agg=cfg.optim.agg,
                            trunc_cap=cfg.optim.trunc_cap, max_len=cfg.rollout.max_new_tokens)
            t_rule = t_log = 0.0
            u = 0
            if global_keep > 0:
                for epoch in range(cfg.optim.epochs):
                    chunks = np.array_split(np.arange(n_keep), cfg.optim.updates_per_batch)
                    for chunk in chunks:
                        idx = chunk.tolist()
                        if not idx:  # nothing here on this rank: still join DDP's all-reduce with a zero loss
                            lp0, _ = sequence_logprobs(policy, train_module, index_batch(batch, [0]),
                                                       temperature=cfg.rollout.temperature, autocast=amp,
                                                       with_entropy=False)
                            loss = lp0.sum() * 0.0
                            optimizer.zero_grad(set_to_none=True)
                            loss.backward()
                            optimizer.step()
                            u += 1
                            continue
                        mb = index_batch(train_batch, idx)
                        mb_adv, mask = adv_t[chunk], mb.response_mask  # (b,), (b, T)
                        logp, entropy = sequence_logprobs(policy, train_module, mb, temperature=cfg.rollout.temperature,
                                                          autocast=amp, with_entropy=True)  # (b, T) each
                        anchor_lp = mb.logp_rollout if logp_old_all is None else logp_old_all[chunk]
                        t0 = time.perf_counter()
                        res = compute_mask(cfg.rule.name, logp=logp.detach(), logp_rollout=mb.logp_rollout,
                                           advantages=mb_adv, response_mask=mask,
                                           logp_old=None if logp_old_all is None else anchor_lp,
                                           anchor=cfg.rule.anchor, seq_ids=seq_t[chunk], step=step, **rule_params)
                        loss, lmetrics = policy_loss(logp, anchor_lp, mb_adv, mask, res, agg=cfg.optim.agg,
                                                     trunc_cap=cfg.optim.trunc_cap, max_len=cfg.rollout.max_new_tokens,
                                                     rule=cfg.rule.name)
                        t_rule += time.perf_counter() - t0
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        gnorm = torch.nn.utils.clip_grad_norm_(module.parameters(),
                                                               cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
                        optimizer.step()

                        # the step's scalars are computed once over all its updates (pooled, step_stats)
                        pool.add(update=u, logp=logp, logp_rollout=mb.logp_rollout,
                                 logp_old=None if logp_old_all is None else anchor_lp, advantages=mb_adv, mask=mask,
                                 seq_ids=seq_t[chunk], keep=res.keep, entropy=entropy, loss=lmetrics["loss/policy"],
                                 grad_norm=float(gnorm))
                        t0 = time.perf_counter()
                        log.log_tokens(step=step, update=u, seq_ids=seq_t[chunk], logp=logp.detach(),
                                       logp_rollout=mb.logp_rollout, advantages=mb_adv, response_mask=mask,
                                       logp_old=None if logp_old_all is None else anchor_lp,
                                       keep_applied=res.keep, reason_applied=res.reason, token_ids=mb.response_ids,
                                       entropy=entropy, reward=rew_t[chunk], group_id=group_ids[chunk],
                                       loss_weight=applied_weight(res, cfg.optim.trunc_cap))
                        t_log += time.perf_counter() - t0
                        u += 1
            with warnings.catch_warnings():  # the lr schedule is per iteration, even one with no update
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                scheduler.step()
            t_update = time.perf_counter() - t_upd

            # ---- 4. per-step scalars (the rule's and the loss's over the step's pooled updates)
            pooled = pool.scalars()
            n_tok = int(batch.response_mask.sum())
            lens = batch.response_mask.sum(1).float()
            scalars = {
                "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
                "acc/mean": float(correct.mean()),
                "response/len_mean": float(lens.mean()), "response/len_max": float(lens.max()),
                "batch/kept_seqs": n_keep, "batch/skipped_groups": int(zero.sum()) // cfg.rollout.n,
                "batch/updates": u, "rollout/staleness": step - version,
                "optim/lr": optimizer.param_groups[0]["lr"],
                "time/rollout_s": t_rollout, "time/update_s": t_update, "time/rule_s": t_rule, "time/log_tokens_s": t_log,
                "time/step_s": time.perf_counter() - t_step,
                "time/rollout_frac": t_rollout / max(time.perf_counter() - t_step, 1e-9),
                "throughput/tokens_per_s": n_tok / max(time.perf_counter() - t_step, 1e-9),
            }
            scalars.update(pooled)
            if d.main and cfg.log.eval_every and (step + 1) % cfg.log.eval_every == 0 and step + 1 < cfg.steps:
                scalars.update(run_eval(step + 1))
            if step + 1 == cfg.steps and d.main:
                ev = run_eval(step + 1)
                scalars.update(ev)
                summary["summary/greedy_acc_after"] = ev["eval/greedy_acc"]
                summary["summary/greedy_reward_after"] = ev["eval/greedy_reward"]
                scalars.update(summary)
            log.log_scalars(step, scalars)
            log.end_step(step)

            # ---- checkpoint (rank 0 writes; all ranks wait)
            last = step + 1 == cfg.steps
            if (cfg.ckpt.every and (step + 1) % cfg.ckpt.every == 0) or last:
                qt = pack_queue(queue) if queue else None  # batches already sampled for later iterations
                move_in = []
                if qt is not None and d.world > 1:  # other ranks' queues go in before rank 0 renames the checkpoint
                    import torch.distributed as dist

                    qdir = run_dir / "checkpoints" / f".queue-step={step:06d}"
                    if not d.main:
                        from safetensors.torch import save_file

                        qdir.mkdir(parents=True, exist_ok=True)
                        save_file(qt, str(qdir / queue_file(d.rank)))
                    dist.barrier()
                    move_in = [qdir / queue_file(r) for r in range(1, d.world)]
                if d.main:
                    save_checkpoint(run_dir, step, module, optimizer, scheduler,
                                    extra={"summary": summary, "config": to_dict(cfg),
                                           "queue": [[j, v] for j, (_, v) in sorted(queue.items())]},
                                    keep=max(cfg.ckpt.keep, 1), queue=qt, move_in=move_in)
                    if move_in:
                        move_in[0].parent.rmdir()
                if d.world > 1:
                    import torch.distributed as dist

                    dist.barrier()
            bar.update(1)
            bar.set_postfix(reward=f"{scalars['reward/mean']:.3f}", acc=f"{scalars['acc/mean']:.2f}",
                            masked=f"{scalars.get(f'mask/{cfg.rule.name}/frac', 0.0):.3f}")
        if d.main and cfg.ckpt.keep == 0:
            drop_checkpoints(run_dir)
        rec.close()
    except BaseException:
        rec.close(status="failed")
        raise
    finally:
        bar.close()
    return summary
