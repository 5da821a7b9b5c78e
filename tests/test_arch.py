"""Adapters: every listed architecture's table row points at real modules of the right kind."""

from __future__ import annotations

import pytest
import torch

from slicekit.arch import (
    UnsupportedArchitectureError,
    attention_info,
    get_arch,
    is_linear,
    linear_weight,
    mlp_width,
    set_linear,
    supported_model_types,
)
from tiny import ARCHS, tiny_config, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_table_matches_model(arch):
    model = tiny_model(arch)
    cfg = model.config
    spec = get_arch(cfg)
    hidden = cfg.hidden_size
    layers = spec.layer_list(model)
    assert len(layers) == cfg.num_hidden_layers
    for emb in spec.embeddings(model):
        assert isinstance(emb, torch.nn.Embedding) and emb.embedding_dim == hidden
    assert is_linear(model.get_submodule(spec.head))
    assert linear_weight(model.get_submodule(spec.head)).shape == (cfg.vocab_size, hidden)
    b = spec.block
    assert b.parallel == (arch in ("gpt_neox", "phi"))
    for layer in layers:
        for name in b.attn_readers:
            assert linear_weight(layer.get_submodule(name)).shape[1] == hidden, name
        assert linear_weight(layer.get_submodule(b.attn_writer)).shape[0] == hidden, b.attn_writer
        if b.experts is None:  # a dense MLP of linears
            for name in b.mlp_readers:
                assert linear_weight(layer.get_submodule(name)).shape[1] == hidden, name
            assert linear_weight(layer.get_submodule(b.mlp_writer)).shape[0] == hidden, b.mlp_writer
            up_rows = sum(linear_weight(layer.get_submodule(n)).shape[0] for n in b.mlp_up)
            assert up_rows == mlp_width(cfg) * len(b.mlp_up) * b.mlp_up_fused
            assert linear_weight(layer.get_submodule(b.mlp_down)).shape[1] == mlp_width(cfg)
        else:  # experts stored as 3-D parameters: E × (fused·F) × D up, E × D × F down
            n_experts = getattr(cfg, b.experts.num_experts_key)
            (up,) = b.mlp_up
            assert layer.get_parameter(up).shape == (n_experts, mlp_width(cfg) * b.mlp_up_fused, hidden)
            assert layer.get_parameter(b.mlp_down).shape == (n_experts, hidden, mlp_width(cfg))
            assert not spec.mlp_prunable and spec.rotation_invariant  # router and experts rotate with the stream
        for norm in (b.attn_norm, b.mlp_norm):
            if norm is not None:
                assert layer.get_submodule(norm).weight.shape == (hidden,)


def test_attention_geometry():
    info = attention_info(tiny_config("llama"))
    assert (info.num_heads, info.num_kv_heads, info.head_dim, info.rotary_dim) == (4, 2, 16, 16)
    assert info.group_size == 2
    assert attention_info(tiny_config("phi")).rotary_dim == 8  # partial rotary 0.5
    assert attention_info(tiny_config("gpt_neox")).rotary_dim == 8
    assert attention_info(tiny_config("opt")).rotary_dim == 0


def test_sequential_gpt_neox_variant():
    assert get_arch(tiny_config("gpt_neox_seq")).block.parallel is False


def test_unknown_architecture_lists_supported():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("bert")
    with pytest.raises(UnsupportedArchitectureError) as err:
        get_arch(cfg)
    for mt in supported_model_types():
        assert mt in str(err.value)


def test_set_linear_keeps_sizes_consistent_for_conv1d_and_linear():
    model = tiny_model("gpt2")
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D, stored in × out
    w = linear_weight(conv)[:10, :5].clone()
    set_linear(conv, w, torch.zeros(10))
    assert conv.weight.shape == (5, 10) and conv.nf == 10 and conv.nx == 5
    assert conv(torch.randn(3, 5)).shape == (3, 10)
    lin = torch.nn.Linear(6, 4)
    set_linear(lin, torch.randn(2, 6), keep_bias=False)
    assert lin.out_features == 2 and lin.bias is None
    with pytest.raises(ValueError):
        set_linear(torch.nn.Linear(6, 4), torch.randn(2, 6))  # old bias no longer fits
