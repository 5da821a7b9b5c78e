"""MoDeGPT: exactness with nothing removed, the attention wrapper, GQA and rotary pairing,
error against kept size, parameter targeting, and save/load/generate on every tiny family."""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys

import pytest
import torch

from slicekit.arch import get_arch, linear_weight, set_linear
from slicekit.checkpoint import load, save
from slicekit.errors import SlicekitError
from slicekit.methods import MethodContext, get_method
from slicekit.methods.modegpt import MoDeGPTConfig
from slicekit.methods.modegpt.procedure import attention_geometry
from slicekit.modeling_slicekit import ReducedAttention, make_reduced_attention
from slicekit.models import count_parameters
from slicekit.pipeline import CompressReport
from slicekit.pipeline import compress as pipeline_compress
from slicekit.shape import Plan, count_plan
from tiny import ARCHS, mlp_prunable_archs, tiny_config, tiny_inputs, tiny_model


def _heads_narrowable(arch: str) -> bool:
    """MoDeGPT's rule (its config docstring): heads are narrowed where the table names separate
    q/k/v/o projections and the heads have no q/k norms."""
    b = get_arch(tiny_config(arch)).block
    return None not in (b.attn_q, b.attn_k, b.attn_v, b.attn_o) and not b.qk_norm


#: the families whose MLP is made of linears (MoDeGPT's Nyström step narrows them)
PRUNABLE = mlp_prunable_archs()
#: families whose heads can be narrowed
ATTENTION_ARCHS = [a for a in PRUNABLE if _heads_narrowable(a)]


def _cal(n: int = 3):
    return [tiny_inputs(4, 32, seed=10 + s) for s in range(n)]


def compress(model, config: MoDeGPTConfig, batches=None) -> CompressReport:
    """MoDeGPT through the one entry point (schedule, scores and the parameter target are the pipeline's)."""
    return pipeline_compress(model, None, "modegpt", config, progress=False,
                             batches=_cal() if batches is None else batches)


def compress_at(model, config: MoDeGPTConfig, fractions: list[float], batches) -> dict:
    """MoDeGPT at explicit per-layer sparsities: the method's own plan, then its surgery; the
    result must be the plan."""
    entry = get_method("modegpt")
    plan = entry.plan(model, config, fractions)
    summary = entry.apply(model, plan, config, MethodContext(batches, fractions=fractions, progress=False))
    assert plan.differences(Plan.of(model)) == []
    return summary


def _removed(report: CompressReport) -> float:
    return 1 - report.params_compressed["decoder"] / report.params_original["decoder"]


def _real_counts(model) -> dict[str, int]:
    """Counts from the tensors themselves (tied ones once), independent of any plan."""
    spec = get_arch(model.config)
    total = sum(p.numel() for p in model.parameters())
    emb = {id(p): p.numel() for m in [*spec.embeddings(model), model.get_submodule(spec.head)]
           for p in m.parameters(recurse=False)}
    return {"total": total, "non_embedding": total - sum(emb.values()),
            "decoder": sum(p.numel() for p in spec.layer_list(model).parameters())}


def _logits(model, x=None):
    with torch.no_grad():
        return model(tiny_inputs() if x is None else x).logits


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_heads_are_narrowed_where_the_table_allows():
    assert {"llama", "mistral", "qwen2", "opt", "phi"} <= set(ATTENTION_ARCHS)
    assert not {"gpt2", "gpt_neox", "gpt_neox_seq", "phi3"} & set(ATTENTION_ARCHS)  # fused q/k/v


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in PRUNABLE])
def test_families_with_a_fixed_mlp_fail_cleanly(arch):
    """Where the MLP cannot be narrowed (experts stored as 3-D parameters), MoDeGPT either
    compresses what it can, exactly as planned, or refuses with a one-line SlicekitError before
    touching a weight — never an internal error."""
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        res = compress(model, MoDeGPTConfig(target_params=0.1, schedule="constant"))
    except SlicekitError:
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    else:
        assert count_plan(res.plan).as_dict() == count_parameters(model) == _real_counts(model)


@pytest.mark.parametrize("arch", PRUNABLE)
def test_nothing_removed_is_exact(arch):
    model = tiny_model(arch)
    ref = _logits(model)
    res = compress(model, MoDeGPTConfig(target_params=0.0, schedule="constant"))
    assert _removed(res) == 0.0
    assert _rel(_logits(model), ref) < 1e-5


@pytest.mark.parametrize("arch", ATTENTION_ARCHS)
def test_reduced_attention_with_all_dims_is_exact(arch):
    """The wrapper alone (identity index, full widths) reproduces the original attention, with
    and without the KV cache."""
    model = tiny_model(arch)
    ref = _logits(model)
    x = tiny_inputs(1, 6)
    gen_ref = model.generate(x, max_new_tokens=6, do_sample=False, use_cache=True)
    spec = get_arch(model.config)
    geo = attention_geometry(model, spec)
    assert geo is not None
    for layer in spec.layer_list(model):
        attn = make_reduced_attention(layer.get_submodule(geo.path), {
            "q": geo.q, "k": geo.k, "v": geo.v, "o": geo.o, "num_heads": geo.num_heads,
            "num_kv_heads": geo.num_kv_heads, "qk_dim": geo.head_dim, "v_dim": geo.head_dim,
            "rotary_dim": geo.rotary_dim})
        attn.qk_index.copy_(torch.arange(geo.head_dim).repeat(geo.num_kv_heads, 1))
        assert isinstance(layer.get_submodule(geo.path), ReducedAttention)
    assert _rel(_logits(model), ref) < 1e-5
    assert torch.equal(model.generate(x, max_new_tokens=6, do_sample=False, use_cache=True), gen_ref)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize(("dq", "dv"), [(12, 16), (16, 10), (8, 8)])
def test_padding_head_dims_leaves_attention_unchanged(dq, dv, impl):
    """The fused-kernel padding of ReducedAttention (q/k/v zero-padded per head to one size, the
    padding dropped before the output projection) changes nothing: a Llama whose heads only use
    ``dq`` query/key dims (whole rotary pairs) and ``dv`` value dims gives the same logits once its
    heads are narrowed to exactly those dims, with transformers' SDPA kernel and its eager path."""
    model = tiny_model("llama")  # 4 query heads, 2 KV heads, head_dim 16, full rotary
    model.set_attn_implementation(impl)
    d, half, heads, kv = 16, 8, 4, 2
    keep = torch.tensor(list(range(dq // 2)) + list(range(half, half + dq // 2)))  # rotary pairs (j, j + 8)
    drop_qk = torch.tensor([j for j in range(d) if j not in set(keep.tolist())], dtype=torch.long)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for lin, n in ((attn.q_proj, heads), (attn.k_proj, kv)):
                lin.weight.view(n, d, -1)[:, drop_qk] = 0
            attn.v_proj.weight.view(kv, d, -1)[:, dv:] = 0
    x = tiny_inputs(2, 12)
    ref = _logits(model, x)

    def rows(n: int, idx: torch.Tensor) -> torch.Tensor:  # the rows ``idx`` of each of ``n`` heads
        return torch.cat([h * d + idx for h in range(n)])

    for layer in model.model.layers:
        attn = layer.self_attn
        set_linear(attn.q_proj, linear_weight(attn.q_proj)[rows(heads, keep)].clone())
        set_linear(attn.k_proj, linear_weight(attn.k_proj)[rows(kv, keep)].clone())
        set_linear(attn.v_proj, linear_weight(attn.v_proj)[rows(kv, torch.arange(dv))].clone())
        set_linear(attn.o_proj, linear_weight(attn.o_proj)[:, rows(heads, torch.arange(dv))].clone())
        make_reduced_attention(attn, {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "num_heads": heads,
                                      "num_kv_heads": kv, "qk_dim": dq, "v_dim": dv, "rotary_dim": dq})
        attn.qk_index.copy_(keep.repeat(kv, 1))
        assert attn.head_dim == max(dq, dv)  # transformers' forward sees one padded head size
    assert attn.q_proj.weight.shape == (heads * dq, 64) and attn.v_proj.weight.shape == (kv * dv, 64)
    assert _rel(_logits(model, x), ref) < 1e-5


@pytest.mark.parametrize("arch", PRUNABLE)
def test_compress_save_load_generate(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    before = count_parameters(model)
    res = compress(model, MoDeGPTConfig(target_params=0.25))
    after = count_parameters(model)
    share = 1 - after["decoder"] / before["decoder"]
    assert share == pytest.approx(_removed(res))
    assert abs(share - 0.25) < 0.01
    assert res.plan.shape() == Plan.of(model).shape()
    assert count_plan(res.plan).as_dict() == after == _real_counts(model)
    if arch in ATTENTION_ARCHS:
        assert any(isinstance(m, ReducedAttention) for m in model.modules())
        assert res.summary["skipped_modules"] == []
    else:
        assert res.summary["skipped_modules"] == ["qk", "vo"]
    out = _logits(model)
    assert torch.isfinite(out).all()
    save(model, None, str(tmp_path / "m"))
    loaded, _ = load(str(tmp_path / "m"))
    assert _rel(_logits(loaded), out) <= 1e-5
    remote = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), trust_remote_code=True)
    assert _rel(_logits(remote), out) <= 1e-5
    x = tiny_inputs(1, 5)
    cached = remote.generate(x, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = remote.generate(x, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (1, 13) and torch.equal(cached, uncached)


@pytest.mark.parametrize("fast_heads", [False, True])
def test_gqa_groups_share_dims_and_rotary_pairs_stay_together(fast_heads):
    """Query heads use their KV group's dims, rotary pairs stay whole; the paper's layout lets
    each KV group choose (on this model the groups do choose differently), ``fast_heads`` gives
    every head of a layer one set."""
    model = tiny_model("llama")  # 4 query heads, 2 KV heads, head_dim 16, full rotary
    orig = copy.deepcopy(model)
    compress_at(model, MoDeGPTConfig(modules="qk", fast_heads=fast_heads), [0.5, 0.3], _cal())
    rows_differ = [not torch.equal(layer.self_attn.qk_index[0], layer.self_attn.qk_index[1])
                   for layer in model.model.layers]
    assert any(rows_differ) != fast_heads
    d, half, grp = 16, 8, 2
    kept = []
    for layer, ref in zip(model.model.layers, orig.model.layers, strict=True):
        attn = layer.self_attn
        assert isinstance(attn, ReducedAttention)
        m = attn.sk_spec["qk_dim"]
        kept.append(m)
        assert m % 2 == 0 and m < d and attn.sk_spec["rotary_dim"] == m
        assert attn.qk_index.shape == (2, m)
        for row in attn.qk_index.tolist():
            firsts, partners = row[: m // 2], row[m // 2:]
            assert all(f < half for f in firsts) and partners == [f + half for f in firsts]
        wq, wk = ref.self_attn.q_proj.weight, ref.self_attn.k_proj.weight
        for h in range(4):
            idx = attn.qk_index[h // grp]
            assert torch.equal(attn.q_proj.weight[h * m:(h + 1) * m], wq[h * d + idx])
        for j in range(2):
            idx = attn.qk_index[j]
            assert torch.equal(attn.k_proj.weight[j * m:(j + 1) * m], wk[j * d + idx])
        assert attn.sk_spec["v_dim"] == d and attn.v_proj.weight.shape == ref.self_attn.v_proj.weight.shape
    assert kept[0] < kept[1]  # the layer with the larger sparsity keeps fewer dims


def _slow_path(monkeypatch) -> None:
    """Force ReducedAttention's general path (rotation inside the projections) everywhere."""
    monkeypatch.setattr(ReducedAttention, "_sk_shared_row", lambda self: None)


def test_fast_heads_use_the_family_rope_and_equal_the_general_path(monkeypatch):
    """``fast_heads``: one dim set per layer, value rank = query/key width (no padding), and the
    family's own RoPE on cos/sin gathered at that set gives the logits and the cached generation of
    the general path (per-head rotation in the projections) to round-off; an in-place change of
    ``qk_index`` that makes its rows differ is seen and turns the fast path off."""
    model = tiny_model("llama")
    compress(model, MoDeGPTConfig(target_params=0.3, fast_heads=True))
    attns = [layer.self_attn for layer in model.model.layers]
    for attn in attns:
        spec = attn.sk_spec
        assert spec["qk_dim"] == spec["v_dim"] == spec["pad_dim"] == spec["rotary_dim"] < 16
        assert attn._sk_shared_row() is not None
    x = tiny_inputs(2, 12)
    fast = _logits(model, x)
    prompt = tiny_inputs(1, 5)
    gen_fast = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    with monkeypatch.context() as m:
        _slow_path(m)
        assert _rel(_logits(model, x), fast) < 1e-5
        assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True), gen_fast)
    clone = copy.deepcopy(model)  # a copy's buffers are new tensors: its cache must not be reused
    assert all(a._sk_shared_row() is not None for a in (layer.self_attn for layer in clone.model.layers))
    assert torch.equal(_logits(clone, x), fast)
    attn = attns[0]
    other = attn.qk_index.clone()
    other[1] = other[1].flip(0)
    attn._buffers["qk_index"] = other  # replaced, as loading may do
    assert attn._sk_shared_row() is None
    with torch.no_grad():
        attn.qk_index.copy_(attn.qk_index[:1].expand_as(attn.qk_index))  # rows equal again, in place
    assert attn._sk_shared_row() is not None
    with torch.no_grad():
        attn.qk_index[1] = attn.qk_index[1].flip(0)
    assert attn._sk_shared_row() is None
    changed = _logits(model, x)
    _slow_path(monkeypatch)  # the other layers' rows are still equal: they change path, layer 0 must not
    assert _rel(_logits(model, x), changed) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi"])
def test_general_path_rope_tables_are_per_call_and_freed(arch):
    """The general path builds its cos/signed-sin table once per set of position embeddings and
    frees it with them: cached generation (new positions each step) matches the uncached model,
    and nothing stays cached after a call (phi: partial rotary)."""
    import gc

    from slicekit import modeling_slicekit

    model = tiny_model(arch)
    compress(model, MoDeGPTConfig(target_params=0.3))
    attns = [layer.self_attn for layer in model.model.layers]
    assert any(isinstance(a, ReducedAttention) and a._sk_shared_row() is None for a in attns)
    prompt = tiny_inputs(2, 6)
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    gc.collect()
    assert modeling_slicekit._ROPE_TABLES == []
    with torch.no_grad():
        full = model(cached).logits
        steps = torch.stack([model(cached[:, : t + 1]).logits[:, -1] for t in range(5, cached.shape[1] - 1)], 1)
    assert _rel(full[:, 5:-1], steps) < 1e-5
    assert torch.equal(full[:, 5:-1].argmax(-1), cached[:, 6:])
    gc.collect()
    assert modeling_slicekit._ROPE_TABLES == []
    # two live sets of embeddings (other positions): each call gets its own table
    attn = next(a for a in attns if isinstance(a, ReducedAttention) and a._sk_shared_row() is None)
    h = torch.randn(1, 5, model.config.hidden_size)
    pos = torch.arange(5)[None]
    pe_a, pe_b = (model.model.rotary_emb(h, p) for p in (pos, 3 * pos))  # other relative positions
    with torch.no_grad():
        alone = attn(h, position_embeddings=pe_b, attention_mask=None)[0]
        other = attn(h, position_embeddings=pe_a, attention_mask=None)[0]
        again = attn(h, position_embeddings=pe_b, attention_mask=None)[0]
    assert torch.equal(again, alone) and not torch.allclose(other, alone)


def test_fast_heads_is_opt_in_and_recipes_without_it_reproduce_per_group_dims():
    from slicekit.methods import config_from_dict, config_to_dict

    assert MoDeGPTConfig().fast_heads is False
    old = {k: v for k, v in config_to_dict(MoDeGPTConfig()).items() if k != "fast_heads"}
    assert config_from_dict(MoDeGPTConfig, old).fast_heads is False
    assert config_from_dict(MoDeGPTConfig, old | {"fast_heads": True}).fast_heads is True


@pytest.mark.parametrize("modules", ["mlp", "vo", "qk"])
def test_error_decreases_as_more_is_kept(modules):
    ref_model = tiny_model("llama")
    ref = _logits(ref_model)
    errors = []
    for frac in (0.75, 0.5, 0.25, 0.0):
        model = copy.deepcopy(ref_model)
        compress_at(model, MoDeGPTConfig(modules=modules), [frac, frac], _cal(4))
        errors.append(_rel(_logits(model), ref))
    assert errors[-1] < 1e-6
    assert all(a > b for a, b in itertools.pairwise(errors)), errors


def test_parameter_target_is_met_with_each_schedule():
    # round_to=1: a tiny model's MLP (width 64) is too narrow for 1 % steps in multiples of 8
    for schedule in ("constant", "modegpt", "dynamic"):
        model = tiny_model("llama")
        res = compress(model, MoDeGPTConfig(target_params=0.3, schedule=schedule, round_to=1))
        assert abs(_removed(res) - 0.3) < 0.01, schedule
        assert res.params_compressed == count_parameters(model)
    layers = res.summary["layers"]
    assert all(0 <= p["sparsity"] <= 0.9 for p in layers)


def test_mlp_widths_are_multiples_of_round_to_and_old_recipes_reproduce_unrounded():
    from slicekit.methods import config_from_dict, config_to_dict

    model = tiny_model("llama")
    res = compress(model, MoDeGPTConfig(target_params=0.3, schedule="modegpt"))
    widths = [p["mlp_keep"] for p in res.summary["layers"]]
    assert all(w % 8 == 0 for w in widths) and len(set(widths)) > 1, widths  # per-layer, each a multiple of 8
    assert abs(_removed(res) - 0.3) < 0.05
    old = {k: v for k, v in config_to_dict(MoDeGPTConfig()).items() if k != "round_to"} | {"config_version": 2}
    assert config_from_dict(MoDeGPTConfig, old).round_to == 1
    assert MoDeGPTConfig().round_to == 8


def test_modegpt_schedule_gives_unimportant_layers_more_sparsity():
    model = tiny_model("llama")
    res = compress(model, MoDeGPTConfig(target_params=0.3))
    bi, sp = res.summary["layer_scores"]["bi"], [p["sparsity"] for p in res.summary["layers"]]
    assert (bi[0] < bi[1]) == (sp[0] > sp[1])


@pytest.mark.parametrize("kwargs", [dict(modules="mlp,xx"), dict(modules=""), dict(ridge=0.0),
                                    dict(target_params=1.0), dict(target_params=None), dict(epsilon=0.0),
                                    dict(schedule="nope")])
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(SlicekitError):
        MoDeGPTConfig(**kwargs)


def test_attention_only_on_a_fused_family_is_an_error():
    with pytest.raises(SlicekitError, match="modegpt cannot compress this model"):
        compress(tiny_model("gpt2"), MoDeGPTConfig(modules="qk,vo"))


def test_registered_and_deterministic():
    assert get_method("modegpt").config_cls is MoDeGPTConfig
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    compress(a, MoDeGPTConfig())
    compress(b, MoDeGPTConfig())
    assert torch.equal(_logits(a), _logits(b))


def test_cli_compress(tmp_path, data_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(d)
    vocab = {chr(i): i for i in range(32, 127)}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2, "\n": 10})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(d)
    proc = subprocess.run([sys.executable, "-m", "slicekit.cli", "compress", "--model", str(d), "--method", "modegpt",
                           "--target-params", "0.25", "--schedule", "constant", "--cal-nsamples", "4", "--cal-seqlen", "64",
                           "--out", str(tmp_path / "c"), "--json", "--quiet"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert abs(1 - res["params"]["compressed"]["decoder"] / res["params"]["original"]["decoder"] - 0.25) < 0.01
    loaded, _ = load(str(tmp_path / "c"))
    assert any(isinstance(m, ReducedAttention) for m in loaded.modules())


@pytest.mark.slow
def test_smollm2_quarter_of_decoder_removed(smollm2, data_dir):
    """The real model (9 heads, 3 KV heads, GQA): small calibration, the target is met and the
    model still predicts text better than chance by a wide margin."""
    from slicekit.data import load_text, sample_calibration
    from slicekit.evaluate import eval_windows, perplexity_of_windows

    model, tok = smollm2
    cal = sample_calibration(tok, load_text("wikitext2", "validation", purpose="calibration"), 4, 128, 0, "documents")
    windows = eval_windows(tok, load_text("wikitext2", "test"), 128, 2)
    res = compress(model, MoDeGPTConfig(target_params=0.25), cal.batches(4))
    assert abs(_removed(res) - 0.25) < 0.002
    nll, _ = perplexity_of_windows(model, windows, progress=False)
    assert nll < 6.0  # ppl < ~400 on 2 short windows (chance: log(49152) ≈ 10.8)
