"""The compressed-shape description: derived from a model, counted, rebuilt.

:func:`describe` walks a (compressed, in-memory) model and writes the description that
``modeling_slicekit.apply_shape`` interprets.  The parameter counter builds the described model on
the meta device and counts it, so the count, the saver and the loader cannot disagree.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from slicekit.arch import get_arch, linear_shape_spec
from slicekit.modeling_slicekit import (
    SHAPE_VERSION,
    ReducedAttention,
    ResidualBlock,
    UnitRMSNorm,
    build_compressed_model,
)


def describe(model: nn.Module, attributes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The shape description of ``model``: every linear, embedding, replaced norm and block.

    Listing every linear (changed or not) keeps the description explicit and the interpreter
    trivial; blocks are listed after the modules they contain.
    """
    modules: dict[str, dict] = {}
    blocks: dict[str, dict] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, Conv1D)):
            modules[name] = linear_shape_spec(mod)
        elif isinstance(mod, nn.Embedding):
            modules[name] = {"type": "embedding", "num_embeddings": mod.num_embeddings,
                             "embedding_dim": mod.embedding_dim}
        elif isinstance(mod, UnitRMSNorm):
            modules[name] = {"type": "unit_rmsnorm", "dim": mod.dim, "norm_dim": mod.norm_dim, "eps": mod.eps}
        elif isinstance(mod, ReducedAttention):
            modules[name] = {"type": "reduced_attention", **mod.spec}
        elif isinstance(mod, ResidualBlock):
            spec = {k: v for k, v in mod.spec.items() if k not in ("attn_shortcut", "mlp_shortcut")}
            for key in ("attn_shortcut", "mlp_shortcut"):
                p = getattr(mod, key)
                spec[key] = None if p is None else list(p.shape)
            blocks[name] = {**spec, "type": "block"}
    modules.update(blocks)
    return {"version": SHAPE_VERSION, "modules": modules, "attributes": dict(attributes or {})}


def block_spec(config: PretrainedConfig) -> dict[str, Any]:
    """The :class:`ResidualBlock` wiring for a family, from its adapter row."""
    b = get_arch(config).block
    return {"attn": b.attn, "attn_norm": b.attn_norm, "mlp": list(b.mlp), "mlp_norm": b.mlp_norm,
            "parallel": b.parallel, "attn_shortcut": None, "mlp_shortcut": None}


def count_from_shape(base_config: PretrainedConfig, shape: dict[str, Any]) -> dict[str, int]:
    """Parameter counts of the described model (built on the meta device, nothing allocated)."""
    from slicekit.models import count_parameters

    model = build_compressed_model(base_config, shape)
    return count_parameters(model)
