"""The speed-oriented code paths of ``cppo_diag.masks`` give exactly (bit for bit) what the plain formulation gives.

Each fast path is compared with a straightforward version of the same computation (kept here or in the module as
the fallback): the composite-key shuffle permutation vs the per-row stable sort of the keys, the one-sort band
ordering of the adaptive delta_b vs two stable sorts, the int32-counted positions vs a float cumsum, the
in-place binary KL vs the textbook expression, and the away test with and without a cached rho. Both sort
back ends (numpy on CPU, ``torch.sort`` as used on CUDA) and the >63-bit fallbacks are exercised on CPU.
"""

from __future__ import annotations

import pytest
import torch

from cppo_diag.masks import compute_mask, shuffle
from cppo_diag.masks import quantile as Q
from cppo_diag.masks.divergence import BINARY_KL_EPS, binary_kl
from cppo_diag.masks.layout import build_input
from cppo_diag.masks.rules.cppo import position_weights

from reference_loop import pad, random_batch


def _masks(seed: int, count: int = 40):
    """Random (B, T) validity masks: right/left padding, holes, empty rows, B = 0, T = 0, T = 1."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.zeros(0, 5, dtype=torch.bool), torch.zeros(3, 0, dtype=torch.bool), torch.ones(2, 1, dtype=torch.bool),
           torch.zeros(3, 7, dtype=torch.bool)]
    for _ in range(count):
        B, T = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 80, (1,), generator=g))
        kind = int(torch.randint(0, 3, (1,), generator=g))
        n = torch.randint(0, T + 1, (B,), generator=g)
        cols = torch.arange(T)[None, :]
        if kind == 0:
            m = cols < n[:, None]
        elif kind == 1:
            m = cols >= (T - n)[:, None]
        else:
            m = torch.rand(B, T, generator=g) < torch.rand(1, generator=g)
        out.append(m)
    return out


@pytest.fixture(params=["numpy", "torch"])
def sort_backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(shuffle, "host_paths", lambda device: False)
    return request.param


def test_shuffle_permutation_fast_path_equals_rowsort(sort_backend):
    for m in _masks(1):
        rank, n = torch.cumsum(m, -1) - 1, m.sum(-1)
        for seed in (0, 5, 2**40 + 3, 2**64 - 1):
            ref = shuffle._permuted_ranks_rowsort(rank, n, m, seed=seed)
            assert torch.equal(shuffle.permuted_ranks(rank, n, m, seed=seed), ref), (m.shape, seed)
            pos = shuffle.permuted_positions(n, m, seed=seed)
            assert torch.equal(pos, torch.where(m, ref, 0)), (m.shape, seed)
            for b in range(m.shape[0]):  # the plain-Python definition (sorted hash keys, ties by j)
                perm = shuffle.shuffle_permutation(seed, b, int(n[b]))
                assert pos[b][m[b]].tolist() == perm and ref[b][m[b]].tolist() == perm, (m.shape, seed, b)


def test_shuffle_permutation_matches_the_python_definition(sort_backend):
    m = torch.arange(30)[None, :] < torch.tensor([30, 17, 1, 0, 29])[:, None]
    n = m.sum(-1)
    pos = shuffle.permuted_positions(n, m, seed=11)
    for b in range(m.shape[0]):
        assert pos[b, : int(n[b])].tolist() == shuffle.shuffle_permutation(11, b, int(n[b]))


def test_shuffle_falls_back_when_the_key_does_not_fit(monkeypatch):
    monkeypatch.setattr(shuffle, "KEY_BITS", 33)  # forces the per-row sort for any T > 2
    m = _masks(2, 8)[-1]
    rank, n = torch.cumsum(m, -1) - 1, m.sum(-1)
    assert shuffle._perm_packed_numpy(3, n) is None
    assert torch.equal(shuffle.permuted_ranks(rank, n, m, seed=3), shuffle._permuted_ranks_rowsort(rank, n, m, seed=3))


def _two_sort_reference(vals, m_row):
    row_of = torch.repeat_interleave(torch.arange(m_row.numel()), m_row)
    order = torch.sort(vals, stable=True).indices
    order = order[torch.sort(row_of[order], stable=True).indices]
    return vals[order]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_band_sort_within_rows_equals_two_stable_sorts(sort_backend, dtype):
    g = torch.Generator().manual_seed(3)
    for trial in range(30):
        R = int(torch.randint(1, 12, (1,), generator=g))
        m_row = torch.randint(0, 40, (R,), generator=g)
        M = int(m_row.sum())
        vals = (0.02 + 0.02 * torch.rand(M, generator=g, dtype=torch.float64)).to(dtype)
        if M > 4 and trial % 3 == 0:
            vals[: M // 2] = vals[M // 2]  # duplicates
        if M and trial % 5 == 0:
            vals[0] = torch.finfo(dtype).tiny / 4  # a subnormal
        assert torch.equal(Q._sort_within_rows(vals, m_row), _two_sort_reference(vals, m_row)), (trial, dtype)


def test_band_sort_falls_back_when_the_key_does_not_fit(monkeypatch):
    monkeypatch.setattr(shuffle, "KEY_BITS", 2)
    vals = torch.tensor([0.03, 0.025, 0.021, 0.039, 0.03], dtype=torch.float64)
    m_row = torch.tensor([3, 0, 2])
    assert torch.equal(Q._sort_within_rows(vals, m_row), _two_sort_reference(vals, m_row))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adaptive_delta_b_both_backends_agree(monkeypatch, dtype):
    g = torch.Generator().manual_seed(4)
    B, T = 30, 60
    scale = torch.tensor([0.005, 0.03, 0.1])[torch.arange(B) % 3][:, None]  # rows at the min, between, at the cap
    q = torch.full((B, T), 0.5, dtype=torch.float64)
    p = q + torch.rand(B, T, generator=g, dtype=torch.float64) * scale * 1.3
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lp, m = pad(p.log().to(dtype), lengths, 64, "left")
    lr, _ = pad(q.log().to(dtype), lengths, 64, "left")
    x = build_input(logp=lp, logp_rollout=lr, advantages=torch.ones(B, dtype=dtype), response_mask=m)
    d = x.divergence("binary_tv")
    settings = [dict(q=0.9, scale=1.0, delta_b_min=0.02, cap=2.0), dict(q=0.5, scale=1.0, delta_b_min=0.02, cap=2.0),
                dict(q=0.0, scale=3.0, delta_b_min=0.02, cap=5.0), dict(q=1.0, scale=0.5, delta_b_min=0.01, cap=2.0),
                dict(q=0.9, scale=1.0, delta_b_min=0.02, cap=1.0), dict(q=0.73, scale=1.0, delta_b_min=0.0, cap=2.0)]
    host = [Q.adaptive_delta_b(d, m, x.lengths, **kw) for kw in settings]
    assert bool(((host[0] > 0.02) & (host[0] < 0.04)).any())  # some rows took the exact (band) path
    monkeypatch.setattr(shuffle, "host_paths", lambda device: False)  # torch.sort, no row subsets (as on CUDA)
    for kw, a in zip(settings, host):
        assert torch.equal(a, Q.adaptive_delta_b(d, m, x.lengths, **kw)), kw
    monkeypatch.setattr(shuffle, "KEY_BITS", 2)  # two stable sorts
    for kw, a in zip(settings, host):
        assert torch.equal(a, Q.adaptive_delta_b(d, m, x.lengths, **kw)), kw
    for kw, a in zip(settings, host):  # and the plain quantile-then-clamp definition
        for b in range(B):
            vals = d[b][m[b]]
            expect = float(torch.quantile(vals.double(), kw["q"])) * kw["scale"]
            expect = min(max(expect, kw["delta_b_min"]), kw["cap"] * kw["delta_b_min"])
            assert float(a[b]) == pytest.approx(expect, rel=1e-6 if dtype == torch.float32 else 1e-12, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_position_weights_equal_a_float_cumsum(dtype):
    for m in _masks(5, 20):
        if m.numel() == 0:
            continue
        B, T = m.shape
        x = build_input(logp=torch.zeros(B, T, dtype=dtype), logp_rollout=torch.zeros(B, T, dtype=dtype),
                        advantages=torch.ones(B, dtype=dtype), response_mask=m)
        for w_min in (0.8, 0.0, 1.0, 0.37):
            r = torch.cumsum(m, dim=-1, dtype=dtype) - 1.0
            den = (m.sum(-1) - 1).clamp(min=1).to(dtype)[:, None]
            expect = torch.rsub(r.mul(1.0 - w_min).div(den), 1.0).masked_fill(~m, 0.0)
            got = position_weights(x, w_min=w_min, weight_length="sequence", horizon=None)
            assert torch.equal(got, expect), (m.shape, w_min)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binary_kl_equals_the_textbook_expression(dtype):
    g = torch.Generator().manual_seed(6)
    p = torch.rand(5000, generator=g, dtype=torch.float64).to(dtype)
    q = torch.rand(5000, generator=g, dtype=torch.float64).to(dtype)
    p[:10], q[5:15], p[20:30], p[40], q[41] = 1.0, 1.0, q[20:30], 0.0, 0.0
    p0, q0 = p.clone(), q.clone()
    expect = q * torch.log(q / p) + (1.0 - q) * torch.log((1.0 - q + BINARY_KL_EPS) / (1.0 - p + BINARY_KL_EPS))
    got = binary_kl(p, q)
    assert torch.equal(torch.nan_to_num(got, nan=7.0), torch.nan_to_num(expect, nan=7.0))
    assert torch.equal(p, p0) and torch.equal(q, q0)  # inputs untouched


def test_away_is_the_same_with_or_without_a_cached_rho():
    lp, lr, adv, lengths = random_batch(6, 30, seed=7, dtype=torch.float32)
    lp[0, :5] = lr[0, :5]  # rho == 1 exactly
    lp[1, :5] = lr[1, :5] + 1e-8  # rho rounds to 1
    lp, m = pad(lp, lengths, 32)
    lr, _ = pad(lr, lengths, 32)
    a = build_input(logp=lp, logp_rollout=lr, advantages=adv, response_mask=m)
    b = build_input(logp=lp, logp_rollout=lr, advantages=adv, response_mask=m)
    rho = b.rho  # cached before away
    assert torch.equal(a.away, b.away)
    assert torch.equal(a.rho, rho)  # rho computed after away is the same tensor value


@pytest.mark.parametrize("rule", ["cppo", "cppo_shuffled", "cppo_soft", "cppo_no_weight"])
def test_cppo_family_is_the_same_with_either_sort_backend(monkeypatch, rule):
    lp, lr, adv, lengths = random_batch(16, 50, seed=8, dtype=torch.float32, drift=0.05)
    lp, m = pad(lp, lengths, 55, "left")
    lr, _ = pad(lr, lengths, 55, "left")
    kw = dict(logp=lp, logp_rollout=lr, advantages=adv, response_mask=m, return_internals=True)
    a = compute_mask(rule, **kw)
    monkeypatch.setattr(shuffle, "host_paths", lambda device: False)
    b = compute_mask(rule, **kw)
    assert torch.equal(a.keep, b.keep) and torch.equal(a.reason, b.reason)
    assert (a.weight is None) == (b.weight is None) and (a.weight is None or torch.equal(a.weight, b.weight))
    for k in a.internals:
        assert torch.equal(a.internals[k], b.internals[k]), k
    assert a.metrics == b.metrics


def test_fast_paths_accept_non_contiguous_masks():
    lp, lr, adv, _ = random_batch(6, 40, seed=3, drift=0.2, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    m = (torch.rand(40, 6, generator=g) < 0.7).t()  # (6, 40) view with strides (1, 6)
    assert not m.is_contiguous()
    n = m.sum(-1)
    assert torch.equal(shuffle.permuted_positions(n, m, seed=2), shuffle.permuted_positions(n, m.contiguous(), seed=2))
    for rule in ("cppo", "cppo_shuffled", "cppo_soft"):
        a = compute_mask(rule, logp=lp, logp_rollout=lr, advantages=adv, response_mask=m, return_internals=True)
        b = compute_mask(rule, logp=lp, logp_rollout=lr, advantages=adv, response_mask=m.contiguous(),
                         return_internals=True)
        assert torch.equal(a.keep, b.keep) and torch.equal(a.reason, b.reason), rule
        assert all(torch.equal(a.internals[k], b.internals[k]) for k in a.internals), rule
