"""SliceGPT's rotate-and-slice, as a calibration-engine method.

Sequential calibration as in the reference: the rotation of each interface is computed on
activations that already carry the slicing of every earlier interface.  One procedure serves
sequential blocks (two rotations per layer: before attention and before the MLP) and parallel
blocks (one rotation per layer); the only difference is whether a mid-layer interface exists.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from slicekit.arch import ArchSpec, get_arch, linear_weight, set_linear
from slicekit.calibration import CalibrationEngine, Gram, LayerStep
from slicekit.errors import SlicekitError
from slicekit.invariance import (
    invariant_plan,
    make_invariant,
    make_layer_invariant,
    reader_weight,
    rotate_stream_readers,
    set_reader_weight,
    set_writer_weight,
    writer_weight,
)
from slicekit.linalg import pca_from_gram, rotate_reader, rotate_writer
from slicekit.methods import MethodContext
from slicekit.methods.common import EXPERT_WIDTH_MULTIPLE
from slicekit.methods.slicegpt.config import SliceGPTConfig
from slicekit.modeling_slicekit import SlicedLayer, UnitRMSNorm
from slicekit.schedules import effective_slice_base, widths_from_fractions
from slicekit.shape import Plan, mlp_stream_children


@dataclass
class WidthPlan:
    """Residual width at every interface: layer ``l`` reads ``attn_in[l]`` (and, in sequential
    blocks, its MLP reads ``mlp_in[l]``); the head reads ``head_in``."""

    attn_in: list[int]
    mlp_in: list[int]
    head_in: int

    def out_width(self, layer: int) -> int:
        return self.attn_in[layer + 1] if layer + 1 < len(self.attn_in) else self.head_in


def width_multiple(config: SliceGPTConfig, spec: ArchSpec) -> int:
    """Stream widths are multiples of ``round_to`` — and of 8 where mixture-of-experts modules read
    the stream: transformers' grouped experts kernel needs 16-byte-aligned rows, and an expert
    matrix ``D'`` wide fails there otherwise (:data:`slicekit.methods.common.EXPERT_WIDTH_MULTIPLE`)."""
    if spec.block.experts is not None:
        return math.lcm(config.round_to, EXPERT_WIDTH_MULTIPLE)
    return config.round_to


def plan_widths(config: SliceGPTConfig, spec: ArchSpec, hidden: int, fractions: list[float]) -> WidthPlan:
    """Integer widths of every interface for per-layer slice fractions.

    A mixture-of-experts MLP writes the width it reads (see
    :func:`slicekit.modeling_slicekit.resize_experts`), so there the MLP reads the layer's *output*
    width and the attention (whose output projection is a linear) makes any change of width; with
    ``slice_head`` off the last layer's MLP therefore stays full width.
    """
    widths = widths_from_fractions(hidden, fractions, width_multiple(config, spec))
    head = widths[-1] if config.slice_head else hidden
    if spec.head_width_is_embedding_width:
        head = widths[0]
    plan = WidthPlan(attn_in=list(widths), mlp_in=list(widths), head_in=head)
    if spec.block.experts is not None:
        if spec.block.parallel:  # no such family: _PaddedExperts calibrates sequential blocks only
            raise SlicekitError("SliceGPT on a parallel block with a mixture-of-experts MLP is not implemented")
        plan.mlp_in = [plan.out_width(i) for i in range(len(widths))]
    return plan


def _rotate_readers(layer: nn.Module, names, q: torch.Tensor, width: int) -> None:
    rotate_stream_readers(layer, names, q, width)


class _WriterInBasis:
    """A writer made to write the *whole* stream in the basis ``q`` while its layer is calibrated.

    With the writers in the basis of the layer's input rotation, the residual is just the leading
    coordinates of the output (the block's shortcut is the truncated identity) and no shortcut
    product is computed during calibration; the output Gram matrix is taken in that basis and its
    eigenvectors ``V`` give the output rotation ``Q·V``.  PCA is basis-independent (the damping
    ``λ·I`` commutes with rotations), so the result equals the original-basis one to round-off.
    :meth:`finish` then writes the weights from the kept original in one float64 product.
    """

    def __init__(self, layer: nn.Module, names: tuple[str, ...], q: torch.Tensor) -> None:
        self.layer, self.names = layer, names
        self.saved = []
        for n in names:
            w, b = writer_weight(layer, n)
            self.saved.append((w.clone(), None if b is None else b.clone()))
        for n, (w, b) in zip(names, self.saved, strict=True):
            set_writer_weight(layer, n, *rotate_writer(w, b, q, q.shape[1]))

    def finish(self, q: torch.Tensor, width: int) -> None:
        for n, (w, b) in zip(self.names, self.saved, strict=True):
            set_writer_weight(self.layer, n, *rotate_writer(w, b, q, width))
        self.saved = []


class _PaddedExperts:
    """A mixture-of-experts MLP made to read and write the *whole* stream while its layer is calibrated.

    :class:`_WriterInBasis` lets the MLP write all ``D`` coordinates of the stream in the basis of
    its input, but an experts block writes only the width it reads (the expert loop accumulates
    into ``zeros_like`` of its input).  So during calibration the readers hold all ``D`` rotated
    columns (``W·Q``) and the MLP's input, ``d`` wide, is zero-padded to ``D`` by a forward
    pre-hook: ``W·Q·[h; 0] = W·Q[:, :d]·h`` exactly, router logits included.  :meth:`finish`
    removes the hook and keeps the first ``d`` columns of every reader.
    """

    def __init__(self, layer: nn.Module, mlp: str, hidden: int) -> None:
        self.layer = layer

        def pad(module: nn.Module, args: tuple) -> tuple:
            h = args[0]
            return (F.pad(h, (0, hidden - h.shape[-1])), *args[1:])

        self.hook = layer.get_submodule(mlp).register_forward_pre_hook(pad)

    def finish(self, readers, width: int) -> None:
        self.hook.remove()
        for path in readers:
            w, bias = reader_weight(self.layer, path)
            set_reader_weight(self.layer, path, w[..., :width].clone(), bias)


def _set_norm(layer: nn.Module, name: str | None, width: int, norm_dim: int) -> None:
    if name is not None:
        old = layer.get_submodule(name)
        setattr(layer, name, UnitRMSNorm(width, norm_dim, old.eps))


def _set_shortcut(block: SlicedLayer, key: str, mat: torch.Tensor | None) -> None:
    ref = next(block.parameters())
    setattr(block, key, None if mat is None else nn.Parameter(mat.to(ref.dtype).to(ref.device).contiguous(),
                                                              requires_grad=False))


def _project(outputs: list[torch.Tensor], v: torch.Tensor, width: int) -> list[torch.Tensor]:
    vd = v[:, :width]
    # In the activations' dtype, as the reference does: the rotation itself came from float64 PCA.
    return [o @ vd.to(device=o.device, dtype=o.dtype) for o in outputs]


def _attn_half(layer: SlicedLayer, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return layer.attn_half(hidden, *args, **kwargs)


def _mlp_half(layer: SlicedLayer, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return layer.mlp_half(hidden)


#: ``basis(G, k)`` → a ``D × D`` orthogonal matrix whose first ``k`` columns span the kept subspace,
#: for the Gram matrix ``G`` of the stream in the model's original coordinates
Basis = Callable[[torch.Tensor, int], torch.Tensor]


class RotateAndSlice:
    """The engine method. ``Q``/``width`` track the basis of the stream entering the next layer.

    ``basis``: how an interface's kept subspace is chosen.  ``None`` is SliceGPT's PCA (the
    eigenvectors of the Gram matrix, largest first, which are basis-independent); another choice
    (DOTResize's transport map) sees the Gram matrix in the original coordinates of the stream,
    because its "neurons" are those coordinates, and the result is mapped back into the current
    basis.  The rest of the procedure — shortcuts, norms, sequential calibration — is the same.
    """

    def __init__(self, model: nn.Module, spec: ArchSpec, plan: WidthPlan, damping: float,
                 basis: Basis | None = None) -> None:
        self.model, self.spec, self.plan, self.damping = model, spec, plan, damping
        self.basis = basis
        self.hidden = model.config.hidden_size
        self.q: torch.Tensor | None = None
        self.width = self.hidden
        self.eigenvalues: list[list[float]] = []

    def _pca(self, gram: Gram, width: int, current: torch.Tensor | None = None) -> torch.Tensor:
        """The rotation ``V`` (in the basis ``current`` of the Gram matrix) whose first ``width``
        columns are kept."""
        if self.basis is None:
            vals, vecs = pca_from_gram(gram.matrix, self.damping)
            self.eigenvalues.append((vals / gram.count).tolist())
            return vecs
        g = gram.matrix.double()
        if current is not None:
            cur = current.double().to(g.device)
            g = cur @ g @ cur.T
        full = self.basis(g, width).to(g.device, torch.float64)
        vecs = full if current is None else cur.T @ full
        kept = vecs[:, :width]
        self.eigenvalues.append((torch.diagonal(kept.T @ gram.matrix.double() @ kept) / gram.count).tolist())
        return vecs

    def begin(self, engine: CalibrationEngine) -> None:
        gram = Gram()
        for x in engine.inputs:
            gram.add(x.to(engine.device))
        d0 = self.plan.attn_in[0]
        q = self._pca(gram, d0)
        for emb in self.spec.embeddings(self.model):
            new = rotate_reader(emb.weight.data, q, d0, out_dtype=emb.weight.dtype)
            emb.weight = nn.Parameter(new.contiguous(), requires_grad=emb.weight.requires_grad)
            emb.embedding_dim = d0
        engine.map_inputs(lambda x: (x.double() @ q[:, :d0].to(x.device)).to(x.dtype))
        self.q, self.width = q, d0

    #: what a resumed streaming run restores (see :class:`slicekit.calibration.Method`)
    CARRY = ("q", "width", "eigenvalues")

    def process_layer(self, step: LayerStep) -> None:
        make_layer_invariant(self.model, step.index, self.spec)
        layer, b, i, hidden = step.layer, self.spec.block, step.index, self.hidden
        mlp_readers, mlp_writers = mlp_stream_children(self.spec)
        q_in, d_in = self.q.to(step.device), self.width
        d_out = self.plan.out_width(i)
        readers = b.attn_readers + (mlp_readers if b.parallel else ())
        _rotate_readers(layer, readers, q_in, d_in)
        _set_norm(layer, b.attn_norm, d_in, hidden)
        if b.parallel:
            _set_norm(layer, b.mlp_norm, d_in, hidden)
        # Each half-block's Gram is taken in the basis of its input rotation (see _WriterInBasis):
        # V holds the eigenvectors in that basis, so the new rotation is Q·V, the shortcut is the
        # d_in × d_out corner of V, and the kept stream is the outputs times V[:, :d_out].
        _set_shortcut(layer, "attn_shortcut", None)
        q_cur, d_cur = q_in, d_in
        inputs = None
        if not b.parallel:
            # One pass over each half of the block instead of two passes over the whole block: the
            # stream after the attention residual is kept, and projected once its rotation is known.
            writer = _WriterInBasis(layer, (b.attn_writer,), q_in)
            obs = step.forward(grams=[":output"], keep_outputs=True, call=_attn_half)
            d_mid = self.plan.mlp_in[i]
            v = self._pca(obs.grams[":output"], d_mid, q_in)
            q_cur, d_cur = q_in @ v, d_mid
            writer.finish(q_cur, d_mid)
            _set_shortcut(layer, "attn_shortcut", v[:d_in, :d_mid])
            if b.experts is None:
                _rotate_readers(layer, mlp_readers, q_cur, d_mid)
            else:  # see _PaddedExperts: full-width readers until the MLP's output basis is known
                _rotate_readers(layer, mlp_readers, q_cur, hidden)
                padded = _PaddedExperts(layer, b.mlp[0], hidden)
            _set_norm(layer, b.mlp_norm, d_mid, hidden)
            _set_shortcut(layer, "mlp_shortcut", None)
            inputs = _project(obs.outputs, v, d_mid)
            del obs
        writers = (b.attn_writer, *mlp_writers) if b.parallel else mlp_writers
        writer = _WriterInBasis(layer, writers, q_cur)
        obs = step.forward(grams=[":output"], keep_outputs=True, inputs=inputs,
                           call=None if b.parallel else _mlp_half)
        del inputs
        if b.experts is not None and not b.parallel:
            padded.finish(mlp_readers, d_cur)
        v = self._pca(obs.grams[":output"], d_out, q_cur)
        q_out = q_cur @ v
        writer.finish(q_out, d_out)
        _set_shortcut(layer, "attn_shortcut" if b.parallel else "mlp_shortcut", v[:d_cur, :d_out])
        step.set_next_inputs(_project(obs.outputs, v, d_out))
        self.q, self.width = q_out.cpu(), d_out

    def end(self, engine: CalibrationEngine) -> None:
        head = self.model.get_submodule(self.spec.head)
        set_linear(head, rotate_reader(linear_weight(head), self.q, self.width, out_dtype=head.weight.dtype))
        parent, _, name = self.spec.final_norm.rpartition(".")
        old = self.model.get_submodule(self.spec.final_norm)
        setattr(self.model.get_submodule(parent), name, UnitRMSNorm(self.width, self.hidden, old.eps))


def plan(model: nn.Module, config: SliceGPTConfig, fractions: list[float]) -> Plan:
    """The shape after invariance, rotation and slicing at ``fractions`` — no weight touched.

    Invariance unties the head, replaces every norm by a weightless one and folds LayerNorm
    biases into the readers (:func:`slicekit.invariance.invariant_plan`); slicing then narrows
    every reader and writer of the stream and adds the shortcut matrices (square where the
    widths agree, rectangular where a schedule changes the width).
    """
    if config.rotation == "global":
        from slicekit.methods.slicegpt.global_rotation import plan_global

        return plan_global(model, config, fractions)
    spec = get_arch(model.config)
    b = spec.block
    hidden = model.config.hidden_size
    widths = plan_widths(config, spec, hidden, fractions)
    p = invariant_plan(model, spec)
    n = len(widths.attn_in)
    for path in [spec.token_embedding] + ([spec.position_embedding] if spec.position_embedding else []):
        p.resize_embedding(path, widths.attn_in[0])
    for i in range(n):
        d_in, d_mid, d_out = widths.attn_in[i], widths.mlp_in[i], widths.out_width(i)
        def at(name: str, i: int = i) -> str:
            return spec.layer_path(i, name)

        for name in b.attn_readers:
            p.resize_linear(at(name), in_features=d_in)
        p.modules[at(b.attn_norm)]["dim"] = d_in
        if b.parallel:
            if b.mlp_norm is not None:
                p.modules[at(b.mlp_norm)]["dim"] = d_in
            p.resize_linear(at(b.attn_writer), out_features=d_out)
            p.set_mlp_stream(i, read=d_in, write=d_out)
            p.blocks[spec.layer_path(i)].update(attn_shortcut=[d_in, d_out], mlp_shortcut=None)
        else:
            p.resize_linear(at(b.attn_writer), out_features=d_mid)
            p.modules[at(b.mlp_norm)]["dim"] = d_mid
            p.set_mlp_stream(i, read=d_mid, write=d_out)
            p.blocks[spec.layer_path(i)].update(attn_shortcut=[d_in, d_mid], mlp_shortcut=[d_mid, d_out])
    p.modules[spec.final_norm]["dim"] = widths.head_in
    p.resize_linear(spec.head, in_features=widths.head_in)
    return p


def apply(model: nn.Module, plan_: Plan, config: SliceGPTConfig, ctx: MethodContext) -> dict:
    """Make ``model`` invariant, then rotate and slice it in place, layer by layer."""
    if config.rotation == "global":
        from slicekit.methods.slicegpt.global_rotation import apply_global

        return apply_global(model, plan_, config, ctx)
    spec = get_arch(model.config)
    hidden = model.config.hidden_size
    widths = plan_widths(config, spec, hidden, ctx.fractions)
    make_invariant(model, spec, layers=False)  # each layer is made invariant at its turn
    method = RotateAndSlice(model, spec, widths, config.damping)
    ctx.engine(model).run(method, desc="slicegpt")
    n = len(widths.attn_in)
    summary = {
        "hidden_size": hidden,
        "schedule": config.schedule,
        "attn_in_widths": widths.attn_in,
        "mlp_in_widths": widths.mlp_in,
        "head_in_width": widths.head_in,
        "mean_width": sum(widths.attn_in) / n,
        "mean_slicing": 1.0 - sum(widths.attn_in) / (n * hidden),
    }
    if config.schedule == "dynamic":
        summary["slice_base"] = effective_slice_base(sum(ctx.fractions) / n, config.slice_base)
    return summary


def schedule_kwargs(model: nn.Module, config: SliceGPTConfig) -> dict:
    """Scored schedules are rounded to realisable widths with the constant schedule's total."""
    return {"full_width": model.config.hidden_size, "multiple": width_multiple(config, get_arch(model.config))}

