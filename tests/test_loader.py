"""The shipped loader (``modeling_slicekit.py``): formats, features, and what it refuses.

``tests/fixtures/v1-llama-*`` were written by slicekit 0.1.0 (shape format 1, before plans and
runtime subclasses) with the logits they gave then: the current loader must read them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slicekit.checkpoint import load, save
from slicekit.errors import SlicekitError
from slicekit.methods.slicegpt import SliceGPTConfig
from slicekit.modeling_slicekit import FEATURES, SHAPE_FORMAT, upgrade_shape
from slicekit.pipeline import compress
from tiny import logits, rel_error, tiny_calibration, tiny_inputs, tiny_model

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.loader


@pytest.mark.parametrize("name", ["v1-llama-slicegpt", "v1-llama-modegpt"])
def test_loads_checkpoints_of_the_previous_format(name, tmp_path):
    expected = load_file(str(FIXTURES / name / "expected_logits.safetensors"))
    raw = json.loads((FIXTURES / name / "config.json").read_text())
    assert raw["slicekit"]["shape"]["version"] == 1  # really the old format
    model, _ = load(str(FIXTURES / name))
    assert rel_error(logits(model, expected["input_ids"]), expected["logits"]) < 1e-5
    assert model.slicekit["shape"]["format"] == SHAPE_FORMAT
    # saving it again writes the current format, which loads to the same logits
    model.save_pretrained(str(tmp_path / "new"))
    new_raw = json.loads((tmp_path / "new" / "config.json").read_text())
    assert new_raw["slicekit"]["shape"]["format"] == SHAPE_FORMAT
    again, _ = load(str(tmp_path / "new"))
    assert rel_error(logits(again, expected["input_ids"]), expected["logits"]) < 1e-5


def test_upgrade_moves_the_query_key_index_into_a_tensor():
    raw = json.loads((FIXTURES / "v1-llama-modegpt" / "config.json").read_text())
    shape, extra = upgrade_shape(raw["slicekit"]["shape"])
    assert shape["format"] == SHAPE_FORMAT and "reduced_attention" in shape["features"]
    assert extra and all(k.endswith(".qk_index") and v.dtype == torch.long for k, v in extra.items())
    assert not any("qk_index" in spec for spec in shape["modules"].values())


@pytest.fixture
def saved(tmp_path) -> Path:
    model = tiny_model("llama")
    compress(model, None, "slicegpt", SliceGPTConfig(slicing=0.25), batches=tiny_calibration(), progress=False)
    save(model, None, str(tmp_path / "out"))
    return tmp_path / "out"


def _edit_config(path: Path, fn) -> None:
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unknown_feature_is_refused_with_advice(saved):
    _edit_config(saved, lambda c: c["slicekit"]["shape"]["features"].append("teleportation"))
    with pytest.raises(SlicekitError, match=r"teleportation.*upgrade"):
        load(str(saved))
    assert "teleportation" not in FEATURES


def test_newer_format_is_refused(saved):
    _edit_config(saved, lambda c: c["slicekit"]["shape"].__setitem__("format", SHAPE_FORMAT + 1))
    with pytest.raises(SlicekitError, match="newer"):
        load(str(saved))


def test_edited_shape_is_refused_not_loaded(saved):
    def narrow(c):
        spec = c["slicekit"]["shape"]["modules"]["model.layers.0.mlp.up_proj"]
        spec["out_features"] -= 8
    _edit_config(saved, narrow)
    with pytest.raises(SlicekitError, match="does not match its shape description"):
        load(str(saved))


def test_mixed_shards_are_refused(saved, tmp_path):
    """A weights file from another compression (same names, other widths) next to this config."""
    other = tiny_model("llama")
    compress(other, None, "slicegpt", SliceGPTConfig(slicing=0.5), batches=tiny_calibration(), progress=False)
    save(other, None, str(tmp_path / "other"))
    shutil.copyfile(tmp_path / "other" / "model.safetensors", saved / "model.safetensors")
    with pytest.raises(SlicekitError, match="shape"):
        load(str(saved))


def test_loader_file_needs_nothing_but_torch_transformers_safetensors():
    import ast

    import slicekit.modeling_slicekit as mk

    tree = ast.parse(Path(mk.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    allowed = {"__future__", "ast", "inspect", "textwrap", "contextlib", "json", "os", "shutil", "types", "weakref",
               "collections", "typing",
               "torch", "transformers", "safetensors", "huggingface_hub", "accelerate"}
    assert roots <= allowed, roots - allowed


def test_logits_match_after_reload_in_half_precision(saved):
    x = tiny_inputs()
    model, _ = load(str(saved))
    ref = logits(model, x)
    half, _ = load(str(saved), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert rel_error(logits(half, x).float(), ref) < 0.05
