"""The seeded weight permutation of ``cppo_shuffled`` (CPPO paper Fig. 5 ablation).

For response row b with n valid tokens, the permutation of positions 0..n-1 sorts the keys
``hash(seed, b, n, j)`` for j = 0..n-1 (ties broken by j). The hash is counter-based (a 32-bit integer mix,
below), so the permutation depends only on (seed, row index, valid length): never on the padded width, the
padding side, the device, or the other rows. An offline recompute that rebuilds the batch in seq_id order
reproduces the trainer's permutation. ``shuffle_permutation`` gives it for one row in plain Python.
"""

from __future__ import annotations

import torch

__all__ = ["shuffle_permutation", "permuted_ranks", "mix32"]

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


def _key(seed: int, row, n, j):
    h = mix32(_fold(seed) ^ _GOLDEN)
    h = mix32(h ^ (row & _M32))
    h = mix32(h ^ (n & _M32))
    return mix32(h ^ (j & _M32))


def shuffle_permutation(seed: int, row: int, length: int) -> list[int]:
    """perm (list of 0-based positions): the weight at position i of row ``row`` is w at ``perm[i]``."""
    keys = [(_key(seed, row, length, j), j) for j in range(length)]
    return [j for _, j in sorted(keys)]


def permuted_ranks(rank: torch.Tensor, n: torch.Tensor, valid: torch.Tensor, *, seed: int) -> torch.Tensor:
    """(B, T) int64: for each valid token at 0-based position rank, the source position perm[rank]."""
    B, T = rank.shape
    dev = rank.device
    j = torch.arange(T, device=dev, dtype=torch.int64)[None, :].expand(B, T)  # (B, T) candidate positions
    rows = torch.arange(B, device=dev, dtype=torch.int64)[:, None]  # (B, 1)
    keys = _key(seed, rows, n[:, None].to(torch.int64), j)  # (B, T) in [0, 2**32)
    keys = torch.where(j < n[:, None], keys, torch.full((), 1 << 33, dtype=torch.int64, device=dev))
    order = torch.sort(keys, dim=-1, stable=True).indices  # (B, T) perm for positions < n
    return torch.where(valid, order.gather(1, rank.clamp(min=0)), rank)
