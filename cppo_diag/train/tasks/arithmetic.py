"""Synthetic arithmetic with answers of tens of tokens (the CPU demo's task; see SPEC.md "What the bundled demo
must exercise").

``fib`` (default): a Fibonacci-style recurrence modulo 10**digits. The prompt gives two seeds and the number of
terms to write, e.g. ``3,8;10=`` -> ``1,9,0,9,9,8,7,5,2,7``: each term is the sum of the two before it,
zero-padded to ``digits`` digits. Answers are ``(digits + 1) * terms - 1`` characters plus EOS (16-32 tokens
with the defaults: 1 digit, 8-16 terms); each term depends on the two before it, so an early slip propagates
and position matters.

``add``: several independent additions in one prompt, ``12+34,56+78=`` -> ``46,134``.

Rewards: ``exact`` (1 if the whole answer matches, else 0) or ``partial`` (fraction of terms right at their
place; 1 exactly when the whole answer is right) - the dense option the demo uses.

Held-out set: ``eval_size`` distinct prompts drawn without replacement (``base.draw_distinct``); training
draws skip them. ``domain_size`` counts the distinct prompts: ``fib`` has (10**digits)**2 seed pairs times the
number of term counts (900 with the defaults), ``add`` sum over k of (10**digits)**(2k).
"""

from __future__ import annotations

import numpy as np

from .base import Problem, draw_distinct


class ArithmeticTask:
    def __init__(self, kind: str = "fib", *, min_terms: int = 8, max_terms: int = 16, digits: int = 1,
                 reward: str = "partial", eval_size: int = 128, eval_seed: int = 12345):
        if kind not in ("fib", "add"):
            raise ValueError(f"task.kind: expected 'fib' or 'add' for arithmetic, found {kind!r}")
        if reward not in ("exact", "partial"):
            raise ValueError(f"task.reward: expected 'exact' or 'partial', found {reward!r}")
        if not 1 <= min_terms <= max_terms:
            raise ValueError(f"task.min_terms/max_terms: expected 1 <= min <= max, found {min_terms}, {max_terms}")
        self.kind, self.min_terms, self.max_terms, self.digits, self.reward = kind, min_terms, max_terms, digits, reward
        self.name = f"arith-{kind}"
        mod, counts = 10**digits, range(min_terms, max_terms + 1)
        self.domain_size = len(counts) * mod**2 if kind == "fib" else sum(mod ** (2 * k) for k in counts)
        self._eval = draw_distinct(self._one, eval_size, np.random.default_rng(eval_seed), domain_size=self.domain_size)
        self._eval_prompts = {p.prompt for p in self._eval}

    def _one(self, rng: np.random.Generator) -> Problem:
        mod = 10**self.digits
        k = int(rng.integers(self.min_terms, self.max_terms + 1))
        if self.kind == "fib":
            a, b = (int(x) for x in rng.integers(0, mod, size=2))
            terms, x, y = [], a, b
            for _ in range(k):
                x, y = y, (x + y) % mod
                terms.append(f"{y:0{self.digits}d}")
            return Problem(f"{a:0{self.digits}d},{b:0{self.digits}d};{k}=", ",".join(terms), {"terms": k})
        pairs = rng.integers(0, mod, size=(k, 2))
        prompt = ",".join(f"{a}+{b}" for a, b in pairs) + "="
        return Problem(prompt, ",".join(str(int(a + b)) for a, b in pairs), {"terms": k})

    def sample(self, n: int, rng: np.random.Generator) -> list[Problem]:
        out = []
        while len(out) < n:
            p = self._one(rng)
            if p.prompt not in self._eval_prompts:
                out.append(p)
        return out

    def eval_set(self) -> list[Problem]:
        return self._eval

    def score(self, problem: Problem, completion: str) -> tuple[float, bool]:
        got, want = completion.strip().split(","), problem.answer.split(",")
        correct = got == want
        if self.reward == "exact" or correct:
            return float(correct), correct
        hits = sum(g == w for g, w in zip(got, want))
        return hits / max(len(want), len(got)), False  # extra terms dilute the credit
