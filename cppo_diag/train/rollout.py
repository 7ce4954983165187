"""Rollout generation behind a small interface, so a faster engine (vLLM, SGLang) can be added later.

A ``Sampler`` turns prompts into responses and returns, for every sampled token, the log-probability the
sampler itself assigned to it (mu in SPEC.md), recorded at sampling time. The built-in ``TorchSampler``
decodes with the training model's own KV cache; under bf16 autocast its mu differs from the trainer's
recomputed pi in the low bits, the same kind of train/inference mismatch real engines have.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Protocol

import torch


@dataclass
class RolloutBatch:
    prompt_ids: list[list[int]]  # B prompts (token ids, unpadded)
    response_ids: torch.Tensor  # (B, T) long, pad_id after the end
    response_mask: torch.Tensor  # (B, T) bool, True on generated tokens (EOS included)
    logp_rollout: torch.Tensor  # (B, T) float32, mu's log-prob of each sampled token (0 on padding)
    # set by the trainer with log.behavior_logp (attribution): the sampling weights' log-probs under the trainer's
    # numerics (B, T), and how many optimiser steps those weights had taken
    logp_behavior: torch.Tensor | None = None
    opt_step: int = 0


class Sampler(Protocol):
    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None) -> RolloutBatch:
        ...


def left_pad(prompt_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, Lp), attention_mask (B, Lp) bool) with prompts right-aligned."""
    Lp = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), Lp), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), Lp), dtype=torch.bool)
    for i, p in enumerate(prompt_ids):
        ids[i, Lp - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, Lp - len(p):] = True
    return ids.to(device), mask.to(device)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering on (B, V) logits: keep the smallest set whose probability reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)


class TorchSampler:
    """Autoregressive sampling with the model's KV cache.

    ``forward(input_ids, attention_mask, position_ids, cache) -> (logits, cache)`` is the model adapter (see
    ``cppo_diag.train.models``). mu is the log-probability of the sampled id under the distribution actually
    sampled from: the log-softmax of ``logits / temperature``, after top-p truncation and renormalisation when
    ``top_p < 1`` (so mu is the behaviour policy; the trainer's pi is the untruncated tempered softmax, and
    pi / mu carries the truncation). With ``top_p = 1`` the two coincide.
    """

    def __init__(self, forward: Callable, *, eos_id: int, pad_id: int, device, autocast_dtype=None,
                 empty_cache: Callable | None = None):
        self.forward, self.eos_id, self.pad_id, self.device = forward, eos_id, pad_id, torch.device(device)
        self.autocast_dtype, self.empty_cache = autocast_dtype, empty_cache

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def generate(self, prompt_ids, *, max_new_tokens, temperature=1.0, top_p=1.0, greedy=False, generator=None,
                 logit_noise=0.0):
        B = len(prompt_ids)
        ids, mask = left_pad(prompt_ids, self.pad_id, self.device)  # (B, Lp)
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)  # (B, Lp)
        cache = self.empty_cache() if self.empty_cache else None
        out_ids = torch.full((B, max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)
        out_lp = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=self.device)
        out_mask = torch.zeros((B, max_new_tokens), dtype=torch.bool, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        next_pos = pos[:, -1] + 1  # (B,)
        step_in, step_pos, attn = ids, pos, mask
        T = 0
        for t in range(max_new_tokens):
            with self._autocast():
                logits, cache = self.forward(step_in, attn, step_pos, cache)
            logits = logits[:, -1].float() / max(temperature, 1e-6)  # (B, V)
            if logit_noise > 0 and not greedy:  # a degraded engine (rollout.logit_noise): mu is the noisy policy
                logits = logits + logit_noise * torch.randn(logits.shape, generator=generator, device=logits.device)
            if greedy:
                logp_all = logits.log_softmax(-1)  # (B, V)
                tok = logits.argmax(-1)  # (B,)
            else:
                kept = top_p_filter(logits, top_p)  # (B, V) -inf outside the nucleus
                logp_all = kept.log_softmax(-1)  # (B, V) the distribution sampled from: mu
                tok = torch.multinomial(kept.softmax(-1), 1, generator=generator).squeeze(1)  # (B,)
            tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
            out_ids[:, t] = tok
            out_lp[:, t] = torch.where(done, 0.0, logp_all.gather(1, tok[:, None]).squeeze(1))
            out_mask[:, t] = ~done
            done = done | (tok == self.eos_id)
            T = t + 1
            if bool(done.all()):
                break
            step_in = tok[:, None]  # (B, 1)
            step_pos = next_pos[:, None]
            next_pos = next_pos + 1
            attn = torch.cat([attn, torch.ones(B, 1, dtype=torch.bool, device=self.device)], dim=1)
        return RolloutBatch(prompt_ids=[list(p) for p in prompt_ids], response_ids=out_ids[:, :T],
                            response_mask=out_mask[:, :T], logp_rollout=out_lp[:, :T])
