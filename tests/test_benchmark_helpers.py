"""The equal-size comparisons in the benchmarks rest on this analytic SliceGPT count: check it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tiny import ARCHS, tiny_inputs, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from common import slicegpt_decoder_params, slicegpt_sparsity_for_decoder_share
from slicekit.methods import CompressionContext
from slicekit.methods.slicegpt import SliceGPTConfig, compress
from slicekit.models import count_parameters


@pytest.mark.parametrize("arch", ARCHS)
def test_analytic_slicegpt_count_equals_real_count(arch):
    model = tiny_model(arch)
    predicted = slicegpt_decoder_params(model, 40)
    compress(model, [tiny_inputs(2, 32)], SliceGPTConfig(sparsity=24 / 64), CompressionContext(progress=False))
    assert count_parameters(model)["decoder"] == predicted


def test_share_search_picks_the_closest_width():
    model = tiny_model("llama")
    dense = count_parameters(model)["decoder"]
    sparsity, width, got = slicegpt_sparsity_for_decoder_share(model, 0.25)
    assert width % 8 == 0 and sparsity == (64 - width) / 64
    assert abs(got - (1 - slicegpt_decoder_params(model, width) / dense)) < 1e-12
    for other in range(8, 65, 8):
        assert abs(got - 0.25) <= abs(1 - slicegpt_decoder_params(model, other) / dense - 0.25) + 1e-12
