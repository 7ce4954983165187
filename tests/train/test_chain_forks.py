"""The chain task's forks (task.forks): two right digits at the fork positions, the density rising along the answer."""

import numpy as np
import pytest

from cppo_diag.train.config import TaskConfig
from cppo_diag.train.tasks import build_task, warmstart_key
from cppo_diag.train.tasks.chain import ChainTask, chain_digits, fork_positions, valid_prefix


def test_fork_positions_rise_along_the_answer():
    at = sorted(fork_positions(160, 0.5))
    assert len(at) == 40  # forks * n / 2
    thirds = [sum(1 for a in at if lo <= a < hi) for lo, hi in ((0, 53), (53, 107), (107, 160))]
    assert thirds[0] < thirds[1] < thirds[2]
    gaps = np.diff(at)
    assert gaps[:5].mean() > gaps[-5:].mean()  # denser at the end
    assert fork_positions(160, 0.0) == frozenset()


def test_either_branch_at_a_fork_is_right_and_the_rule_continues_from_the_digit_written():
    t = ChainTask(min_len=64, max_len=64, forks=0.8, eval_size=4, eval_seed=1)
    p = t.eval_set()[0]
    seed = [int(c) for c in p.prompt.split(";")[0]]
    answers = {"".join(map(str, chain_digits(seed, 64, forks=0.8, rng=np.random.default_rng(s)))) for s in range(20)}
    assert len(answers) > 10  # many right answers
    for a in answers:
        assert t.score(p, a) == (1.0, True)
    a = sorted(answers)[0]
    first_fork = min(fork_positions(64, 0.8))
    # a digit that is neither branch at the first fork: the correct prefix ends there
    v = int(a[first_fork])
    other = (v + 5) % 10
    bad = next(d for d in range(10) if d not in (v, other))
    slip = a[:first_fork] + str(bad) + a[first_fork + 1:]
    assert t.score(p, slip) == (pytest.approx(first_fork / 64), False)
    assert valid_prefix(seed, slip, 64, 0.8)[0] == first_fork
    # the other branch at the fork without continuing from it: wrong one digit later
    swapped = a[:first_fork] + str(other) + a[first_fork + 1:]
    assert valid_prefix(seed, swapped, 64, 0.8)[0] == first_fork + 1
    # too long dilutes, as without forks
    assert t.score(p, a + "1")[0] == pytest.approx(64 / 65)
    assert ChainTask(min_len=64, max_len=64, forks=0.8, eval_size=4, eval_seed=1, reward="exact").score(p, slip) == (0.0, False)


def test_forks_zero_is_the_plain_chain_and_the_warm_starts_are_separate():
    plain = ChainTask(min_len=32, max_len=32, eval_size=8, eval_seed=2)
    p = plain.eval_set()[0]
    seed = [int(c) for c in p.prompt.split(";")[0]]
    assert p.answer == "".join(map(str, chain_digits(seed, 32)))
    assert warmstart_key(TaskConfig(kind="chain")) == "chain"
    assert warmstart_key(TaskConfig(kind="chain", forks=0.5)) == "chain_forks"
    assert warmstart_key(TaskConfig(kind="fib", forks=0.5)) == "fib"
    assert build_task(TaskConfig(kind="chain", min_terms=32, max_terms=32, forks=0.5, eval_size=4)).forks == 0.5
    with pytest.raises(ValueError, match="task.forks"):
        ChainTask(forks=1.5, eval_size=1)


def test_detour_credit_prices_the_detours_in_the_partial_reward_only():
    t = ChainTask(min_len=64, max_len=64, forks=0.8, eval_size=4, eval_seed=1, detour_credit=0.0)
    p = t.eval_set()[0]
    seed = [int(c) for c in p.prompt.split(";")[0]]
    straight = "".join(map(str, chain_digits(seed, 64, forks=0.8)))  # the rule's value at every fork
    assert t.score(p, straight) == (1.0, True)
    branchy = "".join(map(str, chain_digits(seed, 64, forks=0.8, rng=np.random.default_rng(0))))
    prefix, detours = valid_prefix(seed, branchy, 64, 0.8)
    assert prefix == 64 and detours > 0
    assert t.score(p, branchy) == (pytest.approx((64 - detours) / 64), True)  # exact, but detours earn nothing
    half = ChainTask(min_len=64, max_len=64, forks=0.8, eval_size=4, eval_seed=1, detour_credit=0.5)
    assert half.score(p, branchy)[0] == pytest.approx((64 - 0.5 * detours) / 64)
    with pytest.raises(ValueError, match="task.detour_credit"):
        ChainTask(forks=0.5, detour_credit=2.0, eval_size=1)
