#!/usr/bin/env python
"""Write a small offline math dataset in the trainer's format, and optionally a local Hugging Face model for it.

The dataset: multi-step arithmetic word problems with integer answers ("Mia has 7 shells. She gets 5 more.
Then she doubles what she has. How many shells does Mia have now?"), one JSON object per line with

    {"prompt": "...", "answer": "24", "solution": "7 + 5 = 12. 12 * 2 = 24. The answer is \\boxed{24}.",
     "steps": 2}

``prompt`` / ``answer`` are what ``task.kind = "dataset"`` reads (``cppo_diag.train.tasks.MathDatasetTask``
appends "Please reason step by step, and put your final answer within \\boxed{}." to every prompt and
compares the completion's last ``\\boxed{}`` with ``answer``); ``solution`` is a worked solution used only
by the optional warm start below. Train and eval files are drawn from disjoint problem sets (an eval
problem's prompt never appears in train); everything derives from ``--seed``.

``--model-dir DIR`` also writes a *local transformers checkpoint* the trainer loads with
``model.kind = "hf", model.path = DIR`` exactly as it would a Qwen3 checkpoint on disk (``AutoTokenizer`` +
``AutoModelForCausalLM.from_pretrained(..., local_files_only=True)``; nothing is downloaded):

* a byte-level BPE tokenizer trained on the dataset's text (``--vocab-size``; ``<pad>``/``<bos>``/``<eos>``,
  BOS prepended, no chat template), so every character of the prompts, the suffix and ``\\boxed{}`` is
  representable (the trainer's ``config:<arch>`` random models use the tiny GPT's character vocabulary, which
  has no capital letters and no backslash, so they cannot read this task);
* a randomly initialised Qwen2 model (``--hidden``, ``--layers``, ``--heads``);
* with ``--sft-steps N > 0``, a supervised warm start on the ``solution`` texts (teacher forcing on the
  response only, as the trainer encodes it), stopped after N steps or ``--sft-seconds``. RL from a random
  model has no signal (every reward 0, every group dropped); the warm start gives a policy at partial
  accuracy so groups have reward variance. Its greedy accuracy on the eval file is written to
  ``DIR/warmstart.json``.

    python scripts/make_math_dataset.py --out runs/gpu-smoke-data                       # train/eval JSONL
    python scripts/make_math_dataset.py --out runs/gpu-smoke-data --model-dir runs/gpu-smoke-data/model \\
        --sft-steps 600 --device cuda                                                   # + warm-started model
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

NAMES = ["Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ivan", "Sara", "Tom", "Nina", "Raj"]
ITEMS = ["apples", "marbles", "stickers", "coins", "shells", "books", "stamps", "cards", "pencils", "beads"]


def _problem(rng: np.random.Generator, min_steps: int, max_steps: int, max_value: int) -> dict:
    """One word problem: a start value and a chain of operations, each phrased as a sentence and solved as a line."""
    name = NAMES[rng.integers(len(NAMES))]
    item = ITEMS[rng.integers(len(ITEMS))]
    pron = "She" if name in ("Mia", "Ava", "Zoe", "Lena", "Sara", "Nina") else "He"
    v = int(rng.integers(2, 21))
    sentences = [f"{name} has {v} {item}."]
    lines = []
    k = int(rng.integers(min_steps, max_steps + 1))
    for _ in range(k):
        ops = ["add", "mul"] + (["sub"] if v > 1 else []) + (["half"] if v % 2 == 0 and v > 2 else [])
        if v * 2 > max_value:
            ops = [o for o in ops if o != "mul"] or ["sub"]
        op = ops[rng.integers(len(ops))]
        if op == "add":
            x = int(rng.integers(1, 20))
            x = min(x, max(1, max_value - v))
            sentences.append(f"{pron} gets {x} more.")
            lines.append(f"{v} + {x} = {v + x}.")
            v += x
        elif op == "sub":
            x = int(rng.integers(1, v))
            sentences.append(f"{pron} gives away {x}.")
            lines.append(f"{v} - {x} = {v - x}.")
            v -= x
        elif op == "mul":
            x = 3 if v * 3 <= max_value and rng.random() < 0.4 else 2
            sentences.append(f"Then {pron.lower()} {'doubles' if x == 2 else 'triples'} what {pron.lower()} has.")
            lines.append(f"{v} * {x} = {v * x}.")
            v *= x
        else:
            sentences.append(f"{pron} gives half of them to a friend.")
            lines.append(f"{v} / 2 = {v // 2}.")
            v //= 2
    sentences.append(f"How many {item} does {name} have now?")
    return {
        "prompt": " ".join(sentences),
        "answer": str(v),
        "solution": " ".join(lines) + f" The answer is \\boxed{{{v}}}.",
        "steps": k,
    }


def make_dataset(n_train: int, n_eval: int, *, seed: int = 0, min_steps: int = 2, max_steps: int = 3,
                 max_value: int = 99) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows), disjoint by prompt text, deterministic in ``seed``."""
    if min_steps < 1 or max_steps < min_steps:
        raise ValueError(f"steps: expected 1 <= min_steps <= max_steps, found {min_steps}..{max_steps}")
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    tries = 0
    while len(rows) < n_train + n_eval:
        tries += 1
        if tries > 50 * (n_train + n_eval) + 1000:
            raise ValueError(f"could not draw {n_train + n_eval} distinct problems (found {len(rows)}); "
                             "raise --max-steps or --max-value, or ask for fewer")
        r = _problem(rng, min_steps, max_steps, max_value)
        if r["prompt"] in seen:
            continue
        seen.add(r["prompt"])
        rows.append(r)
    return rows[n_eval:], rows[:n_eval]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# -- optional local HF model ---------------------------------------------------------------------------------
def build_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on ``texts``; ids 0/1/2 = <pad>/<bos>/<eos>; BOS prepended by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def build_model(tok, *, hidden: int, layers: int, heads: int, max_positions: int, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _encode_pairs(tok, rows: list[dict], suffix: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids as the trainer encodes them, response ids + EOS) per row."""
    out = []
    for r in rows:
        p = tok(r["prompt"] + suffix)["input_ids"]
        a = tok(r["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append((p, a))
    return out


def sft_warmstart(model, tok, train: list[dict], *, steps: int, seconds: float, batch_size: int, lr: float,
                  device: str, seed: int, progress: bool = True) -> dict:
    """Teacher forcing on the solutions (loss on response tokens only); returns steps done, seconds, last loss."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from cppo_diag.train.tasks.math_dataset import DEFAULT_SUFFIX

    pairs = _encode_pairs(tok, train, DEFAULT_SUFFIX)
    rng = np.random.default_rng(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, min(50, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else None
    t0 = time.time()
    loss_v = float("nan")
    done = 0
    bar = tqdm(range(steps), desc="sft warm start", disable=not progress)
    for _ in bar:
        idx = rng.integers(0, len(pairs), size=batch_size)
        seqs = [pairs[i][0] + pairs[i][1] for i in idx]
        L = max(len(s) for s in seqs)
        x = torch.full((batch_size, L), tok.pad_token_id, dtype=torch.long)
        y = torch.full((batch_size, L), -100, dtype=torch.long)
        for j, i in enumerate(idx):
            p, a = pairs[i]
            s = p + a
            x[j, : len(s)] = torch.tensor(s)
            y[j, len(p) - 1 : len(s) - 1] = torch.tensor(a)  # predict a[t] from position len(p)-1+t
        x, y = x.to(device), y.to(device)
        attn = (x != tok.pad_token_id).long()
        if amp is not None:
            with amp:
                logits = model(input_ids=x, attention_mask=attn).logits
        else:
            logits = model(input_ids=x, attention_mask=attn).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        done += 1
        if done % 20 == 0 or done == steps:
            loss_v = float(loss.item())
            bar.set_postfix(loss=f"{loss_v:.3f}")
        if time.time() - t0 > seconds:
            loss_v = float(loss.item())
            break
    bar.close()
    return {"sft_steps": done, "sft_seconds": round(time.time() - t0, 1), "sft_last_loss": round(loss_v, 4)}


def greedy_accuracy(model, tok, rows: list[dict], *, device: str, max_new_tokens: int, batch_size: int = 64) -> float:
    """Greedy exact accuracy with the trainer's scorer (last \\boxed{} vs answer)."""
    import torch

    from cppo_diag.train.tasks.math_dataset import DEFAULT_SUFFIX, extract_boxed, normalize_answer

    model.to(device).eval()
    hits = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            enc = [tok(r["prompt"] + DEFAULT_SUFFIX)["input_ids"] for r in chunk]
            L = max(len(e) for e in enc)
            x = torch.full((len(enc), L), tok.pad_token_id, dtype=torch.long)
            m = torch.zeros((len(enc), L), dtype=torch.long)
            for j, e in enumerate(enc):  # left padding
                x[j, L - len(e) :] = torch.tensor(e)
                m[j, L - len(e) :] = 1
            out = model.generate(input_ids=x.to(device), attention_mask=m.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            for r, ids in zip(chunk, out[:, L:].tolist()):
                got = extract_boxed(tok.decode(ids, skip_special_tokens=True))
                hits.append(got is not None and normalize_answer(got) == normalize_answer(r["answer"]))
    model.train()
    return float(np.mean(hits)) if hits else float("nan")


def check_reload(tok, model_dir: Path, texts: list[str]) -> None:
    """Fail unless the trainer's loader (``model.kind='hf'``) encodes ``texts`` as the warm start did.

    transformers 5's AutoTokenizer gives every ``qwen2`` checkpoint Qwen2's own pre-tokenizer (one token per
    digit); the trainer's ``load_tokenizer`` keeps the saved ``tokenizer.json``. This guards that contract.
    """
    from cppo_diag.train.models.hf import load_tokenizer

    loaded = load_tokenizer(str(model_dir))
    for t in texts:
        a, b = tok(t)["input_ids"], loaded(t)["input_ids"]
        if a != b:
            raise RuntimeError(f"{model_dir}: the trainer's tokenizer encodes {t!r} as {b[:16]}..., "
                               f"expected the warm start's {a[:16]}... ({type(loaded).__name__})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory for train.jsonl and eval.jsonl")
    ap.add_argument("--n-train", type=int, default=4000, help="training problems [4000]")
    ap.add_argument("--n-eval", type=int, default=64, help="held-out problems [64]")
    ap.add_argument("--seed", type=int, default=0, help="seed of problems, tokenizer, model init and warm start [0]")
    ap.add_argument("--min-steps", type=int, default=2, help="fewest operations per problem [2]")
    ap.add_argument("--max-steps", type=int, default=3, help="most operations per problem [3]")
    ap.add_argument("--max-value", type=int, default=99, help="largest intermediate value [99]")
    g = ap.add_argument_group("optional local transformers model (random Qwen2 + BPE tokenizer, optional warm start)")
    g.add_argument("--model-dir", type=Path, default=None, help="write the model here (off when not given)")
    g.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size [512]")
    g.add_argument("--hidden", type=int, default=512, help="hidden size [512]")
    g.add_argument("--layers", type=int, default=6, help="layers [6]")
    g.add_argument("--heads", type=int, default=8, help="attention heads (KV heads = heads // 2) [8]")
    g.add_argument("--max-positions", type=int, default=1024, help="max_position_embeddings [1024]")
    g.add_argument("--sft-steps", type=int, default=0, help="warm-start steps on the solutions (0 = random model) [0]")
    g.add_argument("--sft-seconds", type=float, default=60.0, help="stop the warm start after this many seconds [60]")
    g.add_argument("--sft-batch", type=int, default=64, help="warm-start batch size [64]")
    g.add_argument("--sft-lr", type=float, default=1e-3, help="warm-start AdamW learning rate [1e-3]")
    g.add_argument("--device", default="auto", help="warm-start device: auto | cpu | cuda [auto]")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    train, ev = make_dataset(args.n_train, args.n_eval, seed=args.seed, min_steps=args.min_steps,
                             max_steps=args.max_steps, max_value=args.max_value)
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(ev, args.out / "eval.jsonl")
    print(f"dataset: {len(train)} train, {len(ev)} eval problems -> {args.out}/{{train,eval}}.jsonl")
    if args.model_dir is None:
        return 0

    import torch

    from cppo_diag.train.tasks.math_dataset import DEFAULT_SUFFIX

    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    texts = [r["prompt"] + DEFAULT_SUFFIX for r in train] + [r["solution"] for r in train]
    tok = build_tokenizer(texts, args.vocab_size)
    model = build_model(tok, hidden=args.hidden, layers=args.layers, heads=args.heads,
                        max_positions=args.max_positions, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    info: dict = {"arch": "Qwen2", "params": n_params, "vocab_size": len(tok), "hidden": args.hidden,
                  "layers": args.layers, "seed": args.seed, "device": device}
    if args.sft_steps > 0:
        info.update(sft_warmstart(model, tok, train, steps=args.sft_steps, seconds=args.sft_seconds,
                                  batch_size=args.sft_batch, lr=args.sft_lr, device=device, seed=args.seed,
                                  progress=not args.no_progress))
        longest = max(len(tok(r["solution"], add_special_tokens=False)["input_ids"]) for r in ev) + 8
        info["greedy_acc_eval"] = round(greedy_accuracy(model, tok, ev, device=device, max_new_tokens=longest), 4)
    args.model_dir.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(str(args.model_dir), safe_serialization=True)
    tok.save_pretrained(str(args.model_dir))
    check_reload(tok, args.model_dir, [r["prompt"] + DEFAULT_SUFFIX for r in ev] + [r["solution"] for r in ev])
    (args.model_dir / "warmstart.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"model: {n_params / 1e6:.1f} M parameters, vocab {len(tok)} -> {args.model_dir} "
          + " ".join(f"{k}={v}" for k, v in info.items() if k.startswith(("sft", "greedy"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
