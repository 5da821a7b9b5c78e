"""Export of vanilla-shaped Llama-family models to GGUF, the file format llama.cpp (and Ollama,
LM Studio, …) run.

Only a *vanilla* model can be exported: a plain config of a family whose table row in
:mod:`slicekit.arch` has a ``gguf`` entry, with tensors that all have the shapes that config
implies (uniform per-layer widths — MLP width, KV groups, head dimension, hidden size — are fine,
they are just a smaller config).  GGUF has one
set of hyper-parameters per file, so per-layer widths or slicekit's extra modules (shortcut
matrices, reduced attention) have no representation in it.

What is written follows llama.cpp's own converter (``convert_hf_to_gguf.py``), because that is
what every GGUF reader expects (the per-family facts — GGUF architecture, Q/K permutation, biases,
head dimension, sliding window — are :class:`slicekit.arch.GGUFSpec`, in the architecture table):

- tensor names come from the ``gguf`` package's tables (``gguf.get_tensor_name_map``), never
  spelled out here;
- for the ``llama`` architecture the rows of Q and K are permuted from Hugging Face's
  rotate-half layout into the interleaved-pairs layout llama.cpp computes RoPE in
  (transformers' GGUF loader undoes exactly this permutation when it reads the file back);
- 1-D tensors (norms, biases) stay F32 whatever the requested type, as llama.cpp does;
- with tied embeddings only ``token_embd`` is written (no ``output``), which is also how readers
  tell that the head is tied;
- the tokenizer is stored as llama.cpp's ``gpt2`` (byte-level BPE) vocabulary: tokens, merges,
  token types, special-token ids, BOS/EOS flags, chat template, and a pre-tokenizer name.

The file is written to a temporary sibling and renamed into place, so an interrupted export
never leaves a truncated file under the requested name.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from slicekit.arch import (
    GGUFSpec,
    attention_info,
    get_arch,
    gguf_spec,
    is_slicekit_format,
    mlp_width,
    model_type_of,
)
from slicekit.errors import SlicekitError

#: What a user with a slicekit-format (remote-code) checkpoint should do to get an exportable one.
VANILLA_HINT = ("compress with uniform per-layer widths so that the output is saved with a vanilla config "
                "(e.g. FASP with --mlp-only and the constant schedule)")

#: Accepted ``dtype`` spellings → canonical name.
_DTYPES: dict[str, str] = {"f32": "f32", "float32": "f32", "fp32": "f32",
                           "f16": "f16", "float16": "f16", "fp16": "f16",
                           "bf16": "bf16", "bfloat16": "bf16"}


@dataclass
class ExportReport:
    """What :func:`export_gguf` wrote."""

    path: str
    architecture: str  # GGUF general.architecture
    model_type: str  # the Hugging Face model_type it came from
    dtype: str  # "f32" | "f16" | "bf16" (1-D tensors are always F32)
    tensors: int
    parameters: int  # elements written (tied head counted once)
    file_bytes: int
    tokenizer: str  # "gpt2/<pre-tokenizer>"
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the CLI."""
        text = (f"wrote {self.path}: GGUF {self.architecture} {self.dtype.upper()}, {self.tensors} tensors, "
                f"{self.parameters:,} parameters, {self.file_bytes / 2**20:.1f} MiB, tokenizer {self.tokenizer}")
        return text + "".join(f"\nnote: {n}" for n in self.notes)


def export_gguf(model_dir_or_model: str | os.PathLike[str] | nn.Module, out_path: str | os.PathLike[str],
                dtype: str = "f32", tokenizer: Any = None, *, name: str | None = None,
                tokenizer_pre: str | None = None) -> ExportReport:
    """Write a vanilla-shaped Llama/Mistral/Qwen2 model (a saved directory, or an in-memory
    Hugging Face model plus its tokenizer) as a GGUF file in F32, F16 or BF16.

    ``name`` is stored as ``general.name`` (default: the directory's or the model's base name).
    ``tokenizer_pre`` overrides llama.cpp's pre-tokenizer name, which is otherwise recognised
    from the tokenizer's pre-tokenizer (GPT-2's byte-level regex → ``gpt-2``, digits split
    first → ``smollm``, Llama-3/Qwen2 split regexes → their names); it decides how llama.cpp
    cuts text before the merges, and a wrong one tokenises some strings differently.
    """
    kind = _DTYPES.get(str(dtype).lower())
    if kind is None:
        raise SlicekitError(f"unknown GGUF dtype {dtype!r}; choose f32, f16 or bf16")
    out_path = os.fspath(out_path)
    if os.path.isdir(out_path):
        raise SlicekitError(f"GGUF output {out_path} is a directory; give a file name ending in .gguf")
    model, tokenizer, default_name = _load_source(model_dir_or_model, tokenizer)
    family = check_exportable(model)
    notes = _notes(model, family)
    vocab = _tokenizer_vocab(tokenizer, int(model.config.vocab_size), tokenizer_pre)
    notes += vocab.notes
    name = name or default_name
    if name == "mistral":  # transformers' GGUF loader treats exactly this name as a request for a class it cannot map
        name = "mistral-slicekit"
    return _write(model, family, vocab, kind, out_path, name, notes)


# ---------------------------------------------------------------------------------------------
# source model


def _load_source(source: Any, tokenizer: Any) -> tuple[nn.Module, Any, str]:
    """``(model, tokenizer, default general.name)`` from a directory or an in-memory model."""
    if isinstance(source, nn.Module):
        if tokenizer is None:
            raise SlicekitError("GGUF export needs the tokenizer too (a GGUF file carries its vocabulary): "
                                "pass tokenizer=")
        path = getattr(source.config, "_name_or_path", "") or ""
        base = os.path.basename(os.path.normpath(path)) if path else ""
        return source, tokenizer, base or f"slicekit-{model_type_of(source.config)}"
    directory = os.fspath(source)
    if not os.path.isdir(directory):
        raise SlicekitError(f"no such model directory: {directory}")
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise SlicekitError(f"{directory} has no config.json: not a saved model directory")
    try:
        with open(cfg_path) as fh:
            raw = json.load(fh)
    except json.JSONDecodeError as err:
        raise SlicekitError(f"{cfg_path} is not valid JSON: {err}") from err
    # vanilla outputs carry only slicekit info keys; a slicekit-format file has its own config
    if is_slicekit_format(raw):
        raise SlicekitError(f"{directory} is a slicekit-format checkpoint (per-layer shapes, remote code); "
                            f"GGUF export needs a vanilla-shaped output: {VANILLA_HINT}")
    gguf_spec(raw, source=directory)  # refuses families GGUF export does not know before loading any weight
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        # "auto" keeps the stored dtype; every tensor is upcast to float32 one at a time when written.
        model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto")
    except (OSError, ValueError, RuntimeError) as err:
        raise SlicekitError(f"cannot load {directory}: {str(err).splitlines()[0]}") from err
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError, TypeError) as err:
            raise SlicekitError(f"cannot load the tokenizer saved in {directory} (GGUF export needs it): "
                                f"{str(err).splitlines()[0]}") from err
    return model.eval(), tokenizer, os.path.basename(os.path.normpath(directory))


def _rope(config: Any) -> dict[str, Any]:
    """RoPE settings whether the config is transformers 5 (``rope_parameters``) or older."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:
        rope["rope_theta"] = config.rope_theta
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def check_exportable(model: nn.Module) -> GGUFSpec:
    """The GGUF facts of ``model``'s family, or a :class:`SlicekitError` saying why it cannot be exported.

    Beyond the family, the model must be exactly what its config builds (same module
    classes, same tensor names and shapes): a compressed model with per-layer widths or
    replaced modules would otherwise be written under hyper-parameters that do not describe it.
    """
    config = model.config
    if is_slicekit_format(config):
        raise SlicekitError(f"this is a slicekit-format model; GGUF export needs a vanilla-shaped one: {VANILLA_HINT}")
    family = gguf_spec(config)
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise SlicekitError(f"GGUF {family.gguf_arch} computes a SiLU-gated MLP; this model uses {act!r}")
    if not family.qkv_bias and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise SlicekitError(f"GGUF export of {model_type_of(config)} models with attention/MLP biases is not "
                            "supported (transformers' GGUF loader would drop the biases)")
    rope = _rope(config)
    if rope["rope_type"] not in ("default", "linear"):
        raise SlicekitError(f"RoPE scaling {rope['rope_type']!r} is not supported by the GGUF export "
                            "(supported: default, linear)")
    if getattr(config, "partial_rotary_factor", None) not in (None, 1.0) or \
            rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise SlicekitError("GGUF export needs RoPE over the whole head (partial_rotary_factor = 1)")
    heads = attention_info(config)
    if not family.custom_head_dim and heads.head_dim * heads.num_heads != config.hidden_size:
        raise SlicekitError(f"{model_type_of(config)} with head_dim ≠ hidden_size / num_attention_heads cannot be "
                            "exported: transformers' GGUF loader has no key for it in this architecture")
    refusal = family.window_refusal(config)
    if refusal is not None:
        raise SlicekitError(refusal)
    _check_built_by_config(model)
    return family


def _check_built_by_config(model: nn.Module) -> None:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            built = AutoModelForCausalLM.from_config(model.config)
        except (ValueError, TypeError) as err:
            raise SlicekitError(f"the model's config does not build a model: {err}") from err
    want = {n: (type(m).__name__) for n, m in built.named_modules()}
    have = {n: (type(m).__name__) for n, m in model.named_modules()}
    if want != have:
        odd = sorted(set(want.items()) ^ set(have.items()))[:3]
        raise SlicekitError(f"the model has modules its config does not describe ({odd}); "
                            f"GGUF export needs a vanilla-shaped model: {VANILLA_HINT}")
    want_t = {n: tuple(p.shape) for n, p in built.state_dict().items()}
    have_t = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if want_t != have_t:
        odd = sorted(set(want_t.items()) ^ set(have_t.items()))[:3]
        raise SlicekitError(f"tensor shapes differ from what the config describes ({odd}): per-layer widths, or a "
                            "config not updated after uniform slicing (export the saved output directory instead); "
                            f"GGUF export needs a vanilla-shaped model: {VANILLA_HINT}")


def _notes(model: nn.Module, family: GGUFSpec) -> list[str]:
    config = model.config
    notes = []
    window = family.dropped_window(config)
    if window is not None:
        notes.append(f"the sliding attention window ({window}) has no GGUF key: the exported model attends to "
                     f"the whole context, which equals the source only for sequences ≤ {window} tokens")
    if _rope(config)["rope_type"] == "linear":
        notes.append("linear RoPE scaling is written for llama.cpp; transformers' GGUF loader ignores it")
    return notes


# ---------------------------------------------------------------------------------------------
# tensors


def _permute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half row order → llama.cpp's interleaved (x0, x1) pairs, per head.

    HF keeps the two halves of each head's rotary pairs in separate blocks of rows; llama.cpp's
    RoPE kernel rotates adjacent rows, so each head's rows are reordered 0, d/2, 1, d/2+1, …
    """
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_tensors(model: nn.Module, family: GGUFSpec) -> list[tuple[str, str]]:
    """``(gguf name, HF name)`` for every tensor to write, in state-dict order."""
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == family.gguf_arch)
    table = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    names = []
    for hf_name, _ in model.named_parameters():  # tied weights appear once: no output.weight when tied
        gguf_name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise SlicekitError(f"tensor {hf_name} has no GGUF {family.gguf_arch} name; cannot export this model")
        names.append((gguf_name, hf_name))
    extra = set(model.state_dict()) - {hf for _, hf in names}
    tied = {"lm_head.weight"} if model.get_output_embeddings().weight is model.get_input_embeddings().weight else set()
    if extra - tied:
        raise SlicekitError(f"persistent buffers {sorted(extra - tied)[:3]} have no GGUF equivalent")
    return names


def _tensor_data(model: nn.Module, hf_name: str, family: GGUFSpec) -> np.ndarray:
    """The float32 array llama.cpp expects for ``hf_name`` (Q/K rows permuted where needed)."""
    config = model.config
    w = model.get_parameter(hf_name).detach().to("cpu", torch.float32)
    if family.permute_qk:
        block, heads = get_arch(config).block, attention_info(config)
        if f".{block.attn}.{block.attn_q}." in hf_name:
            w = _permute_qk(w, heads.num_heads)
        elif f".{block.attn}.{block.attn_k}." in hf_name:
            w = _permute_qk(w, heads.num_kv_heads)
    return w.contiguous().numpy()


# ---------------------------------------------------------------------------------------------
# tokenizer


@dataclass
class _Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: Any
    notes: list[str]


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SlicekitError(f"GGUF export needs a fast (tokenizers-backed) tokenizer; got {type(tokenizer).__name__}")
    return json.loads(backend.to_str())


def _known_splits() -> dict[str, str]:
    """Split regex → llama.cpp pre-tokenizer name, from the table transformers' GGUF loader uses to
    rebuild the pre-tokenizer (so a name chosen here reads back as the same pre-tokenizer)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # older transformers: only the structural rules below apply
        return {}
    preferred = ("llama-bpe", "qwen2", "tekken", "gpt-4o", "qwen35")
    out: dict[str, str] = {}
    for pre in (*preferred, *GGUF_PRE_TOKENIZER_SPLITS):
        if pre in GGUF_PRE_TOKENIZER_SPLITS:
            out.setdefault(GGUF_PRE_TOKENIZER_SPLITS[pre], pre)
    return out


def infer_pre_tokenizer(pre_tokenizer: dict[str, Any] | None) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer given as tokenizers JSON, or None.

    llama.cpp identifies pre-tokenizers by name (its converter hashes a test string); here the
    structure is matched instead: GPT-2's regex alone is ``gpt-2``, single digits split off
    before it is ``smollm`` (StarCoder/SmolLM), and an explicit Split regex followed by a
    regex-free ByteLevel is looked up among the regexes transformers' GGUF loader knows.
    """
    if not pre_tokenizer:
        return None
    steps = pre_tokenizer["pretokenizers"] if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") and pattern:
            return _known_splits().get(pattern)
    return None


def _tokenizer_vocab(tokenizer: Any, vocab_size: int, pre_override: str | None) -> _Vocab:
    """Everything llama.cpp's ``gpt2`` tokenizer model needs, as its converter derives it."""
    import gguf

    spec = _backend_json(tokenizer)
    model = spec.get("model", {})
    decoder = spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise SlicekitError("GGUF export supports byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2, SmolLM2 style); "
                            f"this one is {model.get('type')} with a {decoder.get('type')} decoder")
    notes: list[str] = []
    pre = pre_override or infer_pre_tokenizer(spec.get("pre_tokenizer"))
    if pre is None:
        pre = "default"
        notes.append("unrecognised pre-tokenizer, written as 'default': llama.cpp may split text differently "
                     "(pass tokenizer_pre= with llama.cpp's name for it)")
    if spec.get("normalizer"):
        notes.append(f"the tokenizer's {spec['normalizer'].get('type')} normalizer has no GGUF key and is dropped")

    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise SlicekitError(f"the tokenizer has {len(vocab)} tokens but the model only {vocab_size} embeddings")
    by_id = {i: t for t, i in vocab.items()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows past the tokenizer: llama.cpp's converter pads like this
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.NORMAL))

    with tempfile.TemporaryDirectory(prefix="slicekit-gguf-tok-") as tmp:
        tokenizer.save_pretrained(tmp)  # SpecialVocab reads the saved files: merges, special ids, template
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise SlicekitError("the tokenizer has no BPE merges; cannot describe it in GGUF")
    ids = dict(special.special_token_ids)
    for typ in ("bos", "eos", "unk", "pad"):  # the in-memory tokenizer is the authority when it knows
        tid = getattr(tokenizer, f"{typ}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < vocab_size:
            ids[typ] = tid
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    add_bos = len(full) > len(plain) and ids.get("bos") is not None and full[0] == ids["bos"]
    add_eos = len(full) > len(plain) and ids.get("eos") is not None and full[-1] == ids["eos"]
    template = getattr(tokenizer, "chat_template", None) or special.chat_template
    return _Vocab(tokens, types, list(special.merges), pre, ids, add_bos, add_eos, template, notes)


# ---------------------------------------------------------------------------------------------
# writing


def _write(model: nn.Module, family: GGUFSpec, vocab: _Vocab, kind: str, out_path: str, name: str,
           notes: list[str]) -> ExportReport:
    import gguf

    config = model.config
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16}[kind]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}[kind]
    info = attention_info(config)
    heads, kv_heads, head_dim = info.num_heads, info.num_kv_heads, info.head_dim
    rope = _rope(config)

    writer = gguf.GGUFWriter(None, family.gguf_arch)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(mlp_width(config))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(kv_heads))
    if head_dim * heads != config.hidden_size:  # llama.cpp otherwise derives it as embedding / heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for typ, tid in sorted(vocab.special_ids.items()):
        setter = getattr(writer, f"add_{typ}_token_id", None)
        if setter is not None:
            setter(int(tid))
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)

    # Tensor infos first, data streamed afterwards: only one tensor is ever converted in memory.
    plan = []
    for gguf_name, hf_name in _gguf_tensors(model, family):
        shape = tuple(model.get_parameter(hf_name).shape)
        tq = gguf.GGMLQuantizationType.F32 if len(shape) <= 1 else qtype
        nbytes = int(np.prod(shape)) * (4 if tq == gguf.GGMLQuantizationType.F32 else 2)
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), nbytes, raw_dtype=tq)
        plan.append((hf_name, tq, int(np.prod(shape))))

    directory = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(directory, exist_ok=True)
    # A fresh hidden sibling (opened by the writer, so it gets the usual permissions), renamed at the end.
    tmp = os.path.join(directory, f".{os.path.basename(out_path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        from pathlib import Path

        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for hf_name, tq, _ in plan:
            data = _tensor_data(model, hf_name, family)
            if tq == gguf.GGMLQuantizationType.BF16:
                data = gguf.quants.quantize(data, tq)  # round-to-nearest-even, bytes as uint8
            elif tq == gguf.GGMLQuantizationType.F16:
                data = data.astype(np.float16)
            writer.write_tensor_data(data)
        writer.flush()
        assert writer.fout is not None
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return ExportReport(path=out_path, architecture=family.gguf_arch, model_type=model_type_of(config),
                        dtype=kind, tensors=len(plan), parameters=sum(n for *_, n in plan),
                        file_bytes=os.path.getsize(out_path), tokenizer=f"gpt2/{vocab.pre}", notes=notes)
