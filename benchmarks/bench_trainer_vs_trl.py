#!/usr/bin/env python
"""The bundled trainer (``cppo_diag.train``) vs TRL's ``GRPOTrainer``, side by side in one process, on CPU.

Both train the same randomly initialised ``config:llama-tiny`` transformers model (``cppo_diag/train/models/hf.py``:
Llama, hidden 64, 2 layers, the character vocabulary) on the same prompts (the ``fib`` task's), with the same group
size, batch, sampling settings (temperature 1, no top-p/top-k), fp32, one pass and one optimiser update per batch,
no reference model / KL, no pi_old recompute. Responses have a fixed length: the bundled sampler is given an EOS id
that never occurs, TRL gets ``min_new_tokens = max_completion_length``; tokens are still counted from the masks.

Per optimiser step, each side is split into
  * rollout: generation + decoding + rewards + advantages (bundled: ``time/rollout_s``; TRL: its
    ``_generate_and_score_completions``, timed in a subclass);
  * update: loss forward + backward + clip + optimiser step (bundled: ``time/update_s``, rule included, minus
    ``time/log_tokens_s``; TRL: the whole optimiser step, timed by a callback, minus its rollout).
Throughputs are response tokens per second of each phase. Rounds alternate the order (A/B, B/A, ...); each run
trains ``--steps`` steps and the first step of every run is dropped as warm-up. Prints per-round ratios
bundled / TRL (> 1: the bundled trainer is faster) and their medians. ``--clock cpu`` times both with this
process's CPU time instead of wall time (the bundled trainer's timers are pointed at it), which a loaded machine
disturbs far less when ``--threads 1``.

    python benchmarks/bench_trainer_vs_trl.py --threads 1            # ~1 minute on 2 cores
    python benchmarks/bench_trainer_vs_trl.py --quick                # smoke run, seconds
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ARCH = "llama-tiny"
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU time (robust to load)


class _TrainerClock:
    """Stands in for the ``time`` module inside ``cppo_diag.train.runtime`` so that the trainer's phase timers
    (``time/rollout_s``, ``time/update_s``) read the chosen clock."""

    def __init__(self, clock):
        self.perf_counter = clock

    def __getattr__(self, name):
        return getattr(time, name)


def task_prompts(args) -> list[str]:
    """The prompts the bundled trainer draws in a run of ``args.steps`` steps (``fib`` task, seed 0, rank 0)."""
    from cppo_diag.train.config import TaskConfig
    from cppo_diag.train.tasks import build_task
    from cppo_diag.train.trainer import step_rng

    task = build_task(TaskConfig(kind="fib", eval_size=8))
    return [p.prompt for step in range(args.steps) for p in task.sample(args.prompts, step_rng(0, step, 0, 0))]


class _Scalars:
    """A recorder for ``train(recorder_factory=...)`` that keeps the step scalars in memory and writes nothing
    (``log.record`` must be true for the factory to be used)."""

    def __init__(self):
        from cppo_diag.capture.null import NullRecorder

        self._null = NullRecorder()
        self.steps: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._null, name)

    def log_scalars(self, step, values):
        self.steps.append(dict(values))


def run_bundled(args, out_dir: Path) -> list[tuple[float, float, int]]:
    """(rollout s, update s, response tokens) per step of one bundled training run."""
    import cppo_diag.train.runtime as runtime_mod
    from cppo_diag.train import build_config, train

    cfg = build_config("demo", overrides={
        "steps": args.steps, "threads": args.threads, "device": "cpu", "precision": "fp32", "seed": 0,
        "model": {"kind": "hf", "path": f"config:{ARCH}", "dtype": "float32"},
        "task": {"kind": "fib", "eval_size": 8},
        "rollout": {"prompts_per_step": args.prompts, "n": args.group, "max_new_tokens": args.length,
                    "temperature": 1.0, "top_p": 1.0, "staleness": 0},
        "optim": {"lr": 1e-4, "epochs": 1, "updates_per_batch": 1, "skip_zero_var": False, "grad_clip": 1.0,
                  "adv_std_norm": True},
        "rule": {"name": "grpo_clip", "params": {}, "anchor": "rollout"},
        "log": {"out_dir": str(out_dir), "name": "bundled", "record": True, "progress": False},
        "ckpt": {"every": 0, "keep": 0, "resume": False}})
    rec = _Scalars()
    real_build = runtime_mod.build_policy

    def build_fixed_length(*a, **kw):  # fixed response length: an EOS id the sampler never draws
        pol = real_build(*a, **kw)
        pol.eos_id = -1
        return pol

    runtime_mod.build_policy, runtime_mod.time = build_fixed_length, _TrainerClock(CLOCKS[args.clock])
    try:
        train(cfg, recorder_factory=lambda *a, **kw: rec)
    finally:
        runtime_mod.build_policy, runtime_mod.time = real_build, time
    # update minus the token-logging time (its recorder keeps nothing; TRL records nothing)
    return [(s["time/rollout_s"], s["time/update_s"] - s["time/log_tokens_s"], round(s["response/len_mean"] * args.prompts * args.group))
            for s in rec.steps if "time/rollout_s" in s]  # (evaluation scalars come on their own)


def _char_tokenizer():
    """A transformers tokenizer over the bundled character vocabulary (same ids; ``<bos>`` prepended)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from cppo_diag.train.models.tiny_gpt import CharTokenizer

    ct = CharTokenizer()
    tk = Tokenizer(models.WordLevel({s: i for i, s in enumerate(ct.itos)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", ct.bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def _trl_model():
    """The module ``model.path='config:llama-tiny'`` builds for the bundled trainer, randomly initialised."""
    from cppo_diag.train.config import ModelConfig
    from cppo_diag.train.models.hf import build_random_hf

    return build_random_hf(ARCH, ModelConfig(kind="hf", path=f"config:{ARCH}", dtype="float32")).module


def run_trl(args, out_dir: Path) -> list[tuple[float, float, int]]:
    """(rollout s, update s, response tokens) per optimiser step of one TRL ``GRPOTrainer`` run."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    rows: list[list] = []  # per step: [rollout s, tokens, step s]
    clock = CLOCKS[args.clock]

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = clock()
            out = super()._generate_and_score_completions(inputs)
            rows.append([clock() - t0, int(out["completion_mask"].sum()), None])
            return out

    class StepClock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = clock()

        def on_step_end(self, a, state, control, **kw):
            rows[-1][2] = clock() - self.t0

    torch.manual_seed(0)
    tok = _char_tokenizer()
    B = args.prompts * args.group
    prompts = task_prompts(args)  # TRL's sampler orders them its own way
    cfg = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, per_device_train_batch_size=B,
        gradient_accumulation_steps=1, num_generations=args.group, max_completion_length=args.length,
        generation_kwargs={"min_new_tokens": args.length}, temperature=1.0, top_p=1.0, top_k=0, num_iterations=1,
        gradient_checkpointing=args.trl_grad_ckpt,  # TRL's default is on; the bundled trainer's is off
        beta=0.0, max_steps=args.steps, learning_rate=1e-4, max_grad_norm=1.0, logging_steps=10**6,
        report_to="none", save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0)

    def reward(completions, **kw):  # cheap, varies within a group
        return [float(str(c).count("1")) for c in completions]

    trainer = Timed(model=_trl_model(), reward_funcs=reward, args=cfg, processing_class=tok,
                    train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[StepClock()])
    trainer.remove_callback(PrinterCallback)  # its end-of-training metrics dict is noise here
    trainer.train()
    return [(r, s - r, n) for r, n, s in rows if s is not None]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="A/B rounds (the order alternates)")
    ap.add_argument("--steps", type=int, default=6, help="optimiser steps per run (the first is warm-up)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="responses per prompt (GRPO group size)")
    ap.add_argument("--length", type=int, default=64, help="response length in tokens (fixed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall: perf_counter; cpu: process CPU time (with --threads 1, robust to a loaded machine)")
    ap.add_argument("--trl-grad-ckpt", action="store_true",
                    help="keep TRL's default gradient checkpointing (off by default here, as in the bundled trainer)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 steps, 2 x 4 responses of 8 tokens")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.prompts, args.group, args.length = 1, 2, 2, 4, 8
    if args.steps < 2:
        ap.error(f"--steps: expected >= 2 (the first step of each run is warm-up), found {args.steps}")

    import torch
    import transformers
    import trl

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_trl_"))
    print(f"model config:{ARCH}, {args.prompts} prompts x {args.group} responses x {args.length} tokens, "
          f"{args.steps} steps per run (first dropped), threads {args.threads}, clock {args.clock}, "
          f"TRL gradient checkpointing {'on' if args.trl_grad_ckpt else 'off'}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}")

    def rates(steps):
        steps = steps[1:]  # warm-up
        tok = sum(n for _, _, n in steps)
        return tok / sum(r for r, _, _ in steps), tok / sum(u for _, u, _ in steps), tok // len(steps)

    r_roll, r_upd = [], []
    for i in range(args.rounds):
        order = ("bundled", "trl") if i % 2 == 0 else ("trl", "bundled")
        got = {}
        for side in order:
            run = run_bundled if side == "bundled" else run_trl
            got[side] = rates(run(args, tmp / f"{side}-{i}"))
        (bro, bup, bn), (tro, tup, tn) = got["bundled"], got["trl"]
        r_roll.append(bro / tro)
        r_upd.append(bup / tup)
        print(f"round {i} ({'/'.join(order)}): tokens/step bundled {bn} trl {tn} | rollout tok/s bundled {bro:.0f} "
              f"trl {tro:.0f} ratio {bro / tro:.2f} | update tok/s bundled {bup:.0f} trl {tup:.0f} "
              f"ratio {bup / tup:.2f}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"rollout ratio bundled/trl: median {statistics.median(r_roll):.2f} "
          f"({', '.join(f'{x:.2f}' for x in r_roll)})")
    print(f"update ratio bundled/trl: median {statistics.median(r_upd):.2f} "
          f"({', '.join(f'{x:.2f}' for x in r_upd)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
