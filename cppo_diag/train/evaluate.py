"""Held-out evaluation: greedy accuracy and Avg@k at a chosen temperature / top-p."""

from __future__ import annotations

import numpy as np
import torch

from cppo_diag import metric_names as M

from .tasks.base import Problem


@torch.no_grad()
def evaluate(policy, sampler, problems: list[Problem], score, *, max_new_tokens: int, k: int = 0,
             temperature: float = 0.7, top_p: float = 0.95, batch_size: int = 128, generator=None,
             valid_share=None) -> dict[str, float]:
    """``eval/greedy_acc`` and ``eval/greedy_reward`` (temperature 0), ``eval/greedy_valid_share`` when the task
    gives a per-digit ``valid_share(problem, completion)`` (the chain task), and, when k > 0, ``eval/avg@k``
    (mean exact accuracy over k samples per prompt at ``temperature`` / ``top_p``)."""
    was_training = policy.module.training
    policy.module.eval()
    out: dict[str, float] = {}
    accs, rewards, shares = [], [], []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        rb = sampler.generate([policy.encode_prompt(p.prompt) for p in chunk], max_new_tokens=max_new_tokens, greedy=True)
        for p, ids, m in zip(chunk, rb.response_ids.tolist(), rb.response_mask.tolist()):
            text = policy.decode([t for t, v in zip(ids, m) if v and t != policy.eos_id])
            r, c = score(p, text)
            accs.append(c)
            rewards.append(r)
            if valid_share is not None:
                shares.append(valid_share(p, text))
    out[M.EVAL_GREEDY_ACC] = float(np.mean(accs))
    out[M.EVAL_GREEDY_REWARD] = float(np.mean(rewards))
    if shares:
        out[M.EVAL_GREEDY_VALID_SHARE] = float(np.mean(shares))
    if k > 0:
        hits = []
        for i in range(0, len(problems), max(1, batch_size // k)):
            chunk = problems[i : i + max(1, batch_size // k)]
            prompts = [policy.encode_prompt(p.prompt) for p in chunk for _ in range(k)]
            rb = sampler.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  generator=generator)
            for j, (ids, m) in enumerate(zip(rb.response_ids.tolist(), rb.response_mask.tolist())):
                hits.append(score(chunk[j // k], policy.decode([t for t, v in zip(ids, m) if v and t != policy.eos_id]))[1])
        out[M.eval_avg_at(k)] = float(np.mean(hits))
    policy.module.train(was_training)
    return out
