"""FASP on tiny random models of every architecture: shapes, counts, restoration, round trips."""

from __future__ import annotations

import json

import pytest
import torch

from slicekit.arch import attention_info, get_arch, linear_weight
from slicekit.checkpoint import load, save
from slicekit.errors import SlicekitError
from slicekit.methods import get_method
from slicekit.methods.fasp import FASPConfig
from slicekit.methods.fasp.structure import head_groups
from slicekit.models import count_parameters
from slicekit.pipeline import CompressReport
from slicekit.pipeline import compress as pipeline_compress
from slicekit.shape import Plan, count_plan
from tiny import ARCHS, mlp_prunable_archs, tiny_inputs, tiny_model

#: the families whose MLP is made of linears FASP can narrow (the architecture table says which)
PRUNABLE = mlp_prunable_archs()


def _cal(n: int = 3):
    return [tiny_inputs(2, 32, seed=s) for s in range(n)]


def compress(model, batches, config: FASPConfig) -> CompressReport:
    """FASP through the one entry point (schedule, target and layer scores are the pipeline's)."""
    return pipeline_compress(model, None, "fasp", config, progress=False, batches=batches)


def _removed(report: CompressReport) -> float:
    """The real share of decoder parameters removed, from the report's counts."""
    return 1 - report.params_compressed["decoder"] / report.params_original["decoder"]


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_registered_with_cli_options():
    entry = get_method("fasp")
    assert entry.config_cls is FASPConfig
    from slicekit.cli import build_parser

    args = build_parser("fasp").parse_args(["compress", "--model", "x", "--method", "fasp", "--mlp-only",
                                            "--target-params", "0.3", "--damping", "0.1"])
    from slicekit.cli import _build_method_config

    cfg = _build_method_config("fasp", args, {})
    assert cfg == FASPConfig(target_params=0.3, mlp_only=True, damping=0.1)


def test_config_validation():
    with pytest.raises(SlicekitError):
        FASPConfig(target_params=1.0)
    with pytest.raises(SlicekitError):
        FASPConfig(target_params=None)
    with pytest.raises(SlicekitError):
        FASPConfig(attention_sparsity=0.5, mlp_only=True)
    with pytest.raises(SlicekitError):
        FASPConfig(round_to=0)


@pytest.mark.parametrize("arch", PRUNABLE)
def test_nothing_removed_is_exact(arch):
    model = tiny_model(arch)
    x = tiny_inputs()
    ref = _logits(model, x)
    result = compress(model, _cal(), FASPConfig(target_params=0.0))
    assert _removed(result) == 0.0
    assert _rel(_logits(model, x), ref) <= 1e-6


@pytest.mark.parametrize("arch", PRUNABLE)
def test_shapes_counts_restoration_and_round_trip(arch, tmp_path):
    model = tiny_model(arch)
    spec, b = get_arch(model.config), get_arch(model.config).block
    info = attention_info(model.config)
    groups, _ = head_groups(model.config, spec)
    result = compress(model, _cal(), FASPConfig(target_params=0.3))
    s = result.summary
    # shapes follow the plan and the description
    for layer, rec, share in zip(spec.layer_list(model), s["layers"], s["layer_fractions"], strict=True):
        width = rec["mlp_width"]
        assert width < 96
        assert linear_weight(layer.get_submodule(b.mlp_down)).shape[1] == width
        for name in b.mlp_up:
            assert linear_weight(layer.get_submodule(name)).shape[0] == width * b.mlp_up_fused
        heads = rec.get("heads") or info.num_heads
        assert linear_weight(layer.get_submodule(b.attn_writer)).shape[1] == heads * info.head_dim
        if groups is not None:  # default: floor(layer share × groups) go
            assert heads == info.num_heads - int(share * groups.n_groups + 1e-9) * groups.heads_per_group
        # restoration never worse than plain removal, on the calibration data
        for key in ("attn", "mlp"):
            if f"{key}_error" in rec:
                assert rec[f"{key}_error"] <= rec[f"{key}_error_plain"] + 1e-9
                assert rec[f"{key}_error"] < rec[f"{key}_error_plain"]
    counted = count_parameters(model)
    assert result.plan.shape() == Plan.of(model).shape()
    for dotted, value in result.plan.attributes.items():  # head counts the attention reads at run time
        parent, _, name = dotted.rpartition(".")
        assert getattr(model.get_submodule(parent), name) == value, dotted
    assert count_plan(result.plan).as_dict() == counted == result.params_compressed
    assert counted["total"] == sum(p.numel() for p in model.parameters())
    assert counted["decoder"] == sum(p.numel() for p in spec.layer_list(model).parameters())
    assert abs(_removed(result) - 0.3) < 0.05
    x = tiny_inputs()
    ref = _logits(model, x)
    assert torch.isfinite(ref).all()
    fmt = save(model, None, str(tmp_path / "c"), info={"method": "fasp"})
    heads_whole = all(r.get("heads") in (None, info.num_heads) for r in s["layers"])
    assert fmt == ("vanilla" if heads_whole else "slicekit")  # uniform MLP widths fit the original config
    loaded, _ = load(str(tmp_path / "c"))
    assert _rel(_logits(loaded, x), ref) <= 1e-6
    loaded.config.use_cache = True
    with torch.no_grad():  # the KV cache works with per-layer head counts
        g1 = loaded.generate(x[:1, :6], max_new_tokens=5, do_sample=False, use_cache=True)
        g2 = loaded.generate(x[:1, :6], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in PRUNABLE])
def test_families_with_a_fixed_mlp_fail_cleanly(arch):
    """Where the MLP cannot be narrowed (experts stored as 3-D parameters), FASP either compresses
    what it can, exactly as planned, or refuses with a one-line SlicekitError before touching a
    weight — never an internal error."""
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        result = compress(model, _cal(), FASPConfig(target_params=0.1))
    except SlicekitError:
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    else:
        assert count_plan(result.plan).as_dict() == count_parameters(model) == result.params_compressed


@pytest.mark.parametrize("restore", [True, False])
def test_recorded_error_is_the_measured_output_error(restore):
    """Layer 0, MLP only: the down projection's output on the calibration data, before and after."""
    model = tiny_model("llama")
    cal = _cal()
    layer = model.model.layers[0]
    outs = {}

    def grab(key):
        return lambda _m, args, out: outs.setdefault(key, []).append(out.detach().double())

    h = layer.mlp.down_proj.register_forward_hook(grab("before"))
    for batch in cal:
        _logits(model, batch)
    h.remove()
    result = compress(model, cal, FASPConfig(target_params=0.3, mlp_only=True, restore=restore))
    h = layer.mlp.down_proj.register_forward_hook(grab("after"))
    for batch in cal:
        _logits(model, batch)
    h.remove()
    y0, y1 = torch.cat(outs["before"]), torch.cat(outs["after"])
    measured = float(((y0 - y1) ** 2).sum() / (y0 - layer.mlp.down_proj.bias.double()
                                                 if layer.mlp.down_proj.bias is not None else y0).pow(2).sum())
    rec = result.summary["layers"][0]
    assert measured == pytest.approx(rec["mlp_error"], rel=1e-3)
    tokens = sum(batch.numel() for batch in cal)
    if restore:  # default ridge: kept columns per calibration token
        assert rec["mlp_damping"] == pytest.approx(rec["mlp_width"] / tokens)
    if restore:
        assert rec["mlp_error"] < 0.9 * rec["mlp_error_plain"]
    else:
        assert rec["mlp_error"] == pytest.approx(rec["mlp_error_plain"])


def test_restoration_lowers_the_logit_error():
    x = tiny_inputs(4, 32, seed=9)
    ref = _logits(tiny_model("opt"), x)
    errs = {}
    for restore in (False, True):
        m = tiny_model("opt")
        compress(m, _cal(), FASPConfig(target_params=0.3, restore=restore))
        errs[restore] = _rel(_logits(m, x), ref)
    assert errs[True] < errs[False]


def test_mlp_only_saves_a_vanilla_checkpoint(tmp_path):
    model = tiny_model("llama")
    result = compress(model, _cal(), FASPConfig(target_params=0.25, mlp_only=True))
    widths = result.summary["mlp_widths"]
    assert len(set(widths)) == 1 and widths[0] < 96
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)
    x = tiny_inputs()
    ref = _logits(model, x)
    assert save(model, None, str(tmp_path / "v")) == "vanilla"
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["intermediate_size"] == widths[0]
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "v").eval()
    assert _rel(_logits(plain, x), ref) <= 1e-6


def test_gqa_removes_whole_kv_groups():
    model = tiny_model("llama")  # 4 query heads, 2 KV heads, head_dim 16
    x = tiny_inputs()
    result = compress(model, _cal(), FASPConfig(target_params=0.3, attention_sparsity=0.5))
    for layer, rec in zip(model.model.layers, result.summary["layers"], strict=True):
        attn = layer.self_attn
        assert attn.q_proj.weight.shape == (32, 64) and attn.o_proj.weight.shape == (64, 32)
        assert attn.k_proj.weight.shape == (16, 64) and attn.v_proj.weight.shape == (16, 64)
        assert attn.num_key_value_groups == 2 and rec["kv_groups"] == 1 and rec["heads"] == 2
    assert torch.isfinite(_logits(model, x)).all()


def test_kept_head_keeps_its_weights():
    """Dropping a group keeps the other group's Q/K/V rows untouched (the interlinked rows)."""
    model = tiny_model("llama")
    before = [layer.self_attn.k_proj.weight.detach().clone() for layer in model.model.layers]
    result = compress(model, _cal(), FASPConfig(target_params=0.3, attention_sparsity=0.5))
    for layer, k0, rec in zip(model.model.layers, before, result.summary["layers"], strict=True):
        scores = rec["attn_scores"]
        kept = max(range(2), key=lambda g: scores[g])
        assert torch.equal(layer.self_attn.k_proj.weight, k0[kept * 16:(kept + 1) * 16])


def test_phi3_keeps_attention_and_refuses_head_removal():
    model = tiny_model("phi3")
    result = compress(model, _cal(), FASPConfig(target_params=0.25))
    assert "kept whole" in result.summary["attention"]
    assert model.model.layers[0].self_attn.o_proj.weight.shape == (64, 64)
    with pytest.raises(SlicekitError, match="Phi3Attention"):
        compress(tiny_model("phi3"), _cal(), FASPConfig(target_params=0.25, attention_sparsity=0.5))


def test_share_of_decoder_parameters_is_hit():
    model = tiny_model("llama")
    before = count_parameters(model)["decoder"]
    result = compress(model, _cal(), FASPConfig(target_params=0.25, round_to=1, mlp_only=True))
    after = count_parameters(model)["decoder"]
    assert result.params_original["decoder"] == before
    assert _removed(result) == pytest.approx((before - after) / before, abs=1e-15)
    per_neuron = 3 * 64
    assert abs((before - after) - 0.25 * before) <= per_neuron  # within one neuron per layer


def test_schedule_file_gives_per_layer_widths(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"fractions": [0.1, 0.4]}))
    model = tiny_model("qwen2")
    result = compress(model, _cal(), FASPConfig(schedule=str(path), mlp_only=True, round_to=1))
    w0, w1 = result.summary["mlp_widths"]
    assert w0 > w1
    assert result.summary["layer_fractions"] == [0.1, 0.4]


def test_scored_schedule_runs():
    model = tiny_model("llama")
    result = compress(model, _cal(), FASPConfig(schedule="dynamic", mlp_only=True))
    assert "layer_scores" in result.summary
    assert torch.isfinite(_logits(model, tiny_inputs())).all()


# FASP on the real SmolLM2 (share removed, planned count = real count): test_repeatable.py's
# test_smollm2_fasp_twice_is_bit_identical checks it on the model it compresses anyway.
