"""The method × architecture matrix: generic invariants every method and every family must keep.

A new method joins by adding a row to ``METHOD_CONFIGS``; a new architecture by adding a tiny
config to ``tests/tiny.py``.  For every pair:

- zero compression is the identity (logits equal to float round-off);
- the plan's parameter count, made before any surgery, equals the real tensors afterwards, and
  the compressed model is exactly the plan;
- save → load gives the same logits, and so does ``save_pretrained`` of the loaded model;
- the compressed model keeps what transformers gives its own layers: hidden-state capture,
  gradient checkpointing, generation with and without the KV cache.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from slicekit.checkpoint import load, save
from slicekit.methods import get_method
from slicekit.models import enable_checkpointing
from slicekit.pipeline import compress, plan_compression
from slicekit.schedules import needs_scores
from slicekit.scores import layer_scores
from slicekit.shape import Plan, count_built, count_plan
from tiny import ARCHS, logits, rel_error, tiny_calibration, tiny_inputs, tiny_model

#: method -> (config at zero compression, config that compresses)
METHOD_CONFIGS = {
    "slicegpt": (dict(slicing=0.0, round_to=1), dict(target_params=0.3)),
    "modegpt": (dict(target_params=0.0), dict(target_params=0.3)),
    "fasp": (dict(target_params=0.0), dict(target_params=0.3, round_to=4)),
    "dotresize": (dict(target_params=0.0), dict(target_params=0.3, round_to=4)),
    "prunenet": (dict(target_params=0.0), dict(target_params=0.3, round_to=4, episodes=2)),
}
METHODS = list(METHOD_CONFIGS)
PAIRS = [(m, a) for m in METHODS for a in ARCHS]


def _config(method: str, which: int):
    entry = get_method(method)
    return entry.config_cls(**METHOD_CONFIGS[method][which])


@functools.cache
def _refusal(method: str, arch: str) -> str | None:
    """Why ``method`` refuses ``arch`` (its ``unsupported`` hook, from the architecture table), or None."""
    entry = get_method(method)
    return entry.unsupported(tiny_model(arch), _config(method, 1)) if entry.unsupported else None


def _skip_refused(method: str, arch: str) -> None:
    """A pair the method refuses is not in the matrix (tests/test_new_families.py checks the refusal)."""
    reason = _refusal(method, arch)
    if reason:
        pytest.skip(f"{method} refuses {arch}: {reason}")


def _real_counts(model) -> dict[str, int]:
    """Counted from the tensors themselves, independently of slicekit's counter."""
    from slicekit.arch import get_arch

    spec = get_arch(model.config)
    total = sum(p.numel() for p in model.parameters())
    decoder = sum(p.numel() for p in spec.layer_list(model).parameters())
    return {"total": total, "decoder": decoder}


@pytest.mark.parametrize(("method", "arch"), PAIRS)
def test_zero_compression_is_identity(method, arch):
    _skip_refused(method, arch)
    model = tiny_model(arch)
    x = tiny_inputs()
    ref = logits(model, x)
    compress(model, None, method, _config(method, 0), batches=tiny_calibration(), progress=False)
    assert rel_error(logits(model, x), ref) < 1e-5


@pytest.mark.parametrize(("method", "arch"), PAIRS)
def test_plan_counts_the_result_before_surgery(method, arch):
    _skip_refused(method, arch)
    model = tiny_model(arch)
    entry = get_method(method)
    config = _config(method, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = layer_scores(model, tiny_calibration(), progress=False) if needs_scores(config.schedule) else None
    run = plan_compression(entry, model, config, scores)
    # planning touched nothing
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    planned = count_plan(run.plan)
    assert planned == count_built(run.plan)  # arithmetic = what the loader would build
    report = compress(model, None, method, config, batches=tiny_calibration(), progress=False)
    real = _real_counts(model)
    assert planned.total == real["total"] and planned.decoder == real["decoder"]
    assert report.params_compressed == planned.as_dict()
    assert Plan.of(model, attributes=run.plan.attributes).shape() == run.plan.shape()
    assert real["decoder"] < run.original.decoder  # it did compress
    removed = 1 - real["decoder"] / run.original.decoder
    assert abs(removed - 0.3) < 0.12, removed  # met against the counter, up to whole units on tiny layers


class _Compressed:
    """Method × architecture pairs compressed and saved on first use, with the logits each gave in
    memory: a worker builds only the pairs its tests ask for (pytest-xdist splits them)."""

    def __init__(self, root) -> None:
        self.root = root
        self.x = tiny_inputs()
        self.expected: dict[str, tuple[torch.Tensor, str]] = {}

    def get(self, method: str, arch: str):
        """(directory, in-memory logits, save format) of one pair."""
        name = f"{method}-{arch}"
        if name not in self.expected:
            model = tiny_model(arch)
            compress(model, None, method, _config(method, 1), batches=tiny_calibration(), progress=False)
            fmt = save(model, None, str(self.root / name))
            self.expected[name] = (logits(model, self.x), fmt)
        ref, fmt = self.expected[name]
        return self.root / name, ref, fmt

    def all(self) -> dict[str, tuple[torch.Tensor, str]]:
        for method, arch in PAIRS:
            if not _refusal(method, arch):
                self.get(method, arch)
        return self.expected


@pytest.fixture(scope="module")
def compressed_dirs(tmp_path_factory) -> _Compressed:
    return _Compressed(tmp_path_factory.mktemp("matrix"))


@pytest.mark.loader
@pytest.mark.parametrize(("method", "arch"), PAIRS)
def test_save_load_and_save_pretrained_round_trip(compressed_dirs, method, arch, tmp_path):
    _skip_refused(method, arch)
    x = compressed_dirs.x
    path, ref, _ = compressed_dirs.get(method, arch)
    model, _ = load(str(path))
    assert rel_error(logits(model, x), ref) < 1e-6
    model.save_pretrained(str(tmp_path / "again"))
    again, _ = load(str(tmp_path / "again"))
    assert rel_error(logits(again, x), ref) < 1e-6


@pytest.mark.loader
@pytest.mark.parametrize(("method", "arch"), PAIRS)
def test_transformers_features_on_compressed_models(compressed_dirs, method, arch):
    _skip_refused(method, arch)
    x = compressed_dirs.x
    path, _, _ = compressed_dirs.get(method, arch)
    model, _ = load(str(path))
    n_layers = model.config.num_hidden_layers
    out = model(input_ids=x, output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == n_layers + 1
    # gradient checkpointing: the same gradients as without it
    model.train()
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks in both runs (checkpointing replays the RNG state)
    model(input_ids=x, labels=x).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    enable_checkpointing(model)
    layer = model.get_submodule(f"{_layers_path(model)}.0")
    assert layer.gradient_checkpointing
    torch.manual_seed(0)
    model(input_ids=x, labels=x, use_cache=False).loss.backward()
    ckpt = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert plain.keys() == ckpt.keys() and plain
    assert max(rel_error(ckpt[n], plain[n]) for n in plain if plain[n].norm() > 0) < 1e-4
    model.eval()
    enable_checkpointing(model, False)
    prompt = x[:1, :6]
    with torch.no_grad():
        a = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        b = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)


def _layers_path(model) -> str:
    from slicekit.arch import get_arch

    return get_arch(model.config).layers


def test_device_map_keeps_compressed_layers_whole(compressed_dirs):
    """accelerate's device-map planner must not split a compressed decoder layer."""
    from accelerate import infer_auto_device_map

    for method in METHODS:
        model, _ = load(str(compressed_dirs.get(method, "llama")[0]))
        runtime = {type(m).__name__ for m in model.modules() if type(m).__name__.startswith(("Sliced", "Reduced"))}
        assert runtime <= set(model._no_split_modules)  # methods that only narrow widths add no classes
        sizes = sum(p.numel() * p.element_size() for p in model.parameters())
        dm = infer_auto_device_map(model, max_memory={0: sizes // 3, "cpu": sizes * 4},
                                   no_split_module_classes=model._no_split_modules)
        for key in dm:
            parts = key.split(".")
            # a layer is either placed whole ("model.layers.0") or not named at all
            assert not (len(parts) > 3 and parts[1] == "layers"), dm


@pytest.mark.loader
def test_plain_transformers_loads_every_checkpoint_without_slicekit(compressed_dirs):
    """Remote code (and plain configs where the shape allows) in a process that cannot import
    slicekit, with no standard input: same logits as in memory."""
    root, x, expected = compressed_dirs.root, compressed_dirs.x, compressed_dirs.all()
    want = {name: fmt for name, (_, fmt) in expected.items()}
    torch.save({name: ref for name, (ref, _) in expected.items()}, root / "expected.pt")
    torch.save(x, root / "x.pt")
    script = textwrap.dedent(f"""
        import sys, json, torch
        sys.modules["slicekit"] = None  # importing slicekit must fail
        from transformers import AutoModelForCausalLM
        root = {str(root)!r}
        expected = torch.load(root + "/expected.pt")
        x = torch.load(root + "/x.pt")
        want = json.loads({json.dumps(json.dumps(want))})
        worst = {{}}
        for name, fmt in want.items():
            kwargs = {{"trust_remote_code": True}} if fmt == "slicekit" else {{}}
            m = AutoModelForCausalLM.from_pretrained(root + "/" + name, **kwargs).eval()
            with torch.no_grad():
                out = m(input_ids=x).logits
            worst[name] = float((out - expected[name]).norm() / expected[name].norm())
        print(json.dumps(worst))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         stdin=subprocess.DEVNULL, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    worst = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(worst) == set(want)
    assert max(worst.values()) < 1e-5, worst
    assert "[y/N]" not in res.stdout + res.stderr
