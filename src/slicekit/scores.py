"""Layer importance signals measured on calibration data.

For decoder block ``l`` with input ``h_l`` and output ``h_{l+1}`` (the residual stream before and
after the block, one vector per token):

- **layer redundancy** ``LR_l = mean over tokens of cos(h_l, h_{l+1})`` (Dumitru et al., 2024,
  dynamic slicing): close to 1 when the block barely changes the stream;
- **block importance** ``BI_l = 1 − LR_l`` (MoDeGPT, after ShortGPT).

The mean is over every token of every calibration sequence, each token weighted equally.  The
walk over the layers is :meth:`CalibrationEngine.observe` (no loop or hook of our own), and the
model is not modified.

Which model to score: the residual stream of the model *as given*.  For RMSNorm families the
invariance transforms of :func:`slicekit.invariance.make_invariant` leave the stream untouched
(folding norm scales and untying the head change no residual vector), so the scores are the same
before and after; for LayerNorm families (OPT, GPT-2, Phi-2, GPT-NeoX) the transforms subtract
each vector's mean, which changes cosines.  Methods therefore score the original model, which
is what the papers' definitions refer to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from slicekit.arch import get_arch
from slicekit.calibration import CalibrationEngine


@dataclass
class LayerScores:
    """Per-block scores, index ``l`` = decoder block ``l``."""

    lr: list[float]  # layer redundancy: mean cos(input, output)
    bi: list[float]  # block importance: 1 − lr

    def as_dict(self) -> dict[str, list[float]]:
        return {"lr": list(self.lr), "bi": list(self.bi)}

    @classmethod
    def from_lr(cls, lr: Sequence[float]) -> LayerScores:
        lr = [float(v) for v in lr]
        return cls(lr=lr, bi=[1.0 - v for v in lr])


def token_cosines(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarity of matching rows of ``a`` and ``b`` (… × D), in float64, flattened."""
    a = a.reshape(-1, a.shape[-1]).double()
    b = b.reshape(-1, b.shape[-1]).double()
    num = (a * b).sum(-1)
    den = (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)
    return num / den


@torch.no_grad()
def layer_scores(model: nn.Module, batches: Sequence[torch.Tensor], device: str | torch.device | None = None,
                 progress: bool = True) -> LayerScores:
    """``LR_l`` and ``BI_l`` of every decoder block on the token-id ``batches``.

    One pass over the model, layer by layer through the calibration engine; nothing in the
    model is changed (the engine only reads).
    """
    spec = get_arch(model.config)
    engine = CalibrationEngine(model, spec, batches, device=device, progress=progress)
    lr: list[float] = []
    for _, obs, inputs in engine.observe(desc="layer scores"):
        total, count = 0.0, 0
        for x, y in zip(inputs, obs.outputs, strict=True):
            cos = token_cosines(x, y)
            total += float(cos.sum())
            count += cos.numel()
        lr.append(total / count)
    return LayerScores.from_lr(lr)
