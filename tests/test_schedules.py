"""Width schedules: constant, dynamic slicing, MoDeGPT allocation, explicit files, rounding."""

from __future__ import annotations

import json
import math

import pytest

from slicekit.errors import SlicekitError
from slicekit.schedules import (
    check_schedule,
    constant,
    dynamic_slicing,
    fill_to_mean,
    load_schedule_file,
    minmax,
    modegpt_allocation,
    needs_scores,
    resolve_schedule,
    round_to_total,
    round_width,
    softmax,
    widths_from_fractions,
)
from slicekit.scores import LayerScores

# A realistic LR profile: the first and last blocks change the stream most.
LR = [0.35, 0.82, 0.90, 0.93, 0.95, 0.96, 0.97, 0.96, 0.94, 0.90, 0.85, 0.60]


def _mean(xs):
    return sum(xs) / len(xs)


def test_constant_and_rounding_helpers_unchanged():
    assert constant(0.25, 3) == [0.25, 0.25, 0.25]
    assert round_width(576, 0.25, 8) == 432
    assert round_width(64, 0.1, 8) == 56  # 57.6 → 57 → 56
    assert widths_from_fractions(64, [0.0, 0.5], 8) == [64, 32]


def test_dynamic_slicing_matches_the_formula_without_clamping():
    s_target, sb = 0.25, 0.05
    v = minmax(LR)
    expected = [sb + (s_target - sb) * x / _mean(v) for x in v]
    got = dynamic_slicing(LR, s_target, sb, cap=0.9)
    assert max(expected) < 0.9  # no clamping in this case
    assert got == pytest.approx(expected, abs=1e-12)
    assert _mean(got) == pytest.approx(s_target, abs=1e-12)
    assert min(got) == pytest.approx(sb)  # the least redundant layer gets exactly the slice base
    assert got.index(max(got)) == LR.index(max(LR))


def test_dynamic_slicing_clamps_and_redistributes_in_proportion_to_v():
    s_target, sb, cap = 0.4, 0.0, 0.47
    got = dynamic_slicing(LR, s_target, sb, cap)
    assert _mean(got) == pytest.approx(s_target, abs=1e-12)
    assert max(got) <= cap + 1e-12
    capped = [i for i, s in enumerate(got) if s >= cap - 1e-12]
    assert capped, "this setting must hit the cap"
    v = minmax(LR)
    free = [i for i in range(len(LR)) if i not in capped and v[i] > 0]
    ratios = {round((got[i] - sb) / v[i], 9) for i in free}
    assert len(ratios) == 1  # s_l = SB + λ'·v_l on the uncapped layers
    # λ' is larger than the unclamped λ = (S − SB)/mean(v): the excess went to the free layers
    assert ratios.pop() > (s_target - sb) / _mean(v)


def test_dynamic_slicing_defaults_and_degenerate_scores():
    assert _mean(dynamic_slicing(LR, 0.3)) == pytest.approx(0.3)
    assert min(dynamic_slicing(LR, 0.3)) == pytest.approx(0.15)  # slice base S/2
    assert dynamic_slicing([0.9] * 4, 0.2, 0.1) == [0.2] * 4
    with pytest.raises(SlicekitError):
        dynamic_slicing(LR, 0.2, 0.3)  # slice base above the target
    with pytest.raises(SlicekitError):
        dynamic_slicing(LR, 0.95, 0.1, cap=0.9)


def test_modegpt_allocation_formula_cap_and_mean():
    bi = [1 - x for x in LR]
    eps, target = 0.1, 0.25
    p = softmax([-b / eps for b in bi])
    unclamped = [len(bi) * target * x for x in p]
    got = modegpt_allocation(bi, target, eps, cap=0.9)
    if max(unclamped) <= 0.9:
        assert got == pytest.approx(unclamped, abs=1e-12)
    assert _mean(got) == pytest.approx(target, abs=1e-12)
    # a sharper temperature hits the cap; the rest is the renormalised softmax
    got = modegpt_allocation(bi, 0.3, 0.02, cap=0.6)
    assert _mean(got) == pytest.approx(0.3, abs=1e-12) and max(got) <= 0.6 + 1e-12
    free = [i for i, s in enumerate(got) if s < 0.6 - 1e-12]
    p = softmax([-b / 0.02 for b in bi])
    assert {round(got[i] / p[i], 6) for i in free if p[i] > 1e-6} == {round(got[free[0]] / p[free[0]], 6)}
    # larger ε → closer to constant
    flat = modegpt_allocation(bi, 0.25, 100.0)
    assert max(flat) - min(flat) < 0.01


def test_fill_to_mean_spreads_equally_when_free_weights_are_zero():
    got = fill_to_mean([0.0, 0.0, 0.0], [1.0, 0.0, 0.0], 0.5, cap=0.6)
    assert got == pytest.approx([0.6, 0.45, 0.45])


def test_round_to_total_hits_the_total_and_stays_close():
    fractions = dynamic_slicing(LR, 0.25, 0.05)
    total = len(LR) * round_width(576, 0.25, 8)
    widths = round_to_total(fractions, 576, total, 8, cap=0.9)
    assert sum(widths) == total
    assert all(w % 8 == 0 for w in widths)
    for w, s in zip(widths, fractions):
        assert abs(w - (1 - s) * 576) < 8  # within one multiple of the ideal width


def test_round_to_total_is_largest_remainder():
    # D = 80: ideal widths 56, 62, 68 floor to 56, 56, 64 (sum 176, remainders 0, 6, 4); the
    # total 184 needs one more 8, which goes to the largest remainder, layer 1.
    assert round_to_total([0.3, 0.225, 0.15], 80, 184, 8, cap=0.9) == [56, 64, 64]
    # all remainders equal (4, 4, 4): the lowest index wins
    assert round_to_total([0.25, 0.25, 0.15], 80, 184, 8, cap=0.9) == [64, 56, 64]
    # removing: ideal 70, 70, 44 floor to 64, 64, 40 (sum 168, remainders 6, 6, 4); the total
    # 160 takes 8 from the smallest remainder, layer 2.
    widths = round_to_total([0.125, 0.125, 0.45], 80, 160, 8, cap=0.9)
    assert widths == [64, 64, 32]


def test_round_to_total_respects_bounds():
    # cap 0.5 of 64 → width at least 32; full width at most 64
    widths = round_to_total([0.9, 0.0, 0.0, 0.0], 64, 4 * 48, 8, cap=0.5)
    assert sum(widths) == 192 and min(widths) >= 32 and max(widths) <= 64
    with pytest.raises(SlicekitError):
        round_to_total([0.2] * 4, 64, 4 * 64 + 8, 8)


def test_resolve_schedule_rounded_matches_constant_total():
    scores = LayerScores.from_lr(LR)
    n = len(LR)
    for name in ("dynamic", "modegpt"):
        f = resolve_schedule(name, 0.25, n, scores=scores, slice_base=0.05, full_width=576, multiple=8)
        widths = widths_from_fractions(576, f, 8)
        assert sum(widths) == n * round_width(576, 0.25, 8)
        assert len(set(widths)) > 1
        assert max(f) <= 0.9
    raw = resolve_schedule("dynamic", 0.25, n, scores=scores, slice_base=0.05)
    assert _mean(raw) == pytest.approx(0.25, abs=1e-12)
    assert resolve_schedule("constant", 0.25, n) == [0.25] * n


def test_resolve_schedule_errors():
    with pytest.raises(SlicekitError):
        resolve_schedule("dynamic", 0.25, 3)  # no scores
    with pytest.raises(SlicekitError):
        resolve_schedule("dynamic", 0.25, 3, scores=LayerScores.from_lr([0.9, 0.8]))  # wrong length
    with pytest.raises(SlicekitError):
        check_schedule("nonsense")
    with pytest.raises(SlicekitError):
        check_schedule("/no/such/schedule.json")
    assert needs_scores("dynamic") and needs_scores("modegpt") and not needs_scores("constant")


def test_schedule_files(tmp_path):
    p = tmp_path / "w.json"
    p.write_text(json.dumps({"widths": [64, 48, 32]}))
    f = resolve_schedule(str(p), 0.25, 3, full_width=64, multiple=8)
    assert widths_from_fractions(64, f, 8) == [64, 48, 32]
    assert not needs_scores(str(p))
    p.write_text(json.dumps({"widths": [64, 44, 32]}))
    with pytest.raises(SlicekitError, match="multiples of 8"):
        resolve_schedule(str(p), 0.25, 3, full_width=64, multiple=8)
    assert load_schedule_file(str(p), 3, 64, 4) == pytest.approx([0.0, 20 / 64, 0.5])
    p.write_text(json.dumps({"fractions": [0.1, 0.2, 0.3]}))
    assert resolve_schedule(str(p), 0.25, 3) == [0.1, 0.2, 0.3]
    p.write_text(json.dumps([0.1, 0.2, 0.3]))
    assert resolve_schedule(str(p), 0.25, 3) == [0.1, 0.2, 0.3]
    for bad in ({"fractions": [0.1, 0.2]}, {"fractions": [0.1, 1.2, 0.1]}, {"widths": [64, 48, 32], "fractions": [0.1] * 3},
                {"sizes": [1, 2, 3]}, {"fractions": ["a", 0.1, 0.1]}):
        p.write_text(json.dumps(bad))
        with pytest.raises(SlicekitError):
            resolve_schedule(str(p), 0.25, 3, full_width=64)
    p.write_text("{not json")
    with pytest.raises(SlicekitError, match="not valid JSON"):
        resolve_schedule(str(p), 0.25, 3)


def test_minmax_and_softmax():
    assert minmax([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]
    assert math.fsum(softmax([1.0, 2.0, 3.0])) == pytest.approx(1.0)
