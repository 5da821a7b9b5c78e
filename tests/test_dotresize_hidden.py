"""DOTResize at the residual width (``width="hidden"``): SliceGPT's procedure with the orthonormal
factor of the transport plan as the basis.

- at full width the transform is exact (logits to round-off) on every rotatable family;
- below it, the shape and real parameter count are SliceGPT's at the same widths, the kept
  subspace is the span of the transport plan, which retains no more calibration energy than PCA;
- the compressed model saves and loads back equal; families without rotation invariance are
  refused with the reason.
"""

from __future__ import annotations

import pytest
import torch

from slicekit.checkpoint import load, save
from slicekit.errors import SlicekitError
from slicekit.methods import MethodContext, get_method
from slicekit.methods.dotresize.procedure import transport_basis
from slicekit.methods.dotresize.transport import hidden_transform, retained_energy
from slicekit.models import count_parameters
from slicekit.pipeline import compress, n_layers_of
from slicekit.shape import Plan, count_plan
from tiny import logits, rel_error, rotatable_archs, tiny_calibration, tiny_inputs, tiny_model

ROTATABLE = rotatable_archs()


def _hidden(**kw):
    return get_method("dotresize").config_cls(**{"width": "hidden", "target_params": 0.3, "round_to": 4, **kw})


@pytest.mark.parametrize("arch", ROTATABLE)
def test_full_width_is_exact(arch):
    model = tiny_model(arch)
    x = tiny_inputs()
    ref = logits(model, x)
    entry, config = get_method("dotresize"), _hidden()
    fractions = [0.0] * n_layers_of(model)
    plan = entry.plan(model, config, fractions)
    entry.apply(model, plan, config, MethodContext(tiny_calibration(), fractions=fractions, progress=False))
    assert rel_error(logits(model, x), ref) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "opt", "phi"])
def test_same_shape_and_count_as_slicegpt_at_the_same_widths(arch, tmp_path):
    model, other = tiny_model(arch), tiny_model(arch)
    x = tiny_inputs()
    ref = logits(model, x)
    report = compress(model, None, "dotresize", _hidden(), batches=tiny_calibration(), progress=False)
    widths = report.summary["attn_in_widths"]
    assert max(widths) < model.config.hidden_size  # it did slice
    slicing = 1 - widths[0] / model.config.hidden_size
    sg = compress(other, None, "slicegpt", get_method("slicegpt").config_cls(slicing=slicing, round_to=4),
                  batches=tiny_calibration(), progress=False)
    assert Plan.of(model).shape() == Plan.of(other).shape()
    assert report.params_compressed == sg.params_compressed == count_parameters(model)
    assert count_plan(report.plan).decoder < report.params_original["decoder"]
    out = logits(model, x)
    assert torch.isfinite(out).all() and rel_error(out, ref) > 1e-3  # compressed, not a no-op
    save(model, None, str(tmp_path / "m"))
    again, _ = load(str(tmp_path / "m"))
    assert rel_error(logits(again, x), out) < 1e-6


def test_basis_spans_the_transport_plan_and_is_orthogonal():
    torch.manual_seed(0)
    x = torch.randn(400, 24, dtype=torch.float64) * torch.linspace(3, 0.1, 24, dtype=torch.float64)
    gram = x.T @ x
    k = 10
    full = transport_basis(_hidden())(gram, k)
    assert torch.allclose(full.T @ full, torch.eye(24, dtype=torch.float64), atol=1e-10)
    q, _ = hidden_transform(gram, k)
    assert torch.allclose(full[:, :k], q, atol=1e-12)  # the plan's own basis, first
    # PCA maximises retained energy over orthonormal bases: the transport basis cannot beat it
    vecs = torch.linalg.eigh(gram).eigenvectors.flip(-1)[:, :k]
    assert retained_energy(gram, full[:, :k]) <= retained_energy(gram, vecs) + 1e-12
    assert retained_energy(gram, full[:, :k]) > 0.5  # and it keeps the high-energy coordinates


def test_families_without_invariance_are_refused():
    from slicekit.arch import get_arch
    from tiny import NEW_ARCHS

    refused = [a for a in NEW_ARCHS if get_arch(tiny_model(a).config).not_invariant_reason]
    assert refused, "the table lists families that cannot be rotated"
    model = tiny_model(refused[0])
    with pytest.raises(SlicekitError, match="dotresize"):
        compress(model, None, "dotresize", _hidden(), batches=tiny_calibration(), progress=False)
    # the MLP width is refused only where the MLP itself cannot be pruned
    mlp_refusal = get_method("dotresize").unsupported(model, _hidden(width="mlp"))
    assert mlp_refusal == get_arch(model.config).mlp_fixed_reason
