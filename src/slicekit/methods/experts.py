"""What the calibration-based MLP methods share on a mixture-of-experts MLP.

transformers 5.x keeps a layer's routed experts as one module with 3-D parameters (``gate_up``
``E × 2F × D``, ``down`` ``E × D × F``).  Expert ``e`` only ever sees the tokens the router sends
it, so its statistics must come from exactly those tokens: :class:`ExpertGrams` routes the MLP
input with the layer's *own* router module (transformers' top-k code, not a copy) and keeps one
float64 Gram of the intermediate activations ``a_e = act(x·gate_eᵀ)·(x·up_eᵀ)`` per expert.
:func:`narrow_experts` then runs a method's ordinary per-MLP step (FASP's score and restoration,
MoDeGPT's Nyström, DOTResize's transport) once per expert and narrows every expert of the layer
to one width, each keeping its own neurons.

Memory is ``E·F²`` float64 per layer — 4 MB for 64 experts of width 96, 0.6 GB for Qwen3-30B-A3B
(128 × 768), 13 GB for Mixtral-8x7B (8 × 14 336): this route is meant for expert widths up to
about 1.5 k.

An expert that receives no calibration token has nothing to score or fit: it keeps its
largest-magnitude neurons (:func:`slicekit.methods.common.select_expert_neurons`) and their down
columns unchanged, and the record lists it.  Router and shared expert (Qwen2-MoE) keep their size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slicekit.arch import ArchSpec
from slicekit.calibration import LayerStep
from slicekit.linalg import gram_matrix
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

    @classmethod
    def collect(cls, step: LayerStep, spec: ArchSpec) -> ExpertGrams:
        """One pass of the layer on the calibration batches, observing every expert."""
        stats = cls(step.layer, spec)
        step.forward(observers={stats.point: stats.observe})
        return stats


#: ``choose(e, down_e, gram_e, tokens_e) -> (keep, new_down, extra)``: a method's per-MLP step for
#: expert ``e`` (``down_e`` ``D × F`` as stored, ``keep`` the ``k`` kept neurons, ``new_down``
#: ``D × k``, ``extra`` anything the method records for that expert)
Choose = Callable[[int, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, Any]]


def narrow_experts(layer: nn.Module, spec: ArchSpec, stats: ExpertGrams, k: int, choose: Choose
                   ) -> tuple[dict[str, Any], list[Any]]:
    """Narrow every routed expert of ``layer`` to ``k`` neurons, each by ``choose`` on its own
    statistics (unrouted experts: largest magnitude, unchanged down columns).  Returns the layer
    record (``expert_tokens``, ``unrouted_experts``) and the ``extra`` of every expert (None for
    the unrouted ones)."""
    _, _, down = expert_weights(layer, spec)
    unrouted = [e for e, n in enumerate(stats.counts) if n == 0]
    fallback = select_expert_neurons(layer, spec, k, "magnitude") if unrouted else None
    keeps, downs, extras = [], [], []
    for e in range(down.shape[0]):
        w = down[e]
        if stats.counts[e] == 0:
            keep = fallback[e].to(w.device)
            keeps.append(keep)
            downs.append(w[:, keep])
            extras.append(None)
            continue
        keep, new, extra = choose(e, w, stats.grams[e], stats.counts[e])
        keeps.append(keep.to(w.device))
        downs.append(new.to(w))
        extras.append(extra)
    keep_expert_neurons(layer, spec, torch.stack(keeps), torch.stack(downs))
    return {"expert_tokens": list(stats.counts), "unrouted_experts": unrouted}, extras
