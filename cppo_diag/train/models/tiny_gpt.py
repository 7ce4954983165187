"""A small character-level GPT with a KV cache, for the CPU demo and the tests.

Pre-LayerNorm decoder (nanoGPT layout) with learned absolute positions. Positions are passed explicitly so
left-padded prompts keep the same position ids as unpadded ones; padding keys are masked out. The same
``forward`` serves training (full sequence) and generation (prompt, then one token at a time with ``cache``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SPECIALS = ["<pad>", "<bos>", "<eos>"]
CHARS = list("0123456789+-*/=,;:.>|()[]{}^ ") + [chr(c) for c in range(ord("a"), ord("z") + 1)]


class CharTokenizer:
    """Character vocabulary: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, then one id per character."""

    def __init__(self, chars: list[str] | None = None):
        self.itos = SPECIALS + list(chars or CHARS)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode_prompt(self, text: str) -> list[int]:
        return [self.bos_id] + self.encode(text)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as exc:
            raise ValueError(
                f"character {exc.args[0]!r} in {text!r} is not in the tiny GPT's vocabulary "
                f"(expected one of {''.join(self.itos[len(SPECIALS):])!r})"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids if i >= len(SPECIALS))

    def token_strings(self, ids: list[int]) -> list[str]:
        return [self.itos[i] for i in ids]


@dataclass
class TinyGPTConfig:
    vocab_size: int = len(SPECIALS) + len(CHARS)
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 96


class _Attention(nn.Module):
    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, key_valid, cache_kv):
        B, Lq, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (z.view(B, Lq, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, H, Lq, D)
        if cache_kv is not None and cache_kv[0] is not None:
            k = torch.cat([cache_kv[0], k], dim=2)  # (B, H, Lk, D)
            v = torch.cat([cache_kv[1], v], dim=2)
        Lk = k.size(2)
        causal = torch.ones(Lq, Lk, dtype=torch.bool, device=x.device).tril(diagonal=Lk - Lq)  # (Lq, Lk)
        diag = torch.zeros_like(causal)
        diag[torch.arange(Lq), torch.arange(Lk - Lq, Lk)] = True  # every query sees itself: no all-masked row
        mask = causal[None, None] & (key_valid[:, None, None, :] | diag[None, None])  # (B, 1, Lq, Lk)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, D)
        return self.proj(y.transpose(1, 2).reshape(B, Lq, C)), (k, v)


class _Block(nn.Module):
    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = _Attention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x, key_valid, cache_kv):
        a, kv = self.attn(self.ln1(x), key_valid, cache_kv)
        x = x + a
        return x + self.mlp(self.ln2(x)), kv


class TinyGPT(nn.Module):
    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """input_ids (B, L); attention_mask (B, L_total) bool/int over cached + new keys; position_ids (B, L).

        Returns (logits (B, L, V), cache) where cache is a list of per-layer (k, v) to pass back in.
        """
        B, L = input_ids.shape
        past = 0 if cache is None or cache[0][0] is None else cache[0][0].size(2)
        if attention_mask is None:
            attention_mask = torch.ones(B, past + L, dtype=torch.bool, device=input_ids.device)
        key_valid = attention_mask.bool()  # (B, past + L)
        if position_ids is None:
            position_ids = (key_valid.long().cumsum(1) - 1).clamp(min=0)[:, past:]  # (B, L)
        if int(position_ids.max()) >= self.cfg.block_size:
            raise ValueError(
                f"position {int(position_ids.max())} exceeds the tiny GPT's block_size={self.cfg.block_size}; "
                "raise model.block_size or lower rollout.max_new_tokens"
            )
        x = self.tok(input_ids) + self.pos(position_ids)  # (B, L, C)
        new_cache = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, key_valid, None if cache is None else cache[i])
            new_cache.append(kv)
        return self.head(self.ln_f(x)), new_cache

    def empty_cache(self):
        return [(None, None) for _ in self.blocks]

    # -- safetensors + JSON persistence (no pickle) -----------------------------------------------------
    def save(self, directory: str | Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"tiny_gpt": asdict(self.cfg), **(extra or {})}, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "TinyGPT":
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / "model.safetensors").exists() or not (d / "config.json").exists():
            raise FileNotFoundError(f"tiny GPT checkpoint {d}: expected model.safetensors and config.json, found {sorted(p.name for p in d.glob('*')) if d.exists() else 'no directory'}")
        cfg = TinyGPTConfig(**json.loads((d / "config.json").read_text())["tiny_gpt"])
        model = cls(cfg)
        model.load_state_dict(load_file(str(d / "model.safetensors")))
        return model
