"""Tiny Qwen3 / Qwen3-MoE policies built in code (no downloads), or a local Hugging Face folder.

Sizes that learn 2-digit addition on 2 CPU cores (see docs/architecture.md): hidden 128,
intermediate 256, 4 layers, 4 heads (2 KV), head_dim 32, tied embeddings ≈ 0.6 M parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dcmdp.models.source import resolve_model_folder
from dcmdp.models.tokenizer import build_tokenizer, load_tokenizer
from dcmdp.precision import TORCH_DTYPES
from dcmdp.spec import ModelSpec


def build_config(spec: ModelSpec, tokenizer: Any):
    common = dict(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim, tie_word_embeddings=True,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    if spec.builtin == "tiny-qwen3-moe":
        # optional and heavy (the ml extra): the core imports without it
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            **common, moe_intermediate_size=max(8, spec.intermediate_size // spec.num_experts_per_tok // 2),
            num_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_tok,
            decoder_sparse_step=1, mlp_only_layers=[],
        )
    # optional and heavy (the ml extra): the core imports without it
    from transformers import Qwen3Config

    return Qwen3Config(**common)


def build_model(spec: ModelSpec, seed: int = 0):
    """(model, tokenizer): a loaded model (``spec.path`` / ``spec.name``) in ``spec.dtype``, else a
    built-in tiny model (fp32). Raises :class:`~dcmdp.models.source.ModelSourceError` naming the field
    when a loaded model's folder cannot be had."""
    # optional and heavy (the ml extra): the core imports without it
    import torch
    from transformers import AutoModelForCausalLM

    if spec.loaded:
        folder = resolve_model_folder(spec)
        tokenizer = load_tokenizer(folder)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, TORCH_DTYPES[spec.dtype]),
                                                     trust_remote_code=False)
        return model, tokenizer
    tokenizer = build_tokenizer()
    config = build_config(spec, tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tokenizer


def save_model(model, tokenizer, folder: Path) -> Path:
    """Write a Hugging Face folder (config, safetensors, tokenizer) that engines load from."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def vocab_limit(model) -> int:
    """Rows of the input embedding: the token ids a model accepts are ``0 .. vocab_limit - 1``.

    Real checkpoints pad the embedding beyond the tokenizer (Qwen: 151,936 rows, ~151,665 tokens),
    so ``len(tokenizer)`` is the wrong bound for ids an engine may sample."""
    return int(model.get_input_embeddings().num_embeddings)


def context_length(model) -> int:
    """Positions the model supports (``config.max_position_embeddings``; 0 when it names none)."""
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
