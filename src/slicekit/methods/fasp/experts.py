"""FASP on a mixture-of-experts MLP: every routed expert is its own interlinked pair.

transformers 5.x keeps a layer's routed experts as one module with 3-D parameters (``gate_up``
``E × 2F × D``, ``down`` ``E × D × F``); the plan gives every expert of a layer one width (one
``experts`` entry, one config key in a plain checkpoint), but each expert keeps its *own*
neurons (:func:`slicekit.methods.common.keep_expert_neurons`).

**Statistics.**  Expert ``e`` only ever sees the tokens the router sends it, so its score and its
restoration use exactly those tokens.  The engine hands over the MLP's input (the experts
module's first argument, ``N × D``); the layer's own router module routes it (its top-k indices,
transformers' code, not a copy), and the intermediate activations ``a_e = act(x·gate_eᵀ)·(x·up_eᵀ)``
of the routed tokens are accumulated into a float64 Gram ``G_e = a_eᵀa_e`` per expert.  Memory is
``E·F²`` float64 per layer — 4 MB for 64 experts of width 96, 0.6 GB for Qwen3-30B-A3B (128 × 768),
but 13 GB for Mixtral-8x7B (8 × 14 336): this route is meant for expert widths up to about 1.5 k.

**Score and restoration** are FASP's dense ones per expert: ``S_{e,j} = ‖down_e[:, j]‖₁·‖a_e[:, j]‖₂``,
the lowest go, the kept columns of ``down_e`` are restored by the anchored least squares
(:func:`slicekit.linalg.anchored_gram` + :func:`slicekit.linalg.lstsq_restore`) on ``G_e``, with
the default ridge ``|S| / tokens_e``.  The router's top-k weight multiplies an expert's output
per token; the least squares fits the un-weighted expert output (weighting would only change how
much each routed token counts in the fit, not what is fitted).

**An expert that receives no calibration token** has nothing to score or fit: it keeps the
weight-magnitude choice (:func:`slicekit.methods.common.select_expert_neurons`, ``magnitude``)
and its kept down columns unchanged (plain removal); the layer's record lists it.

**Qwen2-MoE's shared expert** (always on, gated by a sigmoid) and the router keep their size:
only the routed experts' width is pruned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slicekit.arch import ArchSpec
from slicekit.linalg import column_scores, gram_matrix
from slicekit.methods.common import expert_weights, keep_expert_neurons, select_expert_neurons


def routed_experts(router: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``N × k`` indices of the experts the layer's own router sends each token of ``x`` to.

    transformers' top-k routers return ``(router_logits, router_scores, router_indices)``."""
    out = router(x)
    return out[-1] if isinstance(out, tuple) else out


class ExpertGrams:
    """Per-expert float64 Gram matrices of the intermediate activations of the routed tokens.

    ``observe`` is an engine observer for the point :attr:`point` (the experts module's input)."""

    def __init__(self, layer: nn.Module, spec: ArchSpec) -> None:
        e = spec.block.experts
        self.layer, self.spec = layer, spec
        self.router: nn.Module = layer.get_submodule(e.router)
        self.experts: nn.Module = layer.get_submodule(e.experts)
        gate, _, _ = expert_weights(layer, spec)
        n_exp, width = gate.shape[0], gate.shape[1]
        self.grams = torch.zeros(n_exp, width, width, dtype=torch.float64, device=gate.device)
        self.counts = [0] * n_exp
        self.point = f"{e.experts}:input"

    def observe(self, _batch: int, x: torch.Tensor) -> None:
        gate, up, _ = expert_weights(self.layer, self.spec)
        x = x.reshape(-1, gate.shape[-1])
        chosen = routed_experts(self.router, x)
        act: Callable[[torch.Tensor], torch.Tensor] = self.experts.act_fn
        for e in range(gate.shape[0]):
            tokens = (chosen == e).any(dim=-1)
            n = int(tokens.sum())
            if n == 0:
                continue
            xe = x[tokens].double()
            a = act(xe @ gate[e].double().T) * (xe @ up[e].double().T)
            gram_matrix(a, self.grams[e])
            self.counts[e] += n


def prune_experts(layer: nn.Module, spec: ArchSpec, stats: ExpertGrams, n_remove: int,
                  restore: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], tuple[torch.Tensor, dict]],
                  ) -> dict[str, Any]:
    """Remove ``n_remove`` neurons from every routed expert of ``layer``, each expert its lowest
    scoring ones, and restore its kept down columns.

    ``restore(down_e, gram_e, tokens_e, keep_e) -> (new_down_e, errors)`` is FASP's restoration
    of one writer (``errors``: ``error``, ``error_plain``, ``total`` — unnormalised sums).
    Returns the layer record's MLP entries."""
    gate, _, down = expert_weights(layer, spec)
    n_exp, width = gate.shape[0], gate.shape[1]
    k = width - n_remove
    unrouted = [e for e in range(n_exp) if stats.counts[e] == 0]
    fallback = select_expert_neurons(layer, spec, k, "magnitude") if unrouted else None
    keeps, downs = [], []
    sums = {"error": 0.0, "error_plain": 0.0, "total": 0.0}
    damping: list[float | None] = []
    for e in range(n_exp):
        w = down[e]
        if stats.counts[e] == 0:
            keep = fallback[e].to(w.device)
            keeps.append(keep)
            downs.append(w[:, keep])
            damping.append(None)
            continue
        g = stats.grams[e]
        scores = column_scores(w, g)
        keep = torch.sort(torch.argsort(scores, descending=True)[:k]).values
        new, err = restore(w, g, stats.counts[e], keep)
        for key in sums:
            sums[key] += err[key]
        damping.append(err["damping"])
        keeps.append(keep)
        downs.append(new.to(w))
    keep_expert_neurons(layer, spec, torch.stack(keeps), torch.stack(downs))
    total = sums["total"]
    return {
        "mlp_width": k,
        "mlp_error": sums["error"] / total if total > 0 else 0.0,
        "mlp_error_plain": sums["error_plain"] / total if total > 0 else 0.0,
        "mlp_damping": damping,
        "expert_tokens": list(stats.counts),
        "unrouted_experts": unrouted,
    }
