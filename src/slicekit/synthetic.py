"""Randomly initialised Llama checkpoints of any size, written without holding the model.

For memory checks of streaming compression (``benchmarks/streaming.py``) and for users who want
to know whether a model of a given shape fits their machine before downloading it: the tensors
are drawn and written one shard at a time, so a 4 GB (or 400 GB) checkpoint needs the memory of
one shard.  Weights are ``N(0, 0.02²)`` as in transformers' initialisation, norms are ones; the
result loads with plain ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch


def write_random_llama(directory: str, *, layers: int, hidden: int, intermediate: int, heads: int,
                       kv_heads: int | None = None, vocab: int = 32000, tie: bool = False,
                       layers_per_shard: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32,
                       tokenizer: Any = None, max_position_embeddings: int = 4096) -> int:
    """Write the checkpoint (config, shards, index, and ``tokenizer`` if given); returns its bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    kv_heads = kv_heads or heads
    head_dim = hidden // heads
    os.makedirs(directory, exist_ok=True)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie,
                         bos_token_id=getattr(tokenizer, "bos_token_id", 1) or 1,
                         eos_token_id=getattr(tokenizer, "eos_token_id", 2) or 2, dtype=str(dtype).split(".")[-1])
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    outer = {"model.embed_tokens.weight": normal(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=dtype)}
    if not tie:
        outer["lm_head.weight"] = normal(vocab, hidden)
    n_shards = 1 + (layers + layers_per_shard - 1) // layers_per_shard
    weight_map: dict[str, str] = {}
    total = 0

    def flush(tensors: dict[str, torch.Tensor], k: int) -> None:
        nonlocal total
        name = f"model-{k:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()

    flush(outer, 1)
    del outer
    shard: dict[str, torch.Tensor] = {}
    k = 2
    for i in range(layers):
        p = f"model.layers.{i}."
        shard.update({
            p + "self_attn.q_proj.weight": normal(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": normal(intermediate, hidden),
            p + "mlp.up_proj.weight": normal(intermediate, hidden),
            p + "mlp.down_proj.weight": normal(hidden, intermediate),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
        })
        if (i + 1) % layers_per_shard == 0 or i + 1 == layers:
            flush(shard, k)
            shard = {}
            k += 1
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return total
