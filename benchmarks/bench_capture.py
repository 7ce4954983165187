"""Capture overhead and on-disk size: recording on vs off, measured side by side.

A loop shaped like one RL training step: a small language model (embedding -> MLP -> LM head) runs forward
and backward on a (B, T) = (64, 1024) batch on CPU, computes per-token log-probs of the sampled tokens, a
policy-gradient loss and an optimiser step. With recording on, each step also calls
``RunRecorder.log_tokens`` (required columns: logp, logp_rollout, advantages, response_mask) and
``end_step``. Blocks of steps alternate (off, on, on, off, ...) in interleaved repeats so machine noise
hits both alike; an "on" block ends with ``rec.flush()`` so the background work it caused is charged to
it. The script reports median step times (wall and process CPU), their ratios, the time spent inside
``log_tokens`` on the training thread, the writer thread's busy time, and bytes per token on disk
(required columns, and the whole shard).

Targets (docs/benchmarks.md, section Capture): overhead <= 3% of step time, <= 16 bytes/token.

``--writer-only`` measures the background writer alone, for several writer settings side by side: the
same recorded batch is logged ``--writer-steps`` times (``log_tokens`` + ``end_step``, no model), then
``flush()``; sustained throughput = tokens / wall time from the first call to the end of the flush, so
it is bounded by whichever is slower, the training-thread call or the writer. Each setting opens a fresh
run and writes one untimed warm-up step first; settings are interleaved over ``--repeats`` (medians
reported). Columns: tokens/s (wall), writer CPU per step (all writer threads), bytes/token (required
columns; whole shard).

    python benchmarks/bench_capture.py                 # defaults: B=64, T=1024, 16 repeats x 1 step
    python benchmarks/bench_capture.py --repeats 3 --steps 2 --extra-columns
    python benchmarks/bench_capture.py --writer-only --repeats 5              # codec / thread table
    python benchmarks/bench_capture.py --writer-only --settings lz4,lz4-t2 --device cuda
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cppo_diag import RunRecorder, open_run  # noqa: E402
from cppo_diag.storage import schema  # noqa: E402


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(hidden, 4 * hidden), torch.nn.GELU(), torch.nn.Linear(4 * hidden, hidden)
        )
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, ids):  # (B, T) -> (B, T, V)
        h = self.emb(ids)
        return self.head(h + self.mlp(h))


def make_batch(B: int, T: int, vocab: int, gen: torch.Generator):
    ids = torch.randint(0, vocab, (B, T), generator=gen)  # (B, T) sampled tokens
    lengths = torch.randint(T // 4, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T) right padding
    adv = torch.randn(B, generator=gen)  # (B,)
    return ids, mask, adv


def train_step(model, opt, ids, mask, adv, logp_rollout, rec, step, extra):
    logits = model(ids[:, :-1])  # (B, T-1, V)
    logp_all = torch.log_softmax(logits.float(), -1)
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    m = mask[:, 1:]
    ratio = torch.exp(logp - logp_rollout[:, 1:])
    loss = -(ratio * adv[:, None] * m).sum() / m.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    kw = {}
    if extra:  # diagnostics a trainer computes anyway (both variants pay for them; only logging differs)
        with torch.no_grad():
            kw = dict(entropy=-(logp_all.exp() * logp_all).sum(-1), token_ids=ids[:, 1:], logp_old=logp.detach())
    t_log = 0.0
    if rec is not None:
        t0 = time.perf_counter()
        rec.log_tokens(step=step, logp=logp, logp_rollout=logp_rollout[:, 1:], advantages=adv, response_mask=m, **kw)
        rec.end_step(step)
        t_log = time.perf_counter() - t0
    return t_log


def required_bytes(files) -> tuple[int, int, int]:
    req = set(schema.REQUIRED_TOKEN_COLUMNS)
    n = req_b = total = 0
    for f in files:
        md = pq.read_metadata(f)
        n += md.num_rows
        total += f.stat().st_size
        for r in range(md.num_row_groups):
            for c in range(md.num_columns):
                if md.schema.column(c).name in req:
                    req_b += md.row_group(r).column(c).total_compressed_size
    return n, req_b, total


# --writer-only settings: name -> RunRecorder keyword arguments ({} = the shipped defaults)
WRITER_SETTINGS: dict[str, dict] = {
    "default": {},
    "zstd": {"compression": "zstd"},
    "zstd-3": {"compression": "zstd", "compression_level": 3},
    "lz4": {"compression": "lz4"},
    "snappy": {"compression": "snappy"},
    "none": {"compression": "none"},
    "lz4-t2": {"compression": "lz4", "writer_threads": 2},
    "lz4-t4": {"compression": "lz4", "writer_threads": 4},
}


def writer_only(args, logp, logp_rollout, adv, mask) -> int:
    """Throughput of the background writer per setting, interleaved over repeats (see module docstring)."""
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in WRITER_SETTINGS]
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; expected names from {list(WRITER_SETTINGS)}")
    tokens_per_step = int(mask.sum())
    results: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n in names}
    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    root = Path(tmp.name) if tmp else args.out
    bar = tqdm(total=args.repeats * len(names), desc="writer bench", unit="setting")
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            run_dir = root / f"writer-{name}-{r}"
            try:
                rec = RunRecorder(run_dir, trainer="bench", on_error="raise", **WRITER_SETTINGS[name])
            except TypeError as exc:  # an older RunRecorder without this keyword
                raise SystemExit(f"setting {name!r}: {exc}") from exc
            rec.log_tokens(step=0, logp=logp, logp_rollout=logp_rollout, advantages=adv, response_mask=mask)
            rec.end_step(0)
            rec.flush()  # untimed warm-up step
            cpu0 = rec._writer.cpu_s
            w0 = time.perf_counter()
            for step in range(1, args.writer_steps + 1):
                rec.log_tokens(step=step, logp=logp, logp_rollout=logp_rollout, advantages=adv, response_mask=mask)
                rec.end_step(step)
            rec.flush()
            wall = time.perf_counter() - w0
            cpu = rec._writer.cpu_s - cpu0
            rec.close()
            files = open_run(run_dir).token_files()
            n, req_b, total = required_bytes(files)
            results[name].append((tokens_per_step * args.writer_steps / wall, cpu / args.writer_steps,
                                  req_b / n, total / n))
            shutil.rmtree(run_dir, ignore_errors=True)
            bar.update(1)
    bar.close()
    print()
    print(f"writer only: device={logp.device} valid tokens/step={tokens_per_step} steps/setting={args.writer_steps} "
          f"repeats={args.repeats} (medians; settings interleaved)")
    base = statistics.median(x[0] for x in results[names[0]])
    print(f"| setting | RunRecorder kwargs | M tokens/s (wall) | vs {names[0]} | writer CPU ms/step "
          f"| bytes/token required | bytes/token whole shard |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        rows = results[name]
        tps = statistics.median(x[0] for x in rows)
        print(f"| {name} | `{WRITER_SETTINGS[name] or 'defaults'}` | {tps / 1e6:.2f} "
              f"(min {min(x[0] for x in rows) / 1e6:.2f}) | {tps / base:.2f}x "
              f"| {statistics.median(x[1] for x in rows) * 1e3:.2f} | {statistics.median(x[2] for x in rows):.2f} "
              f"| {statistics.median(x[3] for x in rows):.2f} |")
    if tmp:
        tmp.cleanup()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="sequences per step B (default 64)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence T (default 1024)")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary of the toy model (default 512)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the toy model (default 64)")
    p.add_argument("--steps", type=int, default=1, help="training steps per block (default 1)")
    p.add_argument("--repeats", type=int, default=16, help="interleaved repeats of an off block and an on block (default 16)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--device", default="cpu", help="torch device for the model and tensors (default cpu; "
                   "'cuda' exercises the pinned non_blocking copy path)")
    p.add_argument("--extra-columns", action="store_true", help="also record entropy, token_id, logp_old")
    p.add_argument("--out", type=Path, default=None, help="run directory root (default: a temp dir)")
    p.add_argument("--writer-only", action="store_true",
                   help="measure the background writer's throughput per setting (no training step)")
    p.add_argument("--settings", default=",".join(WRITER_SETTINGS),
                   help="--writer-only: comma-separated settings to compare, from: " + ", ".join(
                       f"{k} ({v or 'RunRecorder defaults'})" for k, v in WRITER_SETTINGS.items()))
    p.add_argument("--writer-steps", type=int, default=20,
                   help="--writer-only: timed steps per setting and repeat (default 20)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = TinyLM(args.vocab, args.hidden).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids, mask, adv = make_batch(args.batch, args.seq_len, args.vocab, gen)
    with torch.no_grad():  # the "sampler's" log-probs: the model's own, slightly perturbed
        lp = torch.log_softmax(model(ids.to(device)).float(), -1).cpu()
        logp_rollout = torch.cat([torch.zeros(args.batch, 1), lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)], 1)
        logp_rollout += 0.01 * torch.randn(logp_rollout.shape, generator=gen)
    ids, mask, adv, logp_rollout = (x.to(device) for x in (ids, mask, adv, logp_rollout))
    if args.writer_only:
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1]).float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return writer_only(args, logp, logp_rollout[:, 1:], adv, mask[:, 1:])

    def sync():  # a real loop syncs once per step (loss.item()); do the same so wall times are comparable
        if device.type == "cuda":
            torch.cuda.synchronize()

    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    root = Path(tmp.name) if tmp else args.out
    rec = RunRecorder(root, name="bench-capture", trainer="bench", on_error="warn")
    step_counter = 0
    for _ in range(args.warmup):
        train_step(model, opt, ids, mask, adv, logp_rollout, rec, step_counter, args.extra_columns)
        step_counter += 1
    rec.flush()
    warm_cpu, warm_busy, warm_steps = rec._writer.cpu_s, rec._writer.busy_s, step_counter

    # Blocks of `steps` steps alternate off/on (off-on, on-off, ...). An "on" block ends with rec.flush(),
    # so background work it caused is charged to it, not to the next "off" block.
    blocks = {"off": [], "on": []}  # (wall s/step, process CPU s/step) per block
    pair_ratios = []
    log_times = []
    order = ["off", "on"]
    bar = tqdm(total=args.repeats * 2 * args.steps, desc="capture bench", unit="step")
    for r in range(args.repeats):
        this = {}
        for variant in (order if r % 2 == 0 else order[::-1]):
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                t_log = train_step(model, opt, ids, mask, adv, logp_rollout, rec if variant == "on" else None,
                                   step_counter, args.extra_columns)
                sync()
                if variant == "on":
                    log_times.append(t_log)
                    step_counter += 1
                bar.update(1)
            if variant == "on":
                rec.flush()
            this[variant] = ((time.perf_counter() - w0) / args.steps, (time.process_time() - c0) / args.steps)
            blocks[variant].append(this[variant])
        pair_ratios.append(this["on"][0] / this["off"][0])
    bar.close()
    t0 = time.perf_counter()
    rec.close()
    drain = time.perf_counter() - t0

    run = open_run(root / "bench-capture")
    n, req_b, total = required_bytes(run.token_files())
    off = statistics.median(b[0] for b in blocks["off"])
    on = statistics.median(b[0] for b in blocks["on"])
    cpu_off = statistics.median(b[1] for b in blocks["off"])
    cpu_on = statistics.median(b[1] for b in blocks["on"])
    tokens_per_step = int(mask[:, 1:].sum())
    print()
    print(f"device={device} B={args.batch} T={args.seq_len} valid tokens/step={tokens_per_step} "
          f"torch threads={torch.get_num_threads()} "
          f"extra columns={args.extra_columns}")
    n_blocks = len(blocks["off"])
    print(f"step time, recording off : median {off * 1e3:8.1f} ms  ({n_blocks} blocks x {args.steps} steps)")
    print(f"step time, recording on  : median {on * 1e3:8.1f} ms  ({n_blocks} blocks x {args.steps} steps, incl. flush)")
    print(f"ratio on/off (wall)      : {on / off:.3f}  (overhead {100 * (on / off - 1):+.1f}%, target <= +3%)")
    print(f"ratio on/off, per repeat : median {statistics.median(pair_ratios):.3f}  "
          f"(min {min(pair_ratios):.3f}, max {max(pair_ratios):.3f})")
    print(f"process CPU per step     : off {cpu_off * 1e3:.0f} ms, on {cpu_on * 1e3:.0f} ms, "
          f"ratio {cpu_on / cpu_off:.3f}  (all threads; less sensitive to other load)")
    print(f"log_tokens+end_step call : median {statistics.median(log_times) * 1e3:.2f} ms on the training thread")
    # per timed step: the warm-up steps (and any one-time import they triggered) are excluded
    n_on = max(1, step_counter - warm_steps)
    busy = (rec.stats["writer_busy_s"] - warm_busy) / n_on
    wcpu = (rec.stats["writer_cpu_s"] - warm_cpu) / n_on
    print(f"writer thread            : {wcpu * 1e3:.1f} ms CPU/step ({100 * wcpu / off:.2f}% of the off step time), "
          f"{busy * 1e3:.1f} ms wall/step in the background")
    print(f"drain at close           : {drain * 1e3:.0f} ms")
    print(f"rows on disk             : {n} in {len(run.token_files())} shard(s) ({run.meta['status']})")
    print(f"bytes/token, required    : {req_b / n:.2f}  (target <= 16)")
    print(f"bytes/token, whole shard : {total / n:.2f}")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
