"""Width schedules: how much of each layer to remove, as a small separate concept.

A schedule turns a target mean sparsity into per-layer *slice fractions* ``s_l`` (fraction of the
width removed from layer ``l``); :func:`widths_from_fractions` turns fractions into integer widths
rounded down to a multiple (8 by default).  Methods consume widths; they never compute schedules
themselves.  The one entry point every method calls is :func:`resolve_schedule`::

    fractions = resolve_schedule(config.schedule, config.sparsity, n_layers,
                                 scores=layer_scores(...),        # only if needs_scores(...)
                                 slice_base=..., epsilon=..., cap=...,
                                 full_width=D, multiple=8)        # optional: exact, rounded widths

Schedules (``name_or_path``):

- ``constant`` — every layer ``s_l = S``;
- ``dynamic`` — dynamic slicing by layer redundancy (Dumitru et al., 2024), :func:`dynamic_slicing`;
- ``modegpt`` — MoDeGPT's global sparsity allocation (Lin et al., 2025), :func:`modegpt_allocation`;
- a path to a JSON file — explicit per-layer widths or fractions, :func:`load_schedule_file`.

Everything here is a pure function of lists of numbers (no torch, no model).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from slicekit.errors import SlicekitError

if TYPE_CHECKING:
    from slicekit.scores import LayerScores

SCHEDULES = ("constant", "dynamic", "modegpt")
_SCORED = ("dynamic", "modegpt")
DEFAULT_CAP = 0.9
DEFAULT_EPSILON = 0.1


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    if not (0.0 <= sparsity < 1.0) or math.isnan(sparsity):
        raise SlicekitError(f"{name} must be in [0, 1) (got {sparsity})")
    return float(sparsity)


def round_width(full: int, fraction_removed: float, multiple: int = 8) -> int:
    """``floor((1 − s)·D)`` rounded down to ``multiple``; never zero."""
    if multiple < 1:
        raise SlicekitError(f"rounding multiple must be ≥ 1 (got {multiple})")
    width = math.floor((1.0 - fraction_removed) * full + 1e-9)
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


# ---------------------------------------------------------------- schedule names and files

def is_schedule_file(schedule: str) -> bool:
    return schedule not in SCHEDULES


def needs_scores(schedule: str) -> bool:
    """Whether the schedule needs :class:`slicekit.scores.LayerScores` (a calibration pass)."""
    return schedule in _SCORED


def check_schedule(schedule: str) -> str:
    """A known schedule name, or an existing JSON file; anything else is a user error."""
    if schedule in SCHEDULES:
        return schedule
    if not schedule.endswith(".json") and not os.path.isfile(schedule):
        raise SlicekitError(f"unknown schedule {schedule!r}: use {', '.join(SCHEDULES)} or a path to a JSON file")
    if not os.path.isfile(schedule):
        raise SlicekitError(f"schedule file not found: {schedule}")
    return schedule


# ---------------------------------------------------------------- the allocations

def minmax(values: Sequence[float]) -> list[float]:
    """``(v − min) / (max − min)``; all zeros when the values are all equal."""
    lo, hi = min(values), max(values)
    if hi - lo <= 0:
        return [0.0] * len(values)
    return [(v - lo) / (hi - lo) for v in values]


def fill_to_mean(base: Sequence[float], weights: Sequence[float], target: float, cap: float) -> list[float]:
    """``s_l = min(base_l + λ·w_l, cap)`` with the ``λ ≥ 0`` that makes ``mean(s) = target``.

    Water-filling with an active set: solve for ``λ`` over the free layers, fix every layer that
    exceeds ``cap`` at ``cap`` (its excess goes back to the pool), and repeat until none exceeds
    it — at most ``n`` rounds.  A layer at the cap never comes back below it, because fixing layers
    only raises ``λ``.  The excess is therefore redistributed *in proportion to the weights* of the
    free layers (so the shape of the allocation is kept on them); if every free layer has weight
    zero it is spread equally instead.  Requires ``base_l ≤ target ≤ cap`` on average (checked).
    """
    n = len(base)
    if n == 0 or len(weights) != n:
        raise SlicekitError("a schedule needs one weight per layer and at least one layer")
    if any(w < 0 for w in weights):
        raise SlicekitError("schedule weights must be non-negative")
    if target > cap + 1e-12:
        raise SlicekitError(f"target sparsity {target} exceeds the per-layer cap {cap}")
    if any(b > cap + 1e-12 for b in base) or sum(base) > n * target + 1e-9:
        raise SlicekitError(f"slice base above the target sparsity {target} or the cap {cap}")
    fixed: set[int] = set()
    weights = list(weights)
    while True:
        free = [i for i in range(n) if i not in fixed]
        room = n * target - cap * len(fixed) - sum(base[i] for i in free)
        wsum = sum(weights[i] for i in free)
        if wsum <= 0:  # nothing left to weight by: spread the rest equally
            weights = [1.0 if i in free else w for i, w in enumerate(weights)]
            wsum = float(len(free))
        lam = room / wsum
        s = [cap if i in fixed else base[i] + lam * weights[i] for i in range(n)]
        over = [i for i in free if s[i] > cap]
        if not over:
            return s
        fixed.update(over)


def effective_slice_base(target: float, slice_base: float | None) -> float:
    """The slice base dynamic slicing uses: ``slice_base``, or ``target / 2`` when not given."""
    return target / 2 if slice_base is None else float(slice_base)


def dynamic_slicing(lr: Sequence[float], target: float, slice_base: float | None = None,
                    cap: float = DEFAULT_CAP) -> list[float]:
    """Dynamic slicing (Dumitru et al., 2024): ``s_l = SB + (S − SB)·v_l / mean(v)``,
    ``v = minmax(LR)``.

    High layer redundancy (the block changes its input little) means more slicing; the least
    redundant layer gets exactly the slice base ``SB``; ``mean(s) = S`` exactly.  Unlike the
    reference, fractions are clamped to ``[0, cap]`` with the excess redistributed by
    :func:`fill_to_mean` in proportion to ``v`` (so ``s_l = SB + λ'·v_l`` still holds on the
    layers below the cap, with a larger ``λ'``).  ``slice_base=None`` means ``S / 2``.  When all
    LR are equal the schedule is constant.
    """
    check_sparsity(target)
    sb = effective_slice_base(target, slice_base)
    if not 0.0 <= sb <= target:
        raise SlicekitError(f"slice base must be in [0, sparsity] = [0, {target}] (got {sb})")
    v = minmax(lr)
    if not any(v):
        return [float(target)] * len(lr)
    return fill_to_mean([sb] * len(lr), v, target, cap)


def softmax(values: Sequence[float]) -> list[float]:
    m = max(values)
    e = [math.exp(v - m) for v in values]
    z = sum(e)
    return [x / z for x in e]


def modegpt_allocation(bi: Sequence[float], target: float, epsilon: float = DEFAULT_EPSILON,
                       cap: float = DEFAULT_CAP) -> list[float]:
    """MoDeGPT's global sparsity allocation: ``φ_l = L·φ̄·softmax(−BI/ε)_l``, capped at ``cap``.

    Unimportant blocks (low ``BI``) get more sparsity; small ``ε`` sharpens the allocation, large
    ``ε`` tends to the constant schedule.  ``mean(φ) = φ̄`` exactly; a layer over the cap is set
    to the cap and the excess is redistributed in proportion to the softmax weights of the other
    layers (iteratively, :func:`fill_to_mean`), i.e. the softmax is renormalised over them.
    """
    check_sparsity(target)
    if not epsilon > 0:
        raise SlicekitError(f"epsilon must be > 0 (got {epsilon})")
    p = softmax([-b / epsilon for b in bi])
    return fill_to_mean([0.0] * len(bi), p, target, cap)


# ---------------------------------------------------------------- rounding to real widths

def round_to_total(fractions: Sequence[float], full: int, total: int, multiple: int = 8,
                   cap: float = DEFAULT_CAP) -> list[int]:
    """Integer widths, multiples of ``multiple``, summing to ``total`` (largest-remainder rounding).

    1. ideal widths ``u_l = (1 − s_l)·D``; bounds ``lo = ceil((1 − cap)·D)`` and ``hi = D``, both
       moved inwards to multiples of ``multiple`` (``lo`` at least ``multiple``);
    2. ``w_l = floor(u_l)`` to a multiple, clamped to ``[lo, hi]``;
    3. while ``Σw < total``: add ``multiple`` to the layer with the largest ``u_l − w_l`` that can
       grow; while ``Σw > total``: remove ``multiple`` from the layer with the smallest ``u_l − w_l``
       that can shrink (ties: the lower layer index).

    Every width is within one ``multiple`` of its ideal unless a bound was hit, and the fractions
    ``1 − w_l/D`` stay within ``[0, cap]``.  ``total`` must be a multiple of ``multiple`` and
    within ``[n·lo, n·hi]``.
    """
    m = int(multiple)
    if m < 1:
        raise SlicekitError(f"rounding multiple must be ≥ 1 (got {multiple})")
    n = len(fractions)
    hi = full - full % m
    lo = max(m, math.ceil((1.0 - cap) * full / m - 1e-9) * m)
    if total % m or not n * lo <= total <= n * hi:
        raise SlicekitError(f"cannot split a total width of {total} into {n} layers of multiples of {m} "
                            f"within [{lo}, {hi}]")
    ideal = [(1.0 - s) * full for s in fractions]
    widths = [min(max(math.floor(u / m + 1e-9) * m, lo), hi) for u in ideal]
    diff = (total - sum(widths)) // m
    while diff > 0:
        cand = [i for i in range(n) if widths[i] + m <= hi]
        i = max(cand, key=lambda j: (ideal[j] - widths[j], -j))
        widths[i] += m
        diff -= 1
    while diff < 0:
        cand = [i for i in range(n) if widths[i] - m >= lo]
        i = min(cand, key=lambda j: (ideal[j] - widths[j], j))
        widths[i] -= m
        diff += 1
    return widths


def fractions_of(widths: Sequence[int], full: int) -> list[float]:
    """The slice fractions that :func:`widths_from_fractions` maps back to exactly ``widths``."""
    return [1.0 - w / full for w in widths]


# ---------------------------------------------------------------- explicit schedules

def load_schedule_file(path: str, n_layers: int, full_width: int | None = None, multiple: int = 1) -> list[float]:
    """Per-layer fractions from a JSON file: ``{"fractions": [s_0, …]}`` or just ``[s_0, …]``
    (fraction removed per layer), or ``{"widths": [d_0, …]}`` (kept width per layer: needs
    ``full_width``, and each width must be a multiple of ``multiple`` so it is kept exactly).

    One entry per decoder layer; the file is taken as is (the target sparsity is not used).
    """
    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as err:
        raise SlicekitError(f"cannot read schedule file {path}: {err}") from err
    except json.JSONDecodeError as err:
        raise SlicekitError(f"schedule file {path} is not valid JSON: {err}") from err
    if isinstance(data, list):
        data = {"fractions": data}
    if not isinstance(data, dict) or len(set(data) & {"fractions", "widths"}) != 1:
        raise SlicekitError(f"schedule file {path} must be a JSON list of fractions or an object with exactly "
                            "one of 'fractions' or 'widths' (a list with one number per layer)")
    key = "fractions" if "fractions" in data else "widths"
    values = data[key]
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in values):
        raise SlicekitError(f"schedule file {path}: '{key}' must be a list of numbers")
    if len(values) != n_layers:
        raise SlicekitError(f"schedule file {path} has {len(values)} {key} for a model with {n_layers} layers")
    if key == "widths":
        if full_width is None:
            raise SlicekitError("a schedule of widths needs the full width of the model")
        bad = [w for w in values if w != int(w) or not 0 < w <= full_width or int(w) % multiple]
        if bad:
            raise SlicekitError(f"schedule file {path}: widths must be integers in [1, {full_width}] that are "
                                f"multiples of {multiple} (got {bad[0]}; or set the rounding multiple to 1)")
        return fractions_of([int(w) for w in values], full_width)
    for s in values:
        check_sparsity(float(s))
    return [float(s) for s in values]


# ---------------------------------------------------------------- the entry point

def resolve_schedule(schedule: str, target: float, n_layers: int, *, scores: LayerScores | None = None,
                     slice_base: float | None = None, epsilon: float = DEFAULT_EPSILON,
                     cap: float = DEFAULT_CAP, full_width: int | None = None,
                     multiple: int = 8) -> list[float]:
    """Per-layer slice fractions for ``schedule`` at mean sparsity ``target``.

    ``scores`` (from :func:`slicekit.scores.layer_scores`) are required when
    :func:`needs_scores` says so: ``dynamic`` uses ``scores.lr``, ``modegpt`` ``scores.bi``.

    Without ``full_width`` the fractions are real numbers whose mean is ``target`` exactly (after
    clamping).  With ``full_width`` (the width ``D`` being sliced) and ``multiple``, the
    ``dynamic``/``modegpt`` fractions are rounded by :func:`round_to_total` to realisable widths
    whose total is that of the constant schedule, ``n·round_width(D, target, multiple)``, so a
    non-constant schedule keeps exactly the constant one's total width; the returned fractions
    are ``1 − w_l/D`` (which :func:`widths_from_fractions` maps back to ``w_l`` exactly).
    Constant and file schedules are returned unrounded (each layer is floored when widths are
    made, as always); a file of widths must then hold multiples of ``multiple``.
    """
    check_sparsity(target)
    if not 0 < cap < 1:
        raise SlicekitError(f"the per-layer cap must be in (0, 1) (got {cap})")
    if n_layers < 1:
        raise SlicekitError("a schedule needs at least one layer")
    check_schedule(schedule)
    if schedule == "constant":
        return constant(target, n_layers)
    if is_schedule_file(schedule):
        return load_schedule_file(schedule, n_layers, full_width, multiple if full_width is not None else 1)
    if scores is None or len(scores.lr) != n_layers:
        raise SlicekitError(f"schedule {schedule!r} needs layer scores for all {n_layers} layers")
    if schedule == "dynamic":
        fractions = dynamic_slicing(scores.lr, target, slice_base, cap)
    else:
        fractions = modegpt_allocation(scores.bi, target, epsilon, cap)
    if full_width is None:
        return fractions
    total = n_layers * round_width(full_width, target, multiple)
    return fractions_of(round_to_total(fractions, full_width, total, multiple, cap), full_width)

