"""DOTResize and MoDeGPT on mixture-of-experts MLPs (issue #13): every routed expert merged
(DOTResize) or Nyström-pruned (MoDeGPT) onto its own neurons, from the activations of the tokens
the layer's own router sends it; MoDeGPT's attention is compressed as on dense families."""

from __future__ import annotations

import pytest
import torch

from slicekit.arch import get_arch
from slicekit.checkpoint import load, save
from slicekit.methods import MethodContext, get_method
from slicekit.methods.common import expert_weights
from slicekit.models import count_parameters
from slicekit.pipeline import compress
from slicekit.shape import Plan, count_plan
from tiny import kept_rows, logits, rel_error, tensor_counts, tiny_calibration, tiny_inputs, tiny_model

MOE = ["mixtral", "qwen3_moe", "qwen2_moe"]


def _dot(**kwargs):
    return get_method("dotresize").config_cls(**kwargs)


def _cfg(method: str, **kwargs):
    return get_method(method).config_cls(**kwargs)


METHODS = ["dotresize", "modegpt"]




@pytest.mark.parametrize("arch", MOE)
@pytest.mark.parametrize("method", METHODS)
def test_zero_target_is_the_identity_and_25_percent_is_the_plan(arch, method):
    x = tiny_inputs()
    model = tiny_model(arch)
    ref = logits(model, x)
    compress(model, None, method, _cfg(method, target_params=0.0), progress=False, batches=tiny_calibration())
    assert rel_error(logits(model, x), ref) < 1e-6
    model = tiny_model(arch)
    report = compress(model, None, method, _cfg(method, target_params=0.25), progress=False,
                      batches=tiny_calibration())
    assert Plan.of(model).shape() == report.plan.shape()
    assert count_parameters(model) == count_plan(report.plan).as_dict() == tensor_counts(model)
    assert report.params_compressed["decoder"] < report.params_original["decoder"]
    widths = report.plan.mlp_widths()
    assert all(w % 8 == 0 and w < 32 for w in widths)  # kernel-aligned expert widths
    out = logits(model, x)
    assert torch.isfinite(out).all() and 0 < rel_error(out, ref) < 1.0
    n_experts = expert_weights(get_arch(model.config).layer_list(model)[0], get_arch(model.config))[0].shape[0]
    records = report.summary["layers"] if method == "dotresize" else report.summary["experts"]
    assert len(records) == len(widths) and all(len(r["expert_tokens"]) == n_experts for r in records)


@pytest.mark.parametrize("arch", MOE)
@pytest.mark.parametrize("method", METHODS)
def test_each_expert_drops_exactly_its_own_silent_neurons(arch, method):
    """In every expert different neurons are silent (zero up row: zero activation on every token).
    DOTResize's ``merge=delete`` keeps the most active neurons per expert and MoDeGPT the largest
    ridge leverage (zero for a silent neuron), so each expert must lose exactly its own silent ones
    — the kept gate rows say which — and the logits must not move (the least-squares restoration
    is exact when the dropped inputs are zero).  Using one expert's statistics for another, or the
    layer's pooled statistics, fails this."""
    model = tiny_model(arch)
    spec = get_arch(model.config)
    width = Plan.of(model).mlp_width(0)
    n = 8  # one kernel-aligned step
    g = torch.Generator().manual_seed(0)
    silent: list[list[set[int]]] = []
    gates = []
    with torch.no_grad():
        for layer in spec.layer_list(model):
            gate, up, _ = expert_weights(layer, spec)
            per_expert = []
            for e in range(up.shape[0]):
                idx = torch.randperm(width, generator=g)[:n]
                up[e][idx] = 0
                per_expert.append(set(idx.tolist()))
            silent.append(per_expert)
            gates.append(gate.clone())
    assert len({frozenset(s) for s in silent[0]}) > 1
    x = tiny_inputs()
    ref = logits(model, x)
    entry = get_method(method)
    cfg = _dot(merge="delete", round_to=1) if method == "dotresize" else _cfg(method, modules="mlp", damping=0.0)
    fractions = [n / width] * len(gates)
    plan = entry.plan(model, cfg, fractions)
    assert plan.mlp_widths() == [width - n] * len(gates)
    summary = entry.apply(model, plan, cfg, MethodContext(tiny_calibration(), progress=False, fractions=fractions))
    assert Plan.of(model).shape() == plan.shape()
    assert rel_error(logits(model, x), ref) < 1e-5
    for i, layer in enumerate(spec.layer_list(model)):
        rec = (summary["layers"] if method == "dotresize" else summary["experts"])[i]
        kept = kept_rows(gates[i], expert_weights(layer, spec)[0])
        for e, k in enumerate(kept):
            if rec["expert_tokens"][e] > 0:  # routed experts: their own statistics decide
                assert set(k) == set(range(width)) - silent[i][e], (i, e)


@pytest.mark.parametrize("arch", MOE)
@pytest.mark.parametrize("method", METHODS)
def test_compressed_experts_save_and_load(arch, method, tmp_path):
    model = tiny_model(arch)
    compress(model, None, method, _cfg(method, target_params=0.3), progress=False, batches=tiny_calibration())
    x = tiny_inputs()
    ref = logits(model, x)
    save(model, None, str(tmp_path / "m"))
    loaded, _ = load(str(tmp_path / "m"))
    assert rel_error(logits(loaded, x), ref) < 1e-6
    assert count_parameters(loaded) == count_parameters(model)


def test_residual_width_still_needs_rotation_invariance():
    """``width=hidden`` rotates the stream: on MoE that is SliceGPT's path (supported), on the
    sandwich-norm families it is refused with the reason."""
    assert get_method("dotresize").unsupported(tiny_model("mixtral"), _dot()) is None
    reason = get_method("dotresize").unsupported(tiny_model("gemma2"), _dot(width="hidden"))
    assert reason and "norm" in reason
