"""SliceGPT on tiny random models of every architecture: invariance, exactness, shapes, counts."""

from __future__ import annotations

import pytest
import torch

from slicekit.arch import get_arch, linear_weight
from slicekit.errors import SlicekitError
from slicekit.invariance import make_invariant
from slicekit.methods import CompressionContext
from slicekit.methods.slicegpt import SliceGPTConfig, compress
from slicekit.modeling_slicekit import ResidualBlock, UnitRMSNorm
from slicekit.models import count_parameters
from slicekit.schedules import round_width
from slicekit.shape import count_from_shape
from tiny import ARCHS, logits, rel_error, tiny_calibration, tiny_inputs, tiny_model

CTX = CompressionContext(progress=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_invariance_transforms_keeplogits(arch):
    model = tiny_model(arch)
    x = tiny_inputs()
    ref = logits(model, x)
    make_invariant(model)
    spec = get_arch(model.config)
    assert all(isinstance(layer, ResidualBlock) for layer in spec.layer_list(model))
    assert isinstance(model.get_submodule(spec.final_norm), UnitRMSNorm)
    assert model.get_submodule(spec.head).weight is not spec.embeddings(model)[0].weight
    assert rel_error(logits(model, x), ref) <= 1e-4
    if spec.norm_kind == "layer":  # the stream is centred: embeddings have zero row means
        emb = spec.embeddings(model)[0].weight
        assert emb.mean(-1).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_full_width_rotation_is_exact(arch):
    model = tiny_model(arch)
    x = tiny_inputs()
    ref = logits(model, x)
    compress(model, tiny_calibration(), SliceGPTConfig(sparsity=0.0), CTX)
    layer = get_arch(model.config).layer_list(model)[0]
    assert layer.attn_shortcut is not None  # really rotated, not skipped
    assert rel_error(logits(model, x), ref) <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_sliced_shapes_and_parameter_counts(arch):
    model = tiny_model(arch)
    hidden = model.config.hidden_size
    result = compress(model, tiny_calibration(), SliceGPTConfig(sparsity=0.25), CTX)
    spec = get_arch(model.config)
    d = round_width(hidden, 0.25)
    assert d == 48
    b = spec.block
    for layer in spec.layer_list(model):
        for name in b.attn_readers:
            assert linear_weight(layer.get_submodule(name)).shape[1] == d
        assert layer.attn_shortcut.shape[0] == d
    assert spec.embeddings(model)[0].weight.shape[1] == d
    head_in = d if spec.head_width_is_embedding_width else hidden
    assert linear_weight(model.get_submodule(spec.head)).shape[1] == head_in
    out = logits(model, tiny_inputs())
    assert torch.isfinite(out).all()
    counted = count_parameters(model)
    assert count_from_shape(model.config, result.shape) == counted
    assert counted["total"] == sum(p.numel() for p in model.parameters())
    assert result.summary["attn_in_widths"] == [d] * len(spec.layer_list(model))


def test_slicing_error_grows_with_sparsity():
    x = tiny_inputs(4, 32, seed=9)
    ref = logits(tiny_model("llama"), x)
    errs = []
    for s in (0.1, 0.3, 0.6):
        m = tiny_model("llama")
        compress(m, tiny_calibration(), SliceGPTConfig(sparsity=s), CTX)
        errs.append(rel_error(logits(m, x), ref))
    assert errs[0] < errs[1] < errs[2]


def test_slice_head_option_slices_the_head():
    m = tiny_model("llama")
    compress(m, tiny_calibration(), SliceGPTConfig(sparsity=0.25, slice_head=True), CTX)
    assert m.lm_head.weight.shape[1] == 48
    assert m.model.norm.dim == 48 and m.model.norm.norm_dim == 64


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_impossible_sparsity_is_rejected(bad):
    with pytest.raises(SlicekitError):
        SliceGPTConfig(sparsity=bad)


def test_width_that_rounds_to_zero_is_rejected():
    with pytest.raises(SlicekitError, match="leaves nothing"):
        compress(tiny_model("llama"), tiny_calibration(), SliceGPTConfig(sparsity=0.5, round_to=64), CTX)


def test_rounding_to_multiple():
    assert round_width(576, 0.25, 8) == 432
    assert round_width(576, 0.1, 8) == 512  # 518.4 → 518 → 512
    assert round_width(576, 0.1, 1) == 518


def test_compression_is_deterministic():
    a, b = tiny_model("opt"), tiny_model("opt")
    compress(a, tiny_calibration(), SliceGPTConfig(sparsity=0.3), CTX)
    compress(b, tiny_calibration(), SliceGPTConfig(sparsity=0.3), CTX)
    x = tiny_inputs()
    assert torch.equal(logits(a, x), logits(b, x))


def test_half_precision_path_runs_and_stays_close():
    """bfloat16 weights and activations, float64 PCA: the 0 % model stays close to the original."""
    model = tiny_model("llama").to(torch.bfloat16)
    x = tiny_inputs()
    ref = logits(model, x).float()
    compress(model, tiny_calibration(), SliceGPTConfig(sparsity=0.0), CTX)
    assert model.model.layers[0].attn_shortcut.dtype == torch.bfloat16
    assert rel_error(logits(model, x).float(), ref) < 0.05


def test_residual_forms_agree_with_an_explicit_shortcut():
    """``ResidualBlock._residual``: a matrix, the identity, and the truncated identity (a narrower
    stream entering a wider one, used during calibration) — the last in-place without autograd
    and padded with it, both equal to multiplying by ``[I; 0]``."""
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 7, generator=g)
    s = torch.randn(3, 7, generator=g)
    want = x @ s + out
    assert torch.allclose(ResidualBlock._residual(x, s, out.clone()), want, atol=1e-6)
    same = torch.randn(2, 5, 3, generator=g)
    assert torch.equal(ResidualBlock._residual(x, None, same), x + same)
    pad = torch.eye(3, 7)
    with torch.no_grad():
        assert torch.allclose(ResidualBlock._residual(x, None, out.clone()), x @ pad + out)
    with torch.enable_grad():
        o = out.clone().requires_grad_()
        got = ResidualBlock._residual(x, None, o)
        assert torch.allclose(got, x @ pad + out)
        got.sum().backward()
        assert torch.equal(o.grad, torch.ones_like(out))
