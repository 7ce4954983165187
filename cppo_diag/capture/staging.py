"""Turn the tensors a trainer hands to ``log_tokens`` into one Arrow table of valid tokens.

Two phases, so the training step never waits on the host:

1. ``stage_tokens`` (caller's thread, cheap): checks shapes and dtypes from metadata only (no device
   sync), then starts the device->host copies. CUDA tensors are copied with ``non_blocking=True`` into
   pinned host buffers and one CUDA event is recorded after the last copy; CPU tensors are detached and
   copied through numpy (the trainer may overwrite them in place); numpy arrays are copied.
2. ``materialize`` (writer thread): waits on the event, checks values (cu_seqlens, NaN/Inf), applies
   sequence sampling, drops padding/prompt tokens and builds the table in ``(seq_id, pos)`` order.

Inputs: padded ``(B, T)`` tensors plus an optional ``response_mask`` ``(B, T)`` (left or right padding),
or packed ``(N,)`` tensors plus ``cu_seqlens`` ``(B + 1,)`` (and an optional ``(N,)`` response_mask for
prompt tokens inside the packed stream). ``pos`` is the index of a token among its sequence's valid
tokens, so left padding and packing give the same ``pos`` as right padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from cppo_diag.capture.sampling import keep_sequences
from cppo_diag.storage import schema, validate

try:  # torch is optional for numpy-only users
    import torch
except ImportError:  # pragma: no cover - torch is a dependency of the package
    torch = None


class CaptureInputError(ValueError):
    """A tensor given to the recorder has the wrong shape, dtype or values (the message names it)."""


class NonFiniteError(CaptureInputError):
    """NaN or Inf in a recorded tensor (raised in ``on_error='raise'`` mode)."""


# log_tokens keyword -> (column name, kind). kind: token (same shape as logp), seq (B,), seq_or_token,
# topk (logp.shape + (K,)).
TOKEN_INPUTS: dict[str, tuple[str, str]] = {
    "logp": ("logp", "token"),
    "logp_rollout": ("logp_rollout", "token"),
    "advantages": ("advantage", "seq_or_token"),
    "logp_old": ("logp_old", "token"),
    "logp_behavior": ("logp_behavior", "token"),
    "lag": ("lag", "seq_or_token"),
    "fork": ("fork", "token"),
    "keep_applied": ("keep_applied", "token"),
    "reason_applied": ("reason_applied", "token"),
    "token_ids": ("token_id", "token"),
    "entropy": ("entropy", "token"),
    "loss_weight": ("loss_weight", "token"),
    "reward": ("reward", "seq_or_token"),
    "group_id": ("group_id", "seq"),
    "topk_ids": ("topk_ids", "topk"),
    "topk_logp_rollout": ("topk_logp_rollout", "topk"),
    "topk_logp": ("topk_logp", "topk"),
}
FLOAT_COLUMNS = schema.columns_of_dtype(pl.Float32)  # the dtypes are the schema's column tables
BOOL_COLUMNS = schema.columns_of_dtype(pl.Boolean)
TOPK_FLOAT_COLUMNS = schema.columns_of_dtype(pl.List(pl.Float32))
LOGPROB_COLUMNS = {"logp", "logp_rollout", "logp_old", "logp_behavior", "entropy", "loss_weight"} | TOPK_FLOAT_COLUMNS  # must be float
# every other column (token_id, group_id, reason_applied, lag, topk_ids) holds integers

# Parquet encodings chosen per column (measured in benchmarks/bench_capture.py --writer-only): per-token
# floats use BYTE_STREAM_SPLIT (the codec then finds the repeated exponent bytes), pos is a delta run
# 0,1,2,.. per sequence, columns constant over a sequence (step, seq_id, advantage, reward, update, rank)
# are PLAIN - their long runs of equal values cost almost nothing after the page codec, and PLAIN is ~2x
# cheaper to encode than dictionary + RLE. Other columns (token_id, group_id, keep/reason, top-K) keep
# dictionary + RLE. Statistics are written for the key columns only.
BYTE_STREAM_SPLIT_COLUMNS = ("logp", "logp_rollout", "logp_old", "logp_behavior", "entropy", "loss_weight")
DELTA_COLUMNS = ("pos",)
PLAIN_COLUMNS = ("step", "seq_id", "advantage", "reward", "update", "rank")
STATS_COLUMNS = ("step", "seq_id", "pos", "update", "rank")


def check_index(name: str, value) -> int:
    """``value`` as a non-negative integer (``step``, ``update``): the reader reads back only those.

    Accepts Python/numpy integers, integral floats (``3.0``) and one-element integer tensors; refuses bools,
    negative numbers, fractions, NaN and strings with a ``CaptureInputError`` naming ``name``."""
    v = value
    if _is_torch(v) or isinstance(v, np.ndarray):
        if int(np.prod(_shape(v))) != 1:
            raise CaptureInputError(f"{name}: expected one integer, found shape {_shape(v)}")
        v = v.item()
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise CaptureInputError(f"{name}: expected a non-negative integer, found {value!r} ({type(value).__name__})")
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v) or float(v) != int(v):
            raise CaptureInputError(f"{name}: expected a non-negative integer, found {value!r}")
    v = int(v)
    if v < 0:
        raise CaptureInputError(f"{name}: expected a non-negative integer, found {v}")
    return v


def _is_torch(x) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def _shape(x) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def _kind_of_dtype(x) -> str:
    """'float' | 'int' | 'bool' | 'other' for a torch tensor or numpy array."""
    if _is_torch(x):
        if x.dtype == torch.bool:
            return "bool"
        if x.dtype.is_floating_point:
            return "float"
        if x.dtype.is_complex:
            return "other"
        return "int"
    dt = np.asarray(x).dtype
    if dt == np.bool_:
        return "bool"
    if np.issubdtype(dt, np.floating):
        return "float"
    if np.issubdtype(dt, np.integer):
        return "int"
    return "other"


def _as_array_like(name: str, x):
    if _is_torch(x) or isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple, int, float, np.number)) and not isinstance(x, bool):
        return np.asarray(x)
    raise CaptureInputError(
        f"{name}: expected a torch.Tensor or numpy.ndarray, found {type(x).__name__}"
    )


@dataclass
class StagedTokens:
    """A ``log_tokens`` call whose tensors are on their way to (or already in) host memory."""

    step: int
    update: int
    rank: int
    layout: str  # "padded" | "packed"
    arrays: dict[str, Any]  # input name -> host torch tensor / numpy array (maybe still being copied)
    events: Any = None  # list of torch.cuda.Event (one per device) recorded after the non_blocking copies
    seq_fraction: float = 1.0
    n_seqs: int = 0
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (kind, message) for the recorder
    dropped_nonfinite: int = 0  # sequences dropped because of NaN/Inf (set by materialize)


def _check_dtype(name: str, column: str, x) -> None:
    """Raise CaptureInputError naming ``name`` when ``x``'s dtype cannot be stored in ``column``."""
    kind = _kind_of_dtype(x)
    dt = str(getattr(x, "dtype", "?"))
    if column in LOGPROB_COLUMNS:
        allowed, want = ("float",), "a floating-point dtype"
    elif column in FLOAT_COLUMNS:  # advantage, reward: integer rewards are fine too
        allowed, want = ("float", "int"), "a floating-point (or integer) dtype"
    elif column in BOOL_COLUMNS:
        allowed, want = ("bool", "int"), "a bool (or 0/1 integer) dtype"
    else:  # token_id, group_id, reason_applied, lag, topk_ids
        allowed, want = ("int",), "an integer dtype"
    if kind not in allowed:
        raise CaptureInputError(f"{name}: expected {want}, found {dt}")


def stage_tokens(
    *,
    step: int,
    update: int,
    rank: int,
    seq_fraction: float,
    response_mask=None,
    cu_seqlens=None,
    seq_ids=None,
    **inputs,
) -> StagedTokens:
    """Validate shapes/dtypes (metadata only) and start the host copies. See module docstring."""
    logp = inputs.get("logp")
    for required in ("logp", "logp_rollout", "advantages"):
        if inputs.get(required) is None:
            raise CaptureInputError(f"{required}: required, found None")
    arrays: dict[str, Any] = {}
    for name, x in inputs.items():
        if x is not None:
            arrays[name] = _as_array_like(name, x)
    logp = arrays["logp"]
    shape = _shape(logp)
    if len(shape) == 2:
        layout = "padded"
        n_seqs = shape[0]
        if cu_seqlens is not None:
            raise CaptureInputError(
                f"cu_seqlens: given with a 2-D logp of shape {shape}; cu_seqlens is for packed 1-D (N,) inputs"
            )
    elif len(shape) == 1:
        layout = "packed"
        if cu_seqlens is None:
            raise CaptureInputError(
                f"logp: 1-D shape {shape} is the packed layout and needs cu_seqlens (B+1,); "
                "for padded inputs pass logp as (B, T)"
            )
        cu_seqlens = _as_array_like("cu_seqlens", cu_seqlens)
        cu_shape = _shape(cu_seqlens)
        if len(cu_shape) != 1 or cu_shape[0] < 1:
            raise CaptureInputError(f"cu_seqlens: expected shape (B+1,), found {cu_shape}")
        if _kind_of_dtype(cu_seqlens) != "int":
            raise CaptureInputError(f"cu_seqlens: expected an integer dtype, found {cu_seqlens.dtype}")
        n_seqs = cu_shape[0] - 1
        arrays["cu_seqlens"] = cu_seqlens
    else:
        raise CaptureInputError(f"logp: expected shape (B, T) or packed (N,), found {shape}")

    for name, x in arrays.items():
        if name == "cu_seqlens":
            continue
        column, kind = TOKEN_INPUTS[name]
        xs = _shape(x)
        if kind == "token":
            ok = xs == shape
            want = f"{shape} (same as logp)"
        elif kind == "seq":
            ok = xs == (n_seqs,)
            want = f"({n_seqs},) one per sequence"
        elif kind == "seq_or_token":
            ok = xs in (shape, (n_seqs,), (n_seqs, 1))
            if xs == (n_seqs, 1) and len(shape) == 2 and shape[1] != 1:
                arrays[name] = x = x.reshape(n_seqs)
            want = f"({n_seqs},) per sequence or {shape} per token"
        else:  # topk
            ok = len(xs) == len(shape) + 1 and xs[:-1] == shape
            want = f"{shape + ('K',)} (logp's shape plus a top-K axis)"
        if not ok:
            raise CaptureInputError(f"{name}: expected shape {want}, found {xs}")
        _check_dtype(name, column, x)
    topk_ks = {_shape(arrays[n])[-1] for n in ("topk_ids", "topk_logp_rollout", "topk_logp") if n in arrays}
    if len(topk_ks) > 1:
        raise CaptureInputError(
            "topk_ids/topk_logp_rollout/topk_logp: expected the same K, found "
            + ", ".join(f"{n}={_shape(arrays[n])[-1]}" for n in ("topk_ids", "topk_logp_rollout", "topk_logp") if n in arrays)
        )

    if response_mask is not None:
        response_mask = _as_array_like("response_mask", response_mask)
        if _shape(response_mask) != shape:
            raise CaptureInputError(f"response_mask: expected shape {shape} (same as logp), found {_shape(response_mask)}")
        if _kind_of_dtype(response_mask) not in ("bool", "int", "float"):
            raise CaptureInputError(f"response_mask: expected a bool or 0/1 dtype, found {response_mask.dtype}")
        arrays["response_mask"] = response_mask
    if seq_ids is not None:
        seq_ids = _as_array_like("seq_ids", seq_ids)
        if _shape(seq_ids) != (n_seqs,):
            raise CaptureInputError(f"seq_ids: expected shape ({n_seqs},) one per sequence, found {_shape(seq_ids)}")
        if _kind_of_dtype(seq_ids) != "int":
            raise CaptureInputError(f"seq_ids: expected an integer dtype, found {seq_ids.dtype}")
        arrays["seq_ids"] = seq_ids

    host, events = _to_host(arrays)
    return StagedTokens(
        step=int(step), update=int(update), rank=int(rank), layout=layout, arrays=host, events=events,
        seq_fraction=float(seq_fraction), n_seqs=n_seqs,
    )


def _to_host(arrays: dict[str, Any]):
    """Start device->host copies; return (host arrays, list of cuda events or None). Never synchronises."""
    host: dict[str, Any] = {}
    cuda_devices: set = set()
    for name, x in arrays.items():
        if _is_torch(x):
            x = x.detach()
            if x.device.type == "cuda":
                buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                buf.copy_(x, non_blocking=True)  # enqueued on x's device's current stream
                host[name] = buf
                cuda_devices.add(x.device)
            elif x.device.type == "cpu":
                # numpy's memcpy: torch.clone() wakes the intra-op thread pool, which costs far more CPU
                # than the copy itself on a busy machine (see benchmarks/bench_capture.py).
                if x.dtype == torch.bfloat16:  # numpy has no bfloat16: copy the bits, widen on the writer
                    host[name] = _BF16Bits(x.view(torch.int16).numpy().copy())
                else:
                    host[name] = x.resolve_conj().resolve_neg().numpy().copy()
            else:  # mps, xpu, ...: a plain blocking copy is the portable choice
                host[name] = x.to("cpu", copy=True)
        else:
            host[name] = np.array(x, copy=True)
    events = []
    for device in cuda_devices:  # one event per device: each device's copies run on its own stream
        with torch.cuda.device(device):
            # blocking=True: the writer thread sleeps in ev.synchronize() instead of spinning a CPU core
            # while the GPU finishes the step (a spin-wait shows up as writer CPU time).
            ev = torch.cuda.Event(blocking=True)
            ev.record()
            events.append(ev)
    return host, events or None


class _BF16Bits:
    """The raw bits of a CPU bfloat16 tensor, held as int16 until the writer thread widens them."""

    __slots__ = ("bits",)

    def __init__(self, bits: np.ndarray):
        self.bits = bits

    @property
    def shape(self):
        return self.bits.shape


def _np(x) -> np.ndarray:
    if isinstance(x, _BF16Bits):
        return torch.from_numpy(x.bits).view(torch.bfloat16).float().numpy()
    if _is_torch(x):
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _first_bad(bad_tok: np.ndarray, seq_of_tok: np.ndarray, pos: np.ndarray, seq_ids: np.ndarray) -> str:
    i = int(np.flatnonzero(bad_tok)[0])
    return f"seq {int(seq_ids[seq_of_tok[i]])}, pos {int(pos[i])}"


def values_ok(staged: StagedTokens) -> bool:
    """Fast check (no table built) that ``materialize(staged, nonfinite='raise')`` cannot raise: padded
    layout, every float column finite and top-K log-probs NaN-free over the WHOLE array (padding too), and
    ``reason_applied`` within 0..255. False means "not proven": call ``materialize`` for the exact error
    (padding may legitimately hold NaN/-inf, which materialize ignores). Waits for device copies."""
    if staged.layout != "padded":
        return False
    for ev in staged.events or ():
        ev.synchronize()
    for name, v in staged.arrays.items():
        column = TOKEN_INPUTS.get(name, (None,))[0]
        if column in FLOAT_COLUMNS:
            x = _np(v)
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                return False
            if column in validate.LOGPROB_COLUMNS and x.size and x.max() > validate.LOGP_MAX:
                return False
        elif column in TOPK_FLOAT_COLUMNS:
            if np.isnan(_np(v)).any():
                return False
        elif column == "reason_applied":
            x = _np(v)
            if x.size and (x.min() < 0 or x.max() > 255):
                return False
        elif column == "lag":
            x = _np(v)
            if x.size and x.min() < 0:
                return False
    return True


def materialize(staged: StagedTokens, *, nonfinite: str) -> pa.Table | None:
    """Build the table of valid tokens (writer thread). ``nonfinite``: 'raise' or 'drop'.

    With 'drop', sequences holding NaN/Inf in any recorded float column are removed and a warning per
    tensor is appended to ``staged.warnings`` naming the tensor, step, seq and pos.
    Returns None when sampling keeps no sequence.
    """
    for ev in staged.events or ():
        ev.synchronize()
    a = {k: _np(v) for k, v in staged.arrays.items()}
    B = staged.n_seqs
    step = staged.step
    seq_ids = a.get("seq_ids")
    seq_ids = np.arange(B, dtype=np.int64) if seq_ids is None else seq_ids.astype(np.int64)

    # -- token -> (sequence row, pos) index ------------------------------------------------------------
    if staged.layout == "padded":
        B_, T = a["logp"].shape
        mask = a.get("response_mask")
        valid = np.ones((B_, T), dtype=bool) if mask is None else mask.astype(bool)  # (B, T)
        # Boolean indexing walks (b, t) in row-major order, like np.nonzero, and is ~2x cheaper than
        # gathering with (rows, cols) index arrays.
        seq_of_tok = np.repeat(np.arange(B_), valid.sum(axis=1))  # (N,) row of each valid token
        pos = (np.cumsum(valid, axis=1, dtype=np.int32) - 1)[valid]  # (N,)

        def tok(x):
            return x[valid]
    else:
        cu = a["cu_seqlens"].astype(np.int64)
        N = a["logp"].shape[0]
        if cu[0] != 0 or cu[-1] != N or np.any(np.diff(cu) < 0):
            raise CaptureInputError(
                f"cu_seqlens: expected non-decreasing offsets from 0 to N={N}, found "
                f"first={int(cu[0])}, last={int(cu[-1])}, decreasing={bool(np.any(np.diff(cu) < 0))}"
            )
        mask = a.get("response_mask")
        valid = np.ones(N, dtype=bool) if mask is None else mask.astype(bool)  # (N,)
        seq_all = np.repeat(np.arange(B), np.diff(cu))  # (N,)
        csum = np.concatenate([[0], np.cumsum(valid, dtype=np.int64)])  # (N+1,)
        pos_all = csum[1:] - 1 - csum[cu[:-1]][seq_all]  # (N,)
        (idx,) = np.nonzero(valid)
        pos = pos_all[idx].astype(np.int32)
        seq_of_tok = seq_all[idx]

        def tok(x):
            return x[idx]

    # -- sampling: keep whole sequences by (step, seq_id) hash ---------------------------------------
    keep_seq = keep_sequences(step, seq_ids, staged.seq_fraction)  # (B,)

    # -- per-token columns -------------------------------------------------------------------------
    cols: dict[str, np.ndarray] = {}
    for name, x in a.items():
        if name in ("cu_seqlens", "response_mask", "seq_ids"):
            continue
        column, kind = TOKEN_INPUTS[name]
        if kind == "seq" or (kind == "seq_or_token" and x.ndim == 1 and x.shape[0] == B and x.shape != a["logp"].shape):
            vals = x.reshape(B)[seq_of_tok]
        else:
            vals = tok(x)
        cols[column] = vals

    # -- NaN / Inf policy --------------------------------------------------------------------------
    bad_seq = np.zeros(B, dtype=bool)
    for column, vals in cols.items():
        if column in FLOAT_COLUMNS:
            bad = ~np.isfinite(vals)
            if column in validate.LOGPROB_COLUMNS:  # a log-probability above 0: the reader would exclude it
                bad |= vals > validate.LOGP_MAX
        elif column in TOPK_FLOAT_COLUMNS:
            bad = np.isnan(vals).any(axis=-1)  # -inf is a legal top-K log-prob (masked vocab); NaN is not
        else:
            continue
        bad &= keep_seq[seq_of_tok]
        if bad.any():
            where = _first_bad(bad, seq_of_tok, pos, seq_ids)
            n_bad = int(bad.sum())
            seqs = np.unique(seq_of_tok[bad])
            n_pos = int((bad & np.isfinite(vals) & (vals > validate.LOGP_MAX)).sum()) \
                if column in validate.LOGPROB_COLUMNS else 0
            what = (f"{n_bad - n_pos} NaN/Inf value(s)" if not n_pos else
                    f"{n_pos} value(s) > 0 (a log-probability must be <= 0)" if n_pos == n_bad else
                    f"{n_bad - n_pos} NaN/Inf and {n_pos} positive value(s)")
            msg = f"column '{column}' has {what} at step {step} (first at {where}; {len(seqs)} sequence(s) affected)"
            if nonfinite == "raise":
                raise NonFiniteError(msg)
            staged.warnings.append(("nonfinite", msg + "; dropping those sequences"))
            bad_seq[seqs] = True
    keep_seq &= ~bad_seq
    staged.dropped_nonfinite = int(bad_seq.sum())

    keep_tok = keep_seq[seq_of_tok]
    if not keep_tok.any():
        return None
    # Rows in (seq_id, pos) order: long runs of equal step/seq_id/advantage and pos = 0,1,2,... per
    # sequence, which is what the dictionary/RLE/delta encodings compress best.
    order = None if keep_tok.all() else np.flatnonzero(keep_tok)  # None: every token, already in order
    if np.any(np.diff(seq_ids) < 0):  # tokens are already in (row, pos) order; re-sort only if rows are not
        base = np.arange(len(seq_of_tok)) if order is None else order
        order = base[np.argsort(seq_ids[seq_of_tok[base]], kind="stable")]

    def pick(x: np.ndarray) -> np.ndarray:
        return x if order is None else x[order]

    n = len(seq_of_tok) if order is None else len(order)
    out = {
        "step": _arrow(np.full(n, step, dtype=schema.numpy_dtype("step"))),
        "seq_id": _arrow(seq_ids[pick(seq_of_tok)].astype(schema.numpy_dtype("seq_id"), copy=False)),
        "pos": _arrow(pick(pos).astype(schema.numpy_dtype("pos"), copy=False)),
    }
    for column in schema.TOKEN_COLUMNS:
        if column not in cols:
            continue
        vals = pick(cols[column])
        if column == "reason_applied" and vals.size and (vals.min() < 0 or vals.max() > 255):
            raise CaptureInputError(f"reason_applied: expected codes in 0..255 (schema.REASONS), found range "
                                    f"{int(vals.min())}..{int(vals.max())} at step {step}")
        if column == "lag" and vals.size and vals.min() < 0:
            raise CaptureInputError(f"lag: expected optimiser-step counts >= 0, found {int(vals.min())} at step {step}")
        dtype = schema.numpy_dtype(column)  # the schema's column table: the one place a column's dtype is set
        if isinstance(schema.TOKEN_COLUMNS[column], pl.List):  # (n, K) -> list column of K per row
            K = vals.shape[-1]
            flat = _arrow(np.ascontiguousarray(vals, dtype=dtype).reshape(-1))
            offsets = _arrow(np.arange(0, (n + 1) * K, K, dtype=np.int32))
            out[column] = pa.ListArray.from_arrays(offsets, flat)
        else:
            out[column] = _arrow(vals.astype(dtype, copy=False))
    out["update"] = _arrow(np.full(n, staged.update, dtype=schema.numpy_dtype("update")))
    out["rank"] = _arrow(np.full(n, staged.rank, dtype=schema.numpy_dtype("rank")))
    return pa.Table.from_arrays(list(out.values()), names=list(out.keys()))


_ARROW_TYPES = {
    np.dtype(np.int64): pa.int64(), np.dtype(np.int32): pa.int32(), np.dtype(np.uint8): pa.uint8(),
    np.dtype(np.float32): pa.float32(),
}


def _arrow(x: np.ndarray) -> pa.Array:
    """A 1-D numpy array as an Arrow array without a copy (numeric) or with a bit-pack (bool).

    ``pa.array(ndarray)`` would copy and, on first use, import pandas (~0.25 s of CPU on the writer
    thread, once per process; see benchmarks/bench_capture.py --writer-only). The Arrow array keeps a
    reference to the numpy buffer, so the buffer lives as long as the table.
    """
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        bits = np.packbits(x, bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(x), [None, pa.py_buffer(bits)])
    typ = _ARROW_TYPES.get(x.dtype)
    if typ is None:
        raise TypeError(f"_arrow: expected one of {sorted(map(str, _ARROW_TYPES))} or bool, found {x.dtype}")
    return pa.Array.from_buffers(typ, len(x), [None, pa.py_buffer(x)])
