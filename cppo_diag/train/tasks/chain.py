"""A long-horizon task: a lagged digit chain (the ``long`` preset's task).

The prompt gives ``SEED_LEN`` random seed digits and the number of digits to write, e.g. ``402917;160=``; the
answer continues the sequence for that many digits (lengths are ``min_len + 32 j`` up to ``max_len``) with
``x[t] = (x[t-1] + 1 + x[t-SEED_LEN] mod 2) mod 10`` (each digit is the one before plus 1, plus 1 more when the
digit ``SEED_LEN`` places back is odd), starting after the seed. The ``long`` preset writes 160 digits (+ EOS).
Every digit depends on the whole prefix: one slip shifts every digit after it, so an early mistake propagates
to the end of the answer.

Why this rule and not a lagged Fibonacci sum ``x[t-1] + x[t-6]``: in a sum mod 10 neither input alone says
anything about the output, and the tiny GPT sat at chance loss for hundreds of SFT steps; here the previous
digit narrows the next one to two values, so SFT finds the rule in about 200 short-answer steps.

Domain: 10**SEED_LEN - 1 seeds (the all-zero seed is excluded) times the lengths, so held-out and training
prompts are distinct problems, not the same sequence at another length. The held-out set is drawn without
replacement; training prompts never use a held-out seed (at any length), so no held-out sequence is trained on.

Rewards: ``exact`` (1 iff the whole answer is right) or ``partial`` = the length of the correct prefix over the
answer length (over the longer of answer and completion, so extra digits dilute): a slip at position s earns
s / L, whatever the digits after it happen to match.
"""

from __future__ import annotations

import numpy as np

from .base import Problem, draw_distinct

SEED_LEN = 6
LEN_STEP = 32  # answer lengths are min_len, min_len + 32, ... <= max_len: the tiny GPT (learned absolute
# positions) must stop exactly at the length the prompt names, and it learns a few stop positions reliably, not 65


def chain_digits(seed: list[int], n: int) -> list[int]:
    """n digits continuing ``seed`` with x[t] = (x[t-1] + 1 + x[t-len(seed)] mod 2) mod 10."""
    xs = list(seed)
    m = len(seed)
    for _ in range(n):
        xs.append((xs[-1] + 1 + xs[-m] % 2) % 10)
    return xs[m:]


class ChainTask:
    def __init__(self, *, min_len: int = 128, max_len: int = 192, reward: str = "partial", eval_size: int = 128,
                 eval_seed: int = 12345, seed_len: int = SEED_LEN):
        if reward not in ("exact", "partial"):
            raise ValueError(f"task.reward: expected 'exact' or 'partial', found {reward!r}")
        if not 1 <= min_len <= max_len <= 999:
            raise ValueError(f"task.min_terms/max_terms (chain: answer digits): expected 1 <= min <= max <= 999, "
                             f"found {min_len}, {max_len}")
        self.seed_len = seed_len
        self.domain_size = (10**seed_len - 1) * ((max_len - min_len) // LEN_STEP + 1)
        self.min_len, self.max_len, self.reward = min_len, max_len, reward
        self.name = "chain"
        # held-out: distinct prompts drawn without replacement (base.draw_distinct); training draws skip them
        self._eval = draw_distinct(self._one, eval_size, np.random.default_rng(eval_seed), domain_size=self.domain_size)
        # training skips every held-out *seed*, at any length: the same seed at another length is the same sequence
        self._eval_seeds = {p.prompt.split(";")[0] for p in self._eval}

    def _one(self, rng: np.random.Generator) -> Problem:
        while True:
            seed = [int(x) for x in rng.integers(0, 10, size=self.seed_len)]
            if any(seed):
                break
        n = self.min_len + LEN_STEP * int(rng.integers(0, (self.max_len - self.min_len) // LEN_STEP + 1))
        ans = "".join(str(d) for d in chain_digits(seed, n))
        return Problem(f"{''.join(map(str, seed))};{n:03d}=", ans, {"terms": n})

    def sample(self, n: int, rng: np.random.Generator) -> list[Problem]:
        out = []
        while len(out) < n:
            p = self._one(rng)
            if p.prompt.split(";")[0] not in self._eval_seeds:
                out.append(p)
        return out

    def eval_set(self) -> list[Problem]:
        return self._eval

    def score(self, problem: Problem, completion: str) -> tuple[float, bool]:
        got, want = completion.strip(), problem.answer
        if got == want:
            return 1.0, True
        if self.reward == "exact":
            return 0.0, False
        prefix = 0
        for g, w in zip(got, want):
            if g != w:
                break
            prefix += 1
        return prefix / max(len(want), len(got)), False
