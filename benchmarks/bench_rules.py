"""Benchmark the trust-region rules (``cppo_diag.masks``) on one large batch.

Measures, side by side in one process:
  * floor   one read pass over the inputs (logp.sum() + logp_rollout.sum() + advantages.sum() + mask.sum())
  * every registered rule through ``compute_mask`` (validation, metrics excluded: they are lazy)
  * cppo-loop  CPPO as the authors' public code does it: a Python loop over sequences, ``torch.quantile`` per
               sequence for the adaptive budget (its keep mask is checked against the vectorised one)
and prints a table with ratios, plus the two targets: CPPO >= 20x faster than the loop, and within 10x of the
floor. CPU timings use time.perf_counter (or process CPU time with --clock cpu); CUDA timings use CUDA
events after a synchronize.

Data: B responses of variable length (uniform in [T/8, T], right-padded), mu's probabilities skewed toward 1
like real sampler outputs, pi = mu plus noise whose scale varies per response so that the adaptive delta_b
lands at its minimum, at its cap and in between (the share of each is printed).

  python benchmarks/bench_rules.py                      # B=256, T=4096, CPU, float32
  python benchmarks/bench_rules.py --threads 1 --clock cpu   # steadier on a shared machine
  python benchmarks/bench_rules.py --device cuda --quick

Before/after in one run: export an older version of the rules library and time it interleaved with the
current one (same process, same data; its results are checked equal to the current ones):

  mkdir -p /tmp/old && git archive <older commit> cppo_diag/masks | tar -x -C /tmp/old
  python benchmarks/bench_rules.py --threads 1 --clock cpu --baseline /tmp/old
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from cppo_diag.masks import compute_mask, list_rules  # noqa: E402


def make_batch(B: int, T: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, T // 8), T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T) right padding
    q = 1.0 - torch.rand(B, T, generator=g) ** 3 * 0.98  # (B, T) mostly confident tokens
    scale = torch.linspace(0.005, 0.08, B)[torch.randperm(B, generator=g)][:, None]  # (B, 1) drift per response
    p = (q + scale * torch.randn(B, T, generator=g)).clamp(1e-4, 1.0)
    adv = torch.randn(B, generator=g)
    lp, lr = p.log(), q.log()
    to = dict(device=device, dtype=dtype)
    return lp.to(**to), lr.to(**to), adv.to(**to), mask.to(device), lengths


def cppo_loop(lp, lr, adv, lengths, *, delta=0.15, w_min=0.8, delta_b=0.02, q=0.9, cap=2.0):
    """CPPO the per-sequence way (one Python iteration and one torch.quantile per response)."""
    keep = torch.zeros(lp.shape, dtype=torch.bool, device=lp.device)
    for b in range(lp.shape[0]):
        n = int(lengths[b])
        lpb, lrb = lp[b, :n], lr[b, :n]
        rho = torch.exp((lpb - lrb).clamp(-20, 20))
        away = adv[b] * (rho - 1) > 0
        d = (lpb.exp() - lrb.exp()).abs()
        w = 1 - (1 - w_min) * torch.arange(n, device=lp.device, dtype=lp.dtype) / max(n - 1, 1)
        z = w * d
        db = torch.quantile(d.float(), q).to(d.dtype).clamp(delta_b, cap * delta_b)  # quantile needs fp32/fp64
        zero = z.new_zeros(1)
        s_prev = torch.cat([zero, torch.cumsum(z, 0)[:-1]])  # S_{t-1}
        w_prev = torch.cat([zero, torch.cumsum(w, 0)[:-1]])  # W_{t-1}
        c = torch.clamp(delta + db * w_prev - s_prev, max=delta)
        keep[b, :n] = ~away | (z <= c)
    return keep


def load_baseline(root: str):
    """``compute_mask`` of an older copy of the rules library (``ROOT/cppo_diag/masks``), imported under the
    package name ``cppo_baseline`` so that it runs beside the current one in this process."""
    import shutil
    import tempfile
    from pathlib import Path

    src = Path(root) / "cppo_diag" / "masks"
    if not (src / "__init__.py").is_file():
        raise SystemExit(f"--baseline: expected {src}/__init__.py (a tree holding cppo_diag/masks), found none")
    tmp = Path(tempfile.mkdtemp(prefix="bench_rules_baseline_"))
    shutil.copytree(src, tmp / "cppo_baseline" / "masks", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp / "cppo_baseline" / "__init__.py").write_text("")
    for f in (tmp / "cppo_baseline").rglob("*.py"):
        f.write_text(f.read_text().replace("cppo_diag.masks", "cppo_baseline.masks"))
    sys.path.insert(0, str(tmp))
    import importlib

    return importlib.import_module("cppo_baseline.masks").compute_mask


def _same(a, b) -> bool:
    """Identical keep, reason and weight (bit for bit)."""
    if not (torch.equal(a.keep, b.keep) and torch.equal(a.reason, b.reason)):
        return False
    if (a.weight is None) != (b.weight is None):
        return False
    return a.weight is None or torch.equal(a.weight, b.weight)


def timer(device: str, clock: str = "wall"):
    if device == "cuda":
        def run(fn, repeats):
            fn()
            torch.cuda.synchronize()
            out = []
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                out.append(a.elapsed_time(b))
            return out
    else:
        now = time.process_time if clock == "cpu" else time.perf_counter

        def run(fn, repeats):
            fn()
            out = []
            for _ in range(repeats):
                t0 = now()
                fn()
                out.append((now() - t0) * 1e3)
            return out
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", "-B", type=int, default=256, help="responses per batch (default 256)")
    ap.add_argument("--seq-len", "-T", type=int, default=4096, help="padded width (default 4096)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
    ap.add_argument("--repeats", type=int, default=15, help="timed repeats per entry (default 15; best and median shown)")
    ap.add_argument("--loop-repeats", type=int, default=3, help="timed repeats of the per-sequence loop (default 3)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="CPU device: 'wall' (perf_counter) or 'cpu' (process CPU time: steadier on a shared machine; "
                         "use with --threads 1)")
    ap.add_argument("--rules", nargs="*", default=None, help="rules to time (default: all)")
    ap.add_argument("--quick", action="store_true", help="B=32, T=1024, 3 repeats: a smoke run of every code path")
    ap.add_argument("--baseline", metavar="DIR", default=None,
                    help="also time the rules library found in DIR/cppo_diag/masks (an older version), interleaved "
                         "with the current one, and check that both give identical results")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.repeats, args.loop_repeats = 32, 1024, 3, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    lp, lr, adv, mask, lengths = make_batch(args.batch, args.seq_len, args.device, dtype)
    n_tok = int(mask.sum())
    run = timer(args.device, args.clock)
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"B={args.batch} T={args.seq_len} valid tokens={n_tok} dtype={args.dtype} device={dev_name} "
          f"torch={torch.__version__} clock={'cuda events' if args.device == 'cuda' else args.clock}")

    rows = []

    def record(name, times):
        rows.append((name, min(times), statistics.median(times)))
        return min(times)

    floor = record("floor (one read pass)", run(lambda: lp.sum() + lr.sum() + adv.sum() + mask.sum(), args.repeats))
    names = args.rules or [s.name for s in list_rules()]
    extra = {"cispo": {"eps_high": 0.28}}
    base_fn = load_baseline(args.baseline) if args.baseline else None
    best, before = {}, {}
    for name in names:
        def fn(name=name, cm=compute_mask):
            return cm(name, logp=lp, logp_rollout=lr, advantages=adv, response_mask=mask, **extra.get(name, {}))

        if base_fn is None:
            best[name] = record(name, run(fn, args.repeats))
            continue
        try:
            fn(cm=base_fn)
        except Exception as exc:  # noqa: BLE001 - an older library may lack a rule
            print(f"baseline: {name} failed ({exc}); timing the current version only")
            best[name] = record(name, run(fn, args.repeats))
            continue
        t_old, t_new = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            t_old += run(lambda: fn(cm=base_fn), 1)
            t_new += run(fn, 1)
        before[name] = (min(t_old), statistics.median(t_old), _same(fn(cm=base_fn), fn()))
        best[name] = record(name, t_new)
    loop_t = record("cppo-loop (per sequence, torch.quantile)", run(lambda: cppo_loop(lp, lr, adv, lengths), args.loop_repeats))

    res = compute_mask("cppo", logp=lp, logp_rollout=lr, advantages=adv, response_mask=mask, return_internals=True)
    mismatch = int(((res.keep ^ cppo_loop(lp, lr, adv, lengths)) & mask).sum())
    db = res.internals["delta_b"].float()
    at_min = float((db <= 0.02).float().mean())
    at_cap = float((db >= 0.04).float().mean())

    w = max(len(r[0]) for r in rows)
    print(f"\n{'entry':<{w}}  {'best ms':>9}  {'median ms':>9}  {'x floor':>8}")
    for name, b, med in rows:
        print(f"{name:<{w}}  {b:9.2f}  {med:9.2f}  {b / floor:8.1f}")
    if before:
        print(f"\nbefore/after (--baseline {args.baseline}; interleaved, best of {args.repeats}):")
        print(f"{'rule':<{w}}  {'before ms':>9}  {'after ms':>9}  {'speed-up':>8}  identical results")
        for name, (b_best, _b_med, same) in before.items():
            print(f"{name:<{w}}  {b_best:9.2f}  {best[name]:9.2f}  {b_best / best[name]:7.2f}x  {'yes' if same else 'NO'}")
    print(f"\nadaptive delta_b: {at_min:.0%} of responses at the minimum, {at_cap:.0%} at the cap, "
          f"{1 - at_min - at_cap:.0%} in between (exact selection)")
    print(f"masked fraction (cppo): {res.metrics['mask/cppo/frac']:.4f}; loop vs vectorised keep: {mismatch} of "
          f"{n_tok} valid tokens differ" + ("" if mismatch == 0 else " (float rounding of prefix sums at exact ties)"))
    if "cppo" in best:
        speedup = loop_t / best["cppo"]
        vs_floor = best["cppo"] / floor
        print(f"CPPO vs per-sequence loop: {speedup:.1f}x faster (target >= 20x: {'met' if speedup >= 20 else 'NOT met'})")
        print(f"CPPO vs one-read floor:    {vs_floor:.1f}x the floor (target <= 10x: {'met' if vs_floor <= 10 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
