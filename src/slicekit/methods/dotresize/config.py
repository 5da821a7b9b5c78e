"""DOTResize settings, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from slicekit.errors import SlicekitError
from slicekit.methods import MethodConfig


@dataclass
class DOTResizeConfig(MethodConfig):
    """``target_params`` (default 0.25) is met by narrowing every layer's MLP intermediate width;
    ``merge``: ``merge`` redistributes the removed neurons' signal onto the kept ones through the
    optimal-transport plan, ``delete`` drops them (the same selection rule on each run's own
    sequential calibration: layer 0 keeps the same neurons, later layers see inputs that carry
    the earlier layers' merge or deletion and may differ in a few percent of neurons — measured
    97–98 % overlap on SmolLM2; ``benchmarks/mlp_methods.py`` also reports deletion of exactly
    the merge run's neurons).  ``targets``: how the kept neurons are chosen (``energy``: largest
    activation energy).  ``cost``: source-to-target cost from the activation Gram.  ``reg``:
    entropic regularisation relative to the cost's scale.  ``readers``: how the down projection
    absorbs the plan (``scaled``: row-normalised plan times the least-squares scale).
    ``round_to``: widths are multiples of this.  ``width``: which width is merged — ``mlp``, the
    MLP intermediate width (the output keeps the original architecture, narrower MLPs), or
    ``hidden``, the residual width on the rotation-invariant model: the transport plan ``T = Q·R``
    of the stream's coordinates gives the orthonormal basis ``Q`` in place of SliceGPT's PCA
    (``R`` cancels in every weight; shortcut matrices and the untied head are counted as in
    SliceGPT).  ``targets``, ``cost`` and ``reg`` apply to both; ``merge`` and ``readers`` to ``mlp``.
    """

    VERSION: ClassVar[int] = 1

    target_params: float | None = 0.25
    merge: Literal["merge", "delete"] = "merge"
    targets: Literal["energy", "pivoted", "leverage", "column_score"] = "energy"
    cost: Literal["sqeuclidean", "residual"] = "sqeuclidean"
    reg: float = 0.1
    readers: Literal["scaled", "transport", "pinv"] = "scaled"
    round_to: int = 8
    width: Literal["mlp", "hidden"] = "mlp"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_params is None:
            raise SlicekitError("DOTResize needs target_params (the fraction of decoder parameters removed)")
        if not self.reg > 0:
            raise SlicekitError(f"reg must be > 0 (got {self.reg})")
        if self.round_to < 1:
            raise SlicekitError(f"round_to must be ≥ 1 (got {self.round_to})")
