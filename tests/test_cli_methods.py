"""The command line is generated per method: each method's options, types, defaults and help are
its own; settings can come from a recipe file that the output records and that reproduces it."""

from __future__ import annotations

import json

import pytest

from slicekit.cli import build_parser, main
from slicekit.errors import SlicekitError
from slicekit.methods import available_methods, coerce_field, config_fields, get_method


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        main(["compress", *argv, "--help"])
    return capsys.readouterr().out


def test_help_shows_only_the_chosen_methods_options(capsys):
    texts = {m: _help(capsys, "--method", m) for m in available_methods()}
    for method, text in texts.items():
        own = {f.name for f in config_fields(get_method(method).config_cls)}
        for other in texts:
            if other == method:
                continue
            foreign = {f.name for f in config_fields(get_method(other).config_cls)} - own
            for name in foreign:
                assert "--" + name.replace("_", "-") + " " not in text, (method, name)
        for name in own:
            assert "--" + name.replace("_", "-") in text, (method, name)
    assert "--slicing" in texts["slicegpt"] and "--target-params" in texts["fasp"]


def test_defaults_in_help_are_the_methods_own(capsys):
    assert "(default: 0.25)" in _help(capsys, "--method", "fasp").rsplit("--target-params", 1)[1][:400]
    slicegpt = _help(capsys, "--method", "slicegpt")
    assert "(default: None)" in slicegpt.rsplit("--target-params", 1)[1][:400]


def test_typed_values_are_checked():
    cls = get_method("fasp").config_cls
    assert coerce_field(cls, "round_to", "16") == 16
    assert coerce_field(cls, "mlp_only", "true") is True
    assert coerce_field(cls, "damping", "none") is None
    with pytest.raises(SlicekitError, match="round_to must be a int"):
        coerce_field(cls, "round_to", "1.5")
    with pytest.raises(SlicekitError, match="mlp_only"):
        coerce_field(cls, "mlp_only", "maybe")
    with pytest.raises(SlicekitError, match="unknown"):
        coerce_field(cls, "no_such_field", 1)
    dot = get_method("dotresize").config_cls
    with pytest.raises(SlicekitError, match="one of"):
        coerce_field(dot, "merge", "blend")


def test_foreign_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as err:
        build_parser("fasp").parse_args(["compress", "--model", "x", "--method", "fasp", "--slicing", "0.2"])
    assert err.value.code == 2


def test_recipe_sets_method_settings_and_calibration(tmp_path):
    from slicekit.cli import _build_method_config, _read_recipe

    recipe = {"method": "fasp", "settings": {"target_params": 0.3, "mlp_only": True, "config_version": 2},
              "calibration": {"nsamples": 4, "seqlen": 64}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    data = _read_recipe(str(path))
    args = build_parser("fasp").parse_args(["compress", "--model", "m", "--method", "fasp", "--recipe", str(path),
                                            "--round-to", "16"])
    config = _build_method_config("fasp", args, data)
    assert config.target_params == 0.3 and config.mlp_only and config.round_to == 16
    yaml_path = tmp_path / "r.yaml"
    yaml_path.write_text("method: fasp\nsettings:\n  target_params: 0.2\n")
    assert _read_recipe(str(yaml_path))["settings"]["target_params"] == 0.2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "fasp", "sttings": {}}))
    with pytest.raises(SlicekitError, match="unknown key"):
        _read_recipe(str(bad))
