"""DOTResize at the MLP width, as a calibration-engine method.

Per decoder layer, on inputs that carry the compression of every earlier layer: one pass takes
the float64 Gram of the MLP intermediate activations (the down projection's input), the
transport core (:mod:`slicekit.methods.dotresize.transport`) chooses ``k`` target neurons and
merges the others into them through an entropic optimal-transport plan (Sinkhorn, POT), the up
rows of the targets are kept and the down projection re-projected through the plan.  With
``merge="delete"`` the same targets are kept and the rest dropped — the baseline the paper's
claim "merging beats pruning" is measured against.

The output is the original architecture with narrower MLPs: uniform widths save with a plain
config.

``width="hidden"``: the residual width of the paper.  On the rotation-invariant model it reduces
to SliceGPT's procedure with the orthonormal factor ``Q`` of the transport plan ``T = Q·R`` in
place of the PCA basis: the triangular factor cancels in every weight (derivation in
:func:`slicekit.methods.dotresize.transport.hidden_transform`).  The plan is computed on the
stream's *original* coordinates at every interface (they are the neurons being merged), and the
procedure, shapes and parameter count are SliceGPT's (:class:`RotateAndSlice` with a ``basis``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slicekit.arch import get_arch, linear_weight, mlp_refusal, rotation_refusal
from slicekit.calibration import CalibrationEngine, LayerStep
from slicekit.invariance import make_invariant
from slicekit.methods import MethodContext
from slicekit.methods.common import (
    expert_weights,
    keep_mlp_neurons,
    mlp_up_weights,
    mlp_width_of,
    plan_mlp_widths,
)
from slicekit.methods.dotresize.config import DOTResizeConfig
from slicekit.methods.experts import ExpertGrams, narrow_experts
from slicekit.methods.slicegpt.config import SliceGPTConfig
from slicekit.methods.slicegpt.procedure import RotateAndSlice, plan_widths
from slicekit.methods.slicegpt.procedure import plan as slicegpt_plan
from slicekit.shape import Plan


def _slicing_config(config: DOTResizeConfig) -> SliceGPTConfig:
    """The SliceGPT settings the residual-width variant shares (widths rounded alike, head kept)."""
    return SliceGPTConfig(round_to=config.round_to, damping=0.0)


def plan(model: nn.Module, config: DOTResizeConfig, fractions: list[float]) -> Plan:
    if config.width == "hidden":
        return slicegpt_plan(model, _slicing_config(config), fractions)
    return plan_mlp_widths(model, fractions, config.round_to)


def unsupported(model: nn.Module, config: DOTResizeConfig) -> str | None:
    """The residual width needs rotation invariance; the MLP width needs prunable MLPs, or routed
    experts, which are merged one expert at a time (:meth:`MergeNeurons._experts`)."""
    if config.width == "hidden":
        return rotation_refusal(model)
    return None if get_arch(model.config).block.experts is not None else mlp_refusal(model)


def transport_basis(config: DOTResizeConfig) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``basis(G, k)`` for :class:`RotateAndSlice`: ``[Q | Q⊥]`` with ``Q = orth(T)`` (``D × k``) from
    the transport plan of the stream's coordinates, completed to an orthogonal matrix (the
    complement is sliced away; any completion gives the same model)."""
    from slicekit.methods.dotresize.transport import hidden_transform

    def basis(gram: torch.Tensor, k: int) -> torch.Tensor:
        d = gram.shape[0]
        if k >= d:  # nothing is merged: the identity keeps the model exactly
            return torch.eye(d, dtype=torch.float64, device=gram.device)
        q, _ = hidden_transform(gram, k, how=config.targets, cost=config.cost, reg=config.reg)
        full, r = torch.linalg.qr(torch.cat([q, torch.eye(d, dtype=q.dtype, device=q.device)], dim=1),
                                  mode="complete")
        sign = torch.sign(torch.diagonal(r[:, :d]))
        sign[sign == 0] = 1.0
        full = full * sign[None, :]
        return torch.cat([q, full[:, k:]], dim=1)  # the plan's own columns first, exactly

    return basis


class MergeNeurons:
    def __init__(self, widths: list[int], config: DOTResizeConfig) -> None:
        self.widths, self.config = widths, config
        self.records: list[dict[str, Any]] = []

    CARRY = ("records",)  # what a resumed streaming run restores

    def begin(self, engine: CalibrationEngine) -> None:
        self.spec = engine.spec

    def end(self, engine: CalibrationEngine) -> None:
        pass

    def process_layer(self, step: LayerStep) -> None:
        from slicekit.methods.dotresize.transport import merge_mlp, select_targets

        spec, layer, c = self.spec, step.layer, self.config
        k = self.widths[step.index]
        if k >= mlp_width_of(layer, spec):
            self.records.append({"layer": step.index, "width": k})
            return
        if spec.block.experts is not None:
            self.records.append({"layer": step.index, "width": k, **self._experts(step, k)})
            return
        point = f"{spec.block.mlp_down}:input"
        gram = step.forward(grams=[point]).grams[point].matrix
        down = layer.get_submodule(spec.block.mlp_down)
        if c.merge == "delete":
            keep = select_targets(gram, k, c.targets, weight=linear_weight(down).double())
            keep_mlp_neurons(layer, spec, keep.cpu())
            self.records.append({"layer": step.index, "width": k})
            return
        ups = [w.double() for w in mlp_up_weights(layer, spec)]
        keep, new_down, info = merge_mlp(ups, linear_weight(down).double(), gram, k, how=c.targets, cost=c.cost,
                                         reg=c.reg, readers=c.readers, compare=False)
        keep_mlp_neurons(layer, spec, keep.cpu(), new_down)
        self.records.append({"layer": step.index, "width": k,
                             **{key: info[key] for key in ("sinkhorn_iterations", "seconds") if key in info}})


    def _experts(self, step: LayerStep, k: int) -> dict[str, Any]:
        """A mixture-of-experts layer: every routed expert merged (or, with ``merge="delete"``,
        pruned) onto ``k`` of its own neurons, on the Gram of the tokens the layer's router sends
        it (:mod:`slicekit.methods.experts`)."""
        from slicekit.methods.dotresize.transport import merge_mlp, select_targets

        spec, layer, c = self.spec, step.layer, self.config
        stats = ExpertGrams.collect(step, spec)
        gate, up, _ = expert_weights(layer, spec)

        def choose(e: int, w: torch.Tensor, g: torch.Tensor, _tokens: int) -> tuple[torch.Tensor, torch.Tensor, None]:
            w = w.double()
            if c.merge == "delete":
                keep = select_targets(g, k, c.targets, weight=w)
                return keep, w[:, keep], None
            keep, new, _ = merge_mlp([gate[e].double(), up[e].double()], w, g, k, how=c.targets, cost=c.cost,
                                     reg=c.reg, readers=c.readers, compare=False)
            return keep, new, None

        record, _ = narrow_experts(layer, spec, stats, k, choose)
        return record


@torch.no_grad()
def apply(model: nn.Module, plan_: Plan, config: DOTResizeConfig, ctx: MethodContext) -> dict[str, Any]:
    if config.width == "hidden":
        return _apply_hidden(model, config, ctx)
    widths = plan_.mlp_widths()
    method = MergeNeurons(widths, config)
    ctx.engine(model).run(method, desc="dotresize")
    return {"width": "mlp", "mlp_widths": widths, "merge": config.merge, "layers": method.records,
            "hidden_size": get_arch(model.config) and model.config.hidden_size}


def _apply_hidden(model: nn.Module, config: DOTResizeConfig, ctx: MethodContext) -> dict[str, Any]:
    """Residual width: SliceGPT's invariance and sequential procedure with the transport basis."""
    spec = get_arch(model.config)
    hidden = model.config.hidden_size
    widths = plan_widths(_slicing_config(config), spec, hidden, ctx.fractions)
    make_invariant(model, spec, layers=False)  # each layer is made invariant at its turn
    method = RotateAndSlice(model, spec, widths, 0.0, basis=transport_basis(config))
    ctx.engine(model).run(method, desc="dotresize-hidden")
    n = len(widths.attn_in)
    retained = [sum(e) for e in method.eigenvalues]
    return {"width": "hidden", "hidden_size": hidden, "attn_in_widths": widths.attn_in,
            "mlp_in_widths": widths.mlp_in, "head_in_width": widths.head_in,
            "mean_slicing": 1.0 - sum(widths.attn_in) / (n * hidden),
            "kept_energy_per_token": retained}


def schedule_kwargs(model: nn.Module, config: DOTResizeConfig) -> dict[str, Any]:
    """Scored schedules of the residual width round like SliceGPT's; the MLP width needs nothing."""
    if config.width == "hidden":
        return {"full_width": model.config.hidden_size, "multiple": config.round_to}
    return {}
