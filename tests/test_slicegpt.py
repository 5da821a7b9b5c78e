"""SliceGPT on tiny random models of every architecture: invariance, exactness, shapes, counts."""

from __future__ import annotations

import pytest
import torch

from slicekit.arch import get_arch, linear_weight
from slicekit.errors import SlicekitError
from slicekit.invariance import make_invariant
from slicekit.methods import get_method
from slicekit.methods.slicegpt import SliceGPTConfig
from slicekit.modeling_slicekit import ResidualBlock, UnitRMSNorm
from slicekit.models import count_parameters
from slicekit.pipeline import CompressReport
from slicekit.pipeline import compress as pipeline_compress
from slicekit.schedules import round_width
from slicekit.shape import Plan, count_built, count_plan
from tiny import ARCHS, logits, rel_error, rotatable_archs, tiny_calibration, tiny_inputs, tiny_model

#: the families whose residual stream slicekit can rotate (the architecture table says which)
ROTATABLE = rotatable_archs()


def compress(model, config: SliceGPTConfig, batches=None) -> CompressReport:
    """SliceGPT through the one entry point, on the tiny calibration batches."""
    return pipeline_compress(model, None, "slicegpt", config, progress=False,
                             batches=tiny_calibration() if batches is None else batches)


def real_counts(model) -> dict[str, int]:
    """Parameter counts from the tensors themselves (tied ones once), independent of any plan."""
    spec = get_arch(model.config)
    total = sum(p.numel() for p in model.parameters())
    decoder = sum(p.numel() for p in spec.layer_list(model).parameters())
    emb = {id(p): p.numel() for m in [*spec.embeddings(model), model.get_submodule(spec.head)]
           for p in m.parameters(recurse=False)}
    return {"total": total, "non_embedding": total - sum(emb.values()), "decoder": decoder}


@pytest.mark.parametrize("arch", ROTATABLE)
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


@pytest.mark.parametrize("arch", ROTATABLE)
def test_full_width_rotation_is_exact(arch):
    model = tiny_model(arch)
    x = tiny_inputs()
    ref = logits(model, x)
    compress(model, SliceGPTConfig(slicing=0.0))
    layer = get_arch(model.config).layer_list(model)[0]
    assert layer.attn_shortcut is not None  # really rotated, not skipped
    assert rel_error(logits(model, x), ref) <= 1e-4


@pytest.mark.parametrize("arch", ROTATABLE)
def test_sliced_shapes_and_parameter_counts(arch):
    model = tiny_model(arch)
    hidden = model.config.hidden_size
    config = SliceGPTConfig(slicing=0.25)
    n_layers = model.config.num_hidden_layers
    planned = get_method("slicegpt").plan(model, config, [0.25] * n_layers)  # before any surgery
    result = compress(model, config)
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
    assert count_plan(planned).as_dict() == counted == real_counts(model)
    assert result.plan.shape() == planned.shape() == Plan.of(model).shape()
    assert result.params_compressed == counted
    assert result.summary["attn_in_widths"] == [d] * len(spec.layer_list(model))


@pytest.mark.parametrize("arch", ROTATABLE)
def test_plan_count_before_surgery_equals_real_count(arch):
    """The one counter counts the plan, arithmetically and before any weight changes, exactly as
    the compressed model's real tensors count (width 40 of 64: shortcuts, untied head, folded
    biases), and the model the loader would build counts the same."""
    model = tiny_model(arch)
    config = SliceGPTConfig(slicing=24 / 64)
    planned = get_method("slicegpt").plan(model, config, [24 / 64] * model.config.num_hidden_layers)
    predicted = count_plan(planned)
    assert predicted == count_built(planned)
    assert real_counts(model) != predicted.as_dict()  # the plan is not the model as it is
    report = compress(model, config)
    assert report.summary["attn_in_widths"] == [40] * model.config.num_hidden_layers
    assert real_counts(model) == predicted.as_dict()


def test_target_params_picks_the_closest_width():
    """``target_params`` (share of decoder parameters removed) is met by the constant width, a
    multiple of 8, whose real count (shortcuts included) is closest to the target."""
    model = tiny_model("llama")
    entry = get_method("slicegpt")
    dense = count_parameters(model)["decoder"]
    n = model.config.num_hidden_layers

    def removed(width: int) -> float:
        plan = entry.plan(model, SliceGPTConfig(), [1 - width / 64] * n)
        return 1 - count_plan(plan).decoder / dense

    report = compress(model, SliceGPTConfig(target_params=0.25))
    widths = report.summary["attn_in_widths"]
    assert widths[0] % 8 == 0 and widths == [widths[0]] * n
    got = 1 - report.params_compressed["decoder"] / dense
    assert got == 1 - count_parameters(model)["decoder"] / dense
    assert got == pytest.approx(removed(widths[0]), abs=1e-12)
    for other in range(8, 65, 8):
        assert abs(got - 0.25) <= abs(removed(other) - 0.25) + 1e-12


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in ROTATABLE])
def test_families_that_cannot_be_rotated_are_refused_untouched(arch):
    """SliceGPT refuses, with a one-line reason, a family whose stream it cannot rotate — before
    any weight changes."""
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlicekitError, match="slicegpt cannot compress this model: it"):
        compress(model, SliceGPTConfig(slicing=0.25))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_slicing_error_grows_with_sparsity():
    x = tiny_inputs(4, 32, seed=9)
    ref = logits(tiny_model("llama"), x)
    errs = []
    for s in (0.1, 0.3, 0.6):
        m = tiny_model("llama")
        compress(m, SliceGPTConfig(slicing=s))
        errs.append(rel_error(logits(m, x), ref))
    assert errs[0] < errs[1] < errs[2]


def test_slice_head_option_slices_the_head():
    m = tiny_model("llama")
    compress(m, SliceGPTConfig(slicing=0.25, slice_head=True))
    assert m.lm_head.weight.shape[1] == 48
    assert m.model.norm.dim == 48 and m.model.norm.norm_dim == 64


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_impossible_slicing_is_rejected(bad):
    with pytest.raises(SlicekitError):
        SliceGPTConfig(slicing=bad)
    with pytest.raises(SlicekitError):
        SliceGPTConfig(target_params=bad)


def test_width_that_rounds_to_zero_is_rejected():
    with pytest.raises(SlicekitError, match="leaves nothing"):
        compress(tiny_model("llama"), SliceGPTConfig(slicing=0.5, round_to=64))


def test_rounding_to_multiple():
    assert round_width(576, 0.25, 8) == 432
    assert round_width(576, 0.1, 8) == 512  # 518.4 → 518 → 512
    assert round_width(576, 0.1, 1) == 518


def test_compression_is_deterministic():
    a, b = tiny_model("opt"), tiny_model("opt")
    compress(a, SliceGPTConfig(slicing=0.3))
    compress(b, SliceGPTConfig(slicing=0.3))
    x = tiny_inputs()
    assert torch.equal(logits(a, x), logits(b, x))


def test_half_precision_path_runs_and_stays_close():
    """bfloat16 weights and activations, float64 PCA: the 0 % model stays close to the original."""
    model = tiny_model("llama").to(torch.bfloat16)
    x = tiny_inputs()
    ref = logits(model, x).float()
    compress(model, SliceGPTConfig(slicing=0.0))
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
