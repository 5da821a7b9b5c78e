"""Pieces several methods share: MLP-width plans and the row/column surgery that realises them.

A method that narrows MLPs (FASP's MLP-only mode, PruneNet, DOTResize's MLP merge) plans widths
with :func:`plan_mlp_widths` and applies a choice of neurons with :func:`keep_mlp_neurons`, so
they agree on what a fraction means, how widths are rounded and which rows of a fused matrix go.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slicekit.arch import ArchSpec, get_arch, linear_bias, linear_weight, set_linear
from slicekit.errors import SlicekitError
from slicekit.shape import Plan


def mlp_width_of(layer: nn.Module, spec: ArchSpec) -> int:
    """Intermediate neurons of a layer's MLP (of each routed expert, for a mixture of experts)."""
    if spec.block.experts is not None:
        return int(expert_weights(layer, spec)[2].shape[-1])
    return int(linear_weight(layer.get_submodule(spec.block.mlp_down)).shape[1])


def round_mlp_width(width: int, fraction: float, round_to: int) -> int:
    """``(1 − fraction)·width`` rounded to a multiple of ``round_to`` (at least one multiple)."""
    if not 0.0 <= fraction < 1.0 or math.isnan(fraction):
        raise SlicekitError(f"an MLP fraction must be in [0, 1) (got {fraction})")
    if fraction == 0.0:
        return width
    kept = round((1.0 - fraction) * width / round_to) * round_to
    return int(min(width, max(round_to, kept)))


#: Routed experts lose neurons in multiples of this (with ``round_to``: their lcm).  transformers
#: runs the experts with a grouped matrix product whose kernel needs rows aligned to 16 bytes; a
#: width that is not a multiple of 8 fails there in 16-bit (4 in float32) with "strides should be
#: multiple of 16 bytes" (seen on CPU, torch 2.13), so expert widths of real models (multiples of 8)
#: stay multiples of 8.
EXPERT_WIDTH_MULTIPLE = 8


def mlp_multiple(arch: ArchSpec, round_to: int) -> int:
    """The multiple MLP widths are rounded to: ``round_to``, or ``lcm(round_to, 8)`` for routed
    experts (:data:`EXPERT_WIDTH_MULTIPLE`)."""
    return math.lcm(round_to, EXPERT_WIDTH_MULTIPLE) if arch.block.experts is not None else round_to


def plan_mlp_widths(model: nn.Module, fractions: list[float], round_to: int) -> Plan:
    """The plan in which layer ``l`` keeps ``(1 − fractions[l])`` of its MLP neurons (rounded);
    everything else unchanged.  Uniform fractions give uniform widths, which save with a plain
    config of the original architecture.  Routed experts round to :func:`mlp_multiple`."""
    p = Plan.of(model)
    round_to = mlp_multiple(p.arch, round_to)
    for i, f in enumerate(fractions):
        width = p.mlp_width(i)
        p.set_mlp_width(i, round_mlp_width(width, f, round_to))
    return p


def keep_rows_mlp(keep: torch.Tensor, width: int, fused: int) -> torch.Tensor:
    """Rows of an ``mlp_up`` linear to keep: ``keep`` in each of its ``fused`` stacked halves."""
    return torch.cat([keep + k * width for k in range(fused)])


def keep_mlp_neurons(layer: nn.Module, spec: ArchSpec, keep: torch.Tensor,
                     down_weight: torch.Tensor | None = None) -> None:
    """Keep the intermediate neurons ``keep`` of a layer's MLP: rows of every up linear (both
    halves of a fused one), columns of the down linear — or ``down_weight`` (out × len(keep)) in
    their place when a method re-fits them.  The down bias is unchanged."""
    b = spec.block
    if b.experts is not None:
        keep_expert_neurons(layer, spec, keep, down_weight)
        return
    down = layer.get_submodule(b.mlp_down)
    width = int(linear_weight(down).shape[1])
    keep = torch.as_tensor(keep, dtype=torch.long).flatten().sort().values
    if keep.numel() == 0 or int(keep.max()) >= width or keep.unique().numel() != keep.numel():
        raise ValueError(f"invalid neuron selection for an MLP of width {width}")
    for name in b.mlp_up:
        lin = layer.get_submodule(name)
        w, bias = linear_weight(lin), linear_bias(lin)
        rows = keep_rows_mlp(keep.to(w.device), width, b.mlp_up_fused)
        set_linear(lin, w[rows].clone(), None if bias is None else bias[rows].clone(), keep_bias=bias is not None)
    wd = linear_weight(down)
    new = wd[:, keep.to(wd.device)].clone() if down_weight is None else down_weight
    set_linear(down, new.to(dtype=wd.dtype, device=wd.device), linear_bias(down))


def mlp_up_weights(layer: nn.Module, spec: ArchSpec) -> list[torch.Tensor]:
    """The up linears' weights with fused halves split: each ``width × D`` (for a mixture of
    experts each is ``E × width × D``: the experts' gate and up, see :func:`expert_weights`)."""
    b = spec.block
    if b.experts is not None:
        return list(expert_weights(layer, spec)[:2])
    width = int(linear_weight(layer.get_submodule(b.mlp_down)).shape[1])
    out = []
    for name in b.mlp_up:
        w = linear_weight(layer.get_submodule(name))
        out += [w[k * width:(k + 1) * width] for k in range(b.mlp_up_fused)]
    return out


# ------------------------------------------------------------------ mixture-of-experts MLPs

def expert_weights(layer: nn.Module, spec: ArchSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A mixture-of-experts layer's ``(gate, up, down)``: ``E × F × D``, ``E × F × D``, ``E × D × F``
    (views of the fused 3-D parameters: gate rows first, then up rows)."""
    e = spec.block.experts
    mod = layer.get_submodule(e.experts)
    gate_up, down = getattr(mod, e.gate_up).data, getattr(mod, e.down).data
    width = down.shape[-1]
    return gate_up[:, :width], gate_up[:, width:], down


def keep_expert_neurons(layer: nn.Module, spec: ArchSpec, keep: torch.Tensor,
                        down_weight: torch.Tensor | None = None) -> None:
    """Keep ``k`` intermediate neurons in every routed expert of a layer: one width for all experts
    (one ``experts`` entry in the plan, one config key in a plain checkpoint), each expert its own
    neurons.  ``keep``: ``E × k`` (row ``e``: expert ``e``'s neurons) or ``k`` (the same for all).
    Rows ``j`` and ``F + j`` of the expert's gate/up, column ``j`` of its down — or
    ``down_weight`` (``E × D × k``) in its place.  Router and shared expert are unchanged."""
    from slicekit.modeling_slicekit import sync_moe_dims

    e = spec.block.experts
    mod = layer.get_submodule(e.experts)
    gate, up, down = expert_weights(layer, spec)
    n_exp, width = gate.shape[0], gate.shape[1]
    keep = torch.as_tensor(keep, dtype=torch.long)
    if keep.dim() == 1:
        keep = keep.expand(n_exp, -1)
    keep = keep.sort(dim=-1).values.to(gate.device)
    if (keep.dim() != 2 or keep.shape[0] != n_exp or keep.shape[1] == 0 or int(keep.min()) < 0
            or int(keep.max()) >= width or bool((keep[:, 1:] == keep[:, :-1]).any())):
        raise ValueError(f"invalid neuron selection for {n_exp} experts of width {width}")
    rows = keep[:, :, None].expand(-1, -1, gate.shape[2])
    new_gate_up = torch.cat([gate.gather(1, rows), up.gather(1, rows)], dim=1)
    new_down = down.gather(2, keep[:, None, :].expand(-1, down.shape[1], -1)) if down_weight is None else down_weight
    for name, value in ((e.gate_up, new_gate_up), (e.down, new_down)):
        ref = getattr(mod, name)
        setattr(mod, name, nn.Parameter(value.to(dtype=ref.dtype, device=ref.device).contiguous(),
                                        requires_grad=ref.requires_grad))
    sync_moe_dims(mod)


def select_expert_neurons(layer: nn.Module, spec: ArchSpec, k: int, selection: str, seed: int = 0) -> torch.Tensor:
    """``E × k`` neurons to keep in each routed expert, by the weight-only baselines:
    ``magnitude`` (each expert's neurons scored by PruneNet's
    :func:`~slicekit.methods.prunenet.policy.magnitude_rows`: gate row × up row × down column
    norms) or ``random`` (seeded, a different draw per expert)."""
    from slicekit.methods.prunenet.policy import magnitude_rows

    gate, up, down = expert_weights(layer, spec)
    n_exp, width = gate.shape[0], gate.shape[1]
    if not 0 < k <= width:
        raise SlicekitError(f"cannot keep {k} of {width} neurons per expert")
    if selection == "magnitude":
        return torch.stack([magnitude_rows([gate[i].double().cpu(), up[i].double().cpu()], down[i].double().cpu(), k)
                            for i in range(n_exp)])
    if selection == "random":
        g = torch.Generator().manual_seed(int(seed))
        return torch.stack([torch.randperm(width, generator=g)[:k].sort().values for _ in range(n_exp)])
    raise SlicekitError(f"unknown expert neuron selection {selection!r} (random or magnitude)")


def arch_of(model: nn.Module) -> ArchSpec:
    return get_arch(model.config)
