"""Tiny randomly initialised models of every supported architecture, for exactness tests."""

from __future__ import annotations

import textwrap

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128

# model_type -> config overrides; hidden 64 keeps everything fast, odd-ish sizes catch shape bugs.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True),
    "mistral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, sliding_window=16),
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True),
    "opt": dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=1),
    "gpt_neox": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=128, rotary_pct=0.5, use_parallel_residual=True),
    "gpt_neox_seq": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=128, rotary_pct=0.5, use_parallel_residual=False),
    "phi": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, partial_rotary_factor=0.5),
    "phi3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, n_inner=96),
    # today's families (issue #13)
    "qwen3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True),
    # head_dim 32: the attention's inner width (128) differs from hidden, as in Gemma-7B
    "gemma": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=128, pad_token_id=0),
    # soft caps low enough to bend tiny logits/scores; sliding window shorter than the calibration text
    "gemma2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0,
                   query_pre_attn_scalar=16, sliding_window=8, final_logit_softcapping=3.0,
                   # attention soft-capping is transformers' own attention, which slicekit never changes;
                   # sdpa (what older transformers load with by default) ignores it, so a loaded model
                   # would differ from the eager original by the capping alone
                   attn_logit_softcapping=None, layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0,
                        query_pre_attn_scalar=16, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"]),
    "olmo2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0),
    "mixtral": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, num_local_experts=4,
                    num_experts_per_tok=2),
    "qwen3_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
    "qwen2_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, num_experts=4, num_experts_per_tok=2),
}

ARCHS = list(TINY_CONFIGS)
NEW_ARCHS = ["qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "mixtral", "qwen3_moe", "qwen2_moe"]

#: tiny configs of causal LMs the architecture table does NOT list (no adapter): commands that need
#: no adapter (info, eval, bench) must work on them; they are not in ``ARCHS``.
UNADAPTED_CONFIGS: dict[str, dict] = {
    "stablelm": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128),
}


def _row(name: str):
    from slicekit.arch import get_arch

    return get_arch(tiny_config(name))


def rotatable_archs() -> list[str]:
    """Tiny architectures whose residual stream slicekit can rotate (SliceGPT, bits-back, …)."""
    return [a for a in ARCHS if _row(a).rotation_invariant]


def mlp_prunable_archs() -> list[str]:
    """Tiny architectures whose MLP width can be pruned (their MLP is linears, not 3-D experts)."""
    return [a for a in ARCHS if _row(a).mlp_prunable]


def tiny_config(name: str):
    model_type = "gpt_neox" if name == "gpt_neox_seq" else name
    overrides = TINY_CONFIGS[name] if name in TINY_CONFIGS else UNADAPTED_CONFIGS[name]
    return AutoConfig.for_model(model_type, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **overrides)


def tiny_model(name: str, seed: int = 0):
    """A random model whose norms have non-trivial scales and biases (so folding is tested)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name), attn_implementation="eager")
    with torch.no_grad():
        for mod in model.modules():
            if "norm" in type(mod).__name__.lower():
                if getattr(mod, "weight", None) is not None:
                    mod.weight.uniform_(0.5, 1.5)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.normal_(0, 0.1)
            elif hasattr(mod, "bias") and isinstance(mod.bias, torch.nn.Parameter):
                mod.bias.normal_(0, 0.02)
    model.eval()
    model.config.use_cache = False
    return model


def tiny_inputs(batch: int = 2, seqlen: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seqlen), generator=g)


def tiny_calibration() -> list[torch.Tensor]:
    """Three small calibration batches, the same in every test."""
    return [tiny_inputs(2, 32, seed=s) for s in range(3)]


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def save_tiny_with_tokenizer(directory, name: str = "llama") -> None:
    """A tiny model plus a character-level tokenizer, saved as a Hugging Face directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_model(name).save_pretrained(directory)
    vocab = {chr(i): i for i in range(32, 127)}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2, "\n": 10, " ": 32})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


def write_tiny_gguf(path, context_length: int = 128):
    """A minimal GGUF file (one tensor, a context length): enough for metadata readers and for
    checks that refuse GGUF input."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(context_length)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tensor_counts(model) -> dict[str, int]:
    """Parameter counts read off the tensors themselves, independently of slicekit's counter."""
    from slicekit.arch import get_arch

    spec = get_arch(model.config)
    total = sum(p.numel() for p in model.parameters())
    emb = {id(p): p.numel() for m in [*spec.embeddings(model), model.get_submodule(spec.head)]
           for p in m.parameters(recurse=False)}
    decoder = sum(p.numel() for p in spec.layer_list(model).parameters())
    return {"total": total, "non_embedding": total - sum(emb.values()), "decoder": decoder}


# A subprocess preamble in which `import slicekit` fails: a checkpoint must load on transformers alone.
NO_SLICEKIT = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "slicekit":
                raise ImportError("slicekit is deliberately not importable here")
    sys.meta_path.insert(0, _Block())
    sys.path = [p for p in sys.path if "slicekit" not in p and not p.endswith("/src")]
""")


def kept_rows(before: torch.Tensor, after: torch.Tensor) -> list[list[int]]:
    """Per expert, which of the original gate rows (``E × F × D``) the narrowed ones (``E × k × D``)
    are — for methods that drop rows without changing the kept ones."""
    out = []
    for e in range(before.shape[0]):
        match = (after[e][:, None, :] == before[e][None, :, :]).all(dim=-1)  # k × F
        assert bool((match.sum(dim=1) == 1).all()), f"expert {e}: a kept gate row is not an original row"
        out.append(match.float().argmax(dim=1).tolist())
    return out
