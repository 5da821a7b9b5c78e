"""Architecture knowledge as data: one table row per ``config.model_type``.

Every method asks this module, never a model class, where a block's norms, readers, writers and
MLP intermediate are.  Names are module paths relative to the decoder layer (or to the model for
the model-level entries).  Adding an architecture means adding a row, not a code path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D


class UnsupportedArchitectureError(ValueError):
    """The model's ``model_type`` has no adapter (or a variant slicekit cannot transform)."""


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
    """

    parallel: bool
    attn: str
    attn_norm: str
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
    #: per-head norms of q and k inside the attention (Qwen3, Gemma 3, Phi with qk_layernorm):
    #: narrowing the head dimension would change what they normalise.
    qk_norm: bool = False

    @property
    def mlp_readers(self) -> tuple[str, ...]:
        return self.mlp_up

    @property
    def mlp_writer(self) -> str:
        return self.mlp_down


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


register_architecture(ArchSpec(
    model_types=("llama", "mistral", "qwen2"),
    layers="model.layers", token_embedding="model.embed_tokens", final_norm="model.norm", head="lm_head",
    norm_kind="rms", block=_LLAMA_BLOCK,
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
    norm_kind="rms",
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
    if mt == "gpt2" and getattr(config, "add_cross_attention", False):
        raise UnsupportedArchitectureError("GPT-2 with cross-attention is not a causal LM slicekit can transform")
    return spec


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
