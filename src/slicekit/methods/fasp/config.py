"""FASP settings, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from slicekit.errors import SlicekitError
from slicekit.methods import MethodConfig


@dataclass
class FASPConfig(MethodConfig):
    """``target_params`` is the share of *decoder parameters* removed (default 0.25).

    ``schedule``: how that share is spread over layers — ``constant`` (every layer loses the same
    share of its parameters), a JSON list of per-layer shares, or any name the shared
    :mod:`slicekit.schedules` resolves.  ``mlp_only``: prune MLP neurons only (attention kept
    whole; with a uniform width the checkpoint is a vanilla Hugging Face one).
    ``attention_sparsity``: fraction of KV groups removed per layer (rounded to whole groups); by
    default each layer removes ``floor(share × groups)`` groups and the MLP removes the rest of
    the layer's budget.  ``round_to``: MLP widths removed in multiples of this (routed experts: of
``lcm(round_to, 8)``, which transformers' grouped-matmul experts kernel needs).  ``damping``:
    relative ridge δ/mean(diag G[S,S]) of the least-squares restoration (towards the plain-removal
    weights); ``None`` (default) = ``|S| / tokens``, kept columns per calibration token — the
    least squares overfits when few tokens fit many columns (on SmolLM2-135M with 2 048 tokens,
    0.01 was worse than plain removal on held-out text, 0.3–1 clearly better).
    ``restore``: least-squares restoration of the kept columns (off = plain removal).
    """

    VERSION: ClassVar[int] = 2

    target_params: float | None = 0.25
    mlp_only: bool = False
    attention_sparsity: float | None = None
    round_to: int = 8
    damping: float | None = None
    restore: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_params is None:
            raise SlicekitError("FASP needs target_params (the fraction of decoder parameters removed)")
        if self.attention_sparsity is not None and not 0.0 <= self.attention_sparsity < 1.0:
            raise SlicekitError(f"attention_sparsity must be in [0, 1) (got {self.attention_sparsity})")
        if self.mlp_only and self.attention_sparsity:
            raise SlicekitError("attention_sparsity > 0 contradicts mlp_only")
        if self.round_to < 1:
            raise SlicekitError(f"round_to must be ≥ 1 (got {self.round_to})")
        if self.damping is not None and self.damping < 0:
            raise SlicekitError(f"damping must be ≥ 0 (got {self.damping})")
