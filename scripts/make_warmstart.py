#!/usr/bin/env python
"""Produce the tiny GPT's SFT warm start shipped in ``cppo_diag/train/assets/warmstart_<task>/``.

The CPU demo needs a policy at *partial* accuracy (SPEC.md "What the bundled demo must exercise"): RL then
starts at once with headroom and reward variance inside groups. This script trains the tiny character GPT by
teacher forcing on the synthetic task and stops as soon as greedy exact accuracy on the held-out set reaches
``--target`` (default 0.3), then saves ``model.safetensors`` + ``config.json`` (sizes, task, measured accuracy).

    python scripts/make_warmstart.py                 # fib task, about 3-5 minutes on 2 cores
    python scripts/make_warmstart.py --task add --target 0.3
    python scripts/make_warmstart.py --task chain --min-terms 160 --max-terms 160 --block-size 192 \
        --short-steps 200 --target 0.35 --eval-every 2 --threads 1   # the long preset's warm start (160 digits)
    python scripts/make_warmstart.py --task chain --forks 0.5 --fork-profile uniform --min-terms 160 \
        --max-terms 160 --block-size 192 --short-steps 200 --target 0.35 --eval-every 2 --threads 1   # its uniform-fork twin
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

import torch

from cppo_diag.train.config import TaskConfig
from cppo_diag.train.evaluate import evaluate
from cppo_diag.train.models import warmstart_dir
from cppo_diag.train.models.tiny_gpt import CharTokenizer, TinyGPT, TinyGPTConfig
from cppo_diag.train.rollout import TorchSampler
from cppo_diag.train.sft import sft
from cppo_diag.train.tasks import build_task, warmstart_key


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="fib", help="synthetic task kind: fib | add | chain")
    ap.add_argument("--min-terms", type=int, default=None, help="task.min_terms (chain: fewest answer digits)")
    ap.add_argument("--max-terms", type=int, default=None, help="task.max_terms (chain: most answer digits)")
    ap.add_argument("--forks", type=float, default=0.0,
                    help="task.forks (chain: fork density at the last digit; saved as warmstart_chain_forks)")
    ap.add_argument("--fork-profile", default="rising",
                    help="task.fork_profile: rising | uniform (uniform: saved as warmstart_chain_forks_uniform)")
    ap.add_argument("--short-steps", type=int, default=0,
                    help="curriculum: first train this many steps on short answers (--short-terms), then on the task")
    ap.add_argument("--short-terms", default="16,48", help="MIN,MAX answer terms of the curriculum's first phase")
    ap.add_argument("--init", default="", help="continue from this tiny GPT checkpoint directory (skips the curriculum)")
    ap.add_argument("--batch-size", type=int, default=64, help="SFT sequences per step")
    ap.add_argument("--lr", type=float, default=3e-3, help="SFT peak learning rate")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--target", type=float, default=0.3, help="stop at this greedy exact accuracy on the held-out set")
    ap.add_argument("--max-steps", type=int, default=4000, help="SFT steps at most")
    ap.add_argument("--eval-every", type=int, default=10, help="greedy evaluation every n SFT steps")
    ap.add_argument("--n-layer", type=int, default=3)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="output directory (default: the package's assets/warmstart_<task>)")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    tcfg = TaskConfig(kind=args.task, forks=args.forks, fork_profile=args.fork_profile)
    if args.min_terms is not None:
        tcfg.min_terms = args.min_terms
    if args.max_terms is not None:
        tcfg.max_terms = args.max_terms
    # the longest answer in characters, plus EOS (fib/add: the demo's 40 tokens)
    max_new = tcfg.max_terms + 1 if args.task == "chain" else 40
    task = build_task(tcfg)
    tok = CharTokenizer()
    if args.init:
        model = TinyGPT.load(args.init)
        args.short_steps = 0
    else:
        model = TinyGPT(TinyGPTConfig(vocab_size=tok.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                                      n_embd=args.n_embd, block_size=args.block_size))
    sampler = TorchSampler(lambda ids, attn, pos, cache: model(ids, attention_mask=attn, position_ids=pos, cache=cache),
                           eos_id=tok.eos_id, pad_id=tok.pad_id, device="cpu", empty_cache=model.empty_cache)

    class _P:  # the bits of a Policy that evaluate() uses
        module, encode_prompt, decode, eos_id = model, tok.encode_prompt, tok.decode, tok.eos_id

    out = args.out or str(warmstart_dir(warmstart_key(tcfg)))

    def greedy(m):
        res = evaluate(_P, sampler, task.eval_set(), task.score, max_new_tokens=max_new)
        print(f"eval {json.dumps(res)} t={time.time() - t0:.0f}s", flush=True)
        m.save(out + ".last")  # the latest snapshot, to inspect or continue (--init) while SFT runs
        return res["eval/greedy_acc"]

    t0 = time.time()
    if args.short_steps:  # learn the rule on short answers first (cheap steps), then the positions of long ones
        lo, hi = (int(x) for x in args.short_terms.split(","))
        short = build_task(TaskConfig(kind=args.task, min_terms=lo, max_terms=hi, digits=tcfg.digits, eval_size=8,
                                      forks=tcfg.forks, fork_profile=tcfg.fork_profile))
        sft(model, tok, short, steps=args.short_steps, seed=args.seed + 1, batch_size=args.batch_size, lr=args.lr)
    sft(model, tok, task, steps=args.max_steps, eval_fn=greedy, log_every=args.eval_every, stop_at=args.target,
        seed=args.seed, batch_size=args.batch_size, lr=args.lr)
    res = evaluate(_P, sampler, task.eval_set(), task.score, max_new_tokens=max_new)
    shutil.rmtree(out + ".last", ignore_errors=True)
    model.save(out, extra={"task": {"kind": args.task, "min_terms": tcfg.min_terms, "max_terms": tcfg.max_terms,
                                    "digits": tcfg.digits, "forks": tcfg.forks,
                                    "fork_profile": tcfg.fork_profile},
                           "sft": {"short_steps": args.short_steps, "short_terms": args.short_terms,
                                   "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed},
                           "measured": {**res, "sft_seconds": round(time.time() - t0, 1)},
                           "made_by": "scripts/make_warmstart.py " + " ".join(sys.argv[1:] if argv is None else argv)})
    print(json.dumps(res), "->", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
