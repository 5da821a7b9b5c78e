"""SliceGPT settings, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from slicekit.errors import SlicekitError
from slicekit.schedules import check_sparsity


@dataclass
class SliceGPTConfig:
    """``sparsity`` is the mean fraction of the residual width removed (not of parameters).

    ``schedule``: ``constant`` (every interface the same width), or a per-layer schedule name
    understood by :mod:`slicekit.schedules`.  ``slice_head``: also slice the final interface
    (the reference keeps the head full width).  ``damping``: relative damping of the Gram matrix
    before the eigendecomposition (the reference's 0.01).
    """

    VERSION: ClassVar[int] = 1

    sparsity: float = 0.25
    round_to: int = 8
    slice_head: bool = False
    damping: float = 0.01
    schedule: str = "constant"

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        if self.round_to < 1:
            raise SlicekitError(f"round_to must be ≥ 1 (got {self.round_to})")
        if self.damping < 0:
            raise SlicekitError(f"damping must be ≥ 0 (got {self.damping})")
