"""FASP on mixture-of-experts families (Mixtral, Qwen3-MoE, Qwen2-MoE; issue #13).

Every routed expert of a layer is narrowed to one width, each keeping its own neurons, scored and
restored on the calibration tokens routed to it; KV groups are removed as on dense families.
"""

from __future__ import annotations

import json

import pytest
import torch

from slicekit.arch import get_arch
from slicekit.checkpoint import load, save
from slicekit.methods import MethodContext, get_method
from slicekit.methods.common import EXPERT_WIDTH_MULTIPLE, expert_weights, select_expert_neurons
from slicekit.methods.fasp.structure import neuron_cost
from slicekit.models import count_parameters
from slicekit.pipeline import compress
from slicekit.shape import Plan, count_built, count_plan, layer_counts
from tiny import kept_rows, logits, rel_error, tensor_counts, tiny_calibration, tiny_inputs, tiny_model

MOE = ["mixtral", "qwen3_moe", "qwen2_moe"]


def _fasp(**kwargs):
    return get_method("fasp").config_cls(**kwargs)






def _prune_exactly(model: torch.nn.Module, n_remove: int, **config) -> tuple[Plan, dict]:
    """FASP with per-layer shares that remove exactly ``n_remove`` neurons from every expert."""
    entry = get_method("fasp")
    cfg = _fasp(mlp_only=True, round_to=1, **config)
    base = Plan.of(model)
    fractions = [n_remove * neuron_cost(base, i) / p for i, p in enumerate(layer_counts(base))]
    plan = entry.plan(model, cfg, fractions)
    assert plan.mlp_widths() == [base.mlp_width(0) - n_remove] * len(fractions)
    summary = entry.apply(model, plan, cfg, MethodContext(tiny_calibration(), progress=False, fractions=fractions))
    assert Plan.of(model).shape() == plan.shape()
    return plan, summary


# ------------------------------------------------------------------------ identity and counts

@pytest.mark.parametrize("arch", MOE)
def test_zero_target_is_the_identity(arch):
    model = tiny_model(arch)
    x = tiny_inputs()
    ref = logits(model, x)
    report = compress(model, None, "fasp", _fasp(target_params=0.0), batches=tiny_calibration(), progress=False)
    assert report.params_compressed == report.params_original
    assert rel_error(logits(model, x), ref) < 1e-6


@pytest.mark.parametrize("arch", MOE)
def test_target_is_met_on_the_one_counter(arch):
    """At 25 % the model is the plan, its real count is ``count_plan``'s, and the share removed is
    the target within half a rounding step per layer: experts lose neurons in multiples of
    ``EXPERT_WIDTH_MULTIPLE`` (8) even with ``round_to=1``, so their widths stay kernel-friendly."""
    model = tiny_model(arch)
    x = tiny_inputs()
    ref = logits(model, x)
    report = compress(model, None, "fasp", _fasp(target_params=0.25, round_to=1),
                      batches=tiny_calibration(), progress=False)
    assert all(w % EXPERT_WIDTH_MULTIPLE == 0 for w in report.plan.mlp_widths())
    assert Plan.of(model).shape() == report.plan.shape()
    assert count_parameters(model) == count_plan(report.plan).as_dict() == tensor_counts(model)
    assert count_built(report.plan) == count_plan(report.plan)
    before, after = report.params_original["decoder"], report.params_compressed["decoder"]
    spec = get_arch(model.config)
    n_exp = getattr(model.config, spec.block.experts.num_experts_key)
    step = EXPERT_WIDTH_MULTIPLE * 3 * n_exp * model.config.hidden_size  # 8 neurons in every expert
    n_layers = model.config.num_hidden_layers
    assert abs((before - after) - 0.25 * before) <= n_layers * step / 2
    e = spec.block.experts
    for i, layer in enumerate(spec.layer_list(model)):
        width = report.plan.mlp_width(i)
        assert width < Plan.of(tiny_model(arch)).mlp_width(i)
        assert getattr(layer.get_submodule(e.experts), e.down).shape == (n_exp, model.config.hidden_size, width)
        if e.shared is not None:  # the shared expert keeps its width
            shared = layer.get_submodule(f"{e.shared}.{e.shared_down}")
            assert shared.weight.shape[1] == model.config.shared_expert_intermediate_size
    for rec in report.summary["layers"]:
        assert rec["unrouted_experts"] == [] and sum(rec["expert_tokens"]) > 0
        assert rec["mlp_error"] <= rec["mlp_error_plain"] + 1e-12  # the anchored fit never loses
    out = logits(model, x)
    assert torch.isfinite(out).all() and 0 < rel_error(out, ref) < 1.0


# ------------------------------------------------------------------------ per-expert choice

@pytest.mark.parametrize("arch", MOE)
def test_each_expert_loses_exactly_its_own_useless_neurons(arch):
    """In every expert, different neurons contribute nothing: some have a zero down column, others
    a zero up row (their activation is zero on every token, so only the expert's own activation
    statistics can tell).  FASP must remove exactly those from each expert — the kept gate rows
    say which — and the logits must not move (restoration is exact when the dropped columns carry
    nothing).  Mixing up experts, their statistics, or the gate/up halves fails this."""
    model = tiny_model(arch)
    spec = get_arch(model.config)
    width = Plan.of(model).mlp_width(0)
    n_dead, n_silent = width // 8, width // 8
    g = torch.Generator().manual_seed(0)
    useless: list[list[set[int]]] = []
    gates = []
    with torch.no_grad():
        for layer in spec.layer_list(model):
            gate, up, down = expert_weights(layer, spec)
            per_expert = []
            for e in range(down.shape[0]):
                perm = torch.randperm(width, generator=g)
                dead, silent = perm[:n_dead], perm[n_dead:n_dead + n_silent]
                down[e][:, dead] = 0
                up[e][silent] = 0
                per_expert.append(set(perm[:n_dead + n_silent].tolist()))
            useless.append(per_expert)
            gates.append(gate.clone())
    assert any(a != b for a, b in zip(useless[0], useless[0][1:], strict=False))  # experts differ
    x = tiny_inputs()
    ref = logits(model, x)
    _prune_exactly(model, n_dead + n_silent)
    assert rel_error(logits(model, x), ref) < 1e-5
    for i, layer in enumerate(spec.layer_list(model)):
        kept = kept_rows(gates[i], expert_weights(layer, spec)[0])
        for e, k in enumerate(kept):
            assert set(k) == set(range(width)) - useless[i][e], (i, e)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_statistics_follow_the_layers_own_routing(arch):
    """The tokens counted for each expert of layer 0 are the ones transformers' forward routes to
    it (layer 0's MLP input does not depend on any pruning when the attention is kept)."""
    model = tiny_model(arch)
    spec = get_arch(model.config)
    e = spec.block.experts
    n_exp = getattr(model.config, e.num_experts_key)
    seen = torch.zeros(n_exp, dtype=torch.long)

    def hook(_mod, args, _out):  # the experts module is called with (hidden, top_k_index, top_k_weights)
        for j in range(n_exp):
            seen[j] += int((args[1] == j).any(dim=-1).sum())

    h = spec.layer_list(model)[0].get_submodule(e.experts).register_forward_hook(hook)
    for batch in tiny_calibration():
        logits(model, batch)
    h.remove()
    _, summary = _prune_exactly(model, 8)
    assert summary["layers"][0]["expert_tokens"] == seen.tolist()
    assert int(seen.sum()) == sum(b.numel() for b in tiny_calibration()) * model.config.num_experts_per_tok


def test_an_expert_without_calibration_tokens_keeps_the_magnitude_choice(monkeypatch):
    """Expert 0 receives no calibration token: nothing to score or fit, so it keeps the weight
    magnitude choice and its kept down columns unchanged; the others are fitted as usual."""
    import slicekit.methods.experts as shared_experts

    original = shared_experts.routed_experts

    def never_expert_0(router, x):
        chosen = original(router, x)
        return chosen.masked_fill(chosen == 0, -1)

    monkeypatch.setattr(shared_experts, "routed_experts", never_expert_0)
    model = tiny_model("mixtral")
    spec = get_arch(model.config)
    width = Plan.of(model).mlp_width(0)
    n_remove = width // 4
    layers = spec.layer_list(model)
    expected = [select_expert_neurons(layer, spec, width - n_remove, "magnitude")[0] for layer in layers]
    before = [tuple(t.clone() for t in expert_weights(layer, spec)) for layer in layers]
    _, summary = _prune_exactly(model, n_remove)
    for i, layer in enumerate(layers):
        rec = summary["layers"][i]
        assert rec["unrouted_experts"] == [0] and rec["expert_tokens"][0] == 0
        gate, _, down = expert_weights(layer, spec)
        kept = kept_rows(before[i][0], gate)
        assert kept[0] == expected[i].tolist()
        assert torch.equal(down[0], before[i][2][0][:, expected[i]])  # no restoration
        assert not torch.equal(down[1], before[i][2][1][:, kept[1]])  # a routed expert is restored


# ------------------------------------------------------------------------ attention, save → load

@pytest.mark.loader
@pytest.mark.parametrize("arch", MOE)
def test_kv_groups_and_experts_together_save_and_load(arch, tmp_path):
    """Half the KV groups and part of every expert go; the count is the plan's; the checkpoint
    (narrowed heads: slicekit format) loads with the same logits."""
    model = tiny_model(arch)
    report = compress(model, None, "fasp", _fasp(target_params=0.3, attention_sparsity=0.5, round_to=4),
                      batches=tiny_calibration(), progress=False)
    assert all(rec["kv_groups"] == 1 for rec in report.summary["layers"])
    assert all(rec["mlp_width"] < 32 for rec in report.summary["layers"])
    spec = get_arch(model.config)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    q = model.get_submodule(spec.attn_path(0, spec.block.attn_q))
    assert q.weight.shape[0] == model.config.num_attention_heads // 2 * head_dim
    assert count_parameters(model) == count_plan(report.plan).as_dict() == tensor_counts(model)
    x = tiny_inputs()
    ref = logits(model, x)
    assert torch.isfinite(ref).all()
    assert save(model, None, str(tmp_path / "c")) == "slicekit"
    loaded, _ = load(str(tmp_path / "c"))
    assert Plan.of(loaded).shape() == report.plan.shape()
    assert rel_error(logits(loaded, x), ref) < 1e-6


@pytest.mark.loader
@pytest.mark.parametrize("arch", MOE)
def test_uniform_expert_width_saves_vanilla(arch, tmp_path):
    """MLP only with one width for every layer: the family's own config describes it."""
    model = tiny_model(arch)
    report = compress(model, None, "fasp", _fasp(target_params=0.25, mlp_only=True, round_to=4),
                      batches=tiny_calibration(), progress=False)
    widths = report.plan.mlp_widths()
    assert len(set(widths)) == 1 and widths[0] < 32
    x = tiny_inputs()
    ref = logits(model, x)
    assert save(model, None, str(tmp_path / "v")) == "vanilla"
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    assert cfg[get_arch(model.config).mlp_width_key] == widths[0] and "auto_map" not in cfg
    loaded, _ = load(str(tmp_path / "v"))
    assert rel_error(logits(loaded, x), ref) < 1e-6


def test_other_calibration_mlp_methods_still_refuse_experts():
    """Only FASP's refusal is lifted: the table's MLP refusal stands for the others."""
    from slicekit.arch import mlp_refusal

    model = tiny_model("mixtral")
    assert get_method("fasp").unsupported(model, _fasp()) is None
    assert "experts" in mlp_refusal(model)
