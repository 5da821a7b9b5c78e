"""Which rows and columns FASP removes together: the interlinked pairs of one decoder layer.

Removing input column ``j`` of the second matrix of a pair makes row ``j`` (and bias ``j``) of the
first matrix dead, so both go at once:

- **MLP**: intermediate neuron ``j`` = row ``j`` of every ``mlp_up`` linear (gate and up; both
  halves of a fused ``gate_up_proj``, i.e. rows ``j`` and ``F + j``) ↔ column ``j`` of ``mlp_down``.
- **Attention**: a *KV group* = one key/value head, its rows of W_K and W_V, the rows of W_Q of
  every query head that reads it, and the matching columns of W_O (see the package docstring for
  why whole groups).  With multi-head attention a group is one head.

The module attributes the installed transformers attention reads at run time, and families
whose heads cannot be removed, are facts of the architecture table (:mod:`slicekit.arch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slicekit.arch import ArchSpec, attention_info
from slicekit.methods.common import mlp_width_of as common_mlp_width_of
from slicekit.shape import Plan


@dataclass(frozen=True)
class HeadGroups:
    """The removable attention units of one layer (identical for every layer of a model)."""

    readers: tuple[str, ...]          # linears whose rows go (relative to the layer)
    writer: str                        # the linear whose columns go
    rows: list[dict[str, list[int]]]   # per group: reader -> row indices
    cols: list[list[int]]              # per group: writer column indices
    heads_per_group: int
    head_dim: int

    @property
    def n_groups(self) -> int:
        return len(self.cols)


def head_groups(config, spec: ArchSpec) -> tuple[HeadGroups | None, str | None]:
    """The KV groups of the family, or ``(None, reason)`` when heads cannot be removed."""
    if spec.heads_fixed_reason:
        return None, spec.heads_fixed_reason
    info = attention_info(config)
    b = spec.block
    hd, gs, nkv, nh = info.head_dim, info.group_size, info.num_kv_heads, info.num_heads
    rows: list[dict[str, list[int]]] = []
    cols: list[list[int]] = []
    for g in range(nkv):
        q = list(range(g * gs * hd, (g + 1) * gs * hd))
        kv = list(range(g * hd, (g + 1) * hd))
        if b.qkv_layout == "separate":
            q_name, k_name, v_name = b.attn_readers
            rows.append({q_name: q, k_name: kv, v_name: kv})
        elif b.qkv_layout == "concat":  # [Q (nh·hd) | K (nkv·hd) | V (nkv·hd)]
            (name,) = b.attn_readers
            k_off, v_off = nh * hd, nh * hd + nkv * hd
            rows.append({name: q + [k_off + i for i in kv] + [v_off + i for i in kv]})
        elif b.qkv_layout == "neox":  # per head: [q (hd) | k (hd) | v (hd)]
            if gs != 1:
                return None, "GPT-NeoX layout with grouped KV heads is not supported"
            (name,) = b.attn_readers
            rows.append({name: list(range(g * 3 * hd, (g + 1) * 3 * hd))})
        else:
            return None, f"unknown qkv layout {b.qkv_layout!r}"
        cols.append(q)
    return HeadGroups(tuple(b.attn_readers), b.attn_writer, rows, cols, gs, hd), None


def _row_cost(spec: dict) -> int:
    """Parameters in one row of a planned linear (its inputs plus its bias entry)."""
    return int(spec["in_features"]) + (1 if spec.get("bias") else 0)


def neuron_cost(plan: Plan, layer: int) -> int:
    """Decoder parameters removed with one MLP intermediate neuron (the down bias stays), read
    off the plan.  For a mixture-of-experts layer one unit of width is one neuron in *every*
    routed expert: a gate row, an up row and a down column of ``D`` each, ``3·E·D`` in all (the
    router and Qwen2-MoE's shared expert keep their size)."""
    arch = plan.arch
    b = arch.block
    if b.experts is not None:
        spec = plan.modules[arch.layer_path(layer, b.experts.experts)]
        return 3 * int(spec["num_experts"]) * int(spec["in_features"])
    up = sum(_row_cost(plan.linear(arch.layer_path(layer, n))) * b.mlp_up_fused for n in b.mlp_up)
    return up + int(plan.linear(arch.layer_path(layer, b.mlp_down))["out_features"])


def group_cost(plan: Plan, layer: int, groups: HeadGroups) -> int:
    """Decoder parameters removed with one KV group (the output bias stays), read off the plan."""
    arch = plan.arch
    rows = sum(len(groups.rows[0][n]) * _row_cost(plan.linear(arch.layer_path(layer, n))) for n in groups.readers)
    return rows + len(groups.cols[0]) * int(plan.linear(arch.layer_path(layer, groups.writer))["out_features"])


def mlp_width_of(layer: nn.Module, spec: ArchSpec) -> int:
    """Intermediate neurons of a layer's MLP (of each routed expert, for a mixture of experts)."""
    return common_mlp_width_of(layer, spec)


def keep_rows_mlp(keep: torch.Tensor, width: int, fused: int) -> torch.Tensor:
    """Rows of an ``mlp_up`` linear to keep: ``keep`` in each of its ``fused`` stacked halves."""
    return torch.cat([keep + k * width for k in range(fused)])
