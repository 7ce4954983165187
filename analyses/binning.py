"""Choosing a position bin width that suits the runs at hand.

One rule, shared by the CLI report and the app: the smallest power-of-two width that gives at most
``target_bins`` bins over the longest response. A fixed default (say 64 tokens) draws a single point for a
run whose responses are 30 tokens long, and thousands of noisy bins for 16k-token responses.
"""

from __future__ import annotations

from typing import Any, Sequence

import polars as pl

from cppo_diag.analyses.tokens import load_tokens

BIN_WIDTHS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def auto_bin_width(max_len: int, target_bins: int = 40) -> int:
    """Smallest width in ``BIN_WIDTHS`` with ``ceil(max_len / width) <= target_bins`` (the largest if none)."""
    for w in BIN_WIDTHS:
        if max_len / w <= target_bins:
            return w
    return BIN_WIDTHS[-1]


def max_response_length(sources: Sequence[Any]) -> int:
    """Longest response (max ``pos`` + 1) over the runs / run directories / LazyFrames in ``sources``."""
    longest = 0
    for src in sources:
        top = load_tokens(src).select(pl.col("pos").max()).collect().item()
        if top is not None:
            longest = max(longest, int(top) + 1)
    return longest
