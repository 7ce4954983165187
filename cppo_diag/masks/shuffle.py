"""The seeded weight permutation of ``cppo_shuffled`` (CPPO paper Fig. 5 ablation).

For a response with id ``seq_id`` and n valid tokens, at training step ``step``, the permutation of positions
0..n-1 sorts the keys ``hash(seed, step, seq_id, n, j)`` for j = 0..n-1 (ties broken by j). The hash is
counter-based (a 32-bit integer mix, below), so the permutation depends only on (seed, step, seq_id, valid
length): never on the row the response occupies in a batch, the padded width, the padding side, the device or
the other rows. An offline recompute that knows each token's (step, seq_id) reproduces the trainer's
permutation however it rebuilds the batch, and a new step draws new permutations. ``seq_ids`` default to the
row index and ``step=None`` leaves the step out of the key (the key of a caller that gives neither).
``shuffle_permutation`` gives the permutation for one response in plain Python.

Speed: the first mixes depend only on (seed, step, seq_id, n) and are computed once per row; only the last is
per token. Keys are made unique by appending j, ``composite = row << (32 + jbits) | key << jbits | j``, so ONE
unstable 1-D sort of the valid tokens' composites orders every row by (key, j) at once (the rows come out
back to back, i.e. in packed order) and the permutation is read from the low bits; no indices, no per-row
sort. That path runs on the CPU with numpy's sort (SIMD quicksort, ~8x torch's int64 sort on this machine).
Elsewhere (CUDA: no host synchronisation wanted), or when the composite does not fit 63 bits (B * T_max
beyond ~2**31), a stable per-row ``torch.sort`` of the keys is used (``_permuted_ranks_rowsort``).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["shuffle_permutation", "permuted_ranks", "permuted_positions", "mix32"]

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27: products of 32-bit values stay below 2**59 in int64
_GOLDEN = 0x9E3779B9


def mix32(h):
    """32-bit integer mix (works on Python ints and int64 tensors holding values in [0, 2**32))."""
    h = h ^ (h >> 16)
    h = (h * _MUL) & _M32
    h = h ^ (h >> 16)
    h = (h * _MUL) & _M32
    h = h ^ (h >> 16)
    return h


def _fold(seed: int) -> int:
    seed = int(seed) & ((1 << 64) - 1)
    return (seed ^ (seed >> 32)) & _M32


def _seed_hash(seed: int, step: int | None) -> int:
    """The key prefix of (seed, step): mix32(fold(seed) ^ GOLDEN), with the step mixed in when given."""
    h = mix32(_fold(seed) ^ _GOLDEN)
    return h if step is None else mix32(h ^ _fold(step))


def _key(seed: int, seq_id, n, j, step: int | None = None):
    h = mix32(_seed_hash(seed, step) ^ _fold(seq_id))
    h = mix32(h ^ (n & _M32))
    return mix32(h ^ (j & _M32))


def shuffle_permutation(seed: int, seq_id: int, length: int, step: int | None = None) -> list[int]:
    """perm (list of 0-based positions): the weight at position i of response ``seq_id`` (at ``step``) is w at
    ``perm[i]``."""
    keys = [(_key(seed, seq_id, length, j, step), j) for j in range(length)]
    return [j for _, j in sorted(keys)]


KEY_BITS = 63  # bits available to the composite sort key (a module constant so tests can force the fallback)


def host_paths(device: torch.device) -> bool:
    """Whether the CPU-specific fast paths run for tensors on ``device``: 1-D key sorts in numpy (its SIMD sort)
    rather than ``torch.sort``, and data-dependent row subsets that need a host sync (free on the CPU). Off the
    CPU the sync-free formulation is used. Both give identical results (tests switch this to check)."""
    return device.type == "cpu"


def _row_hash(seed: int, n: torch.Tensor, seq_ids: torch.Tensor | None = None, step: int | None = None) -> torch.Tensor:
    """(B,) int64 in [0, 2**32): the key prefix mix32(mix32(seed_hash(seed, step) ^ fold(seq_id)) ^ n) of each
    row (``seq_ids`` default: the row index)."""
    if seq_ids is None:
        ids = torch.arange(n.shape[0], device=n.device, dtype=torch.int64)
    else:
        ids = seq_ids.to(device=n.device, dtype=torch.int64)
        ids = (ids ^ (ids >> 32)) & _M32  # fold, as ``_fold`` on a Python int
    h = mix32(ids ^ _seed_hash(seed, step))
    return mix32(h ^ (n.to(torch.int64) & _M32))


def _mix32_inplace(h: torch.Tensor) -> torch.Tensor:
    """``mix32`` in place on an int64 tensor (values in [0, 2**32)) or a numpy uint32 array (wrapping multiply)."""
    if isinstance(h, np.ndarray):
        s16, mul = np.uint32(16), np.uint32(_MUL)
        h ^= h >> s16
        h *= mul
        h ^= h >> s16
        h *= mul
        h ^= h >> s16
        return h
    h ^= h >> 16
    h.mul_(_MUL).bitwise_and_(_M32)
    h ^= h >> 16
    h.mul_(_MUL).bitwise_and_(_M32)
    h ^= h >> 16
    return h


def _perm_packed_numpy(seed: int, n: torch.Tensor, seq_ids=None, step=None) -> torch.Tensor | None:
    """(N,) int64, N = sum(n), on the CPU: row b's permutation perm_b[0..n_b-1], rows back to back; None if
    the composite key does not fit ``KEY_BITS`` bits."""
    B = n.shape[0]
    n_np = n.to(torch.int64).numpy()
    t_max = int(n_np.max()) if B else 0
    jbits = max(t_max - 1, 1).bit_length()
    rbits = max(B - 1, 1).bit_length()
    if rbits + 32 + jbits > KEY_BITS:
        return None
    h_rows = _row_hash(seed, n, seq_ids, step).numpy().astype(np.uint32)  # (B,)
    N = int(n_np.sum())
    start = np.cumsum(n_np) - n_np
    j = np.arange(N, dtype=np.int64) - np.repeat(start, n_np)  # (N,) position within the row
    keys = np.repeat(h_rows, n_np) ^ j.astype(np.uint32)
    _mix32_inplace(keys)  # (N,) uint32: the last mix of ``_key``
    comp = keys.astype(np.uint64) << np.uint64(jbits)
    comp |= j.astype(np.uint64)
    comp |= np.repeat(np.arange(B, dtype=np.uint64) << np.uint64(32 + jbits), n_np)
    comp.sort()  # unique values: any sort algorithm gives this order
    comp &= np.uint64((1 << jbits) - 1)
    return torch.from_numpy(comp.view(np.int64))


def permuted_positions(n: torch.Tensor, valid: torch.Tensor, *, seed: int, seq_ids: torch.Tensor | None = None,
                       step: int | None = None) -> torch.Tensor:
    """(B, T) int64: for the valid token of rank r (0-based, among its row's valid tokens) the source position
    perm[r]; 0 on padding. ``seq_ids`` (B,) key each row's permutation (default: the row index); ``step``
    is mixed into the seed when given."""
    perm = _perm_packed_numpy(seed, n, seq_ids, step) if host_paths(valid.device) else None
    if perm is None:
        rank = torch.cumsum(valid, dim=-1) - 1
        return _permuted_ranks_rowsort(rank, n, valid, seed=seed, seq_ids=seq_ids, step=step).masked_fill_(~valid, 0)
    # Valid tokens in row-major order are exactly the packed order (row, rank).
    return torch.zeros(valid.shape, dtype=torch.int64, device=valid.device).masked_scatter_(valid, perm)


def permuted_ranks(rank: torch.Tensor, n: torch.Tensor, valid: torch.Tensor, *, seed: int,
                   seq_ids: torch.Tensor | None = None, step: int | None = None) -> torch.Tensor:
    """(B, T) int64: for each valid token at 0-based position rank, the source position perm[rank] (``rank``
    itself elsewhere). ``seq_ids`` and ``step`` as in :func:`permuted_positions`."""
    perm = _perm_packed_numpy(seed, n, seq_ids, step) if host_paths(valid.device) else None
    if perm is None:
        return _permuted_ranks_rowsort(rank, n, valid, seed=seed, seq_ids=seq_ids, step=step)
    return rank.masked_scatter(valid, perm)


def _permuted_ranks_rowsort(rank: torch.Tensor, n: torch.Tensor, valid: torch.Tensor, *, seed: int,
                            seq_ids: torch.Tensor | None = None, step: int | None = None) -> torch.Tensor:
    """``permuted_ranks`` by a stable per-row sort of the keys: any size, no host synchronisation (the path
    used off the CPU)."""
    B, T = rank.shape
    dev = rank.device
    j = torch.arange(T, device=dev, dtype=torch.int64)  # (T,) candidate positions
    keys = _mix32_inplace(_row_hash(seed, n.to(dev), seq_ids, step)[:, None] ^ j)  # (B, T) in [0, 2**32): ``_key``
    keys.masked_fill_(j >= n.to(dev)[:, None], 1 << 33)  # positions >= n sort last
    order = torch.sort(keys, dim=-1, stable=True).indices  # (B, T) perm for positions < n
    return torch.where(valid, order.gather(1, rank.clamp(min=0)), rank)
