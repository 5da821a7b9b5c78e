"""Computational invariance: rewrite a model so an orthogonal map on the residual stream is free.

After :func:`make_invariant` every norm is a weightless RMSNorm (its scale and bias folded into the
linears that read it), LayerNorm models have a zero-mean residual stream (embeddings and writers
centred), the head is untied, and every decoder layer is a residual block (:class:`SlicedLayer`) ready to carry
shortcut matrices.  The model computes the same logits as before, to float round-off.
This is the common ground of SliceGPT, dynamic slicing, DOTResize and bits-back coding.
"""

from __future__ import annotations

import torch
from torch import nn

from slicekit.arch import ArchSpec, get_arch, linear_bias, linear_weight, set_linear
from slicekit.linalg import center_rows, center_writer, fold_scale_into_readers
from slicekit.modeling_slicekit import SlicedLayer, UnitRMSNorm, make_block
from slicekit.models import untie_head
from slicekit.shape import Plan, block_spec


def _norm_params(norm: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    gamma = getattr(norm, "weight", None)
    beta = getattr(norm, "bias", None)
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = getattr(norm, "eps", 1e-5)
    return (None if gamma is None else gamma.data, None if beta is None else beta.data, float(eps))


def norm_eps(norm: nn.Module) -> float:
    """The epsilon of a norm module, whatever the family calls it."""
    return _norm_params(norm)[2]


def _has_bias(norm: nn.Module) -> bool:
    return _norm_params(norm)[1] is not None


def _is_tied(model: nn.Module, spec: ArchSpec) -> bool:
    head = model.get_submodule(spec.head)
    return head.weight is spec.embeddings(model)[0].weight or bool(getattr(model.config, "tie_word_embeddings", False))


def invariant_plan(model: nn.Module, spec: ArchSpec | None = None) -> Plan:
    """The shape :func:`make_invariant` will give ``model`` (nothing is changed): untied head,
    weightless norms of full width, LayerNorm biases folded into the readers (which gain a bias
    where they had none), every decoder layer a residual block without shortcuts."""
    spec = spec or get_arch(model.config)
    p = Plan.of(model)
    if is_invariant(model):
        return p
    hidden = model.config.hidden_size
    if _is_tied(model, spec):
        p.untie()
    b = spec.block
    bspec = block_spec(model.config)

    def fold(norm_path: str, readers: list[str]) -> None:
        norm = model.get_submodule(norm_path)
        for r in readers:
            if _has_bias(norm):
                p.resize_linear(r, bias=True)
        p.unit_norm(norm_path, hidden, hidden, norm_eps(norm))

    for i in range(len(spec.layer_list(model))):
        def at(name: str, i: int = i) -> str:
            return spec.layer_path(i, name)

        if b.mlp_norm is None:
            fold(at(b.attn_norm), [at(n) for n in b.attn_readers + b.mlp_up])
        else:
            fold(at(b.attn_norm), [at(n) for n in b.attn_readers])
            fold(at(b.mlp_norm), [at(n) for n in b.mlp_up])
        p.block(spec.layer_path(i), bspec)
    fold(spec.final_norm, [spec.head])
    return p


def _fold(norm: nn.Module, readers: list[nn.Module]) -> float:
    gamma, beta, eps = _norm_params(norm)
    for lin in readers:
        w, b = fold_scale_into_readers(linear_weight(lin), linear_bias(lin), gamma, beta, out_dtype=lin.weight.dtype)
        set_linear(lin, w, b)
    return eps


def _center_writer(lin: nn.Module) -> None:
    w, b = center_writer(linear_weight(lin), linear_bias(lin))
    set_linear(lin, w, b)


def is_invariant(model: nn.Module) -> bool:
    spec = get_arch(model.config)
    return all(isinstance(layer, SlicedLayer) for layer in spec.layer_list(model))


@torch.no_grad()
def make_invariant(model: nn.Module, spec: ArchSpec | None = None) -> nn.Module:
    """Apply the invariance transforms in place (idempotent) and return the model."""
    spec = spec or get_arch(model.config)
    if is_invariant(model):
        return model
    hidden = model.config.hidden_size
    head = model.get_submodule(spec.head)
    if _is_tied(model, spec):
        untie_head(model, spec.head)
    b = spec.block
    layers = spec.layer_list(model)
    if spec.norm_kind == "layer":
        for emb in spec.embeddings(model):
            emb.weight.data = center_rows(emb.weight.data).to(emb.weight.dtype)
        for layer in layers:
            _center_writer(layer.get_submodule(b.attn_writer))
            _center_writer(layer.get_submodule(b.mlp_writer))
    bspec = block_spec(model.config)
    for layer in layers:
        attn_readers = [layer.get_submodule(n) for n in b.attn_readers]
        mlp_readers = [layer.get_submodule(n) for n in b.mlp_readers]
        if b.mlp_norm is None:  # one norm feeds attention and MLP (Phi-2)
            eps = _fold(layer.get_submodule(b.attn_norm), attn_readers + mlp_readers)
            setattr(layer, b.attn_norm, UnitRMSNorm(hidden, hidden, eps))
        else:
            eps = _fold(layer.get_submodule(b.attn_norm), attn_readers)
            setattr(layer, b.attn_norm, UnitRMSNorm(hidden, hidden, eps))
            eps = _fold(layer.get_submodule(b.mlp_norm), mlp_readers)
            setattr(layer, b.mlp_norm, UnitRMSNorm(hidden, hidden, eps))
        make_block(layer, bspec)
    final_norm = model.get_submodule(spec.final_norm)
    eps = _fold(final_norm, [head])
    parent, _, name = spec.final_norm.rpartition(".")
    setattr(model.get_submodule(parent), name, UnitRMSNorm(hidden, hidden, eps))
    return model
