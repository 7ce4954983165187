"""Reason codes: why a rule masked a token (SPEC.md "Rules": a reason per masked token).

The one definition of the codes stored in ``reason_applied`` and returned as ``MaskResult.reason`` (uint8).
Pure Python (no torch), so the storage layer and the polars analyses can import it cheaply.

    from cppo_diag.masks.reasons import Reason
    n_budget = int((result.reason == Reason.BUDGET).sum())
    pl.col("reason_applied") == Reason.BUDGET

``Reason`` is an ``IntEnum``: its members compare, hash and index like the plain integers they stand for, so
they work in torch, numpy and polars expressions and as keys of dicts read with stored codes.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["Reason", "KEPT", "TOKEN", "BUDGET", "SEQUENCE", "REASON_CODES", "REASON_NAMES", "REASON_LABELS",
           "reason_name"]


class Reason(IntEnum):
    """uint8 code of a token's mask reason.

    KEPT      not masked (also the code of padding)
    TOKEN     the token threshold alone rejects it (CPPO: Z_t > delta; grpo_clip, dppo: every masked token)
    BUDGET    only CPPO's prefix budget rejects it (c_t < Z_t <= delta: CPPO Eq. 10, Algorithm 1 step 6)
    SEQUENCE  the whole response is masked (TRM's sequence masks)
    """

    KEPT = 0
    TOKEN = 1
    BUDGET = 2
    SEQUENCE = 3


KEPT, TOKEN, BUDGET, SEQUENCE = Reason.KEPT, Reason.TOKEN, Reason.BUDGET, Reason.SEQUENCE

# name -> code (the names used in docs, the registry's ``reasons`` and the analyses' ``n_<name>`` columns)
REASON_CODES: dict[str, int] = {r.name.lower(): int(r) for r in Reason}
# code -> name (the storage format's table of ``reason_applied`` codes)
REASON_NAMES: dict[int, str] = {int(r): r.name.lower() for r in Reason}
# code -> what a reader is shown (app legends and hover texts)
REASON_LABELS: dict[int, str] = {KEPT: "kept", TOKEN: "token threshold", BUDGET: "prefix budget",
                                 SEQUENCE: "sequence"}


def reason_name(code: int) -> str:
    """The name of a reason code ("kept", "token", "budget", "sequence"); raises naming the known codes."""
    try:
        return Reason(int(code)).name.lower()
    except ValueError:
        raise ValueError(f"reason code: expected one of {REASON_NAMES}, found {code!r}") from None
