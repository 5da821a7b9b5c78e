"""Layer scores and layer-adaptive widths (dynamic slicing, MoDeGPT allocation, width files) on
tiny models: scores against an independent computation, exactness, planned shapes, save/load,
and the command line."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from clirun import run_cli as _run_cli
from slicekit.arch import get_arch, linear_weight
from slicekit.checkpoint import load, save
from slicekit.methods.slicegpt import SliceGPTConfig
from slicekit.models import count_parameters
from slicekit.pipeline import CompressReport
from slicekit.pipeline import compress as pipeline_compress
from slicekit.schedules import round_width
from slicekit.scores import layer_scores
from slicekit.shape import Plan, count_plan
from tiny import logits, rel_error, save_tiny_with_tokenizer, tiny_calibration, tiny_inputs, tiny_model

SCORE_ARCHS = ["llama", "opt", "gpt2", "gpt_neox", "phi", "phi3"]


def compress(model, config: SliceGPTConfig) -> CompressReport:
    """SliceGPT through the one entry point (which scores the layers when the schedule needs it)."""
    return pipeline_compress(model, None, "slicegpt", config, progress=False, batches=tiny_calibration())


def _reference_lr(model, batches):
    """Independent: a plain forward with output_hidden_states=True (final norm removed so the
    last entry is the raw output of the last block), cosines per token, mean over all tokens."""
    m = copy.deepcopy(model)
    spec = get_arch(m.config)
    parent, _, name = spec.final_norm.rpartition(".")
    setattr(m.get_submodule(parent), name, torch.nn.Identity())
    sums, count = None, 0
    with torch.no_grad():
        for x in batches:
            hs = m(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states
            cos = torch.stack([torch.nn.functional.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1)
                               for i in range(len(hs) - 1)])  # layers × batch × seq
            s = cos.sum(dim=(1, 2))
            sums = s if sums is None else sums + s
            count += x.numel()
    return (sums / count).tolist()


@pytest.mark.parametrize("arch", SCORE_ARCHS)
def test_layer_scores_match_hidden_states(arch):
    model = tiny_model(arch)
    batches = tiny_calibration()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m).__name__ for m in model.modules()]
    scores = layer_scores(model, batches, progress=False)
    ref = _reference_lr(model, batches)
    assert len(scores.lr) == model.config.num_hidden_layers
    assert scores.lr == pytest.approx(ref, abs=1e-5)
    assert scores.bi == pytest.approx([1 - v for v in ref], abs=1e-5)
    # the model is untouched
    assert [type(m).__name__ for m in model.modules()] == kinds
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _subspace_model(arch, k):
    """A model whose residual stream lies in the first ``k`` coordinates exactly: embeddings and
    every residual writer produce nothing outside them (RMSNorm families keep it there).  Slicing
    any interface to a width ≥ k then loses nothing, so rectangular shortcuts must be exact."""
    model = tiny_model(arch)
    spec = get_arch(model.config)
    with torch.no_grad():
        for emb in spec.embeddings(model):
            emb.weight[:, k:] = 0
        for layer in spec.layer_list(model):
            for name in (spec.block.attn_writer, spec.block.mlp_writer):
                lin = layer.get_submodule(name)
                lin.weight[k:, :] = 0
                if lin.bias is not None:
                    lin.bias[k:] = 0
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_nonconstant_widths_are_exact_when_nothing_is_lost(arch):
    model = _subspace_model(arch, 40)
    x = tiny_inputs()
    ref = logits(model, x)
    # dynamic slicing at mean 0.25 with a cap of 0.375 → widths 56/40 or 40/56 (both ≥ 40)
    cfg = SliceGPTConfig(slicing=0.25, schedule="dynamic", slice_base=0.0, max_layer_sparsity=0.375)
    result = compress(model, cfg)
    widths = result.summary["attn_in_widths"]
    assert sorted(widths) == [40, 56]
    layers = get_arch(model.config).layer_list(model)
    assert tuple(layers[0].mlp_shortcut.shape) == (widths[0], widths[1])  # rectangular
    assert rel_error(logits(model, x), ref) <= 1e-4


def test_full_width_file_schedule_is_exact(tmp_path):
    path = tmp_path / "full.json"
    path.write_text(json.dumps({"widths": [64, 64]}))
    for arch in ("llama", "opt", "gpt_neox"):
        model = tiny_model(arch)
        x = tiny_inputs()
        ref = logits(model, x)
        result = compress(model, SliceGPTConfig(schedule=str(path)))
        assert result.summary["attn_in_widths"] == [64, 64]
        assert get_arch(model.config).layer_list(model)[0].attn_shortcut is not None  # really rotated
        assert rel_error(logits(model, x), ref) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "gpt_neox", "phi"])
@pytest.mark.parametrize("schedule", ["dynamic", "modegpt", "file"])
def test_planned_widths_are_the_real_ones(arch, schedule, tmp_path):
    model = tiny_model(arch)
    spec = get_arch(model.config)
    if schedule == "file":
        path = tmp_path / "w.json"
        path.write_text(json.dumps({"widths": [56, 32]}))
        schedule = str(path)
    cfg = SliceGPTConfig(slicing=0.25, schedule=schedule, slice_base=0.0, epsilon=0.05)
    ref_scores = layer_scores(copy.deepcopy(model), tiny_calibration(), progress=False)
    result = compress(model, cfg)
    s = result.summary
    widths = s["attn_in_widths"]
    if schedule.endswith(".json"):
        assert widths == [56, 32]
    else:
        assert sum(widths) == 2 * round_width(64, 0.25, 8) and len(set(widths)) == 2
        # scored on the original model, before the invariance transforms
        assert s["layer_scores"]["lr"] == pytest.approx(ref_scores.lr, abs=1e-9)
    layers = spec.layer_list(model)
    assert spec.embeddings(model)[0].weight.shape[1] == widths[0]
    for i, layer in enumerate(layers):
        for name in spec.block.attn_readers:
            assert linear_weight(layer.get_submodule(name)).shape[1] == widths[i]
        out = widths[i + 1] if i + 1 < len(layers) else s["head_in_width"]
        assert linear_weight(layer.get_submodule(spec.block.mlp_writer)).shape[0] == out
    assert s["layer_fractions"] == pytest.approx([1 - w / 64 for w in widths])
    assert result.plan.shape() == Plan.of(model).shape()
    counted = count_parameters(model)
    assert count_plan(result.plan).as_dict() == counted == result.params_compressed
    assert counted["total"] == sum(p.numel() for p in model.parameters())
    assert counted["decoder"] == sum(p.numel() for p in layers.parameters())


@pytest.mark.parametrize("arch", ["llama", "opt", "phi"])
def test_save_load_round_trip_with_nonconstant_widths(arch, tmp_path):
    model = tiny_model(arch)
    result = compress(model, SliceGPTConfig(slicing=0.3, schedule="dynamic", slice_base=0.05))
    assert len(set(result.summary["attn_in_widths"])) > 1
    x = tiny_inputs()
    ref = logits(model, x)
    save(model, None, str(tmp_path / "ckpt"))
    loaded, _ = load(str(tmp_path / "ckpt"))
    assert rel_error(logits(loaded, x), ref) <= 1e-6


def test_compression_error_is_reasonable_for_dynamic_widths():
    """Sanity: a dynamic schedule at 25 % is no catastrophe compared with the constant one."""
    x = tiny_inputs()
    errs = {}
    for schedule in ("constant", "dynamic"):
        model = tiny_model("llama")
        ref = logits(model, x)
        compress(model, SliceGPTConfig(slicing=0.25, schedule=schedule))
        errs[schedule] = rel_error(logits(model, x), ref)
    assert 0 < errs["dynamic"] < 1.0 and errs["dynamic"] < 3 * errs["constant"]


# ---------------------------------------------------------------- command line

def run_cli(*args):
    """``slicekit ARGS`` in this process (see clirun): exit status, stdout, stderr."""
    run = _run_cli(*args)
    return run.rc, run.out, run.err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama with a character-level tokenizer saved as a Hugging Face directory."""
    d = tmp_path_factory.mktemp("tiny_dynamic")
    save_tiny_with_tokenizer(d)
    return d


def test_cli_info_layer_scores_json(tiny_dir, data_dir):
    from slicekit.models import load_model
    from slicekit.pipeline import CalibrationRequest, calibration_batches

    rc, out, err = run_cli("info", "--model", str(tiny_dir), "--layer-scores", "--cal-dataset", "wikitext2",
                           "--cal-nsamples", "4", "--cal-seqlen", "64", "--seed", "3", "--json", "--quiet")
    assert rc == 0, err
    info = json.loads(out)
    got = info["layer_scores"]
    assert "4 × 64 tokens" in got["calibration"]
    model, tok = load_model(str(tiny_dir))
    batches, _ = calibration_batches(tok, CalibrationRequest("wikitext2", None, 4, 64, 4, 3))
    ref = _reference_lr(model, batches)
    assert got["lr"] == pytest.approx(ref, abs=1e-5)
    assert got["bi"] == pytest.approx([1 - v for v in ref], abs=1e-5)
    rc, out, err = run_cli("info", "--model", str(tiny_dir), "--layer-scores", "--cal-nsamples", "2",
                           "--cal-seqlen", "32", "--quiet")
    assert rc == 0, err
    assert "layer scores on" in out and "LR" in out


@pytest.mark.parametrize("schedule", ["dynamic", "file"])
def test_cli_compress_schedule_writes_plot(tiny_dir, data_dir, tmp_path, schedule):
    extra = ["--schedule", "dynamic", "--slicing", "0.25", "--slice-base", "0.05"]
    if schedule == "file":
        path = tmp_path / "w.json"
        path.write_text(json.dumps({"widths": [48, 32]}))
        extra = ["--schedule", str(path)]
    out_dir = tmp_path / "c"
    rc, out, err = run_cli("compress", "--model", str(tiny_dir), *extra, "--cal-nsamples", "4",
                           "--cal-seqlen", "64", "--out", str(out_dir), "--json", "--quiet")
    assert rc == 0, err
    res = json.loads(out)
    widths = res["summary"]["attn_in_widths"]
    if schedule == "file":
        assert widths == [48, 32]
    else:
        assert sum(widths) == 96 and len(set(widths)) == 2 and "layer_scores" in res["summary"]
        assert res["settings"]["slice_base"] == 0.05
    png = (out_dir / "layer_widths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    loaded, _ = load(str(out_dir))
    layer0 = get_arch(loaded.config).layer_list(loaded)[0]
    assert tuple(layer0.mlp_shortcut.shape) == (widths[0], widths[1])


def test_cli_rejects_bad_schedule_settings(tiny_dir):
    rc, _, err = run_cli("compress", "--model", str(tiny_dir), "--schedule", "wiggly", "--quiet")
    assert rc == 2 and "unknown schedule" in err
    rc, _, err = run_cli("compress", "--model", str(tiny_dir), "--schedule", "dynamic", "--slicing", "0.2",
                         "--slice-base", "0.3", "--quiet")
    assert rc == 2 and "slice_base" in err
