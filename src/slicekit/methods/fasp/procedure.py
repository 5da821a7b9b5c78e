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
   of down), restore the kept W_down columns by least squares — for a mixture of experts, per
   routed expert on the tokens routed to it (:mod:`slicekit.methods.fasp.experts`);
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
from slicekit.linalg import anchored_gram, column_scores, lstsq_restore, reconstruction_error
from slicekit.methods import MethodContext
from slicekit.methods.common import EXPERT_WIDTH_MULTIPLE
from slicekit.methods.fasp.config import FASPConfig
from slicekit.methods.fasp.experts import ExpertGrams, prune_experts
from slicekit.methods.fasp.structure import (
    HeadGroups,
    group_cost,
    head_groups,
    keep_rows_mlp,
    mlp_width_of,
    neuron_cost,
)
from slicekit.shape import Plan, layer_counts


@dataclass
class LayerPlan:
    """How many units layer ``l`` loses."""

    groups: int
    neurons: int


def plan_units(base: Plan, config: FASPConfig, fractions: list[float], groups: HeadGroups | None) -> list[LayerPlan]:
    """Translate per-layer shares of parameters into whole KV groups and MLP neurons.

    Layer ``l`` should lose ``s_l·P_l`` parameters (``P_l`` its parameters by the one counter, so
    the shares of a constant schedule add up to ``S`` of the decoder).  Groups first
    (``attention_sparsity``, else ``floor(s_l·groups)``; at least one group always stays), then
    MLP neurons fill the rest of the budget in multiples of ``round_to``.  Equal layers get equal
    numbers (so a uniform schedule gives uniform widths); otherwise the rounding is distributed
    by largest remainder so that the total is as close to the budget as the multiples allow.
    Routed experts lose neurons in multiples of ``lcm(round_to, 8)`` (see
    :data:`~slicekit.methods.common.EXPERT_WIDTH_MULTIPLE`).
    """
    q = config.round_to
    if base.arch.block.experts is not None:  # transformers' grouped-matmul experts kernel: aligned rows
        q = math.lcm(q, EXPERT_WIDTH_MULTIPLE)
    wanted_groups, real_neurons, widths = [], [], []
    for i, (p_l, s) in enumerate(zip(layer_counts(base), fractions, strict=True)):
        nc = neuron_cost(base, i)
        gc = group_cost(base, i, groups) if groups is not None else 0
        if groups is None or config.mlp_only:
            g = 0
        elif config.attention_sparsity is not None:
            g = math.floor(config.attention_sparsity * groups.n_groups + 0.5)
        else:
            g = math.floor(s * groups.n_groups + 1e-9)
        if groups is not None:
            g = min(g, groups.n_groups - 1)
        wanted_groups.append(g)
        widths.append(base.mlp_width(i))
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
    return [LayerPlan(groups=g, neurons=c * q) for g, c in zip(wanted_groups, chosen, strict=True)]


def _groups(model: nn.Module, config: FASPConfig) -> tuple[HeadGroups | None, str | None]:
    if config.mlp_only:
        return None, "mlp_only"
    return head_groups(model.config, get_arch(model.config))


def plan(model: nn.Module, config: FASPConfig, fractions: list[float]) -> Plan:
    """The shape after removing each layer's planned KV groups and MLP neurons."""
    spec = get_arch(model.config)
    groups, _ = _groups(model, config)
    p = Plan.of(model)
    for i, lp in enumerate(plan_units(p, config, fractions, groups)):
        if lp.neurons:
            p.set_mlp_width(i, p.mlp_width(i) - lp.neurons)
        if lp.groups:
            kept = groups.n_groups - lp.groups
            for name in groups.readers:
                rows = len(groups.rows[0][name])
                p.resize_linear(spec.layer_path(i, name), out_features=kept * rows)
            p.resize_linear(spec.layer_path(i, groups.writer), in_features=kept * len(groups.cols[0]))
            values = {"heads": kept * groups.heads_per_group, "q_width": kept * groups.heads_per_group * groups.head_dim}
            for attr, what in spec.head_count_attributes:
                p.attributes[f"{spec.attn_path(i)}.{attr}"] = values[what]
    return p


def unsupported(model: nn.Module, config: FASPConfig) -> str | None:
    """Why FASP cannot compress ``model``, or None.  Mixture-of-experts MLPs are pruned per expert
    (:mod:`slicekit.methods.fasp.experts`), so the table's MLP refusal (fused 3-D experts, which
    linear-only MLP surgery cannot narrow) does not apply to them."""
    spec = get_arch(model.config)
    fixed = spec.mlp_fixed_reason
    if fixed and spec.block.experts is None:
        return fixed
    groups, reason = _groups(model, config)
    if groups is None and not config.mlp_only and config.attention_sparsity:
        return f"its attention heads cannot be removed ({reason}); use mlp_only"
    return None


def _rel(err: float, total: float) -> float:
    return err / total if total > 0 else 0.0


class PruneAndRestore:
    """The engine method; ``self.records`` collects per-layer widths and reconstruction errors."""

    def __init__(self, model: nn.Module, spec: ArchSpec, plan: list[LayerPlan], groups: HeadGroups | None,
                 config: FASPConfig) -> None:
        self.model, self.spec, self.plan, self.groups, self.config = model, spec, plan, groups, config
        self.records: list[dict[str, Any]] = []
        self.attributes: dict[str, Any] = {}

    CARRY = ("records",)  # what a resumed streaming run restores

    def begin(self, engine: CalibrationEngine) -> None:
        pass

    def end(self, engine: CalibrationEngine) -> None:
        pass

    # ------------------------------------------------------------ restoration of one writer
    def _restored(self, w: torch.Tensor, g: torch.Tensor, tokens: int,
                  keep: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The kept columns ``keep`` of a writer ``w`` (out × in) after restoration on the Gram
        ``g`` of its input over ``tokens`` tokens, and the unnormalised errors (``error``,
        ``error_plain``, ``total``) with the ridge used (``damping``)."""
        w = w.double()
        keep = keep.to(g.device)
        plain = w[:, keep.to(w.device)]
        damping = self.config.damping
        if damping is None:  # ridge ∝ kept columns per token: strong for few tokens, vanishing for many
            damping = keep.numel() / max(tokens, 1)
        new = lstsq_restore(w, anchored_gram(g, keep, damping), keep) if self.config.restore else plain
        errors = {"total": reconstruction_error(w, g, torch.arange(w.shape[1], device=g.device), torch.zeros_like(w)),
                  "error_plain": reconstruction_error(w, g, keep, plain),
                  "error": reconstruction_error(w, g, keep, new),
                  "damping": damping if self.config.restore else None}
        return new.to(w.device), errors

    def _restore(self, lin: nn.Module, gram: Gram, keep: torch.Tensor, rec: dict, key: str) -> None:
        w = linear_weight(lin)
        new, err = self._restored(w, gram.matrix, gram.count, keep)
        rec[f"{key}_error_plain"] = _rel(err["error_plain"], err["total"])
        rec[f"{key}_error"] = _rel(err["error"], err["total"])
        rec[f"{key}_damping"] = err["damping"]
        set_linear(lin, new, linear_bias(lin))

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
        for attr, what in self.spec.head_count_attributes:
            setattr(layer.get_submodule(self.spec.block.attn), attr, values[what])
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

    def _prune_experts(self, step: LayerStep, stats: ExpertGrams, n_remove: int, rec: dict) -> None:
        rec.update(prune_experts(step.layer, self.spec, stats, n_remove, self._restored))

    def process_layer(self, step: LayerStep) -> None:
        b, lp = self.spec.block, self.plan[step.index]
        experts = ExpertGrams(step.layer, self.spec) if lp.neurons and b.experts is not None else None
        attn_point = f"{b.attn_writer}:input"
        mlp_point = experts.point if experts is not None else f"{b.mlp_down}:input"
        rec: dict[str, Any] = {"layer": step.index, "mlp_width": mlp_width_of(step.layer, self.spec)}
        if self.groups is not None:
            rec.update(kv_groups=self.groups.n_groups, heads=self.groups.n_groups * self.groups.heads_per_group)
        first = [attn_point] if lp.groups else []
        mlp_first = bool(lp.neurons) and (b.parallel or not lp.groups)  # the MLP input is already final
        if mlp_first and experts is None:
            first.append(mlp_point)
        observers = {mlp_point: experts.observe} if mlp_first and experts is not None else None
        obs = step.forward(grams=first, observers=observers) if first or observers else None
        if lp.groups:
            self._prune_attention(step, obs.grams[attn_point], lp.groups, rec)
        if lp.neurons and experts is not None:
            if not mlp_first:
                step.forward(observers={mlp_point: experts.observe})
            self._prune_experts(step, experts, lp.neurons, rec)
        elif lp.neurons:
            if mlp_point not in obs.grams:
                obs = step.forward(grams=[mlp_point])
            self._prune_mlp(step, obs.grams[mlp_point], lp.neurons, rec)
        self.records.append(rec)


@torch.no_grad()
def apply(model: nn.Module, plan_: Plan, config: FASPConfig, ctx: MethodContext) -> dict[str, Any]:
    """Prune ``model`` in place, layer by layer on sequential calibration, as planned."""
    spec = get_arch(model.config)
    groups, reason = _groups(model, config)
    units = plan_units(Plan.of(model), config, ctx.fractions, groups)
    method = PruneAndRestore(model, spec, units, groups, config)
    ctx.engine(model).run(method, desc="fasp")
    return {
        "attention": (f"whole KV groups removed: {sum(p.groups for p in units)} in all" if groups is not None
                      else f"kept whole ({reason})"),
        "mlp_widths": [r["mlp_width"] for r in method.records],
        "heads": [r.get("heads") for r in method.records],
        "layers": method.records,
    }
