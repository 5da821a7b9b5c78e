"""SliceGPT settings, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from slicekit.errors import SlicekitError
from slicekit.schedules import DEFAULT_CAP, DEFAULT_EPSILON, check_schedule, check_sparsity


@dataclass
class SliceGPTConfig:
    """``sparsity`` is the mean fraction of the residual width removed (not of parameters).

    ``schedule``: how the width is spread over the layers (:func:`slicekit.schedules.resolve_schedule`):
    ``constant`` (every interface the same width), ``dynamic`` (dynamic slicing by layer
    redundancy, with ``slice_base``, default ``sparsity / 2``), ``modegpt`` (MoDeGPT's softmax
    allocation with temperature ``epsilon``), or a path to a JSON file of per-layer ``widths`` or
    ``fractions``.  ``max_layer_sparsity`` caps the fraction removed from any one layer (the
    excess is redistributed).  Non-constant widths keep the constant schedule's total width.
    ``slice_head``: also slice the final interface (the reference keeps the head full width).
    ``damping``: relative damping of the Gram matrix before the eigendecomposition (the
    reference's 0.01).
    """

    VERSION: ClassVar[int] = 2

    sparsity: float = 0.25
    round_to: int = 8
    slice_head: bool = False
    damping: float = 0.01
    schedule: str = "constant"
    slice_base: float | None = None
    epsilon: float = DEFAULT_EPSILON
    max_layer_sparsity: float = DEFAULT_CAP

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        if self.round_to < 1:
            raise SlicekitError(f"round_to must be ≥ 1 (got {self.round_to})")
        if self.damping < 0:
            raise SlicekitError(f"damping must be ≥ 0 (got {self.damping})")
        check_schedule(self.schedule)
        if self.slice_base is not None and not 0.0 <= self.slice_base <= self.sparsity:
            raise SlicekitError(f"slice_base must be in [0, sparsity] = [0, {self.sparsity}] (got {self.slice_base})")
        if not self.epsilon > 0:
            raise SlicekitError(f"epsilon must be > 0 (got {self.epsilon})")
        if not self.sparsity <= self.max_layer_sparsity < 1:
            raise SlicekitError(f"max_layer_sparsity must be in [sparsity, 1) = [{self.sparsity}, 1) "
                                f"(got {self.max_layer_sparsity})")
