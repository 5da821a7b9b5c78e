"""DOTResize at the MLP width, as a calibration-engine method.

Per decoder layer, on inputs that carry the compression of every earlier layer: one pass takes
the float64 Gram of the MLP intermediate activations (the down projection's input), the
transport core (:mod:`slicekit.methods.dotresize.transport`) chooses ``k`` target neurons and
merges the others into them through an entropic optimal-transport plan (Sinkhorn, POT), the up
rows of the targets are kept and the down projection re-projected through the plan.  With
``merge="delete"`` the same targets are kept and the rest dropped — the baseline the paper's
claim "merging beats pruning" is measured against.

The output is the original architecture with narrower MLPs: uniform widths save with a plain
config.  The residual-width variant of the paper reduces to SliceGPT with the orthonormal factor
of the plan instead of the PCA basis (the triangular factor cancels in every weight; derivation
in :func:`slicekit.methods.dotresize.transport.hidden_transform`) and is not offered separately.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slicekit.arch import get_arch, linear_weight
from slicekit.calibration import CalibrationEngine, LayerStep
from slicekit.methods import MethodContext
from slicekit.methods.common import keep_mlp_neurons, mlp_up_weights, mlp_width_of, plan_mlp_widths
from slicekit.methods.dotresize.config import DOTResizeConfig
from slicekit.shape import Plan


def plan(model: nn.Module, config: DOTResizeConfig, fractions: list[float]) -> Plan:
    return plan_mlp_widths(model, fractions, config.round_to)


class MergeNeurons:
    def __init__(self, widths: list[int], config: DOTResizeConfig) -> None:
        self.widths, self.config = widths, config
        self.records: list[dict[str, Any]] = []

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


@torch.no_grad()
def apply(model: nn.Module, plan_: Plan, config: DOTResizeConfig, ctx: MethodContext) -> dict[str, Any]:
    widths = plan_.mlp_widths()
    method = MergeNeurons(widths, config)
    ctx.engine(model).run(method, desc="dotresize")
    return {"mlp_widths": widths, "merge": config.merge, "layers": method.records,
            "hidden_size": get_arch(model.config) and model.config.hidden_size}
