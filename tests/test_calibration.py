"""The calibration engine reproduces a plain forward pass, layer by layer."""

from __future__ import annotations

import pytest
import torch

from slicekit.arch import get_arch
from slicekit.calibration import CalibrationEngine, Gram
from tiny import ARCHS, tiny_inputs, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_inputs_and_outputs_match_full_forward(arch):
    model = tiny_model(arch)
    spec = get_arch(model.config)
    batches = [tiny_inputs(2, 24, seed=s) for s in range(2)]
    with torch.no_grad():
        full = [model(input_ids=b, output_hidden_states=True).hidden_states for b in batches]
    engine = CalibrationEngine(model, spec, batches, progress=False)
    n = len(spec.layer_list(model))
    for i, obs, inputs in engine.observe():
        for b in range(len(batches)):
            assert torch.allclose(inputs[b], full[b][i], atol=1e-5, rtol=1e-5)
            if i + 1 < n:  # the last hidden state HF reports is after the final norm
                assert torch.allclose(obs.outputs[b], full[b][i + 1], atol=1e-5, rtol=1e-5)


def test_gram_capture_of_a_submodule_input_is_exact():
    model = tiny_model("llama")
    spec = get_arch(model.config)
    batches = [tiny_inputs(2, 24, seed=s) for s in range(2)]
    captured = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, o: captured.append(a[0]))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    handle.remove()
    ref = Gram()
    for t in captured:
        ref.add(t)
    engine = CalibrationEngine(model, spec, batches, progress=False)
    grams = {}
    for i, obs, _ in engine.observe(grams=["mlp.down_proj:input"]):
        grams[i] = obs.grams["mlp.down_proj:input"]
    assert grams[1].count == ref.count == 2 * 2 * 24
    assert grams[1].matrix.dtype == torch.float64
    assert torch.allclose(grams[1].matrix, ref.matrix, rtol=1e-6, atol=1e-6)


def test_hooks_are_removed_and_model_unchanged():
    model = tiny_model("gpt2")
    spec = get_arch(model.config)
    layers_before = list(spec.layer_list(model))
    engine = CalibrationEngine(model, spec, [tiny_inputs()], progress=False)
    list(engine.observe(grams=[":output", "mlp:input"]))
    assert list(spec.layer_list(model)) == layers_before
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_bad_capture_point_is_rejected_and_hooks_cleaned():
    model = tiny_model("llama")
    engine = CalibrationEngine(model, get_arch(model.config), [tiny_inputs()], progress=False)
    with pytest.raises(ValueError, match="capture point"):
        list(engine.observe(grams=["mlp.down_proj"]))
    for m in model.modules():
        assert not m._forward_hooks
