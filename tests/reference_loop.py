"""A plain per-sequence, per-token Python implementation of SPEC.md: the oracle for the rule tests.

Deliberately naive: lists, ``for`` loops, ``math``. The only tensor operation is the elementwise exp of the
log-probs and log-ratio (``torch.exp``), so that p, q and rho are bit-identical to the vectorised code's and a
comparison at exact thresholds tests the rule logic, not two libm's last bits.

``reference(rule, logp, logp_rollout, advantages, response_mask, topk=None, **params)`` takes padded (B, T)
tensors (float64 advised) and returns a dict of per-row lists: keep, reason (codes 0/1/2/3), weight (or
None) and, for the CPPO family, delta_b per row.
"""

from __future__ import annotations

import math

import torch

from cppo_diag.masks.shuffle import shuffle_permutation

from cppo_diag.masks.reasons import BUDGET, KEPT, SEQUENCE, TOKEN  # noqa: E402

DEFAULTS = {
    "pg_is": {},
    "grpo_clip": {"eps_low": 0.2, "eps_high": 0.28},
    "cispo": {"eps_high": None},
    "dppo": {"delta": None, "divergence": "binary_tv", "delta_low": None, "delta_high": None},
    "cppo": {
        "delta": 0.15, "w_min": 0.8, "delta_b": 0.02, "delta_b_mode": "adaptive", "delta_b_quantile": 0.9,
        "delta_b_cap": 2.0, "delta_b_scale": 1.0, "weight_length": "sequence", "horizon": None,
        "divergence": "binary_tv",
    },
    "trm_max": {"delta": 0.05, "divergence": "binary_kl"},
    "trm_avg": {"delta_avg": 0.001, "divergence": "binary_kl"},
    "drpo": {"delta": 0.15},
}
for _v in ("cppo_no_weight", "cppo_no_budget", "cppo_shuffled", "cppo_soft"):
    DEFAULTS[_v] = dict(DEFAULTS["cppo"], seed=0)


def lerp(a: float, b: float, w: float) -> float:
    """torch.lerp / numpy's two-sided linear interpolation."""
    return a + w * (b - a) if abs(w) < 0.5 else b - (b - a) * (1.0 - w)


def quantile_linear(values: list[float], q: float) -> float:
    xs = sorted(values)
    n = len(xs)
    h = q * (n - 1)
    lo = math.floor(h)
    hi = min(lo + 1, n - 1)
    return lerp(xs[lo], xs[hi], h - lo)


def binary_kl(p: float, q: float) -> float:
    return q * math.log(q / p) + (1 - q) * math.log((1 - q + 1e-8) / (1 - p + 1e-8))


def topk_div(kind: str, ids, k_lr, k_lp, tok, p_tok, q_tok) -> float:
    """TV or KL over TopK(mu) U {y_t} plus "other", masses clamped at 1e-12; ids < 0 are absent."""
    buckets = []  # (p, q)
    seen = set()
    for i, a in enumerate(ids):
        if a < 0:
            continue
        seen.add(a)
        buckets.append((math.exp(k_lp[i]), math.exp(k_lr[i])))
    if tok not in seen:
        buckets.append((p_tok, q_tok))
    p_other = 1.0 - sum(b[0] for b in buckets)
    q_other = 1.0 - sum(b[1] for b in buckets)
    buckets.append((p_other, q_other))
    buckets = [(max(p, 1e-12), max(q, 1e-12)) for p, q in buckets]
    if kind == "tv":
        return 0.5 * sum(abs(p - q) for p, q in buckets)
    return sum(q * math.log(q / p) for p, q in buckets)


def _rows(logp, logp_rollout, advantages, response_mask, topk):
    """Per row: lists of (col, logp, logp_rollout, A, p, q, rho, topk entry) over the valid tokens."""
    B, T = logp.shape
    mask = torch.ones(B, T, dtype=torch.bool) if response_mask is None else response_mask.bool()
    lr_ = (logp - logp_rollout).clamp(-20, 20)
    rho = torch.exp(lr_).tolist()
    p = torch.exp(logp).tolist()
    q = torch.exp(logp_rollout).tolist()
    adv = advantages.tolist()
    per_tok_adv = advantages.dim() == 2
    m = mask.tolist()
    rows = []
    for b in range(B):
        row = []
        for c in range(T):
            if not m[b][c]:
                continue
            a = adv[b][c] if per_tok_adv else adv[b]
            tk = None
            if topk is not None:
                tk = (topk["ids"][b][c].tolist(), topk["logp_rollout"][b][c].tolist(), topk["logp"][b][c].tolist(),
                      int(topk["token_ids"][b][c]))
            row.append({"col": c, "A": a, "p": p[b][c], "q": q[b][c], "rho": rho[b][c], "topk": tk})
        rows.append(row)
    return rows


def _div(name: str, tok) -> float:
    p, q = tok["p"], tok["q"]
    if name == "binary_tv":
        return abs(p - q)
    if name == "binary_kl":
        return binary_kl(p, q)
    ids, k_lr, k_lp, y = tok["topk"]
    return topk_div("tv" if name == "topk_tv" else "kl", ids, k_lr, k_lp, y, p, q)


def _weight(i: int, n: int, w_min: float, weight_length: str, horizon) -> float:
    """w_t for 0-based position i (t = i + 1)."""
    t = i + 1
    if weight_length == "sequence":
        return 1 - (1 - w_min) * (t - 1) / max(n - 1, 1)
    if t > horizon:
        return w_min
    return 1 - (1 - w_min) * (t - 1) / max(horizon - 1, 1)


def reference(rule, logp, logp_rollout, advantages, response_mask=None, topk=None, seq_ids=None, step=None,
              **params):
    """``seq_ids`` (list of B ints, default the row index) and ``step`` key cppo_shuffled's permutation."""
    if rule not in DEFAULTS:
        raise KeyError(rule)
    P = dict(DEFAULTS[rule])
    P.update({k: v for k, v in params.items() if k in P})
    B, T = logp.shape
    rows = _rows(logp, logp_rollout, advantages, response_mask, topk)
    keep = [[False] * T for _ in range(B)]
    reason = [[KEPT] * T for _ in range(B)]
    weight = None
    delta_bs = [None] * B

    if rule == "cispo" and P["eps_high"] is None:
        raise ValueError("eps_high required")
    if rule == "dppo" and P["delta"] is None:
        P["delta"] = 0.05 if P["divergence"].endswith("kl") else 0.15
    if rule in ("cispo", "cppo_soft"):
        weight = [[0.0] * T for _ in range(B)]

    for b, row in enumerate(rows):
        n = len(row)
        if rule in ("pg_is", "drpo"):
            for tok in row:
                keep[b][tok["col"]] = True
            continue
        if rule == "cispo":
            for tok in row:
                keep[b][tok["col"]] = True
                weight[b][tok["col"]] = min(tok["rho"], 1 + P["eps_high"])
            continue
        if rule == "grpo_clip":
            for tok in row:
                a, r = tok["A"], tok["rho"]
                masked = (a > 0 and r > 1 + P["eps_high"]) or (a < 0 and r < 1 - P["eps_low"])
                keep[b][tok["col"]] = not masked
                reason[b][tok["col"]] = TOKEN if masked else KEPT
            continue
        if rule in ("trm_max", "trm_avg"):
            ds = [_div(P["divergence"], tok) for tok in row]
            if rule == "trm_max":
                bad = n > 0 and max(ds) > P["delta"]
            else:
                bad = n > 0 and (sum(ds) / n) > P["delta_avg"]
            for tok in row:
                keep[b][tok["col"]] = not bad
                reason[b][tok["col"]] = SEQUENCE if bad else KEPT
            continue
        if rule == "dppo":
            for tok in row:
                away = tok["A"] * (tok["rho"] - 1) > 0
                d = _div(P["divergence"], tok)
                thr = P["delta"]
                if tok["A"] > 0 and P["delta_high"] is not None:
                    thr = P["delta_high"]
                if tok["A"] < 0 and P["delta_low"] is not None:
                    thr = P["delta_low"]
                masked = away and d > thr
                keep[b][tok["col"]] = not masked
                reason[b][tok["col"]] = TOKEN if masked else KEPT
            continue

        # ---- CPPO family -------------------------------------------------------------------------
        delta = P["delta"]
        ds = [_div(P["divergence"], tok) for tok in row]
        if rule == "cppo_no_weight":
            ws = [1.0] * n
        else:
            ws = [_weight(i, n, P["w_min"], P["weight_length"], P["horizon"]) for i in range(n)]
            if rule == "cppo_shuffled":
                perm = shuffle_permutation(P["seed"], b if seq_ids is None else int(seq_ids[b]), n, step)
                ws = [ws[perm[i]] for i in range(n)]
        budget = rule in ("cppo", "cppo_no_weight", "cppo_soft")
        if budget:
            if P["delta_b_mode"] == "fixed" or n == 0:
                db = P["delta_b"]
            else:
                qv = quantile_linear(ds, P["delta_b_quantile"])
                db = min(max(P["delta_b_scale"] * qv, P["delta_b"]), P["delta_b_cap"] * P["delta_b"])
            delta_bs[b] = db
        S = 0.0
        W = 0.0
        for i, tok in enumerate(row):
            z = ws[i] * ds[i]
            away = tok["A"] * (tok["rho"] - 1) > 0
            c = min(delta, delta + db * W - S) if budget else delta
            col = tok["col"]
            if rule == "cppo_soft":
                x = max(z / delta, (S + z) / (delta + db * W))
                g = (min(1.0, 1.0 / x) if x > 0 else 1.0) if away else 1.0
                weight[b][col] = g
                keep[b][col] = True
            else:
                masked = away and not (z <= c)
                keep[b][col] = not masked
                reason[b][col] = (TOKEN if z > delta else BUDGET) if masked else KEPT
            S += z
            W += ws[i]
    return {"keep": keep, "reason": reason, "weight": weight, "delta_b": delta_bs}


# ---- helpers shared by the rule tests (batches, padding / packing, comparison with the loop) ----------------
from cppo_diag.masks import compute_mask  # noqa: E402

ALL_MASK_RULES = ["pg_is", "grpo_clip", "cispo", "dppo", "cppo", "cppo_no_weight", "cppo_no_budget", "cppo_shuffled",
                  "cppo_soft", "trm_max", "trm_avg", "drpo"]
NEEDS = {"cispo": {"eps_high": 0.28}}


def random_batch(B=4, T=12, seed=0, dtype=torch.float64, drift=0.15, lengths=None):
    """(logp, logp_rollout, adv (B,), lengths (B,)) with valid tokens first (values beyond length are junk)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, T, generator=g, dtype=torch.float64) * 0.98 + 0.01
    p = (q + drift * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(0.003, 0.999)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    if lengths is None:
        lengths = torch.randint(0, T + 1, (B,), generator=g)
    return p.log().to(dtype), q.log().to(dtype), adv.to(dtype), torch.as_tensor(lengths)


def pad(values: torch.Tensor, lengths: torch.Tensor, width: int, side: str = "right", fill: float = 0.0):
    """Compact rows (valid tokens first) -> (B, width) with the given padding side; returns (tensor, mask)."""
    B = values.shape[0]
    out = torch.full((B, width) + tuple(values.shape[2:]), fill, dtype=values.dtype)
    mask = torch.zeros(B, width, dtype=torch.bool)
    for b in range(B):
        n = int(lengths[b])
        start = 0 if side == "right" else width - n
        out[b, start:start + n] = values[b, :n]
        mask[b, start:start + n] = True
    return out, mask


def pack(values: torch.Tensor, lengths: torch.Tensor):
    """Compact rows -> (N, ...) packed plus cu_seqlens (B + 1,)."""
    parts = [values[b, : int(lengths[b])] for b in range(values.shape[0])]
    cu = torch.zeros(len(parts) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.as_tensor([p.shape[0] for p in parts], dtype=torch.int64), 0)
    return torch.cat(parts) if parts else values.new_zeros((0,) + tuple(values.shape[2:])), cu


def valid_rows(t: torch.Tensor, mask: torch.Tensor):
    """Per row, the list of values at valid positions (layout-free view of a per-token result)."""
    return [t[b][mask[b]].tolist() for b in range(t.shape[0])]


def assert_matches_reference(rule, logp, logp_rollout, adv, mask, topk=None, **params):
    res = compute_mask(rule, logp=logp, logp_rollout=logp_rollout, advantages=adv, response_mask=mask, topk=topk,
                       return_internals=True, **params)
    ref = reference(rule, logp, logp_rollout, adv, mask, topk=topk, **params)
    keep_ref = torch.tensor(ref["keep"], dtype=torch.bool).reshape(mask.shape)
    reason_ref = torch.tensor(ref["reason"], dtype=torch.uint8).reshape(mask.shape)
    assert torch.equal(res.keep & mask, keep_ref & mask), (rule, params, res.keep, keep_ref)
    assert torch.equal(res.masked, mask & ~keep_ref), rule
    assert torch.equal(res.reason, reason_ref), (rule, params, res.reason, reason_ref)
    if ref["weight"] is not None:
        w_ref = torch.tensor(ref["weight"], dtype=res.weight.dtype).reshape(mask.shape)
        torch.testing.assert_close(torch.where(mask, res.weight, 0), torch.where(mask, w_ref, 0), rtol=1e-12, atol=1e-14)
    if "delta_b" in res.internals:
        for b, db in enumerate(ref["delta_b"]):
            if db is not None and bool(mask[b].any()):
                assert float(res.internals["delta_b"][b]) == db, (rule, b, float(res.internals["delta_b"][b]), db)
    return res
