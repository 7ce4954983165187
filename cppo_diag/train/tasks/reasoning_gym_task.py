"""Optional ``reasoning-gym`` procedural tasks (``pip install reasoning-gym``), scored by the generator's own checker."""

from __future__ import annotations

import re

import numpy as np

from .base import Problem
from .math_dataset import extract_boxed

SUFFIX = "\nGive your final answer within \\boxed{}."


class ReasoningGymTask:
    def __init__(self, name: str, *, size: int = 2000, eval_size: int = 64, seed: int = 0):
        try:
            import reasoning_gym
        except ImportError as exc:
            raise ImportError("task.kind='reasoning_gym' needs the optional package: pip install reasoning-gym") from exc
        self._ds = reasoning_gym.create_dataset(name, size=size + eval_size, seed=seed)
        entries = list(self._ds)
        held: dict[str, dict] = {}
        for e in entries[:eval_size]:  # distinct questions; none of them is trained on
            held.setdefault(e["question"], e)
        self._eval_entries = list(held.values())
        banned = set(held)
        self._train_entries = [e for e in entries[eval_size:] if e["question"] not in banned]
        if not self._train_entries:
            raise ValueError(f"task.eval_size: the {size + eval_size} generated problems leave none for training")
        self.domain_size = len(banned | {e["question"] for e in self._train_entries})
        self.name = f"rg:{name}"

    def _problem(self, e) -> Problem:
        return Problem(e["question"] + SUFFIX, str(e["answer"]), {"entry": e})

    def sample(self, n: int, rng: np.random.Generator) -> list[Problem]:
        return [self._problem(self._train_entries[i]) for i in rng.integers(0, len(self._train_entries), size=n)]

    def eval_set(self) -> list[Problem]:
        return [self._problem(e) for e in self._eval_entries]

    def score(self, problem: Problem, completion: str) -> tuple[float, bool]:
        ans = extract_boxed(completion)
        if ans is None:
            m = re.findall(r"<answer>(.*?)</answer>", completion, flags=re.S)
            ans = m[-1].strip() if m else None
        if ans is None:
            return 0.0, False
        r = float(self._ds.score_answer(answer=ans, entry=problem.meta["entry"]))
        return r, r >= 1.0
