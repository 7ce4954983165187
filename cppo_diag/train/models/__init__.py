"""Policies: the built-in tiny character GPT and any Hugging Face causal LM from a local path.

A ``Policy`` bundles what the trainer needs and nothing else:

- ``module``: the trainable ``nn.Module`` (wrapped by DDP in multi-process runs);
- ``forward(module, input_ids, attention_mask, position_ids, cache=None, use_cache=False) -> (logits, cache)``;
- ``empty_cache()``: the initial cache for generation (None where the model builds its own);
- tokenizer helpers ``encode_prompt(text)``, ``decode(ids)``, ``token_strings(ids)``, ``eos_id``, ``pad_id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .tiny_gpt import CharTokenizer, TinyGPT, TinyGPTConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass
class Policy:
    name: str
    module: torch.nn.Module
    forward: Callable
    empty_cache: Callable
    encode_prompt: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    token_strings: Callable[[list[int]], list[str]]
    eos_id: int
    pad_id: int
    tokenizer: Any = None


def warmstart_dir(task_kind: str) -> Path:
    return ASSETS / f"warmstart_{task_kind}"


def build_tiny(cfg, task_kind: str) -> Policy:
    tok = CharTokenizer()
    if cfg.init == "random":
        module = TinyGPT(TinyGPTConfig(vocab_size=tok.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                       n_embd=cfg.n_embd, block_size=cfg.block_size))
        name = "tiny-gpt(random)"
    else:
        d = warmstart_dir(task_kind) if cfg.init == "warmstart" else Path(cfg.init)
        if cfg.init == "warmstart" and not d.exists():
            raise FileNotFoundError(
                f"model.init='warmstart': no shipped warm start for task.kind={task_kind!r} at {d}; "
                "run scripts/make_warmstart.py or set model.init='random' or a checkpoint directory"
            )
        module = TinyGPT.load(d)
        name = f"tiny-gpt({d.name})"

    def forward(m, input_ids, attention_mask, position_ids, cache=None, use_cache=False):
        return m(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)

    base = module
    return Policy(name=name, module=module, forward=forward, empty_cache=lambda: base.empty_cache(),
                  encode_prompt=tok.encode_prompt, decode=tok.decode, token_strings=tok.token_strings,
                  eos_id=tok.eos_id, pad_id=tok.pad_id, tokenizer=tok)


def build_policy(model_cfg, task_kind: str, device) -> Policy:
    """Policy from a ``ModelConfig`` (``cppo_diag.train.config``), moved to ``device``."""
    if model_cfg.kind == "tiny_gpt":
        pol = build_tiny(model_cfg, task_kind)
    elif model_cfg.kind == "hf":
        from .hf import build_hf

        pol = build_hf(model_cfg)
    else:
        raise ValueError(f"model.kind: expected 'tiny_gpt' or 'hf', found {model_cfg.kind!r}")
    pol.module.to(device)
    return pol
