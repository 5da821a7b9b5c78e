"""Repeatable runs: the same command twice gives bit-identical weights.

Tiny models go through the command line twice: in the test process (its own random
``PYTHONHASHSEED``, after every test that ran before in it) and in a new interpreter with
``PYTHONHASHSEED=4242``, so anything that depends on set or dict-of-set iteration order, on
object addresses, or on state left in a process would show up as a difference.  SmolLM2 runs
the same call twice in one process (loading it twice from GGUF would not fit the time budget).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from clirun import offline_env, run_cli
from slicekit.methods import available_methods, get_method
from tiny import save_tiny_with_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    save_tiny_with_tokenizer(d)
    return d


#: per-method options that keep a tiny run short (training budgets), the same in every run
FAST: dict[str, tuple[str, ...]] = {"disp": ("--train-tokens", "1024"), "prunenet": ("--episodes", "2")}


def compress_cli(model: Path, method: str, out: Path, hash_seed: str | None, *extra: str) -> dict:
    """``slicekit compress`` in a new interpreter with ``PYTHONHASHSEED=hash_seed``, or with
    ``hash_seed=None`` in the test process (its own random hash seed, after whatever ran before)."""
    args = ["compress", "--model", str(model), "--method", method, "--cal-nsamples", "4", "--cal-seqlen", "64",
            "--out", str(out), "--quiet", "--json", *FAST.get(method, ()), *extra]
    if hash_seed is None:
        run = run_cli(*args, cwd=out.parent)
    else:
        run = run_cli(*args, cwd=out.parent, env=offline_env(PYTHONHASHSEED=hash_seed), fresh=True)
    assert run.rc == 0, run.err[-3000:]
    return json.loads(run.out)


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    assert tensors, f"no weights in {directory}"
    return tensors


def bitwise_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ in any bit (dtype, shape or content); NaN and −0.0 compare by bits."""
    diff = sorted(set(a) ^ set(b))
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if (
            x.dtype != y.dtype
            or x.shape != y.shape
            or not torch.equal(
                x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)
            )
        ):
            diff.append(name)
    return diff


def untimed(obj):
    """``obj`` without the keys that hold measured durations (they differ from run to run)."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if "seconds" not in k and not k.endswith("_time")}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def _shape(directory: Path) -> dict | None:
    cfg = json.loads((directory / "config.json").read_text())
    return cfg.get("slicekit", {}).get("shape")


@pytest.mark.parametrize("method", available_methods())
def test_same_command_twice_gives_identical_weights(method, tiny_dir, data_dir, tmp_path):
    first = compress_cli(tiny_dir, method, tmp_path / "first", None)
    second = compress_cli(tiny_dir, method, tmp_path / "second", "4242")
    assert first["params"]["compressed"]["decoder"] < first["params"]["original"]["decoder"], (
        "nothing was removed"
    )
    assert first["params"] == second["params"]
    assert untimed(first["summary"]) == untimed(second["summary"])
    a, b = saved_tensors(tmp_path / "first"), saved_tensors(tmp_path / "second")
    assert bitwise_differences(a, b) == []
    assert _shape(tmp_path / "first") == _shape(tmp_path / "second")
    assert (tmp_path / "first" / "recipe.json").read_bytes() == (
        tmp_path / "second" / "recipe.json"
    ).read_bytes()
    if get_method(method).needs.calibration:
        # the seed is what makes the two runs agree: another seed draws other text and other weights
        # (DISP prunes without restoring weights, and its tiny budget here barely trains: its own
        # hypernetwork seed is what must change the result)
        seed = "--disp-seed" if method == "disp" else "--seed"
        other = compress_cli(tiny_dir, method, tmp_path / "other", None, seed, "7")
        if method != "disp":  # DISP's structure (and so its count, within the solver's unit) follows its seed
            assert other["params"] == first["params"]
        assert bitwise_differences(a, saved_tensors(tmp_path / "other")), "--seed had no effect"


@pytest.mark.slow
def test_smollm2_fasp_twice_is_bit_identical(smollm2_pristine, data_dir):
    """FASP at target 0.25 with 4 × 128 calibration tokens, twice on fresh copies of SmolLM2's
    first 10 layers (real weights and activations; the full depth only repeats the same per-layer
    work three times over); the first also checks the share removed and that the plan's count is
    the real one."""
    from slicekit.models import count_parameters
    from slicekit.pipeline import CalibrationRequest, compress
    from slicekit.shape import count_plan

    full, tok = smollm2_pristine
    pristine = copy.deepcopy(full)
    pristine.model.layers = pristine.model.layers[:10]
    pristine.config.num_hidden_layers = 10
    if getattr(pristine.config, "layer_types", None):
        pristine.config.layer_types = pristine.config.layer_types[:10]
    before = count_parameters(pristine)["decoder"]
    assert before < 0.4 * count_parameters(full)["decoder"]
    states = []
    for _ in range(2):
        model = copy.deepcopy(pristine)
        report = compress(
            model,
            tok,
            "fasp",
            get_method("fasp").config_cls(target_params=0.25),
            CalibrationRequest(nsamples=4, seqlen=128, batch_size=4),
            progress=False,
        )
        if not states:
            after = count_parameters(model)["decoder"]
            assert abs((before - after) / before - 0.25) < 0.01
            assert count_plan(report.plan).decoder == after == sum(p.numel() for p in model.model.layers.parameters())
            with torch.no_grad():
                assert torch.isfinite(model(input_ids=tok("The city of", return_tensors="pt").input_ids).logits).all()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        del model
    ref = {k: v for k, v in pristine.state_dict().items()}
    assert any(states[0][k].shape != ref[k].shape for k in ref if k in states[0]), "nothing was compressed"
    assert bitwise_differences(states[0], states[1]) == []
