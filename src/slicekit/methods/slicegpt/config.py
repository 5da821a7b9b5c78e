"""SliceGPT settings, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from slicekit.errors import SlicekitError
from slicekit.methods import MethodConfig
from slicekit.schedules import check_sparsity


@dataclass
class SliceGPTConfig(MethodConfig):
    """``slicing``: mean fraction of the residual **width** removed (SliceGPT's "sparsity"); it is
    ignored when ``target_params`` asks for a share of decoder parameters instead, which is then
    met by choosing the width.  Shortcut matrices and an untied head make the parameter share
    removed smaller than the width share: reports always give real counts.

    ``schedule`` (shared, see :class:`slicekit.methods.MethodConfig`) spreads the width over
    layers; non-constant schedules keep the constant schedule's total width.
    ``slice_head``: also slice the final interface (the reference keeps the head full width).
    ``round_to``: widths are multiples of this.  ``damping``: relative damping of the Gram matrix
    before the eigendecomposition (the reference's 0.01).
    ``rotation``: ``layer`` (the paper's: a rotation per interface, shortcut matrices at the
    residual adds, custom loader) or ``global`` (one rotation for the whole stream: no shortcuts,
    a tied head is untied exactly (see ``keep_tie``), and the output is the family's own config
    with a smaller hidden size —
    a plain checkpoint any engine serves; see ``methods/slicegpt/global_rotation.py``).
    ``keep_tie``: with ``rotation=global``, keep a tied head tied (approximating the final norm's
    scale by a diagonal; measured to be harmful on SmolLM2) instead of untying it exactly.
    """

    VERSION: ClassVar[int] = 3

    slicing: float = 0.25
    round_to: int = 8
    slice_head: bool = False
    damping: float = 0.01
    rotation: Literal["layer", "global"] = "layer"
    keep_tie: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sparsity(self.slicing, "slicing")
        if self.round_to < 1:
            raise SlicekitError(f"round_to must be ≥ 1 (got {self.round_to})")
        if self.rotation not in ("layer", "global"):
            raise SlicekitError(f"rotation must be 'layer' or 'global' (got {self.rotation!r})")
        if self.rotation == "global" and self.schedule in ("dynamic", "modegpt"):
            raise SlicekitError("rotation=global keeps one residual width for the whole model: use schedule=constant")
        if self.rotation == "global" and self.slice_head:
            raise SlicekitError("rotation=global slices the head's input with everything else; slice_head is for "
                                "rotation=layer")
        if self.damping < 0:
            raise SlicekitError(f"damping must be ≥ 0 (got {self.damping})")
        if self.slice_base is not None and self.target_params is None and self.slice_base > self.slicing:
            raise SlicekitError(f"slice_base must be in [0, slicing] = [0, {self.slicing}] (got {self.slice_base})")
        if self.target_params is None and not self.slicing <= self.max_layer_sparsity:
            raise SlicekitError(f"max_layer_sparsity must be ≥ slicing = {self.slicing} (got {self.max_layer_sparsity})")
