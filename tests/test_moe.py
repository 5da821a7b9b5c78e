"""Mixture-of-experts families (Mixtral, Qwen3-MoE, Qwen2-MoE) in the compressed-shape description
and under SliceGPT (issue #13).

- the plan lists every layer's router (``E × D``) and experts module (``E`` experts, stream width,
  expert width), :func:`count_plan` counts them, the loader builds them;
- rotation invariance through the MoE block: the router and every expert's gate/up read the MLP
  norm's output, every expert's down (and Qwen2-MoE's shared expert) writes the stream, the
  shared-expert gate reads it — so the router logits, hence the top-k choice, are unchanged;
- SliceGPT at 25 %: the model is the plan, counted by the one counter; save → load without
  slicekit importable gives the same logits and ``generate`` with and without cache agree;
- one global rotation gives a plain narrower MoE model that loads without remote code.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from slicekit.arch import get_arch
from slicekit.checkpoint import load, save
from slicekit.invariance import make_invariant
from slicekit.methods import MethodContext, get_method
from slicekit.models import count_parameters
from slicekit.pipeline import compress
from slicekit.shape import Plan, count_built, count_plan
from tiny import NO_SLICEKIT, logits, rel_error, tensor_counts, tiny_calibration, tiny_inputs, tiny_model

MOE = ["mixtral", "qwen3_moe", "qwen2_moe"]



def _slicegpt(**kwargs):
    return get_method("slicegpt").config_cls(**kwargs)


def _route(model: torch.nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's router logits and top-k expert indices for input ``x`` (forward hooks)."""
    spec = get_arch(model.config)
    found: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [layer.get_submodule(spec.block.experts.router).register_forward_hook(
        lambda m, a, out: found.append((out[0].detach(), out[2].detach()))) for layer in spec.layer_list(model)]
    try:
        logits(model, x)
    finally:
        for h in hooks:
            h.remove()
    return [f[0] for f in found], [f[1] for f in found]




# ------------------------------------------------------------------------ the plan and the counter

@pytest.mark.parametrize("arch", MOE)
def test_plan_lists_routers_and_experts_and_counts_them(arch):
    model = tiny_model(arch)
    cfg = model.config
    spec = get_arch(cfg)
    e = spec.block.experts
    plan = Plan.of(model)
    n_exp = getattr(cfg, e.num_experts_key)
    for i in range(cfg.num_hidden_layers):
        experts = plan.modules[spec.layer_path(i, e.experts)]
        assert experts["type"] == "experts" and experts["num_experts"] == n_exp
        assert experts["in_features"] == cfg.hidden_size and experts["width"] == plan.mlp_width(i)
        assert plan.modules[spec.layer_path(i, e.router)] == {"type": "router", "num_experts": n_exp,
                                                              "in_features": cfg.hidden_size}
    assert plan.is_plain()
    assert count_plan(plan).as_dict() == tensor_counts(model) == count_built(plan).as_dict()
    # the counter counts the planned experts, not the architecture's: a narrower stream and expert width
    narrow = plan.copy()
    narrow.set_mlp_stream(0, read=40, write=40)
    narrow.set_mlp_width(0, 20)
    assert narrow.mlp_width(0) == 20
    assert count_plan(narrow) == count_built(narrow)
    removed = count_plan(plan).decoder - count_plan(narrow).decoder
    shared = 0
    if e.shared is not None:  # gate/up read and down writes the stream; the D → 1 gate reads it
        width = cfg.shared_expert_intermediate_size
        shared = 3 * width * (cfg.hidden_size - 40) + (cfg.hidden_size - 40)
    experts_before = 3 * n_exp * plan.mlp_width(0) * cfg.hidden_size
    assert removed == experts_before - 3 * n_exp * 20 * 40 + n_exp * (cfg.hidden_size - 40) + shared


def test_an_experts_block_cannot_write_another_width_than_it_reads():
    plan = Plan.of(tiny_model("mixtral"))
    with pytest.raises(ValueError, match="writes the width it reads"):
        plan.set_mlp_stream(0, read=48, write=64)


# ------------------------------------------------------------------------ invariance, exactly

@pytest.mark.parametrize("arch", MOE)
def test_invariance_and_full_width_rotation_keep_logits_and_routing(arch):
    """Folding the MLP norm into the router and experts, and rotating every reader and writer of
    the stream (routers, experts' 3-D parameters, the shared expert and its gate), changes the
    logits by float round-off only; the router logits are the same, so every token goes to the
    same experts."""
    x = tiny_inputs()
    model = tiny_model(arch)
    ref = logits(model, x)
    ref_logits, ref_topk = _route(model, x)
    make_invariant(model)
    assert rel_error(logits(model, x), ref) < 1e-5
    model = tiny_model(arch)
    compress(model, None, "slicegpt", _slicegpt(slicing=0.0, round_to=1), batches=tiny_calibration(), progress=False)
    spec = get_arch(model.config)
    layer = spec.layer_list(model)[0]
    assert layer.attn_shortcut is not None and layer.mlp_shortcut is not None  # really rotated
    q_shortcut = layer.mlp_shortcut.detach()
    assert rel_error(q_shortcut @ q_shortcut.T, torch.eye(q_shortcut.shape[0])) < 1e-5
    assert not torch.allclose(q_shortcut, torch.eye(q_shortcut.shape[0]), atol=1e-2)  # not the identity
    assert rel_error(logits(model, x), ref) < 1e-5
    got_logits, got_topk = _route(model, x)
    for a, b in zip(got_logits, ref_logits, strict=True):
        assert rel_error(a, b) < 1e-5
    for a, b in zip(got_topk, ref_topk, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------ SliceGPT at 25 %

@pytest.mark.parametrize("arch", MOE)
def test_slicegpt_shapes_and_counts_are_the_plan(arch):
    model = tiny_model(arch)
    x = tiny_inputs()
    ref = logits(model, x)
    report = compress(model, None, "slicegpt", _slicegpt(slicing=0.25), batches=tiny_calibration(), progress=False)
    out = logits(model, x)
    assert torch.isfinite(out).all() and 0 < rel_error(out, ref) < 1.0
    assert Plan.of(model).shape() == report.plan.shape()
    assert count_parameters(model) == count_plan(report.plan).as_dict() == tensor_counts(model)
    assert count_built(report.plan) == count_plan(report.plan)
    spec = get_arch(model.config)
    e = spec.block.experts
    n_layers = model.config.num_hidden_layers
    widths = report.summary["mlp_in_widths"]
    # an experts block writes the width it reads: it reads the layer's output width (the last
    # layer's MLP stays full width because the head's input is not sliced)
    assert report.summary["attn_in_widths"] == [48, 48] and widths == [48, 64]
    for i, layer in enumerate(spec.layer_list(model)):
        experts, router = layer.get_submodule(e.experts), layer.get_submodule(e.router)
        n_exp, width = getattr(model.config, e.num_experts_key), report.plan.mlp_width(i)
        assert getattr(experts, e.gate_up).shape == (n_exp, 2 * width, widths[i])
        assert getattr(experts, e.down).shape == (n_exp, widths[i], width)
        assert router.weight.shape == (n_exp, widths[i]) and router.hidden_dim == widths[i]
        assert experts.hidden_dim == widths[i]
        if e.shared_gate is not None:
            assert layer.get_submodule(e.shared_gate).weight.shape == (1, widths[i])
    assert len(report.plan.blocks) == n_layers


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_slicegpt_with_changing_widths_and_a_sliced_head(arch):
    """Per-layer widths that change from layer to layer: the attention makes the change, the MLP
    reads and writes the layer's output width; ``slice_head`` slices the last MLP too; the model
    is the plan."""
    entry = get_method("slicegpt")
    model = tiny_model(arch)
    config = _slicegpt(slice_head=True)
    fractions = [0.25, 0.5]
    plan = entry.plan(model, config, fractions)
    entry.apply(model, plan, config, MethodContext(tiny_calibration(), progress=False, fractions=fractions))
    assert Plan.of(model).shape() == plan.shape()
    assert [plan.mlp_width(i) for i in range(2)] == [plan.mlp_width(0)] * 2
    spec = get_arch(model.config)
    reads = [plan.modules[spec.layer_path(i, spec.block.experts.router)]["in_features"] for i in range(2)]
    assert reads == [32, 32]  # layer 0 writes layer 1's input width (32), layer 1 the sliced head's
    assert torch.isfinite(logits(model, tiny_inputs())).all()
    assert count_parameters(model) == tensor_counts(model)


# ------------------------------------------------------------------------ save → load, generate

def _generate_both(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        a = model.generate(x[:1, :6], max_new_tokens=6, do_sample=False, use_cache=True)
        b = model.generate(x[:1, :6], max_new_tokens=6, do_sample=False, use_cache=False)
    return a, b


@pytest.mark.loader
@pytest.mark.parametrize("arch", MOE)
def test_save_load_without_slicekit_and_generate(arch, tmp_path):
    model = tiny_model(arch)
    report = compress(model, None, "slicegpt", _slicegpt(slicing=0.25), batches=tiny_calibration(), progress=False)
    x = tiny_inputs()
    ref = logits(model, x)
    a, b = _generate_both(model, x)
    assert torch.equal(a, b)
    out = tmp_path / "c"
    assert save(model, None, str(out)) == "slicekit"
    shape = json.loads((out / "config.json").read_text())["slicekit"]["shape"]
    assert shape == report.plan.shape() and "experts" in shape["features"]
    loaded, _ = load(str(out))
    assert rel_error(logits(loaded, x), ref) < 1e-6
    torch.save(x, tmp_path / "x.pt")
    code = NO_SLICEKIT + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        with torch.no_grad():
            torch.save(m(input_ids=x).logits, {str(tmp_path / 'y.pt')!r})
        g = m.generate(x[:1, :6], max_new_tokens=6, do_sample=False, use_cache=True)
        g2 = m.generate(x[:1, :6], max_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(g, g2), (g, g2)
        torch.save(g, {str(tmp_path / 'g.pt')!r})
        print(type(m).__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert type(model).__name__ in proc.stdout
    assert rel_error(torch.load(tmp_path / "y.pt", weights_only=True), ref) < 1e-6
    assert torch.equal(torch.load(tmp_path / "g.pt", weights_only=True), a)


@pytest.mark.loader
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_global_rotation_gives_a_plain_moe_model(arch, tmp_path):
    """One rotation for the whole stream: a narrower MoE of the same family (router, experts and
    shared expert at the new width) that plain transformers loads without remote code; at full
    width it computes the original logits and routes every token to the same experts."""
    x = tiny_inputs()
    model = tiny_model(arch)
    ref = logits(model, x)
    _, ref_topk = _route(model, x)
    compress(model, None, "slicegpt", _slicegpt(slicing=0.0, rotation="global", round_to=1),
             batches=tiny_calibration(), progress=False)
    assert rel_error(logits(model, x), ref) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(_route(model, x)[1], ref_topk, strict=True))
    model = tiny_model(arch)
    report = compress(model, None, "slicegpt", _slicegpt(slicing=0.25, rotation="global"),
                      batches=tiny_calibration(), progress=False)
    assert model.config.hidden_size == 48 and report.plan.is_plain()
    assert count_parameters(model) == count_plan(report.plan).as_dict() == tensor_counts(model)
    out_logits = logits(model, x)
    out = tmp_path / "g"
    assert save(model, None, str(out)) == "vanilla"
    assert not (out / "modeling_slicekit.py").exists()
    torch.save(x, tmp_path / "x.pt")
    code = NO_SLICEKIT + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r})
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        with torch.no_grad():
            torch.save(m(input_ids=x).logits, {str(tmp_path / 'y.pt')!r})
        g = m.generate(x[:1, :6], max_new_tokens=6, do_sample=False, use_cache=True)
        g2 = m.generate(x[:1, :6], max_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(g, g2), (g, g2)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert rel_error(torch.load(tmp_path / "y.pt", weights_only=True), out_logits) < 1e-6


# ------------------------------------------------------------------------ experts' width (weight-only)

def _prune_experts(model: torch.nn.Module, widths: list[int], selection: str) -> Plan:
    """Narrow every layer's experts to ``widths[l]`` neurons each, chosen by ``selection``."""
    from slicekit.methods.common import keep_mlp_neurons, select_expert_neurons

    spec = get_arch(model.config)
    plan = Plan.of(model)
    for i, layer in enumerate(spec.layer_list(model)):
        plan.set_mlp_width(i, widths[i])
        keep_mlp_neurons(layer, spec, select_expert_neurons(layer, spec, widths[i], selection, seed=i))
    return plan


@pytest.mark.parametrize("arch", MOE)
def test_magnitude_pruning_of_experts_removes_exactly_the_dead_neurons(arch):
    """Neurons whose down column is zero contribute nothing; each expert has different ones.  The
    magnitude baseline must remove exactly those (per expert), so the logits do not move; a
    selection that mixed up experts or the gate/up halves would change them."""
    from slicekit.methods.common import expert_weights

    model = tiny_model(arch)
    spec = get_arch(model.config)
    width = Plan.of(model).mlp_width(0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in spec.layer_list(model):
            _, _, down = expert_weights(layer, spec)
            for e in range(down.shape[0]):
                down[e][:, torch.randperm(width, generator=g)[: width // 4]] = 0
    x = tiny_inputs()
    ref = logits(model, x)
    kept = width - width // 4
    plan = _prune_experts(model, [kept] * model.config.num_hidden_layers, "magnitude")
    assert rel_error(logits(model, x), ref) < 1e-6
    assert Plan.of(model).shape() == plan.shape()
    assert count_parameters(model) == count_plan(plan).as_dict() == tensor_counts(model)
    n_exp = getattr(model.config, spec.block.experts.num_experts_key)
    removed = count_plan(Plan.of(tiny_model(arch))).decoder - count_plan(plan).decoder
    assert removed == model.config.num_hidden_layers * 3 * n_exp * (width - kept) * model.config.hidden_size


@pytest.mark.loader
@pytest.mark.parametrize("arch", MOE)
def test_uniform_expert_width_saves_a_plain_checkpoint(arch, tmp_path):
    """One expert width for every layer is the family's own config (``intermediate_size`` or
    ``moe_intermediate_size``): saved without remote code, loaded by plain transformers equal."""
    model = tiny_model(arch)
    width = Plan.of(model).mlp_width(0)
    plan = _prune_experts(model, [width // 2] * model.config.num_hidden_layers, "random")
    assert count_parameters(model) == count_plan(plan).as_dict() == count_built(plan).as_dict()
    x = tiny_inputs()
    ref = logits(model, x)
    out = tmp_path / "v"
    assert save(model, None, str(out)) == "vanilla"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg[get_arch(model.config).mlp_width_key] == width // 2 and "auto_map" not in cfg
    torch.save(x, tmp_path / "x.pt")
    code = NO_SLICEKIT + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r})
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        with torch.no_grad():
            torch.save(m(input_ids=x).logits, {str(tmp_path / 'y.pt')!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert rel_error(torch.load(tmp_path / "y.pt", weights_only=True), ref) < 1e-6


@pytest.mark.loader
def test_per_layer_expert_widths_save_and_load_with_the_loader(tmp_path):
    model = tiny_model("qwen2_moe")
    plan = _prune_experts(model, [24, 8], "magnitude")
    assert plan.mlp_widths() == [24, 8]
    x = tiny_inputs()
    ref = logits(model, x)
    a, b = _generate_both(model, x)
    assert torch.equal(a, b)
    assert save(model, None, str(tmp_path / "c")) == "slicekit"
    loaded, _ = load(str(tmp_path / "c"))
    assert Plan.of(loaded).shape() == plan.shape()
    assert rel_error(logits(loaded, x), ref) < 1e-6


def test_bad_expert_selections_are_refused():
    from slicekit.errors import SlicekitError
    from slicekit.methods.common import keep_expert_neurons, select_expert_neurons

    model = tiny_model("mixtral")
    spec = get_arch(model.config)
    layer = spec.layer_list(model)[0]
    with pytest.raises(ValueError, match="invalid neuron selection"):
        keep_expert_neurons(layer, spec, torch.tensor([[0, 0]] * 4))
    with pytest.raises(ValueError, match="invalid neuron selection"):
        keep_expert_neurons(layer, spec, torch.tensor([[0, 99]] * 4))
    with pytest.raises(SlicekitError, match="selection"):
        select_expert_neurons(layer, spec, 4, "bogus")


@pytest.mark.parametrize("arch", MOE)
@pytest.mark.parametrize("selection", ["magnitude", "random"])
def test_prunenet_baselines_compress_moe_through_the_pipeline(arch, selection):
    """``slicekit compress --method prunenet --selection magnitude|random`` on a MoE family: target 0
    changes nothing; at 25 % the real count is the plan's and drops, the output saves; the learned
    policy (trained on one dense matrix per layer) is refused with a reason naming the experts."""
    from slicekit.errors import SlicekitError

    cfg = get_method("prunenet").config_cls
    model = tiny_model(arch)
    x = tiny_inputs()
    ref = logits(model, x)
    compress(model, None, "prunenet", cfg(selection=selection, target_params=0.0), progress=False)
    assert rel_error(logits(model, x), ref) < 1e-6
    model = tiny_model(arch)
    report = compress(model, None, "prunenet", cfg(selection=selection, target_params=0.25), progress=False)
    assert Plan.of(model).shape() == report.plan.shape()
    assert count_parameters(model) == count_plan(report.plan).as_dict() == tensor_counts(model)
    assert report.params_compressed["decoder"] < report.params_original["decoder"]
    assert torch.isfinite(logits(model, x)).all()
    with pytest.raises(SlicekitError, match="expert"):
        compress(tiny_model(arch), None, "prunenet", cfg(selection="policy"), progress=False)


def test_streaming_refuses_moe_checkpoints_clearly(tmp_path):
    """Hub MoE checkpoints store one tensor per expert (fused by transformers at load time), so
    ``--stream`` refuses them with a message that says what to do, before reading any weight."""
    from slicekit.errors import SlicekitError
    from slicekit.streaming import load_streamed

    tiny_model("mixtral").save_pretrained(tmp_path / "m")
    with pytest.raises(SlicekitError, match=r"mixture-of-experts.*drop --stream"):
        load_streamed(str(tmp_path / "m"))


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_stream_widths_stay_kernel_aligned_whatever_round_to(arch):
    """transformers' grouped experts kernel refuses expert matrices whose rows are not 16-byte
    aligned ("strides should be multiple of 16 bytes" at 45 of 64 columns): SliceGPT and PruneNet
    round widths that experts read to multiples of 8 even with ``round_to=1``, and the model runs."""
    model = tiny_model(arch)
    report = compress(model, None, "slicegpt", _slicegpt(slicing=0.28, round_to=1), progress=False,
                      batches=tiny_calibration())
    assert all(w % 8 == 0 for w in report.summary["attn_in_widths"]), report.summary["attn_in_widths"]
    assert torch.isfinite(logits(model, tiny_inputs())).all()
    model = tiny_model(arch)
    cfg = get_method("prunenet").config_cls(selection="magnitude", target_params=0.3, round_to=1)
    report = compress(model, None, "prunenet", cfg, progress=False)
    assert all(w % 8 == 0 for w in report.plan.mlp_widths()) and torch.isfinite(logits(model, tiny_inputs())).all()
