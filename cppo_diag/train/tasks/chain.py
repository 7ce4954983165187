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

Forks (``forks`` > 0, the ``long`` preset): at the positions ``fork_positions`` gives (density rising linearly
along the answer) two digits are right, the rule's value v and the detour v + 5 (mod 10), and the rule goes on
from the digit written. Any valid answer is exact; in the partial reward a detour digit earns ``detour_credit``
(the preset: 0). The reference answers (SFT data) take a random branch at each fork.
"""

from __future__ import annotations

import numpy as np

from .base import Problem, draw_distinct

SEED_LEN = 6
LEN_STEP = 32  # answer lengths are min_len, min_len + 32, ... <= max_len: the tiny GPT (learned absolute
# positions) must stop exactly at the length the prompt names, and it learns a few stop positions reliably, not 65


def chain_digits(seed: list[int], n: int, *, forks: float = 0.0, rng: np.random.Generator | None = None,
                 profile: str = "rising") -> list[int]:
    """n digits continuing ``seed`` with x[t] = (x[t-1] + 1 + x[t-len(seed)] mod 2) mod 10; at the fork
    positions (``fork_positions(n, forks)``) the digit is the rule's value or that value + 5 (mod 10), drawn
    uniformly with ``rng`` (without one: always the rule's value)."""
    xs = list(seed)
    m = len(seed)
    at = fork_positions(n, forks, profile)
    for t in range(n):
        v = (xs[-1] + 1 + xs[-m] % 2) % 10
        if t in at and rng is not None and rng.random() < 0.5:
            v = (v + 5) % 10
        xs.append(v)
    return xs[m:]


FORK_PROFILES = ("rising", "uniform")


def fork_positions(n: int, forks: float, profile: str = "rising") -> frozenset[int]:
    """The 0-based answer positions where two digits are right, about ``forks * n / 2`` of them under either
    profile. ``rising`` (the long preset): the fork density rises linearly from 0 at the first digit to
    ``forks`` at the last (cumulative count ``forks * t**2 / (2 n)`` after t digits), 1/9 of the forks in the
    first third of the answer and 5/9 in the last. ``uniform``: the density is ``forks / 2`` everywhere
    (cumulative count ``forks * t / 2``), a third of the forks in each third: the control that tells a
    divergence rising along the answer apart from forks growing denser along it (docs/trainer.md)."""
    if forks <= 0:
        return frozenset()
    if profile == "rising":
        count = [int(forks * t * t / (2 * n)) for t in range(n + 1)]
    elif profile == "uniform":
        count = [int(forks * t / 2) for t in range(n + 1)]
    else:
        raise ValueError(f"task.fork_profile: expected one of {', '.join(FORK_PROFILES)}, found {profile!r}")
    return frozenset(t - 1 for t in range(1, n + 1) if count[t] > count[t - 1])


def valid_prefix(seed: list[int], digits: str, n: int, forks: float, profile: str = "rising") -> tuple[int, int]:
    """(length of the longest prefix of ``digits`` that follows the chain from ``seed``, how many of its fork
    digits took the detour): at a fork either the rule's value or the detour (value + 5) continues the chain,
    and the rule goes on from the digit written."""
    xs = list(seed)
    m = len(seed)
    at = fork_positions(n, forks, profile)
    detours = 0
    for t, ch in enumerate(digits[:n]):
        if not ch.isdigit():
            return t, detours
        v, d = (xs[-1] + 1 + xs[-m] % 2) % 10, int(ch)
        if d != v:
            if not (t in at and d == (v + 5) % 10):
                return t, detours
            detours += 1
        xs.append(d)
    return min(len(digits), n), detours


class ChainTask:
    def __init__(self, *, min_len: int = 128, max_len: int = 192, reward: str = "partial", eval_size: int = 128,
                 eval_seed: int = 12345, seed_len: int = SEED_LEN, forks: float = 0.0,
                 detour_credit: float = 1.0, fork_profile: str = "rising"):
        if reward not in ("exact", "partial"):
            raise ValueError(f"task.reward: expected 'exact' or 'partial', found {reward!r}")
        if not 1 <= min_len <= max_len <= 999:
            raise ValueError(f"task.min_terms/max_terms (chain: answer digits): expected 1 <= min <= max <= 999, "
                             f"found {min_len}, {max_len}")
        if not 0.0 <= forks <= 1.0:
            raise ValueError(f"task.forks (chain: fork density at the last digit): expected a number in [0, 1], "
                             f"found {forks}")
        if not 0.0 <= detour_credit <= 1.0:
            raise ValueError(f"task.detour_credit (chain: partial credit of a fork's detour digit): expected a "
                             f"number in [0, 1], found {detour_credit}")
        if fork_profile not in FORK_PROFILES:
            raise ValueError(f"task.fork_profile: expected one of {', '.join(FORK_PROFILES)}, found {fork_profile!r}")
        self.seed_len, self.forks, self.detour_credit = seed_len, float(forks), float(detour_credit)
        self.fork_profile = fork_profile
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
        # with forks, the reference answer takes a random branch at each fork (one of 2**(number of forks) right
        # answers):
        # SFT on these answers gives a warm start that is unsure at the forks and sure elsewhere
        ans = "".join(str(d) for d in chain_digits(seed, n, forks=self.forks, rng=rng if self.forks else None,
                                                   profile=self.fork_profile))
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
        if not self.forks:
            if got == want:
                return 1.0, True
            prefix = 0
            for g, w in zip(got, want):
                if g != w:
                    break
                prefix += 1
            return (0.0 if self.reward == "exact" else prefix / max(len(want), len(got))), False
        # with forks any branch is right: check the rule along the completion itself; a detour digit at a fork
        # earns ``detour_credit`` of a digit in the partial reward (the verifier's preference between two right
        # answers), so RL has a reason to move the forks' probabilities
        seed = [int(c) for c in problem.prompt.split(";")[0]]
        prefix, detours = valid_prefix(seed, got, len(want), self.forks, self.fork_profile)
        exact = prefix == len(want) == len(got)
        if self.reward == "exact":
            return float(exact), exact
        return (prefix - (1.0 - self.detour_credit) * detours) / max(len(want), len(got)), exact

    def valid_share(self, problem: Problem, completion: str) -> float:
        """The share of the answer's digits that are valid under some branch: the valid prefix over the answer
        length (over the longer of answer and completion), a detour counting as valid. A per-digit held-out
        measure (``eval/greedy_valid_share``), far less noisy than exact match over 160 digits."""
        got, want = completion.strip(), problem.answer
        seed = [int(c) for c in problem.prompt.split(";")[0]]
        prefix, _ = valid_prefix(seed, got, len(want), self.forks, self.fork_profile)
        return prefix / max(len(want), len(got))

    def fork_flags(self, problem: Problem, length: int) -> np.ndarray | None:
        """(length,) bool: which response positions are forks (two right digits) - the task's oracle of the
        uncertain tokens, recorded as the run-format column ``fork``. The EOS and any digit past the answer's
        length are not forks. None without forks."""
        if not self.forks:
            return None
        at = fork_positions(int(problem.meta["terms"]), self.forks, self.fork_profile)
        flags = np.zeros(length, dtype=bool)
        idx = [t for t in at if t < length]
        flags[idx] = True
        return flags
