"""The task interface: verifiable problems with a reward function."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class Problem:
    prompt: str  # text shown to the model (before any chat template)
    answer: str  # reference answer
    meta: dict = field(default_factory=dict)


class Task(Protocol):
    name: str

    def sample(self, n: int, rng: np.random.Generator) -> list[Problem]:
        """n training problems drawn with ``rng`` (never from the held-out set)."""

    def eval_set(self) -> list[Problem]:
        """The fixed held-out problems used for greedy accuracy and Avg@k."""

    def score(self, problem: Problem, completion: str) -> tuple[float, bool]:
        """(reward, exactly correct) for one completion."""
