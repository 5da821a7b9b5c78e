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

from slicekit.checkpoint import load, save
from slicekit.errors import SlicekitError
from slicekit.methods import CompressionContext, get_method
from slicekit.methods.modegpt import MoDeGPTConfig, compress
from slicekit.methods.modegpt.procedure import attention_geometry
from slicekit.modeling_slicekit import ReducedAttention, equal_head_dims
from slicekit.models import count_parameters
from slicekit.shape import count_from_shape, describe
from tiny import ARCHS, tiny_inputs, tiny_model

CTX = CompressionContext(progress=False)
ATTENTION_ARCHS = ["llama", "mistral", "qwen2", "opt", "phi"]  # families whose heads can be narrowed


def _cal(n: int = 3):
    return [tiny_inputs(4, 32, seed=10 + s) for s in range(n)]


def _logits(model, x=None):
    with torch.no_grad():
        return model(tiny_inputs() if x is None else x).logits


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ARCHS)
def test_nothing_removed_is_exact(arch):
    model = tiny_model(arch)
    ref = _logits(model)
    res = compress(model, _cal(), MoDeGPTConfig(sparsity=0.0, schedule="constant"), CTX)
    assert res.summary["decoder_share_removed"] == 0.0
    assert _rel(_logits(model), ref) < 1e-5


@pytest.mark.parametrize("arch", ATTENTION_ARCHS)
def test_reduced_attention_with_all_dims_is_exact(arch):
    """The wrapper alone (identity index, full widths) reproduces the original attention, with
    and without the KV cache."""
    model = tiny_model(arch)
    ref = _logits(model)
    x = tiny_inputs(1, 6)
    gen_ref = model.generate(x, max_new_tokens=6, do_sample=False, use_cache=True)
    from slicekit.arch import get_arch

    spec = get_arch(model.config)
    geo = attention_geometry(model, spec)
    assert geo is not None
    for layer in spec.layer_list(model):
        attn = layer.get_submodule(geo.path)
        setattr(layer, geo.path, ReducedAttention(attn, {
            "q": geo.q, "k": geo.k, "v": geo.v, "o": geo.o, "num_heads": geo.num_heads,
            "num_kv_heads": geo.num_kv_heads, "qk_dim": geo.head_dim, "v_dim": geo.head_dim,
            "rotary_dim": geo.rotary_dim, "qk_index": [list(range(geo.head_dim))] * geo.num_kv_heads,
            "scaling": float(getattr(attn, "scaling", geo.head_dim ** -0.5))}))
    assert _rel(_logits(model), ref) < 1e-5
    assert torch.equal(model.generate(x, max_new_tokens=6, do_sample=False, use_cache=True), gen_ref)


@pytest.mark.parametrize(("dq", "dv"), [(12, 16), (16, 10), (8, 8)])
def test_padding_head_dims_leaves_attention_unchanged(dq, dv):
    """The fused-kernel padding of ReducedAttention: same output as attention on the unequal
    sizes (the math path), causal and not."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 9, dq, generator=g), torch.randn(2, 4, 9, dq, generator=g)
    v = torch.randn(2, 4, 9, dv, generator=g)
    pq, pk, pv = equal_head_dims(q, k, v)
    assert pq.shape[-1] == pk.shape[-1] == pv.shape[-1] == max(dq, dv)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for causal in (True, False):
        want = sdpa(q, k, v, is_causal=causal, scale=0.3)
        got = sdpa(pq, pk, pv, is_causal=causal, scale=0.3)[..., :dv]
        assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_compress_save_load_generate(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    before = count_parameters(model)
    res = compress(model, _cal(), MoDeGPTConfig(sparsity=0.25), CTX)
    after = count_parameters(model)
    share = 1 - after["decoder"] / before["decoder"]
    assert share == pytest.approx(res.summary["decoder_share_removed"])
    assert abs(share - 0.25) < 0.01
    assert res.shape == describe(model)
    assert count_from_shape(model.config, res.shape) == after
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


def test_gqa_groups_share_dims_and_rotary_pairs_stay_together():
    model = tiny_model("llama")  # 4 query heads, 2 KV heads, head_dim 16, full rotary
    orig = copy.deepcopy(model)
    compress(model, _cal(), MoDeGPTConfig(modules="qk"), CTX, fractions=[0.5, 0.3])
    d, half, grp = 16, 8, 2
    for layer, ref in zip(model.model.layers, orig.model.layers, strict=True):
        attn = layer.self_attn
        assert isinstance(attn, ReducedAttention)
        m = attn.qk_dim
        assert m % 2 == 0 and m < d and attn.rotary_dim == m
        for row in attn.qk_index:
            firsts, partners = row[: m // 2], row[m // 2:]
            assert all(f < half for f in firsts) and partners == [f + half for f in firsts]
        wq, wk = ref.self_attn.q_proj.weight, ref.self_attn.k_proj.weight
        for h in range(4):
            idx = torch.tensor(attn.qk_index[h // grp])
            assert torch.equal(attn.q_proj.weight[h * m:(h + 1) * m], wq[h * d + idx])
        for j in range(2):
            idx = torch.tensor(attn.qk_index[j])
            assert torch.equal(attn.k_proj.weight[j * m:(j + 1) * m], wk[j * d + idx])
        assert attn.v_dim == d and attn.v_proj.weight.shape == ref.self_attn.v_proj.weight.shape


@pytest.mark.parametrize("modules", ["mlp", "vo", "qk"])
def test_error_decreases_as_more_is_kept(modules):
    ref_model = tiny_model("llama")
    ref = _logits(ref_model)
    errors = []
    for frac in (0.75, 0.5, 0.25, 0.0):
        model = copy.deepcopy(ref_model)
        compress(model, _cal(4), MoDeGPTConfig(modules=modules), CTX, fractions=[frac, frac])
        errors.append(_rel(_logits(model), ref))
    assert errors[-1] < 1e-6
    assert all(a > b for a, b in itertools.pairwise(errors)), errors


def test_parameter_target_is_met_with_each_schedule():
    for schedule in ("constant", "modegpt", "dynamic"):
        model = tiny_model("llama")
        res = compress(model, _cal(), MoDeGPTConfig(sparsity=0.3, schedule=schedule), CTX)
        assert abs(res.summary["decoder_share_removed"] - 0.3) < 0.01, schedule
    layers = res.summary["layers"]
    assert all(0 <= p["sparsity"] <= 0.9 for p in layers)


def test_modegpt_schedule_gives_unimportant_layers_more_sparsity():
    model = tiny_model("llama")
    res = compress(model, _cal(), MoDeGPTConfig(sparsity=0.3), CTX)
    bi, sp = res.summary["block_importance"], [p["sparsity"] for p in res.summary["layers"]]
    assert (bi[0] < bi[1]) == (sp[0] > sp[1])


@pytest.mark.parametrize("kwargs", [dict(modules="mlp,xx"), dict(modules=""), dict(ridge=0.0),
                                    dict(sparsity=1.0), dict(epsilon=0.0), dict(schedule="nope")])
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(SlicekitError):
        MoDeGPTConfig(**kwargs)


def test_attention_only_on_a_fused_family_is_an_error():
    with pytest.raises(SlicekitError):
        compress(tiny_model("gpt2"), _cal(), MoDeGPTConfig(modules="qk,vo"), CTX)


def test_registered_and_deterministic():
    assert get_method("modegpt").config_cls is MoDeGPTConfig
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    compress(a, _cal(), MoDeGPTConfig(), CTX)
    compress(b, _cal(), MoDeGPTConfig(), CTX)
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
                           "--sparsity", "0.25", "--schedule", "constant", "--cal-nsamples", "4", "--cal-seqlen", "64",
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
    res = compress(model, cal.batches(4), MoDeGPTConfig(sparsity=0.25), CompressionContext(progress=False))
    assert abs(res.summary["decoder_share_removed"] - 0.25) < 0.002
    nll, _ = perplexity_of_windows(model, windows, progress=False)
    assert nll < 6.0  # ppl < ~400 on 2 short windows (chance: log(49152) ≈ 10.8)
