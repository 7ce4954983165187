"""Supervised warm start for the tiny GPT (teacher forcing on the task's reference answers).

Used by ``scripts/make_warmstart.py`` to produce the shipped checkpoint: RL must start from a policy at
*partial* accuracy so there is headroom to learn and reward variance within groups.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from .models.tiny_gpt import CharTokenizer, TinyGPT
from .tasks.base import Task


def make_batch(tok: CharTokenizer, problems, device="cpu"):
    """Right-padded (input_ids, targets) with targets = -100 outside the answer (+ EOS)."""
    seqs, tgts = [], []
    for p in problems:
        prompt = tok.encode_prompt(p.prompt)
        ans = tok.encode(p.answer) + [tok.eos_id]
        ids = prompt + ans
        seqs.append(ids[:-1])
        tgts.append([-100] * (len(prompt) - 1) + ans)
    L = max(len(s) for s in seqs)
    x = torch.full((len(seqs), L), tok.pad_id, dtype=torch.long)
    y = torch.full((len(seqs), L), -100, dtype=torch.long)
    for i, (s, t) in enumerate(zip(seqs, tgts)):
        x[i, : len(s)] = torch.tensor(s)
        y[i, : len(t)] = torch.tensor(t)
    return x.to(device), y.to(device)


def sft(model: TinyGPT, tok: CharTokenizer, task: Task, *, steps: int, batch_size: int = 64, lr: float = 3e-3,
        seed: int = 0, log_every: int = 50, eval_fn=None, stop_at: float | None = None, progress: bool = True,
        logits_fn=None, device="cpu", autocast=None):
    """Teacher-forced training; stops early once ``eval_fn(model) >= stop_at``. Returns the last eval value.

    ``logits_fn(input_ids, attention_mask) -> (B, L, V)`` defaults to the tiny GPT's forward (pass one for
    transformers models); ``autocast`` a dtype for torch.autocast on ``device``."""
    from contextlib import nullcontext

    if logits_fn is None:
        logits_fn = lambda x, m: model(x, attention_mask=m)[0]  # noqa: E731
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    last = None
    t0 = time.time()
    bar = tqdm(range(steps), desc="sft", disable=not progress)
    for it in bar:
        x, y = make_batch(tok, task.sample(batch_size, rng), device)
        valid = (x != tok.pad_id)
        with torch.autocast(torch.device(device).type, dtype=autocast) if autocast is not None else nullcontext():
            logits = logits_fn(x, valid)  # (B, L, V)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if eval_fn is not None and (it + 1) % log_every == 0:
            model.eval()
            last = eval_fn(model)
            model.train()
            bar.set_postfix(loss=f"{loss.item():.3f}", eval=f"{last:.3f}", t=f"{time.time() - t0:.0f}s")
            if stop_at is not None and last >= stop_at:
                break
    return last
