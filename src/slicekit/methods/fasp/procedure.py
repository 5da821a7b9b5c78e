"""FASP's sequential prune-and-restore, as a calibration-engine method.

Per decoder layer, on inputs that already carry the pruning of every earlier layer:

1. one pass captures the float64 Gram ``G = XᵀX`` of the attention writer's input (W_O) — and of
   the MLP down projection's input when the MLP input does not depend on the attention output
   (parallel blocks, or attention left whole);
2. attention: score each KV group by the FASP column score summed over its W_O columns, drop the
   lowest groups (rows of W_Q/W_K/W_V, columns of W_O), restore the kept W_O columns by least
   squares;
3. MLP (sequential blocks: after a second pass that sees the pruned attention): score each
   intermediate neuron by ``‖W_down[:, j]‖₁·‖X_j‖₂``, drop the lowest (rows of gate/up, columns
   of down), restore the kept W_down columns by least squares;
4. the engine recomputes the layer's outputs, which become the next layer's inputs.

Nothing else changes: no norm is folded, no residual is rotated, every module keeps its class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slicekit.arch import ArchSpec, get_arch, linear_bias, linear_weight, set_linear
from slicekit.calibration import CalibrationEngine, Gram, LayerStep
from slicekit.errors import SlicekitError
from slicekit.linalg import anchored_gram, column_scores, lstsq_restore, reconstruction_error
from slicekit.methods import CompressionContext, CompressionResult
from slicekit.methods.fasp.config import FASPConfig
from slicekit.methods.fasp.structure import (
    HEAD_ATTRIBUTES,
    HeadGroups,
    group_cost,
    head_groups,
    keep_rows_mlp,
    mlp_width_of,
    neuron_cost,
)
from slicekit.models import count_parameters
from slicekit.schedules import needs_scores, resolve_schedule
from slicekit.shape import describe


@dataclass
class LayerPlan:
    """How many units layer ``l`` loses."""

    groups: int
    neurons: int


@dataclass
class Plan:
    layers: list[LayerPlan]
    budget: list[float]          # decoder parameters each layer should lose
    neuron_cost: list[int]
    group_cost: list[int]


def plan_layers(model: nn.Module, spec: ArchSpec, config: FASPConfig, fractions: list[float],
                groups: HeadGroups | None) -> Plan:
    """Translate per-layer shares of parameters into whole KV groups and MLP neurons.

    Layer ``l`` should lose ``s_l·P_l`` parameters (``P_l`` all of its parameters, so the shares
    of a constant schedule add up to ``S`` of the decoder).  Groups first (``attention_sparsity``,
    else ``floor(s_l·groups)``; at least one group always stays), then MLP neurons fill the rest
    of the budget in multiples of ``round_to``.  Equal layers get equal numbers (so a uniform
    schedule gives uniform widths); otherwise the rounding is distributed by largest remainder
    so that the total is as close to the target as the multiples allow.
    """
    layers = spec.layer_list(model)
    q = config.round_to
    budgets, n_costs, g_costs, wanted_groups, real_neurons, widths = [], [], [], [], [], []
    for layer, s in zip(layers, fractions, strict=True):
        p_l = sum(p.numel() for p in layer.parameters())
        budgets.append(s * p_l)
        nc = neuron_cost(layer, spec)
        gc = group_cost(layer, groups) if groups is not None else 0
        n_costs.append(nc)
        g_costs.append(gc)
        if groups is None or config.mlp_only:
            g = 0
        elif config.attention_sparsity is not None:
            g = math.floor(config.attention_sparsity * groups.n_groups + 0.5)
        else:
            g = math.floor(s * groups.n_groups + 1e-9)
        if groups is not None:
            g = min(g, groups.n_groups - 1)
        wanted_groups.append(g)
        width = mlp_width_of(layer, spec)
        widths.append(width)
        real_neurons.append(max(0.0, (s * p_l - g * gc) / nc) if nc else 0.0)

    max_units = [(w - q) // q if w > q else 0 for w in widths]  # keep at least `round_to` neurons
    units = [r / q for r in real_neurons]
    if max(units) - min(units) < 1e-9 and len(set(widths)) == 1:
        chosen = [min(math.floor(u + 0.5), m) for u, m in zip(units, max_units, strict=True)]
    else:
        chosen = [min(math.floor(u), m) for u, m in zip(units, max_units, strict=True)]
        short = round(sum(min(u, m) for u, m in zip(units, max_units, strict=True))) - sum(chosen)
        order = sorted(range(len(units)), key=lambda i: units[i] - math.floor(units[i]), reverse=True)
        for i in order:
            if short <= 0:
                break
            if chosen[i] < max_units[i]:
                chosen[i] += 1
                short -= 1
    plans = [LayerPlan(groups=g, neurons=c * q) for g, c in zip(wanted_groups, chosen, strict=True)]
    return Plan(plans, budgets, n_costs, g_costs)


def _rel(err: float, total: float) -> float:
    return err / total if total > 0 else 0.0


class PruneAndRestore:
    """The engine method; ``self.records`` collects per-layer widths and reconstruction errors."""

    def __init__(self, model: nn.Module, spec: ArchSpec, plan: Plan, groups: HeadGroups | None,
                 config: FASPConfig) -> None:
        self.model, self.spec, self.plan, self.groups, self.config = model, spec, plan, groups, config
        self.records: list[dict[str, Any]] = []
        self.attributes: dict[str, Any] = {}

    def begin(self, engine: CalibrationEngine) -> None:
        pass

    def end(self, engine: CalibrationEngine) -> None:
        pass

    # ------------------------------------------------------------ restoration of one writer
    def _restore(self, lin: nn.Module, gram: Gram, keep: torch.Tensor, rec: dict, key: str) -> None:
        w = linear_weight(lin).double()
        g = gram.matrix
        keep = keep.to(g.device)
        plain = w[:, keep.to(w.device)]
        damping = self.config.damping
        if damping is None:  # ridge ∝ kept columns per token: strong for few tokens, vanishing for many
            damping = keep.numel() / max(gram.count, 1)
        new = lstsq_restore(w, anchored_gram(g, keep, damping), keep) if self.config.restore else plain
        total = reconstruction_error(w, g, torch.arange(w.shape[1], device=g.device), torch.zeros_like(w))
        rec[f"{key}_error_plain"] = _rel(reconstruction_error(w, g, keep, plain), total)
        rec[f"{key}_error"] = _rel(reconstruction_error(w, g, keep, new), total)
        rec[f"{key}_damping"] = damping if self.config.restore else None
        set_linear(lin, new.to(w.device), linear_bias(lin))

    # ------------------------------------------------------------ the two interlinked pairs
    def _prune_attention(self, step: LayerStep, gram: Gram, n_remove: int, rec: dict) -> None:
        gr, layer = self.groups, step.layer
        writer = layer.get_submodule(gr.writer)
        col_score = column_scores(linear_weight(writer), gram.matrix)
        scores = torch.stack([col_score[torch.tensor(c, device=col_score.device)].sum() for c in gr.cols])
        drop = set(torch.argsort(scores)[:n_remove].tolist())
        kept = [g for g in range(gr.n_groups) if g not in drop]
        for name in gr.readers:
            lin = layer.get_submodule(name)
            w, b = linear_weight(lin), linear_bias(lin)
            rows = torch.tensor([r for g in kept for r in gr.rows[g][name]], device=w.device)
            set_linear(lin, w[rows], None if b is None else b[rows])
        cols = torch.tensor([c for g in kept for c in gr.cols[g]], device=gram.matrix.device)
        self._restore(writer, gram, cols, rec, "attn")
        heads = len(kept) * gr.heads_per_group
        values = {"heads": heads, "q_width": heads * gr.head_dim}
        attn_path = f"{self.spec.layers}.{step.index}.{self.spec.block.attn}"
        for attr, what in HEAD_ATTRIBUTES.get(self.model.config.model_type, {}).items():
            setattr(layer.get_submodule(self.spec.block.attn), attr, values[what])
            self.attributes[f"{attn_path}.{attr}"] = values[what]
        rec.update(kv_groups=len(kept), heads=heads, attn_scores=scores.tolist())

    def _prune_mlp(self, step: LayerStep, gram: Gram, n_remove: int, rec: dict) -> None:
        b, layer = self.spec.block, step.layer
        down = layer.get_submodule(b.mlp_down)
        width = mlp_width_of(layer, self.spec)
        scores = column_scores(linear_weight(down), gram.matrix)
        keep = torch.sort(torch.argsort(scores, descending=True)[: width - n_remove]).values
        for name in b.mlp_up:
            lin = layer.get_submodule(name)
            w, bias = linear_weight(lin), linear_bias(lin)
            rows = keep_rows_mlp(keep.to(w.device), width, b.mlp_up_fused)
            set_linear(lin, w[rows], None if bias is None else bias[rows])
        self._restore(down, gram, keep, rec, "mlp")
        rec["mlp_width"] = int(keep.numel())

    def process_layer(self, step: LayerStep) -> None:
        b, lp = self.spec.block, self.plan.layers[step.index]
        attn_point, mlp_point = f"{b.attn_writer}:input", f"{b.mlp_down}:input"
        rec: dict[str, Any] = {"layer": step.index, "mlp_width": mlp_width_of(step.layer, self.spec)}
        if self.groups is not None:
            rec.update(kv_groups=self.groups.n_groups, heads=self.groups.n_groups * self.groups.heads_per_group)
        first = [attn_point] if lp.groups else []
        if lp.neurons and (b.parallel or not lp.groups):
            first.append(mlp_point)
        obs = step.forward(grams=first) if first else None
        if lp.groups:
            self._prune_attention(step, obs.grams[attn_point], lp.groups, rec)
        if lp.neurons:
            if mlp_point not in obs.grams:
                obs = step.forward(grams=[mlp_point])
            self._prune_mlp(step, obs.grams[mlp_point], lp.neurons, rec)
        self.records.append(rec)


def layer_fractions(model: nn.Module, calibration: list[torch.Tensor], config: FASPConfig,
                    ctx: CompressionContext) -> tuple[list[float], dict[str, Any] | None]:
    """Per-layer shares from the shared schedules (scored schedules score the model as given)."""
    n_layers = len(get_arch(model.config).layer_list(model))
    scores = None
    if needs_scores(config.schedule):
        from slicekit.scores import layer_scores

        scores = layer_scores(model, calibration, device=ctx.device, progress=ctx.progress)
    fractions = resolve_schedule(config.schedule, config.sparsity, n_layers, scores=scores)
    return fractions, (None if scores is None else scores.as_dict())


@torch.no_grad()
def compress(model: nn.Module, calibration: list[torch.Tensor], config: FASPConfig,
             ctx: CompressionContext | None = None) -> CompressionResult:
    """Prune ``model`` in place so that about ``config.sparsity`` of its decoder parameters go."""
    ctx = ctx or CompressionContext()
    spec = get_arch(model.config)
    before = count_parameters(model, spec)["decoder"]
    groups, reason = (None, "mlp_only") if config.mlp_only else head_groups(model.config, spec)
    if groups is None and not config.mlp_only and config.attention_sparsity:
        raise SlicekitError(f"cannot remove attention heads of {model.config.model_type}: {reason}")
    fractions, scores = layer_fractions(model, calibration, config, ctx)
    plan = plan_layers(model, spec, config, fractions, groups)
    engine = CalibrationEngine(model, spec, calibration, device=ctx.device, progress=ctx.progress)
    method = PruneAndRestore(model, spec, plan, groups, config)
    engine.run(method, desc="fasp")
    after = count_parameters(model, spec)["decoder"]
    summary = {
        "method": "fasp",
        "target_decoder_share": config.sparsity,
        "achieved_decoder_share": (before - after) / before,
        "decoder_params": {"original": before, "compressed": after},
        "layer_fractions": fractions,
        "attention": (f"whole KV groups removed: {sum(p.groups for p in plan.layers)} in all" if groups is not None
                      else f"kept whole ({reason})"),
        "mlp_widths": [r["mlp_width"] for r in method.records],
        "heads": [r.get("heads") for r in method.records],
        "layers": method.records,
    }
    if scores is not None:
        summary["layer_scores"] = scores
    return CompressionResult(describe(model, method.attributes), summary)
