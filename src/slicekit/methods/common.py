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
    return int(linear_weight(layer.get_submodule(spec.block.mlp_down)).shape[1])


def round_mlp_width(width: int, fraction: float, round_to: int) -> int:
    """``(1 − fraction)·width`` rounded to a multiple of ``round_to`` (at least one multiple)."""
    if not 0.0 <= fraction < 1.0 or math.isnan(fraction):
        raise SlicekitError(f"an MLP fraction must be in [0, 1) (got {fraction})")
    if fraction == 0.0:
        return width
    kept = round((1.0 - fraction) * width / round_to) * round_to
    return int(min(width, max(round_to, kept)))


def plan_mlp_widths(model: nn.Module, fractions: list[float], round_to: int) -> Plan:
    """The plan in which layer ``l`` keeps ``(1 − fractions[l])`` of its MLP neurons (rounded);
    everything else unchanged.  Uniform fractions give uniform widths, which save with a plain
    config of the original architecture."""
    p = Plan.of(model)
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
    """The up linears' weights with fused halves split: each ``width × D``."""
    b = spec.block
    width = int(linear_weight(layer.get_submodule(b.mlp_down)).shape[1])
    out = []
    for name in b.mlp_up:
        w = linear_weight(layer.get_submodule(name))
        out += [w[k * width:(k + 1) * width] for k in range(b.mlp_up_fused)]
    return out


def arch_of(model: nn.Module) -> ArchSpec:
    return get_arch(model.config)
