"""Smaller files (``--save-dtype``), what ``info`` says about an output's format, and
``--device-map`` through accelerate (all-CPU here: the same dispatch code a GPU machine runs)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from slicekit.checkpoint import load, save
from slicekit.errors import SlicekitError
from slicekit.methods import get_method
from slicekit.models import dispatch, load_model
from slicekit.pipeline import compress
from tiny import logits, rel_error, tiny_calibration, tiny_inputs, tiny_model


def _compressed(method: str):
    model = tiny_model("llama")
    cfg = get_method(method).config_cls(target_params=0.25, **({"round_to": 4} if method != "modegpt" else {}))
    compress(model, None, method, cfg, batches=tiny_calibration(), progress=False)
    return model


def _file_dtypes(directory) -> set[torch.dtype]:
    out = set()
    for f in os.listdir(directory):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(directory, f), framework="pt") as fh:
                out |= {fh.get_tensor(k).dtype for k in fh.keys()}  # noqa: SIM118
    return out


@pytest.mark.parametrize(("method", "dtype", "fmt"), [("slicegpt", torch.bfloat16, "slicekit"),
                                                      ("fasp", torch.float16, "vanilla")])
def test_save_dtype_writes_smaller_files_that_load_in_that_dtype(method, dtype, fmt, tmp_path):
    model = _compressed(method)
    full, small = tmp_path / "full", tmp_path / "small"
    assert save(model, None, str(full)) == fmt
    assert save(model, None, str(small), dtype=dtype) == fmt
    assert next(model.parameters()).dtype == torch.float32  # the model itself is not changed
    float_dtypes = {d for d in _file_dtypes(small) if d.is_floating_point}
    assert float_dtypes == {dtype}
    size = {d: sum(os.path.getsize(d / f) for f in os.listdir(d) if f.endswith(".safetensors")) for d in (full, small)}
    assert size[small] < 0.6 * size[full]
    cfg = json.loads((small / "config.json").read_text())
    assert cfg["dtype"] == str(dtype).removeprefix("torch.")
    loaded, _ = load(str(small))
    assert next(loaded.parameters()).dtype == dtype
    x = tiny_inputs()
    assert rel_error(logits(loaded, x).float(), logits(model, x)) < 3e-2
    assert "## Size on disk" in (small / "README.md").read_text()


def test_info_says_whether_an_output_is_vanilla(tmp_path, capsys):
    from slicekit.cli import main

    formats = {}
    for method in ("fasp", "slicegpt"):
        out = tmp_path / method
        save(_compressed(method), None, str(out), info={"recipe": {"method": method}},
             extra_files={"recipe.json": b"{}"})
        assert main(["info", "--model", str(out), "--json"]) == 0
        info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        formats[method] = info["format"]
        assert info["compressed"] is True
    assert formats["fasp"].startswith("vanilla") and formats["slicegpt"].startswith("slicekit")


def test_device_map_dispatch_keeps_logits(tmp_path):
    model = _compressed("slicegpt")
    x = tiny_inputs()
    want = logits(model, x)
    out = tmp_path / "out"
    save(model, None, str(out))
    for device_map in ("auto", "sequential"):
        loaded, _ = load_model(str(out), device_map=device_map, require_tokenizer=False)
        assert hasattr(loaded, "hf_device_map")
        assert rel_error(logits(loaded, x), want) < 1e-5
    explicit = tmp_path / "map.json"
    explicit.write_text(json.dumps({"": "cpu"}))
    loaded, _ = load_model(str(out), device_map=str(explicit), require_tokenizer=False)
    assert rel_error(logits(loaded, x), want) < 1e-5


def test_device_map_refusals(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(SlicekitError, match="unknown --device-map"):
        dispatch(model, "everywhere")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SlicekitError, match="cannot read the device map"):
        dispatch(model, str(bad))
