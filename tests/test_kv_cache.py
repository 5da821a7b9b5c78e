"""The KV cache of a compressed model: measured in transformers' own cache, it must shrink when
a method removes KV heads or narrows heads, and stay the same when only MLPs are narrowed."""

from __future__ import annotations

import pytest

from slicekit.bench import kv_cache_bytes_per_token
from slicekit.methods import get_method
from slicekit.pipeline import compress
from tiny import tiny_calibration, tiny_model


@pytest.mark.parametrize("arch", ["llama", "opt", "phi"])
def test_cache_follows_the_heads(arch):
    dense = kv_cache_bytes_per_token(tiny_model(arch))
    cases = {"fasp-heads": ("fasp", dict(target_params=0.3, attention_sparsity=0.5, round_to=4)),
             "fasp-mlp": ("fasp", dict(target_params=0.2, mlp_only=True, round_to=4)),
             "modegpt": ("modegpt", dict(target_params=0.3))}
    got = {}
    for name, (method, settings) in cases.items():
        model = tiny_model(arch)
        compress(model, None, method, get_method(method).config_cls(**settings), batches=tiny_calibration(),
                 progress=False)
        got[name] = kv_cache_bytes_per_token(model)
    assert got["fasp-heads"] == dense // 2  # half the KV groups gone
    assert got["fasp-mlp"] == dense
    assert got["modegpt"] < dense  # narrowed q/k and v heads, stored padded to the wider of the two
