"""GGUF export: files that transformers' GGUF loader reads back to the same logits and tokens,
in llama.cpp's tensor layout, and clear refusals for what GGUF cannot hold."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
import torch

from slicekit.arch import gguf_spec
from slicekit.errors import SlicekitError
from slicekit.export import export_gguf, infer_pre_tokenizer
from tiny import TINY_CONFIGS, rel_error

gguf = pytest.importorskip("gguf")

SAMPLE = "Hello world, 12345 numbers; ça va? The lazy fox's <s> jumps\n  over it."
CORPUS = ["The quick brown fox jumps over the lazy dog. ", "Hello world, 12345 numbers and ça va?",
          "slicekit exports GGUF files for llama.cpp; it's small and fast."] * 4


@functools.cache
def _bpe_json(pre: str = "gpt2") -> str:
    """A tiny byte-level BPE (300 tokens) trained on a fixed corpus, as tokenizers JSON."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    if pre == "gpt2":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre == "digits":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:  # a Split regex the GGUF loader knows, as Qwen2's tokenizer.json has it
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    return tk.to_str()


def bpe_tokenizer(pre: str = "gpt2", add_bos: bool = False):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer.from_str(_bpe_json(pre))
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<|endoftext|>")


def tiny_lm(arch: str = "llama", vocab: int = 304, seed: int = 0, **overrides):
    """A random model with a vocabulary a little larger than the tokenizer's (padding rows)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, vocab_size=vocab, bos_token_id=1, eos_token_id=2,
                               **{**TINY_CONFIGS[arch], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def reload(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(str(path))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(d, gguf_file=f)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def ids_for(vocab: int, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seqlen), generator=torch.Generator().manual_seed(1))


def fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}


def tensors(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {t.name: t for t in reader.tensors}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter, written independently: pairs (i, i + d/2) become adjacent rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_f32_roundtrip_through_transformers(arch, tmp_path):
    model, tok = tiny_lm(arch), bpe_tokenizer()
    out = tmp_path / f"{arch}.gguf"
    report = export_gguf(model, out, "f32", tok)
    assert report.architecture == gguf_spec(model.config).gguf_arch
    assert report.file_bytes == os.path.getsize(out)
    assert report.parameters == sum(p.numel() for p in model.parameters())
    back, back_tok = reload(out)
    assert back.config.model_type == ("qwen2" if arch == "qwen2" else "llama")
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "num_hidden_layers", "vocab_size", "tie_word_embeddings"):
        assert getattr(back.config, key) == getattr(model.config, key), key
    x = ids_for(model.config.vocab_size)  # 16 tokens: within the tiny Mistral's sliding window
    assert rel_error(logits(back, x), logits(model, x)) <= 1e-5
    assert back_tok.encode(SAMPLE) == tok.encode(SAMPLE)
    assert back_tok.decode(tok.encode(SAMPLE)) == SAMPLE
    if arch == "mistral":
        assert any("sliding" in n for n in report.notes)


@pytest.mark.parametrize("dtype,torch_dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_equals_source_rounded(dtype, torch_dtype, tmp_path):
    """F16/BF16 files hold the source's 2-D weights rounded to nearest, and 1-D tensors in F32:
    the reloaded model equals the source with exactly that rounding applied."""
    model, tok = tiny_lm("llama"), bpe_tokenizer()
    out = tmp_path / f"m-{dtype}.gguf"
    report = export_gguf(model, out, dtype, tok)
    f32 = export_gguf(model, tmp_path / "m-f32.gguf", "f32", tok)
    assert report.file_bytes < 0.75 * f32.file_bytes
    types = {name: t.tensor_type.name for name, t in tensors(out).items()}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert types["blk.0.ffn_down.weight"] == dtype.upper() and types["token_embd.weight"] == dtype.upper()
    rounded = tiny_lm("llama")
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() > 1:
                p.copy_(p.to(torch_dtype).float())
    back, _ = reload(out)
    x = ids_for(model.config.vocab_size)
    assert rel_error(logits(back, x), logits(rounded, x)) <= 1e-5
    assert rel_error(logits(back, x), logits(model, x)) > 0  # it really was rounded


def test_llama_cpp_tensor_layout_and_metadata(tmp_path):
    model, tok = tiny_lm("llama"), bpe_tokenizer()
    cfg = model.config
    out = tmp_path / "m.gguf"
    export_gguf(model, out, "f32", tok)
    ts = tensors(out)
    assert "output.weight" not in ts and "token_embd.weight" in ts  # tied: the head is the embedding
    assert len(ts) == 2 + 9 * cfg.num_hidden_layers
    layer = model.model.layers[1].self_attn
    q = ts["blk.1.attn_q.weight"].data.reshape(layer.q_proj.weight.shape)
    k = ts["blk.1.attn_k.weight"].data.reshape(layer.k_proj.weight.shape)
    v = ts["blk.1.attn_v.weight"].data.reshape(layer.v_proj.weight.shape)
    np.testing.assert_array_equal(q, llama_cpp_permute(layer.q_proj.weight.detach().numpy(), 4))
    np.testing.assert_array_equal(k, llama_cpp_permute(layer.k_proj.weight.detach().numpy(), 2))
    np.testing.assert_array_equal(v, layer.v_proj.weight.detach().numpy())
    assert not np.array_equal(q, layer.q_proj.weight.detach().numpy())
    f = fields(out)
    assert f["general.architecture"] == "llama"
    expect = {"llama.context_length": 128, "llama.embedding_length": 64, "llama.block_count": 2,
              "llama.feed_forward_length": 96, "llama.attention.head_count": 4,
              "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16, "llama.vocab_size": 304,
              "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 1,
              "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": False,
              "general.file_type": int(gguf.LlamaFileType.ALL_F32)}
    assert {k: f[k] for k in expect} == expect
    assert f["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert "llama.attention.key_length" not in f  # head_dim = hidden / heads: llama.cpp derives it
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == 304 and tokens[:3] == ["<|endoftext|>", "<s>", "</s>"]
    assert types[:3] == [int(gguf.TokenType.CONTROL)] * 3 and types[10] == int(gguf.TokenType.NORMAL)
    assert tokens[300:] == [f"[PAD{i}]" for i in range(300, 304)]
    assert set(types[300:]) == {int(gguf.TokenType.UNUSED)}
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in json.loads(_bpe_json())["model"]["merges"]]


def test_qwen2_keeps_biases_unpermuted_and_untied_head_is_written(tmp_path):
    qwen = tiny_lm("qwen2", tie_word_embeddings=False)
    out = tmp_path / "q.gguf"
    export_gguf(qwen, out, "f32", bpe_tokenizer())
    ts = tensors(out)
    attn = qwen.model.layers[0].self_attn
    np.testing.assert_array_equal(ts["blk.0.attn_q.weight"].data.reshape(attn.q_proj.weight.shape),
                                  attn.q_proj.weight.detach().numpy())
    np.testing.assert_array_equal(ts["blk.0.attn_k.bias"].data, attn.k_proj.bias.detach().numpy())
    np.testing.assert_array_equal(ts["output.weight"].data.reshape(qwen.lm_head.weight.shape),
                                  qwen.lm_head.weight.detach().numpy())
    back, _ = reload(out)
    assert back.config.tie_word_embeddings is False
    x = ids_for(qwen.config.vocab_size)
    assert rel_error(logits(back, x), logits(qwen, x)) <= 1e-5


def test_uniformly_reduced_widths_roundtrip(tmp_path):
    """Smaller MLP, one KV group, head_dim ≠ hidden/heads: all plain config values, all read back."""
    model = tiny_lm("llama", intermediate_size=40, num_key_value_heads=1, head_dim=8, hidden_size=48)
    out = tmp_path / "small.gguf"
    export_gguf(model, out, "f32", bpe_tokenizer())
    f = fields(out)
    assert f["llama.attention.key_length"] == 8 and f["llama.attention.value_length"] == 8
    assert f["llama.rope.dimension_count"] == 8 and f["llama.feed_forward_length"] == 40
    back, _ = reload(out)
    assert (back.config.head_dim, back.config.num_key_value_heads, back.config.hidden_size) == (8, 1, 48)
    x = ids_for(model.config.vocab_size)
    assert rel_error(logits(back, x), logits(model, x)) <= 1e-5


def test_export_from_directory_is_atomic_and_overwrites(tmp_path):
    model, tok = tiny_lm("llama"), bpe_tokenizer()
    src = tmp_path / "saved"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    outdir = tmp_path / "out"
    out = outdir / "model.gguf"
    outdir.mkdir()
    out.write_bytes(b"old")
    report = export_gguf(src, out, "bf16")
    assert sorted(os.listdir(outdir)) == ["model.gguf"]  # no temporary left behind
    assert fields(out)["general.name"] == "saved"  # a base name, never a machine path
    assert report.tokenizer == "gpt2/gpt-2" and report.dtype == "bf16"
    back, back_tok = reload(out)
    assert back_tok.encode(SAMPLE) == tok.encode(SAMPLE)
    x = ids_for(model.config.vocab_size)
    assert rel_error(logits(back, x), logits(model, x)) < 2e-2


def test_failed_export_leaves_previous_file(tmp_path, monkeypatch):
    import slicekit.export as ex

    model, tok = tiny_lm("llama"), bpe_tokenizer()
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "_tensor_data", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(model, out, "f32", tok)
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["model.gguf"]


@pytest.mark.parametrize("pre,name", [("gpt2", "gpt-2"), ("digits", "smollm"), ("qwen2", "qwen2")])
def test_pre_tokenizer_is_recognised_and_reads_back(pre, name, tmp_path):
    tok = bpe_tokenizer(pre)
    spec = json.loads(tok.backend_tokenizer.to_str())
    assert infer_pre_tokenizer(spec["pre_tokenizer"]) == name
    out = tmp_path / "m.gguf"
    report = export_gguf(tiny_lm("llama"), out, "f32", tok)
    assert fields(out)["tokenizer.ggml.pre"] == name and report.tokenizer == f"gpt2/{name}"
    if pre != "digits":  # transformers rebuilds "smollm" without its digit split (llama.cpp keeps it)
        _, back_tok = reload(out)
        text = SAMPLE + " I'll pay 2024 $ for it's 'quoted' text"
        assert back_tok.encode(text) == tok.encode(text)


def test_unknown_pre_tokenizer_is_written_as_default_with_a_note(tmp_path):
    report = export_gguf(tiny_lm("llama"), tmp_path / "m.gguf", "f32", bpe_tokenizer(),
                         tokenizer_pre="smollm")
    assert report.tokenizer == "gpt2/smollm" and not report.notes  # an explicit name is taken as given
    assert infer_pre_tokenizer({"type": "Whitespace"}) is None
    assert infer_pre_tokenizer(None) is None


def test_add_bos_flag_roundtrip(tmp_path):
    tok = bpe_tokenizer(add_bos=True)
    assert tok.encode("hi")[0] == 1
    out = tmp_path / "m.gguf"
    export_gguf(tiny_lm("llama"), out, "f32", tok)
    assert fields(out)["tokenizer.ggml.add_bos_token"] is True
    _, back_tok = reload(out)
    assert back_tok.encode(SAMPLE) == tok.encode(SAMPLE)


def test_refuses_per_layer_widths_and_slicekit_checkpoints(tmp_path):
    from slicekit.arch import set_linear

    model, tok = tiny_lm("llama"), bpe_tokenizer()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():  # layer 0 narrower than layer 1: no single feed_forward_length describes it
        set_linear(mlp.gate_proj, mlp.gate_proj.weight[:64].clone())
        set_linear(mlp.up_proj, mlp.up_proj.weight[:64].clone())
        set_linear(mlp.down_proj, mlp.down_proj.weight[:, :64].clone())
    with pytest.raises(SlicekitError, match="vanilla"):
        export_gguf(model, tmp_path / "x.gguf", "f32", tok)
    directory = tmp_path / "ck"  # what slicekit.checkpoint.save writes for such a model: remote-code config
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    base = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({
        "model_type": "slicekit", "architectures": ["SlicekitForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_slicekit.SlicekitForCausalLM"},
        "base_config": base, "slicekit": {"shape": {}}}))
    with pytest.raises(SlicekitError, match=r"slicekit-format.*vanilla"):
        export_gguf(directory, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_clear_errors(tmp_path):
    from tiny import tiny_model

    tok = bpe_tokenizer()
    with pytest.raises(SlicekitError, match="supports model types llama, mistral, qwen2"):
        export_gguf(tiny_model("opt"), tmp_path / "x.gguf", "f32", tok)
    with pytest.raises(SlicekitError, match="f32, f16 or bf16"):
        export_gguf(tiny_lm("llama"), tmp_path / "x.gguf", "q4", tok)
    with pytest.raises(SlicekitError, match="tokenizer"):
        export_gguf(tiny_lm("llama"), tmp_path / "x.gguf", "f32")
    with pytest.raises(SlicekitError, match="biases"):
        export_gguf(tiny_lm("llama", attention_bias=True), tmp_path / "x.gguf", "f32", tok)
    with pytest.raises(SlicekitError, match="RoPE scaling 'yarn'"):
        export_gguf(tiny_lm("llama", rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}),
                    tmp_path / "x.gguf", "f32", tok)
    with pytest.raises(SlicekitError, match="head_dim"):
        export_gguf(tiny_lm("qwen2", head_dim=8), tmp_path / "x.gguf", "f32", tok)
    with pytest.raises(SlicekitError, match="300 tokens but the model only 200"):
        export_gguf(tiny_lm("llama", vocab=200), tmp_path / "x.gguf", "f32", tok)
    with pytest.raises(SlicekitError, match="byte-level BPE"):  # the character-level tokenizer of tests/tiny.py
        from tiny import save_tiny_with_tokenizer

        save_tiny_with_tokenizer(tmp_path / "char")
        export_gguf(tmp_path / "char", tmp_path / "x.gguf")
    with pytest.raises(SlicekitError, match="no such model directory"):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_smollm2_uniform_mlp_width_roundtrip(smollm2, tmp_path):
    """SmolLM2-135M with every MLP cut to 1152 (the shape FASP/PruneNet give with a uniform width),
    saved as a plain directory, exported, read back by transformers: same logits, same tokens."""
    from slicekit.arch import set_linear

    model, tok = smollm2
    width = 1152
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            set_linear(mlp.gate_proj, mlp.gate_proj.weight[:width].clone())
            set_linear(mlp.up_proj, mlp.up_proj.weight[:width].clone())
            set_linear(mlp.down_proj, mlp.down_proj.weight[:, :width].clone())
    model.config.intermediate_size = width
    src = tmp_path / "smollm2-mlp1152"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    out = tmp_path / "smollm2-mlp1152.gguf"
    report = export_gguf(src, out, "f32")
    assert report.architecture == "llama" and report.tensors == 2 + 9 * 30
    assert report.parameters == sum(p.numel() for p in model.parameters())
    back, back_tok = reload(out)
    assert back.config.intermediate_size == width
    text = "The capital of France is Paris. 12345 + 678 = ?<|im_start|>user\nça va?<|im_end|>"
    assert back_tok.encode(text) == tok.encode(text)
    ids = torch.tensor([tok.encode(text)])
    assert rel_error(logits(back, ids), logits(model, ids)) <= 1e-5
