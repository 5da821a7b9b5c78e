"""Which rows and columns FASP removes together: the interlinked pairs of one decoder layer.

Removing input column ``j`` of the second matrix of a pair makes row ``j`` (and bias ``j``) of the
first matrix dead, so both go at once:

- **MLP**: intermediate neuron ``j`` = row ``j`` of every ``mlp_up`` linear (gate and up; both
  halves of a fused ``gate_up_proj``, i.e. rows ``j`` and ``F + j``) ↔ column ``j`` of ``mlp_down``.
- **Attention**: a *KV group* = one key/value head, its rows of W_K and W_V, the rows of W_Q of
  every query head that reads it, and the matching columns of W_O (see the package docstring for
  why whole groups).  With multi-head attention a group is one head.

Architecture knowledge that the shared table in :mod:`slicekit.arch` does not hold — the module
attributes the installed transformers attention reads at run time — is data here
(:data:`HEAD_ATTRIBUTES`), keyed by ``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slicekit.arch import ArchSpec, attention_info, linear_weight

# model_type -> {attribute of the attention module: what it must equal after pruning}, where the
# value is "heads" (number of kept query heads) or "q_width" (kept query heads × head_dim).
# Families not listed derive head counts from tensor shapes (`view(..., -1, head_dim)`) and keep
# `num_key_value_groups` (unchanged, since whole KV groups go).
HEAD_ATTRIBUTES: dict[str, dict[str, str]] = {
    "opt": {"num_heads": "heads"},
    "gpt2": {"num_heads": "heads", "split_size": "q_width"},
}

# model_type -> why its heads cannot be removed with the unmodified transformers module.
HEADS_UNSUPPORTED: dict[str, str] = {
    "phi3": "Phi3Attention splits its fused qkv_proj at config.num_attention_heads × head_dim, read from "
            "the config object all layers share, so per-layer head counts cannot be expressed",
}


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
    mt = config.model_type
    if mt in HEADS_UNSUPPORTED:
        return None, HEADS_UNSUPPORTED[mt]
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


def _in_cost(lin: nn.Module) -> int:
    """Parameters in one row of a linear (its inputs plus its bias entry)."""
    return int(linear_weight(lin).shape[1]) + (1 if lin.bias is not None else 0)


def neuron_cost(layer: nn.Module, spec: ArchSpec) -> int:
    """Decoder parameters removed with one MLP intermediate neuron (the down bias stays)."""
    b = spec.block
    up = sum(_in_cost(layer.get_submodule(n)) * b.mlp_up_fused for n in b.mlp_up)
    return up + int(linear_weight(layer.get_submodule(b.mlp_down)).shape[0])


def group_cost(layer: nn.Module, groups: HeadGroups) -> int:
    """Decoder parameters removed with one KV group (the output bias stays)."""
    rows = sum(len(groups.rows[0][n]) * _in_cost(layer.get_submodule(n)) for n in groups.readers)
    return rows + len(groups.cols[0]) * int(linear_weight(layer.get_submodule(groups.writer)).shape[0])


def mlp_width_of(layer: nn.Module, spec: ArchSpec) -> int:
    return int(linear_weight(layer.get_submodule(spec.block.mlp_down)).shape[1])


def keep_rows_mlp(keep: torch.Tensor, width: int, fused: int) -> torch.Tensor:
    """Rows of an ``mlp_up`` linear to keep: ``keep`` in each of its ``fused`` stacked halves."""
    return torch.cat([keep + k * width for k in range(fused)])
