"""The DISP-LLM hypernetwork and its Gumbel-sigmoid masks (pure torch, no model knowledge).

One score per dimension of every *structure* (five per decoder layer, see
:data:`slicekit.methods.disp.procedure.STRUCTURES`).  The scores are produced, not stored: a
bidirectional GRU runs over a fixed random input sequence with one step per structure (so
neighbouring layers' choices are coupled, as in the paper), each output goes through LayerNorm
and GELU, and one bias-free linear head per structure maps it to that structure's logits.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class HyperNetwork(nn.Module):
    """``sizes[s]`` logits for structure ``s``; the GRU input is a fixed (untrained) buffer."""

    def __init__(self, sizes: list[int], hidden: int = 32, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.sizes = [int(s) for s in sizes]
        self.register_buffer("inputs", torch.randn(len(sizes), 1, hidden, generator=g))
        self.gru = nn.GRU(hidden, 2 * hidden, bidirectional=True)
        self.norm = nn.LayerNorm(4 * hidden)
        self.heads = nn.ModuleList(nn.Linear(4 * hidden, s, bias=False) for s in self.sizes)
        with torch.no_grad():  # seeded initialisation, independent of the global RNG
            for p in self.parameters():
                if p.dim() >= 2:
                    bound = (1.0 / p.shape[1]) ** 0.5
                    p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
                elif p is not self.norm.weight and p is not self.norm.bias:
                    bound = (1.0 / (2 * hidden)) ** 0.5
                    p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)

    def forward(self) -> list[torch.Tensor]:
        out, _ = self.gru(self.inputs)
        z = F.gelu(self.norm(out[:, 0]))
        return [head(z[i]) for i, head in enumerate(self.heads)]


def logistic_noise(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """``log u − log(1 − u)``: the difference of two Gumbel samples (binary Concrete noise)."""
    u = torch.rand(shape, generator=generator).clamp_(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def gumbel_sigmoid_masks(logits: list[torch.Tensor], offset: float, temperature: float,
                         generator: torch.Generator, noise_scale: float = 1.0) -> list[torch.Tensor]:
    """Hard 0/1 masks with straight-through gradients of ``sigmoid((l + offset + s·noise) / T)``.

    ``noise_scale`` s < 1 narrows the noise (annealing): at s = 0 the forward masks are the
    deterministic ones the surgery will use, ``l + offset > 0``.  The noise is always drawn, so
    the generator's stream does not depend on s.

    Written ``hard + (soft − soft.detach())`` so the forward value is exactly 0 or 1 (the usual
    ``(hard − soft).detach() + soft`` is off by round-off, and the masked model would then not be
    exactly the pruned one)."""
    out = []
    for lg in logits:
        noise = logistic_noise(lg.shape, generator).to(lg.device, lg.dtype)
        z = lg + offset + noise_scale * noise
        soft = torch.sigmoid(z / temperature)
        hard = (z > 0).to(soft.dtype)  # not soft > 0.5: the sigmoid rounds to 0.5 for tiny z > 0
        out.append(hard + (soft - soft.detach()))
    return out
