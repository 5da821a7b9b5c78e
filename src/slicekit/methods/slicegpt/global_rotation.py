"""SliceGPT with one rotation for the whole residual stream: a plain, narrower model.

Per-layer rotations need a shortcut matrix at every residual add (the stream changes basis
between layers), an untied head, and a custom loader.  With a single orthogonal ``Q`` for every
interface the residual adds need nothing, and what remains is the original architecture with a
residual stream ``d`` wide (``hidden_size = d``, ``head_dim`` kept):

* embeddings ``E·Q_d``; every reader ``W·diag(γ)·Q_d`` (its input norm's scale folded in);
  every writer ``Q_dᵀ·W`` (and ``Q_dᵀ·b``);
* every RMSNorm becomes a plain RMSNorm over ``d`` coordinates with weight ``√(D/d)`` and
  epsilon ``ε·D/d`` — exactly slicekit's weightless norm over the full ``D`` (see
  :func:`slicekit.arch.hidden_resize_overrides`), so the config is the family's own;
* the head reads ``W_h·diag(γ_f)·Q_d`` exactly — for a family that ties it to the embeddings
  this unties it (``vocab × d`` more parameters).  ``keep_tie=True`` keeps the tie instead: the
  head must then equal the embedding ``E·Q_d``, so the final norm's scale cannot be folded into
  it and the plain final norm keeps the diagonal of ``Q_dᵀ·diag(γ_f)·Q_d`` — exact only when
  ``γ_f`` is constant.  On SmolLM2 (``γ_f`` from −2.1 to 3.3) that alone takes WikiText-2
  perplexity from 27 to 858 at full width, so it is not the default.

``Q`` is the principal basis of the stream over all interfaces at once: the Gram matrix of
every layer's input, every mid-layer stream and the final stream, each normalised by its trace
(the stream grows with depth; every reader sees it through a norm, so each interface weighs the
same).  One calibration pass, no sequential re-calibration: the rotation is global.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from slicekit.arch import get_arch, hidden_resize_overrides, hidden_resize_refusal, linear_weight
from slicekit.errors import SlicekitError
from slicekit.invariance import (
    fold_reader,
    reader_weight,
    rotate_any_reader,
    stream_param_names,
    writer_weight,
)
from slicekit.linalg import fold_scale_into_readers, pca_from_gram, rotate_reader, rotate_writer
from slicekit.methods import MethodContext
from slicekit.schedules import widths_from_fractions
from slicekit.shape import Plan, mlp_stream_children


def global_width(model: nn.Module, config: Any, fractions: list[float]) -> int:
    """The one residual width: every layer's fraction must be the same (a constant schedule).
    It is a multiple of ``round_to`` and of the number of heads (transformers' configs insist that
    ``hidden_size`` divides into heads even when ``head_dim`` is given)."""
    import math

    from slicekit.arch import attention_info
    from slicekit.methods.slicegpt.procedure import width_multiple

    if len({round(f, 12) for f in fractions}) > 1:
        raise SlicekitError("rotation=global keeps one residual width for the whole model: use schedule=constant")
    hidden = model.config.hidden_size
    multiple = math.lcm(width_multiple(config, get_arch(model.config)), attention_info(model.config).num_heads)
    return widths_from_fractions(hidden, fractions[:1], multiple)[0]


def narrow_config(model: nn.Module, width: int):
    cfg = copy.deepcopy(model.config)
    for key, value in hidden_resize_overrides(cfg, width).items():
        setattr(cfg, key, value)
    return cfg


def global_refusal(model: nn.Module) -> str | None:
    """Why this model cannot take the global variant (its plain config could not say the result,
    or it is streamed: one rotation for everything needs the whole model after one pass)."""
    from slicekit.streaming import source_of

    if source_of(model) is not None:
        return ("rotation=global rewrites the whole model at once after one calibration pass; "
                "compress it without --stream")
    reason = hidden_resize_refusal(model.config)
    if reason:
        return f"rotation=global needs a plain narrower config, and {reason}"
    from transformers import AutoModelForCausalLM

    from slicekit.modeling_slicekit import params_on_meta

    spec = get_arch(model.config)
    hidden = model.config.hidden_size
    narrow = narrow_config(model, max(1, hidden // 2))
    with params_on_meta():
        built = AutoModelForCausalLM.from_config(narrow)
    q_old = model.get_submodule(spec.layer_path(0, spec.block.attn_readers[0])).weight.shape[0]
    q_new = built.get_submodule(spec.layer_path(0, spec.block.attn_readers[0])).weight.shape[0]
    if q_old != q_new:
        return "rotation=global needs a config whose head_dim is independent of hidden_size, and this family's is not"
    return None


def plan_global(model: nn.Module, config: Any, fractions: list[float]) -> Plan:
    """The narrower plain model: its own config, every reader/writer/embedding/head at ``d``."""
    spec = get_arch(model.config)
    b = spec.block
    d = global_width(model, config, fractions)
    p = Plan.of(model)
    p.config = narrow_config(model, d)
    if not config.keep_tie:
        p.untie()
    p.resize_embedding(spec.token_embedding, d)
    for i in range(len(spec.layer_list(model))):
        for name in b.attn_readers:
            p.resize_linear(spec.layer_path(i, name), in_features=d)
        p.resize_linear(spec.layer_path(i, b.attn_writer), out_features=d)
        p.set_mlp_stream(i, read=d, write=d)
    p.resize_linear(spec.head, in_features=d)
    return p


def _gamma(norm: nn.Module, offset: float) -> torch.Tensor:
    return norm.weight.data.double() + offset


def stream_rotation(model: nn.Module, ctx: MethodContext, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, eigenvalues)`` of the trace-normalised Gram matrices of every stream interface."""
    spec = get_arch(model.config)
    b = spec.block
    points = [":input"] + ([f"{b.mlp_norm}:input"] if not b.parallel and b.mlp_norm else [])
    total: torch.Tensor | None = None
    engine = ctx.engine(model)
    n = len(engine.layers)

    def add(g: torch.Tensor) -> None:
        nonlocal total
        g = g.double()
        g = g / torch.trace(g).clamp_min(torch.finfo(torch.float64).tiny)
        total = g if total is None else total + g

    for i, obs, _ in engine.observe(grams=points, desc="global rotation"):
        for p in points:
            add(obs.grams[p].mean())
        if i == n - 1:
            from slicekit.calibration import Gram

            last = Gram()
            for out in obs.outputs:
                last.add(out.to(engine.device))
            add(last.mean())
    vals, vecs = pca_from_gram(total, damping)
    return vecs, vals


@torch.no_grad()
def apply_global(model: nn.Module, plan_: Plan, config: Any, ctx: MethodContext) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from slicekit.modeling_slicekit import _set_tensor, checkpoint_tensors, params_on_meta
    from slicekit.streaming import drop_storage

    spec = get_arch(model.config)
    b = spec.block
    hidden = model.config.hidden_size
    d = global_width(model, config, ctx.fractions)
    q, vals = stream_rotation(model, ctx, config.damping)
    scale = (hidden / d) ** 0.5
    off = spec.norm_offset
    tied = bool(getattr(plan_.config, "tie_word_embeddings", False))
    narrow = plan_.config
    impl = getattr(model.config, "_attn_implementation", None)
    with params_on_meta():
        new = AutoModelForCausalLM.from_config(narrow, **({"attn_implementation": impl} if impl else {}))
    new.eval()

    def put(path: str, tensor: torch.Tensor, like: torch.Tensor) -> None:
        _set_tensor(new, path, tensor.to(dtype=like.dtype, device=like.device).contiguous())

    def norm_weight(path: str, value: torch.Tensor) -> None:
        put(f"{path}.weight", value - off, model.get_submodule(path).weight)

    emb = model.get_submodule(spec.token_embedding)
    put(f"{spec.token_embedding}.weight", rotate_reader(emb.weight.data, q, d), emb.weight)
    ones = torch.ones(d, dtype=torch.float64)
    for i, layer in enumerate(spec.layer_list(model)):
        def at(name: str, i: int = i) -> str:
            return spec.layer_path(i, name)

        prefix = spec.layer_path(i)
        mlp_readers, mlp_writers = mlp_stream_children(spec)
        groups = [(b.attn_norm, b.attn_readers + (mlp_readers if b.mlp_norm is None else ()))]
        if b.mlp_norm is not None:
            groups.append((b.mlp_norm, mlp_readers))
        for norm_name, readers in groups:
            gamma = _gamma(layer.get_submodule(norm_name), off)
            for r in readers:
                w0, b0 = reader_weight(layer, r)
                wkey, bkey = stream_param_names(layer, r, "read")
                w, _ = fold_reader(w0, None, gamma, None)
                put(f"{prefix}.{wkey}", rotate_any_reader(w, q, d), w0)
                if b0 is not None:
                    put(f"{prefix}.{bkey}", b0, b0)
            norm_weight(at(norm_name), scale * ones)
        for wname in (b.attn_writer, *mlp_writers):
            w0, b0 = writer_weight(layer, wname)
            wkey, bkey = stream_param_names(layer, wname, "write")
            w, bias = rotate_writer(w0, b0, q, d)
            put(f"{prefix}.{wkey}", w, w0)
            if bias is not None:
                put(f"{prefix}.{bkey}", bias, b0)
        # everything else in the layer (q/k norms inside the heads) is unchanged
        done = {n for n, t in new.get_submodule(prefix).named_parameters() if t.device.type != "meta"}
        for name, tensor in checkpoint_tensors(layer).items():
            if name not in done:
                put(f"{prefix}.{name}", tensor, tensor)
        drop_storage(model, prefix)  # the original layer is done: free it
    final = model.get_submodule(spec.final_norm)
    gamma_f = _gamma(final, off)
    head = model.get_submodule(spec.head)
    qd = q[:, :d]
    if tied:
        # the head is the rotated embedding: the final norm keeps diag(Q_dᵀ·diag(γ)·Q_d)
        norm_weight(spec.final_norm, scale * ((qd * qd) * gamma_f[:, None]).sum(0))
    else:
        norm_weight(spec.final_norm, scale * ones)
        w, _ = fold_scale_into_readers(linear_weight(head), None, gamma_f, None)
        put(f"{spec.head}.weight", rotate_reader(w, q, d), head.weight)
    if tied:
        new.tie_weights()
    left = [n for n, p in new.named_parameters() if p.device.type == "meta"]
    if left:
        raise RuntimeError(f"global rotation left {', '.join(left[:3])} unset")
    for name, child in list(new.named_children()):
        setattr(model, name, child)
    model.config = new.config
    if tied:
        model.tie_weights()
    kept = float(vals[:d].sum() / vals.sum())
    return {"rotation": "global", "hidden_size": hidden, "width": d, "slicing": 1.0 - d / hidden,
            "kept_variance": kept, "tied_head": tied}
