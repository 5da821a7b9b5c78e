"""Width schedules: how much of each layer to remove, as a small separate concept.

A schedule turns a target into per-layer *slice fractions* ``s_l`` (fraction of the width
removed); :func:`widths_from_fractions` turns fractions into integer widths rounded down to a
multiple (8 by default).  Methods consume widths; they never compute schedules themselves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from slicekit.errors import SlicekitError


def check_sparsity(sparsity: float) -> float:
    if not (0.0 <= sparsity < 1.0) or math.isnan(sparsity):
        raise SlicekitError(f"sparsity must be in [0, 1) (got {sparsity})")
    return float(sparsity)


def round_width(full: int, fraction_removed: float, multiple: int = 8) -> int:
    """``floor((1 − s)·D)`` rounded down to ``multiple``; never zero."""
    if multiple < 1:
        raise SlicekitError(f"rounding multiple must be ≥ 1 (got {multiple})")
    width = int(math.floor((1.0 - fraction_removed) * full + 1e-9))
    width -= width % multiple
    if width <= 0:
        raise SlicekitError(
            f"slicing {fraction_removed:.3f} of width {full} rounded to a multiple of {multiple} leaves nothing"
        )
    return min(width, full)


def constant(sparsity: float, n_layers: int) -> list[float]:
    check_sparsity(sparsity)
    return [sparsity] * n_layers


def widths_from_fractions(full: int, fractions: Sequence[float], multiple: int = 8) -> list[int]:
    return [round_width(full, s, multiple) for s in fractions]
