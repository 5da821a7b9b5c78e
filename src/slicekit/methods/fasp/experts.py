"""FASP on a mixture-of-experts MLP: every routed expert is its own interlinked pair.

The plan gives every expert of a layer one width (one ``experts`` entry, one config key in a plain
checkpoint), but each expert keeps its *own* neurons.  The per-expert statistics — a float64 Gram
of the intermediate activations of exactly the tokens the layer's own router sends the expert —
and the per-expert loop are shared with MoDeGPT and DOTResize (:mod:`slicekit.methods.experts`).

**Score and restoration** are FASP's dense ones per expert: ``S_{e,j} = ‖down_e[:, j]‖₁·‖a_e[:, j]‖₂``,
the lowest go, the kept columns of ``down_e`` are restored by the anchored least squares
(:func:`slicekit.linalg.anchored_gram` + :func:`slicekit.linalg.lstsq_restore`) on ``G_e``, with
the default ridge ``|S| / tokens_e``.  The router's top-k weight multiplies an expert's output
per token; the least squares fits the un-weighted expert output (weighting would only change how
much each routed token counts in the fit, not what is fitted).  An expert that receives no
calibration token keeps the weight-magnitude choice and its kept down columns unchanged.

**Qwen2-MoE's shared expert** (always on, gated by a sigmoid) and the router keep their size:
only the routed experts' width is pruned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slicekit.arch import ArchSpec
from slicekit.linalg import column_scores
from slicekit.methods.common import expert_weights
from slicekit.methods.experts import ExpertGrams, narrow_experts, routed_experts

__all__ = ["ExpertGrams", "prune_experts", "routed_experts"]


def prune_experts(layer: nn.Module, spec: ArchSpec, stats: ExpertGrams, n_remove: int,
                  restore: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], tuple[torch.Tensor, dict]],
                  ) -> dict[str, Any]:
    """Remove ``n_remove`` neurons from every routed expert of ``layer``, each expert its lowest
    scoring ones, and restore its kept down columns.

    ``restore(down_e, gram_e, tokens_e, keep_e) -> (new_down_e, errors)`` is FASP's restoration
    of one writer (``errors``: ``error``, ``error_plain``, ``total`` — unnormalised sums).
    Returns the layer record's MLP entries."""
    k = expert_weights(layer, spec)[2].shape[-1] - n_remove

    def choose(_e: int, w: torch.Tensor, g: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        keep = torch.sort(torch.argsort(column_scores(w, g), descending=True)[:k]).values
        new, err = restore(w, g, tokens, keep)
        return keep, new, err

    record, errors = narrow_experts(layer, spec, stats, k, choose)
    sums = {key: sum(e[key] for e in errors if e is not None) for key in ("error", "error_plain", "total")}
    total = sums["total"]
    return {
        "mlp_width": k,
        "mlp_error": sums["error"] / total if total > 0 else 0.0,
        "mlp_error_plain": sums["error_plain"] / total if total > 0 else 0.0,
        "mlp_damping": [None if e is None else e["damping"] for e in errors],
        **record,
    }
