"""Architecture knowledge as data: one table row per ``config.model_type``.

Every method asks this module, never a model class, where a block's norms, readers, writers and
MLP intermediate are.  Names are module paths relative to the decoder layer (or to the model for
the model-level entries).  Adding an architecture means adding a row, not a code path.

What a method needs to know about a family is a field or a property of its row, never a test of
``model_type`` in the method: ``norm_offset`` (Gemma's ``(1 + w)`` norms), ``embedding_scale``
(Gemma's ``√D`` inside the embedding module), ``post_attn_norm``/``post_mlp_norm`` (sandwich and
post norms, Gemma 2/3 and OLMo 2), ``qk_norm``/``qk_norm_scope`` (per-head or whole-projection
q/k norms), ``experts`` (mixture-of-experts MLPs stored as 3-D parameters).  From those,
:attr:`ArchSpec.not_invariant_reason` says whether slicekit can rotate and slice the residual
stream (SliceGPT and the other rotating methods) and :attr:`ArchSpec.mlp_fixed_reason` whether the
MLP width can be pruned (FASP, MoDeGPT, the MLP-width methods).  ``gguf`` says how llama.cpp's file
format holds the family (:func:`gguf_spec`; :mod:`slicekit.export` asks it, never a ``model_type``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from slicekit.errors import SlicekitError


class UnsupportedArchitectureError(ValueError):
    """The model's ``model_type`` has no adapter (or a variant slicekit cannot transform)."""


@dataclass(frozen=True)
class ExpertsSpec:
    """A mixture-of-experts MLP: a router and ``E`` experts of one width ``F``.

    The installed transformers (5.x) keeps the experts of a layer in **one module holding 3-D
    parameters**, not ``E`` ``nn.Linear`` modules: ``gate_up`` is ``E × 2F × D`` (gate rows, then
    up rows: ``chunk(2)`` of the product), ``down`` is ``E × D × F``.  ``router`` is a module whose
    ``weight`` (``E × D``) reads the MLP norm's output, like any reader of the stream.  Paths are
    relative to the decoder layer; ``gate_up``/``down`` are parameter names of ``experts``.
    ``shared``/``shared_gate``: Qwen2-MoE's always-on dense expert (an MLP of ``nn.Linear``) and its
    ``D → 1`` sigmoid gate; ``shared_up``/``shared_down`` name the shared expert's linears that read
    (gate and up) and write the stream.
    """

    router: str
    experts: str
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    num_experts_key: str = "num_local_experts"
    top_k_key: str = "num_experts_per_tok"
    shared: str | None = None
    shared_gate: str | None = None
    shared_up: tuple[str, ...] = ("gate_proj", "up_proj")
    shared_down: str = "down_proj"


@dataclass(frozen=True)
class BlockSpec:
    """The residual structure of one decoder layer.

    ``mlp`` lists the children applied in sequence to compute the MLP (a single module name for
    most families; OPT has no MLP module, so its ``fc1, activation_fn, fc2`` are listed).
    ``mlp_up`` are the linears that read the MLP's input and whose *rows* index the intermediate
    neurons (``mlp_up_fused`` > 1 when one matrix stacks several, as Phi-3's ``gate_up_proj``);
    ``mlp_down`` writes the MLP's output and its columns index the neurons.
    ``attn_q/k/v/o``: the attention's projections (children of ``attn``), or None where q, k and
    v are one fused matrix (``qkv_layout`` says how its rows are laid out).

    ``attn_norm``/``mlp_norm`` normalise the *inputs* of attention and MLP (None: OLMo 2 has none;
    a parallel block with ``mlp_norm`` None feeds its MLP from ``attn_norm``, as Phi-2).
    ``post_attn_norm``/``post_mlp_norm`` normalise their *outputs* before the residual add — the
    sandwich norms of Gemma 2/3 and the post norms of OLMo 2: ``x + N(attn(·))``.  They sit between a
    writer and the stream, so a rotated and sliced stream needs more than a fold (see
    :mod:`slicekit.invariance`).  For a mixture-of-experts block (``experts`` set) ``mlp_up``/
    ``mlp_down`` name the experts' 3-D parameters (``<experts>.<gate_up>``, ``<experts>.<down>``),
    not linears.
    """

    parallel: bool
    attn: str
    attn_norm: str | None
    attn_readers: tuple[str, ...]
    attn_writer: str
    mlp: tuple[str, ...]
    mlp_norm: str | None
    mlp_up: tuple[str, ...]
    mlp_down: str
    mlp_up_fused: int = 1
    qkv_layout: str = "separate"  # "separate" | "concat" (q|k|v rows) | "neox" (per-head interleaved)
    attn_q: str | None = None
    attn_k: str | None = None
    attn_v: str | None = None
    attn_o: str | None = None
    #: norms of q and k inside the attention (Qwen3, Gemma 3, OLMo 2, Phi with qk_layernorm):
    #: narrowing the head dimension would change what they normalise.
    qk_norm: bool = False
    #: what the q/k norms normalise: "head" (each head over ``head_dim``: removing whole heads is
    #: exact) or "projection" (OLMo 2: all heads of q, resp. k, together: removing a head changes
    #: every other head's normaliser and the norm's weight length)
    qk_norm_scope: str = "head"
    #: output norms (see the class docstring)
    post_attn_norm: str | None = None
    post_mlp_norm: str | None = None
    #: mixture-of-experts MLP (None: a dense MLP of linears)
    experts: ExpertsSpec | None = None

    @property
    def mlp_readers(self) -> tuple[str, ...]:
        return self.mlp_up

    @property
    def mlp_writer(self) -> str:
        return self.mlp_down


@dataclass(frozen=True)
class GGUFSpec:
    """How a family is written as GGUF, the file format of llama.cpp, following llama.cpp's own
    converter (``convert_hf_to_gguf.py``) because that is what every GGUF reader expects.

    ``gguf_arch``: GGUF's ``general.architecture``; it also selects the ``gguf`` package's
    tensor-name table.  ``permute_qk``: the converter reorders Q/K rows for this architecture (and
    readers reverse it).  ``qkv_bias``: the family always has Q/K/V biases (Qwen2), so they are part
    of the architecture rather than an optional extra.  ``custom_head_dim``: a head dimension other
    than ``hidden_size / num_attention_heads`` survives the round trip through transformers' GGUF
    loader (for ``llama`` it reads it back from ``rope.dimension_count``; for ``qwen2`` it does not
    read it at all).

    ``sliding_window``: GGUF has no key for a sliding attention window, so what happens to the
    family's: "none" (it has none), "dropped" (``config.sliding_window`` applies to every layer, as
    Mistral's: the file attends to the whole context, which equals the source for sequences up to the
    window, so the export keeps it and says so, see :meth:`dropped_window`), "refused" (switched on by
    ``config.use_sliding_window`` for some layers only, as Qwen2's: nothing in GGUF computes that, see
    :meth:`window_refusal`).
    """

    gguf_arch: str
    permute_qk: bool
    qkv_bias: bool
    custom_head_dim: bool
    sliding_window: str = "none"  # "none" | "dropped" | "refused"

    def window_refusal(self, config: PretrainedConfig) -> str | None:
        """Why the config's sliding window cannot be written as GGUF (None: it can, perhaps
        losing the window: see :meth:`dropped_window`)."""
        if self.sliding_window == "refused" and getattr(config, "use_sliding_window", False):
            return f"{model_type_of(config)} with use_sliding_window=True has no GGUF equivalent"
        return None

    def dropped_window(self, config: PretrainedConfig) -> int | None:
        """The sliding window the GGUF file leaves out, where it is shorter than the context (None:
        the file computes exactly what the source does)."""
        if self.sliding_window != "dropped":
            return None
        window = getattr(config, "sliding_window", None)
        return int(window) if window and window < config.max_position_embeddings else None


@dataclass(frozen=True)
class ArchSpec:
    """What slicekit needs to know about one family."""

    model_types: tuple[str, ...]
    layers: str
    token_embedding: str
    final_norm: str
    head: str
    norm_kind: str  # "rms" or "layer" (LayerNorm, needs centring before it acts as RMSNorm)
    block: BlockSpec
    position_embedding: str | None = None
    rotary: str = "half"  # "half" (rotate_half pairs j, j + r/2), "none" (learned / no positions)
    # GPT-2's model forward reshapes the final hidden states to the embedding width, so the
    # stream must leave the last layer as wide as it entered the first.
    head_width_is_embedding_width: bool = False
    #: config key of the MLP intermediate width (what a vanilla export of a narrower MLP sets)
    mlp_width_key: str = "intermediate_size"
    #: attributes of the attention module that the installed transformers reads at run time and
    #: that must follow when whole heads are removed: name -> "heads" (kept query heads) or
    #: "q_width" (kept query heads × head_dim).  Families not listed derive head counts from
    #: tensor shapes.
    head_count_attributes: tuple[tuple[str, str], ...] = ()
    #: why whole attention heads cannot be removed with the unmodified module (None: they can)
    heads_fixed_reason: str | None = None
    #: RMSNorm scale is ``norm_offset + weight`` (Gemma: ``1 + w``, weights initialised at zero);
    #: folding a norm into its readers folds this scale
    norm_offset: float = 0.0
    #: the token-embedding module multiplies its output by a constant inside its own forward
    #: ("sqrt_hidden": ``√hidden_size``, Gemma's ``*TextScaledWordEmbedding`` with a non-persistent
    #: buffer).  A constant commutes with any rotation or slicing of the embedding matrix, and
    #: resizing the matrix keeps the module (and its scale); see :meth:`embedding_multiplier`.
    embedding_scale: str | None = None
    #: how GGUF (llama.cpp) holds the family (None: slicekit does not export it as GGUF)
    gguf: GGUFSpec | None = None
    #: config key of the RMSNorm epsilon: a plain config of a narrower residual stream rescales
    #: it (None: the family's config cannot describe such a model)
    norm_eps_key: str | None = None

    # ------------------------------------------------------------ what methods may do here
    @property
    def not_invariant_reason(self) -> str | None:
        """Why slicekit cannot rotate and slice this family's residual stream (None: it can).

        Checked by SliceGPT and every method built on :func:`slicekit.invariance.make_invariant`.
        (1 + w) norms, the √D embedding scale, q/k norms inside the heads, soft-capping of logits and
        attention scores, local/global attention layers and mixture-of-experts MLPs (the router and
        every expert's gate/up read the MLP norm's output, every expert's down writes the stream)
        are all compatible with rotation.
        """
        b = self.block
        post = [n for n in (b.post_attn_norm, b.post_mlp_norm) if n is not None]
        if post:
            return (f"it normalises the attention/MLP outputs before the residual add ({', '.join(post)}); a "
                    "rotated and sliced stream then needs an extra map after each such norm (the cheapest "
                    "exact form, slicekit.invariance.post_norm_factors, keeps about as many parameters "
                    "as slicing removes) and the residual block has no place for it yet")
        if b.attn_norm is None:
            return "its decoder layer has no input norm, which slicekit's residual block needs"
        return None

    @property
    def rotation_invariant(self) -> bool:
        """Whether the residual stream can be rotated and sliced (see :attr:`not_invariant_reason`)."""
        return self.not_invariant_reason is None

    @property
    def mlp_fixed_reason(self) -> str | None:
        """Why the MLP intermediate width cannot be pruned (None: ``mlp_up`` rows ↔ ``mlp_down``
        columns are linears that can be narrowed)."""
        if self.block.experts is not None:
            return ("its experts are fused 3-D parameters (gate_up_proj E × 2F × D, down_proj E × D × F), "
                    "not linears, and this method's MLP surgery narrows linears only; fasp, modegpt, dotresize, and "
                    "prunenet with selection=random or magnitude narrow every expert (one width per layer)")
        return None

    @property
    def mlp_prunable(self) -> bool:
        return self.mlp_fixed_reason is None

    def embedding_multiplier(self, config: PretrainedConfig) -> float:
        """The constant the token-embedding module multiplies its rows by (1.0 for most families)."""
        if self.embedding_scale is None:
            return 1.0
        if self.embedding_scale == "sqrt_hidden":
            return float(text_config(config).hidden_size) ** 0.5
        raise ValueError(f"unknown embedding_scale {self.embedding_scale!r}")

    def norm_paths(self) -> tuple[str, ...]:
        """The residual-stream norms of a decoder layer (relative to the layer), inputs first."""
        b = self.block
        return tuple(n for n in (b.attn_norm, b.mlp_norm, b.post_attn_norm, b.post_mlp_norm) if n is not None)

    def layer_row_paths(self) -> tuple[str, ...]:
        """Every path the row names inside a decoder layer (modules, or for experts parameters)."""
        b = self.block
        attn_children = tuple(f"{b.attn}.{c}" for c in (b.attn_q, b.attn_k, b.attn_v, b.attn_o) if c is not None)
        mlp_children = tuple(m for m in b.mlp if m != "activation_fn") + b.mlp_up + (b.mlp_down,)
        paths = (b.attn, *b.attn_readers, b.attn_writer, *attn_children, *mlp_children, *self.norm_paths())
        e = b.experts
        if e is not None:
            paths += tuple(p for p in (e.router, e.experts, e.shared, e.shared_gate) if p is not None)
        return tuple(dict.fromkeys(paths))

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def embeddings(self, model: nn.Module) -> list[nn.Module]:
        names = [self.token_embedding] + ([self.position_embedding] if self.position_embedding else [])
        return [model.get_submodule(n) for n in names]

    def attn_path(self, layer: int, child: str | None = None) -> str:
        """Model-level path of layer ``layer``'s attention (or of one of its children)."""
        base = f"{self.layers}.{layer}.{self.block.attn}"
        return base if child is None else f"{base}.{child}"

    def layer_path(self, layer: int, child: str | None = None) -> str:
        base = f"{self.layers}.{layer}"
        return base if child is None else f"{base}.{child}"


_LLAMA_BLOCK = BlockSpec(
    parallel=False,
    attn="self_attn", attn_norm="input_layernorm",
    attn_readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), attn_writer="self_attn.o_proj",
    mlp=("mlp",), mlp_norm="post_attention_layernorm",
    mlp_up=("mlp.gate_proj", "mlp.up_proj"), mlp_down="mlp.down_proj",
    attn_q="q_proj", attn_k="k_proj", attn_v="v_proj", attn_o="o_proj",
)

ARCHITECTURES: dict[str, ArchSpec] = {}


def register_architecture(spec: ArchSpec) -> ArchSpec:
    """Add a table row; a ``model_type`` may be registered once."""
    for mt in spec.model_types:
        if mt in ARCHITECTURES:
            raise ValueError(f"architecture {mt!r} is already registered")
        ARCHITECTURES[mt] = spec
    return spec


_LLAMA_ROW: dict[str, Any] = dict(
    layers="model.layers", token_embedding="model.embed_tokens", final_norm="model.norm", head="lm_head",
    norm_kind="rms", block=_LLAMA_BLOCK, norm_eps_key="rms_norm_eps",
)
register_architecture(ArchSpec(
    model_types=("llama",), **_LLAMA_ROW,
    gguf=GGUFSpec("llama", permute_qk=True, qkv_bias=False, custom_head_dim=True),
))
register_architecture(ArchSpec(
    # Mistral: Llama's layout with a sliding attention window on every layer; GGUF (like llama.cpp's
    # converter) calls it ``llama`` and has no window key.
    model_types=("mistral",), **_LLAMA_ROW,
    gguf=GGUFSpec("llama", permute_qk=True, qkv_bias=False, custom_head_dim=True, sliding_window="dropped"),
))
register_architecture(ArchSpec(
    # Qwen2: Llama's layout with q/k/v biases (read from the tensors); an opt-in sliding window on the
    # upper layers (config.use_sliding_window, max_window_layers).
    model_types=("qwen2",), **_LLAMA_ROW,
    gguf=GGUFSpec("qwen2", permute_qk=False, qkv_bias=True, custom_head_dim=False, sliding_window="refused"),
))
register_architecture(ArchSpec(
    model_types=("opt",),
    layers="model.decoder.layers", token_embedding="model.decoder.embed_tokens",
    position_embedding="model.decoder.embed_positions", final_norm="model.decoder.final_layer_norm",
    head="lm_head", norm_kind="layer", rotary="none", mlp_width_key="ffn_dim",
    head_count_attributes=(("num_heads", "heads"),),
    block=BlockSpec(
        parallel=False,
        attn="self_attn", attn_norm="self_attn_layer_norm",
        attn_readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), attn_writer="self_attn.out_proj",
        mlp=("fc1", "activation_fn", "fc2"), mlp_norm="final_layer_norm",
        mlp_up=("fc1",), mlp_down="fc2",
        attn_q="q_proj", attn_k="k_proj", attn_v="v_proj", attn_o="out_proj",
    ),
))
register_architecture(ArchSpec(
    model_types=("gpt_neox",),
    layers="gpt_neox.layers", token_embedding="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
    head="lm_head|embed_out", norm_kind="layer",  # `embed_out` before transformers 5.13-ish
    block=BlockSpec(  # `parallel` is replaced by config.use_parallel_residual in get_arch
        parallel=True,
        attn="attention", attn_norm="input_layernorm",
        attn_readers=("attention.query_key_value",), attn_writer="attention.dense",
        mlp=("mlp",), mlp_norm="post_attention_layernorm",
        mlp_up=("mlp.dense_h_to_4h",), mlp_down="mlp.dense_4h_to_h", qkv_layout="neox",
    ),
))
register_architecture(ArchSpec(
    model_types=("phi",),
    layers="model.layers", token_embedding="model.embed_tokens", final_norm="model.final_layernorm",
    head="lm_head", norm_kind="layer",
    block=BlockSpec(  # `qk_norm` is replaced by config.qk_layernorm in get_arch
        parallel=True,
        attn="self_attn", attn_norm="input_layernorm",
        attn_readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), attn_writer="self_attn.dense",
        mlp=("mlp",), mlp_norm=None,
        mlp_up=("mlp.fc1",), mlp_down="mlp.fc2",
        attn_q="q_proj", attn_k="k_proj", attn_v="v_proj", attn_o="dense",
    ),
))
register_architecture(ArchSpec(
    model_types=("phi3",),
    layers="model.layers", token_embedding="model.embed_tokens", final_norm="model.norm", head="lm_head",
    norm_kind="rms", norm_eps_key="rms_norm_eps",
    heads_fixed_reason="Phi3Attention splits its fused qkv_proj at config.num_attention_heads × head_dim, read "
                       "from the config object all layers share, so per-layer head counts cannot be expressed",
    block=BlockSpec(
        parallel=False,
        attn="self_attn", attn_norm="input_layernorm",
        attn_readers=("self_attn.qkv_proj",), attn_writer="self_attn.o_proj",
        mlp=("mlp",), mlp_norm="post_attention_layernorm",
        mlp_up=("mlp.gate_up_proj",), mlp_down="mlp.down_proj", mlp_up_fused=2, qkv_layout="concat",
    ),
))
register_architecture(ArchSpec(
    model_types=("gpt2",),
    layers="transformer.h", token_embedding="transformer.wte", position_embedding="transformer.wpe",
    final_norm="transformer.ln_f", head="lm_head", norm_kind="layer", rotary="none",
    head_width_is_embedding_width=True, mlp_width_key="n_inner",
    head_count_attributes=(("num_heads", "heads"), ("split_size", "q_width")),
    block=BlockSpec(
        parallel=False,
        attn="attn", attn_norm="ln_1",
        attn_readers=("attn.c_attn",), attn_writer="attn.c_proj",
        mlp=("mlp",), mlp_norm="ln_2",
        mlp_up=("mlp.c_fc",), mlp_down="mlp.c_proj",
        qkv_layout="concat",
    ),
))

register_architecture(ArchSpec(
    # Qwen3: Llama's layout plus per-head RMSNorms of q and k (over head_dim, one weight shared by
    # all heads) — they act inside each head, so residual rotations and whole-head removal leave
    # them exact; narrowing the head dimension would not.
    model_types=("qwen3",),
    layers="model.layers", token_embedding="model.embed_tokens", final_norm="model.norm", head="lm_head",
    norm_kind="rms", block=replace(_LLAMA_BLOCK, qk_norm=True), norm_eps_key="rms_norm_eps",
))
register_architecture(ArchSpec(
    # Gemma: Llama's layout; RMSNorm scales by (1 + w); the embedding module multiplies by √D; tied head.
    model_types=("gemma",),
    layers="model.layers", token_embedding="model.embed_tokens", final_norm="model.norm", head="lm_head",
    norm_kind="rms", norm_offset=1.0, embedding_scale="sqrt_hidden", block=_LLAMA_BLOCK,
))
_SANDWICH_BLOCK = replace(
    # Gemma 2/3: input norms before attention and MLP (``pre_feedforward_layernorm``; note that
    # ``post_attention_layernorm`` here is the attention OUTPUT norm, unlike Llama's) and output norms
    # after them, before the residual add.
    _LLAMA_BLOCK, mlp_norm="pre_feedforward_layernorm",
    post_attn_norm="post_attention_layernorm", post_mlp_norm="post_feedforward_layernorm",
)
register_architecture(ArchSpec(
    # Gemma 2: sandwich norms, (1 + w) norms, √D embedding scale, tied head; tanh soft-capping of the
    # final logits (config.final_logit_softcapping, after the head) and of the attention scores
    # (config.attn_logit_softcapping, inside the attention), alternating sliding-window and global
    # layers (config.layer_types) — none of these three touches the residual stream or the head count.
    model_types=("gemma2",),
    layers="model.layers", token_embedding="model.embed_tokens", final_norm="model.norm", head="lm_head",
    norm_kind="rms", norm_offset=1.0, embedding_scale="sqrt_hidden", block=_SANDWICH_BLOCK,
))
register_architecture(ArchSpec(
    # Gemma 3 (text): Gemma 2 plus per-head (1 + w) q/k norms; local/global layers with their own
    # rotary bases; no soft-capping by default.
    model_types=("gemma3_text",),
    layers="model.layers", token_embedding="model.embed_tokens", final_norm="model.norm", head="lm_head",
    norm_kind="rms", norm_offset=1.0, embedding_scale="sqrt_hidden",
    block=replace(_SANDWICH_BLOCK, qk_norm=True),
))
register_architecture(ArchSpec(
    # OLMo 2: no input norms; RMSNorms of the attention and MLP outputs before the residual add;
    # q/k RMSNorms over the whole q (num_heads·head_dim) and k (num_kv_heads·head_dim) projections.
    model_types=("olmo2",),
    layers="model.layers", token_embedding="model.embed_tokens", final_norm="model.norm", head="lm_head",
    norm_kind="rms",
    heads_fixed_reason="Olmo2Attention's q_norm/k_norm normalise the whole q and k projections (all heads "
                       "together), so removing heads would change the other heads' normalisation",
    block=replace(_LLAMA_BLOCK, attn_norm=None, mlp_norm=None, qk_norm=True, qk_norm_scope="projection",
                  post_attn_norm="post_attention_layernorm", post_mlp_norm="post_feedforward_layernorm"),
))
_MOE_MLP = dict(mlp=("mlp",), mlp_up=("mlp.experts.gate_up_proj",), mlp_down="mlp.experts.down_proj", mlp_up_fused=2)
register_architecture(ArchSpec(
    # Mixtral: Mistral's attention; a top-k routed mixture of SwiGLU experts (3-D parameters).
    model_types=("mixtral",),
    layers="model.layers", token_embedding="model.embed_tokens", final_norm="model.norm", head="lm_head",
    norm_kind="rms", norm_eps_key="rms_norm_eps",
    block=replace(_LLAMA_BLOCK, **_MOE_MLP, experts=ExpertsSpec(router="mlp.gate", experts="mlp.experts")),
))
register_architecture(ArchSpec(
    # Qwen3-MoE: Qwen3's attention (per-head q/k norms); routed experts of width moe_intermediate_size
    # (config.mlp_only_layers / decoder_sparse_step can make some layers dense: see get_arch).
    model_types=("qwen3_moe",),
    layers="model.layers", token_embedding="model.embed_tokens", final_norm="model.norm", head="lm_head",
    norm_kind="rms", mlp_width_key="moe_intermediate_size", norm_eps_key="rms_norm_eps",
    block=replace(_LLAMA_BLOCK, **_MOE_MLP, qk_norm=True,
                  experts=ExpertsSpec(router="mlp.gate", experts="mlp.experts", num_experts_key="num_experts")),
))
register_architecture(ArchSpec(
    # Qwen2-MoE: Qwen2's attention (q/k/v biases); routed experts plus one always-on shared expert
    # with a sigmoid gate.
    model_types=("qwen2_moe",),
    layers="model.layers", token_embedding="model.embed_tokens", final_norm="model.norm", head="lm_head",
    norm_kind="rms", mlp_width_key="moe_intermediate_size", norm_eps_key="rms_norm_eps",
    block=replace(_LLAMA_BLOCK, **_MOE_MLP,
                  experts=ExpertsSpec(router="mlp.gate", experts="mlp.experts", num_experts_key="num_experts",
                                      shared="mlp.shared_expert", shared_gate="mlp.shared_expert_gate")),
))


def rotation_refusal(model: nn.Module, config: object = None) -> str | None:
    """A ready ``MethodSpec.unsupported`` hook for methods that rotate the residual stream."""
    return get_arch(model.config).not_invariant_reason


def mlp_refusal(model: nn.Module, config: object = None) -> str | None:
    """A ready ``MethodSpec.unsupported`` hook for methods that prune the MLP width."""
    return get_arch(model.config).mlp_fixed_reason


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def get_arch(config: PretrainedConfig) -> ArchSpec:
    """The adapter for a config, chosen by ``model_type`` only (never by the model's name)."""
    mt = getattr(config, "model_type", None)
    if mt not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {mt!r}; supported model types: {', '.join(supported_model_types())}"
        )
    spec = ARCHITECTURES[mt]
    if mt == "opt":
        if not getattr(config, "do_layer_norm_before", True):
            raise UnsupportedArchitectureError("OPT with post-layer-norm (do_layer_norm_before=False, e.g. OPT-350M) is not supported")
        if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
            raise UnsupportedArchitectureError("OPT with project_in/project_out (word_embed_proj_dim != hidden_size) is not supported")
    if mt == "gpt_neox" and not getattr(config, "use_parallel_residual", True):
        spec = replace(spec, block=replace(spec.block, parallel=False))
    if mt == "phi" and getattr(config, "qk_layernorm", False):
        spec = replace(spec, block=replace(spec.block, qk_norm=True))
    if "|" in spec.head:
        spec = replace(spec, head=_resolve_name(config, spec.head.split("|")))
    if spec.block.experts is not None and _has_dense_layers(config):
        raise UnsupportedArchitectureError(
            f"{mt} with dense MLP layers among the expert layers (mlp_only_layers / decoder_sparse_step) is not "
            "supported: the table describes one MLP kind for every layer")
    if mt == "gpt2" and getattr(config, "add_cross_attention", False):
        raise UnsupportedArchitectureError("GPT-2 with cross-attention is not a causal LM slicekit can transform")
    return spec


def _has_dense_layers(config: PretrainedConfig) -> bool:
    """Qwen-MoE configs can make some layers dense (``mlp_only_layers``, ``decoder_sparse_step``)."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return bool(getattr(config, "mlp_only_layers", None)) or step != 1


_RESOLVED: dict[tuple[type, tuple[str, ...]], str] = {}


def _resolve_name(config: PretrainedConfig, candidates: list[str]) -> str:
    """The one of ``candidates`` (attribute names of the causal-LM class) that the installed
    transformers uses — some modules were renamed between releases.  Read from the source of the
    class's ``__init__``, once per class."""
    import inspect

    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping[type(config)]
    key = (cls, tuple(candidates))
    if key not in _RESOLVED:
        try:
            source = inspect.getsource(cls.__init__)
        except (OSError, TypeError):
            source = ""
        _RESOLVED[key] = next((c for c in candidates if f"self.{c} =" in source), candidates[0])
    return _RESOLVED[key]


@dataclass(frozen=True)
class AttentionInfo:
    """Head geometry, read from the config."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int  # 0 without rotary embeddings

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def attention_info(config: PretrainedConfig) -> AttentionInfo:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    spec = get_arch(config)
    if spec.rotary == "none":
        rot = 0
    else:
        rope = getattr(config, "rope_parameters", None) or {}
        factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
        if factor is None:
            factor = getattr(config, "rotary_pct", 1.0)
        rot = int(head_dim * factor)
    return AttentionInfo(heads, kv, head_dim, rot)


def mlp_width(config: PretrainedConfig) -> int:
    """The MLP intermediate width the config describes (GPT-2's ``n_inner=None`` means 4·D)."""
    val = getattr(config, get_arch(config).mlp_width_key, None)
    return int(val) if val else 4 * config.hidden_size


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The language model's own config (multimodal configs nest it)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def model_type_of(config: PretrainedConfig) -> str:
    """The family name that selects the table row (for messages and reports)."""
    return str(getattr(config, "model_type", "?"))


def _model_type(config: PretrainedConfig | Mapping[str, Any]) -> Any:
    """``model_type`` of a config object or of a raw ``config.json`` dict (None where missing)."""
    if isinstance(config, Mapping):
        return config.get("model_type")
    return getattr(config, "model_type", None)


def is_slicekit_format(config: PretrainedConfig | Mapping[str, Any]) -> bool:
    """Whether a config (object, or a raw ``config.json`` dict) is a slicekit-format checkpoint's
    rather than a family's: a ``base_config`` next to the shape in the file, or format 1's
    ``model_type`` "slicekit" (the file, or a model loaded from one).  Such a model has per-layer
    shapes no family's hyper-parameters describe."""
    from slicekit.modeling_slicekit import SLICEKIT_MODEL_TYPE

    return _model_type(config) == SLICEKIT_MODEL_TYPE or (isinstance(config, Mapping) and "base_config" in config)


def gguf_model_types() -> list[str]:
    """The families slicekit can export as GGUF (rows with a ``gguf`` entry)."""
    return sorted(mt for mt, spec in ARCHITECTURES.items() if spec.gguf is not None)


def gguf_families() -> dict[str, GGUFSpec]:
    """``model_type`` → :class:`GGUFSpec` for every exportable family (a view of the table)."""
    return {mt: spec.gguf for mt, spec in sorted(ARCHITECTURES.items()) if spec.gguf is not None}


def gguf_spec(config: PretrainedConfig | Mapping[str, Any], source: str = "this model") -> GGUFSpec:
    """The GGUF facts of a config's family (a config object or a raw ``config.json`` dict), or a
    :class:`SlicekitError` naming the families that can be exported.  ``source`` names the model in
    that message (a directory, or "this model")."""
    mt = _model_type(config)
    spec = ARCHITECTURES.get(mt) if isinstance(mt, str) else None
    if spec is None or spec.gguf is None:
        raise SlicekitError(f"GGUF export supports model types {', '.join(gguf_model_types())}; {source} is {mt!r}")
    return spec.gguf


def hidden_resize_refusal(config: PretrainedConfig) -> str | None:
    """Why a plain config of this family cannot describe the model with a narrower residual
    stream that one global rotation gives (None: it can, see :func:`hidden_resize_overrides`)."""
    spec = get_arch(config)
    reason = spec.not_invariant_reason
    if reason:
        return reason
    if spec.norm_kind != "rms":
        return ("its norms are LayerNorms, which centre over all D coordinates; a narrower plain model cannot "
                "express that")
    if spec.embedding_scale is not None:
        return "its embeddings are scaled by √hidden_size, which would change with the width"
    if spec.norm_eps_key is None:
        return "the architecture table does not say which config key holds its norm epsilon"
    if spec.position_embedding is not None or spec.head_width_is_embedding_width:
        return "its positions or head are tied to the embedding width"
    return None


def hidden_resize_overrides(config: PretrainedConfig, width: int) -> dict[str, Any]:
    """Config keys of a plain model whose residual stream is ``width`` wide, computing exactly what
    the rotated, sliced model computes: the head geometry stays (``head_dim`` given explicitly)
    and the norm's epsilon is scaled by ``D / width``, because an RMSNorm over ``width``
    coordinates with epsilon ``ε·D/width`` and weight ``√(D/width)`` equals slicekit's
    :class:`~slicekit.modeling_slicekit.UnitRMSNorm` (which divides by the full ``D``)."""
    spec = get_arch(config)
    text = text_config(config)
    hidden = text.hidden_size
    eps = float(getattr(text, spec.norm_eps_key))
    return {"hidden_size": int(width), "head_dim": attention_info(config).head_dim,
            spec.norm_eps_key: eps * hidden / int(width)}


def vanilla_config_overrides(config: PretrainedConfig, mlp_widths: list[int]) -> dict[str, int] | None:
    """Config keys a plain (no remote code) checkpoint must change to describe uniform MLP widths,
    or None where the widths differ between layers."""
    if len(set(mlp_widths)) != 1:
        return None
    return {get_arch(config).mlp_width_key: int(mlp_widths[0])}



# ---- uniform access to linear weights (GPT-2's Conv1D stores them transposed) ----

def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as out × in (``y = x·Wᵀ + b``), whatever the module stores."""
    if isinstance(module, Conv1D):
        return module.weight.data.t()
    if isinstance(module, nn.Linear):
        return module.weight.data
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def set_linear(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None, *, keep_bias: bool = True) -> None:
    """Replace a linear's weight (given out × in) and bias, updating its size attributes.

    All shape surgery on linears goes through here so that weight, bias and
    ``in_features``/``out_features`` (``nf``/``nx`` for Conv1D) always agree.
    ``keep_bias``: when ``bias`` is None, keep the existing bias (it must still fit).
    """
    ref = module.weight
    out_f, in_f = weight.shape
    w = weight.to(dtype=ref.dtype, device=ref.device)
    if isinstance(module, Conv1D):
        module.weight = nn.Parameter(w.t().contiguous(), requires_grad=ref.requires_grad)
        module.nf, module.nx = out_f, in_f
    else:
        module.weight = nn.Parameter(w.contiguous(), requires_grad=ref.requires_grad)
        module.in_features, module.out_features = in_f, out_f
    if bias is not None:
        module.bias = nn.Parameter(bias.to(dtype=ref.dtype, device=ref.device).contiguous(), requires_grad=ref.requires_grad)
    elif not keep_bias:
        module.bias = None
    if module.bias is not None and module.bias.shape[0] != out_f:
        raise ValueError(f"bias of length {module.bias.shape[0]} does not fit {out_f} outputs")


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.data


def linear_shape_spec(module: nn.Module) -> dict:
    """The shape-description entry for a (possibly resized) linear."""
    w = linear_weight(module)
    return {
        "type": "conv1d" if isinstance(module, Conv1D) else "linear",
        "in_features": int(w.shape[1]),
        "out_features": int(w.shape[0]),
        "bias": module.bias is not None,
    }
