"""SliceGPT with one global rotation (``rotation="global"``): a plain, narrower model of the same family.

What must hold, on the tiny random models:

- at zero slicing the variant is exact on every family it accepts, and that list cannot silently
  shrink below the RMSNorm families it was written for;
- at 25 % the output is the family's own model class with a smaller ``hidden_size`` (heads kept),
  whose real parameter counts match the report and the tensors;
- it saves as a plain checkpoint that ``AutoModelForCausalLM`` loads without remote code, with the
  norm epsilon scaled by ``D / d`` (which is what makes the plain RMSNorm exact);
- a tied head is untied (exact) by default; ``keep_tie`` keeps it tied, which is exact only when
  the final norm's scale is constant;
- what it cannot express (LayerNorm, scaled embeddings, per-layer widths, streaming) is refused
  with a one-line :class:`SlicekitError`;
- the PCA basis beats a random orthogonal basis of the same width;
- the command line writes a vanilla checkpoint that ``slicekit info`` reads.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from clirun import run_cli
from slicekit.arch import attention_info, get_arch
from slicekit.checkpoint import save
from slicekit.errors import SlicekitError
from slicekit.methods import get_method
from slicekit.methods.slicegpt import SliceGPTConfig, global_rotation
from slicekit.modeling_slicekit import UnitRMSNorm
from slicekit.models import count_parameters
from slicekit.pipeline import compress
from slicekit.shape import count_plan
from tiny import ARCHS, logits, rel_error, save_tiny_with_tokenizer, tiny_calibration, tiny_inputs, tiny_model

#: the RMSNorm families the variant was written for: the derived list must keep them
REQUIRED = {"llama", "mistral", "qwen2", "qwen3", "phi3"}
#: families a plain narrower config cannot describe (LayerNorm, √hidden embedding scale)
REFUSED = ["opt", "gpt2", "gpt_neox", "gpt_neox_seq", "phi", "gemma"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _global(**overrides) -> SliceGPTConfig:
    return SliceGPTConfig(**{"rotation": "global", **overrides})


def _compress(model, **overrides):
    return compress(model, None, "slicegpt", _global(**overrides), batches=tiny_calibration(), progress=False)


def _supported_archs() -> list[str]:
    """Tiny families the global variant accepts, as the method itself says."""
    entry = get_method("slicegpt")
    return [a for a in ARCHS if entry.unsupported(tiny_model(a), _global()) is None]


GLOBAL_ARCHS = _supported_archs()


# ----------------------------------------------------------------------------- exactness


def test_supported_list_keeps_the_rmsnorm_families():
    assert set(GLOBAL_ARCHS) >= REQUIRED, f"rotation=global no longer accepts {sorted(REQUIRED - set(GLOBAL_ARCHS))}"
    assert not set(REFUSED) & set(GLOBAL_ARCHS)


@pytest.mark.parametrize("arch", GLOBAL_ARCHS)
def test_exact_at_zero_slicing(arch):
    model = tiny_model(arch)
    x = tiny_inputs()
    ref = logits(model, x)
    _compress(model, slicing=0.0, round_to=1)
    assert model.config.hidden_size == tiny_model(arch).config.hidden_size
    assert rel_error(logits(model, x), ref) < 1e-5


# ----------------------------------------------------------------------------- shape and counts


def _direct_counts(model) -> dict[str, int]:
    """Parameter counts straight from the tensors (a tied table counted once)."""
    total = sum(p.numel() for p in model.parameters())
    decoder = sum(p.numel() for p in model.model.layers.parameters())
    tables = {id(p): p.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
              for p in m.parameters()}
    return {"total": total, "decoder": decoder, "non_embedding": total - sum(tables.values())}


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("setting", [dict(slicing=0.25), dict(target_params=0.25)], ids=["slicing", "target"])
def test_compressed_is_a_plain_narrower_model(arch, setting):
    model = tiny_model(arch)
    hidden = model.config.hidden_size
    heads = attention_info(model.config).num_heads
    head_dim = attention_info(model.config).head_dim
    layer_cls, model_cls = type(model.model.layers[0]), type(model)
    config = _global(**setting)
    multiple = math.lcm(config.round_to, heads)
    original_decoder = count_parameters(model)["decoder"]

    report = compress(model, None, "slicegpt", config, batches=tiny_calibration(), progress=False)

    d = model.config.hidden_size
    assert d < hidden and d % multiple == 0 and d % config.round_to == 0
    assert report.summary["width"] == d == report.plan.config.hidden_size
    if "slicing" in setting:
        assert d == math.floor(0.75 * hidden) // multiple * multiple
    else:
        # the realisable width whose decoder count is closest to the share asked for
        target = round(0.75 * original_decoder)
        miss = abs(report.params_compressed["decoder"] - target)
        for other in (d - multiple, d + multiple):
            fractions = [1.0 - other / hidden] * len(model.model.layers)
            neighbour = global_rotation.plan_global(tiny_model(arch), config, fractions)
            assert abs(count_plan(neighbour).decoder - target) >= miss
    assert attention_info(model.config).head_dim == head_dim
    attn = model.model.layers[0].self_attn
    assert attn.o_proj.out_features == d and attn.o_proj.in_features == heads * head_dim
    assert model.model.embed_tokens.weight.shape[1] == d and model.lm_head.in_features == d

    direct = _direct_counts(model)
    counted = count_parameters(model)
    assert {k: counted[k] for k in direct} == direct
    assert report.params_compressed == counted
    assert type(model) is model_cls
    for layer in model.model.layers:
        assert type(layer) is layer_cls and "Sliced" not in type(layer).__name__
    assert not any(isinstance(m, UnitRMSNorm) for m in model.modules())
    assert torch.isfinite(logits(model, tiny_inputs())).all()


# ----------------------------------------------------------------------------- plain checkpoint


@pytest.mark.parametrize("arch", GLOBAL_ARCHS)
def test_saves_as_a_plain_checkpoint(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    hidden = model.config.hidden_size
    eps_key = get_arch(model.config).norm_eps_key
    eps = getattr(model.config, eps_key)
    _compress(model, slicing=0.25)
    d = model.config.hidden_size
    assert d < hidden

    assert save(model, None, str(tmp_path)) == "vanilla"
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in cfg and "slicekit" not in cfg
    assert cfg["hidden_size"] == d
    assert cfg[eps_key] == pytest.approx(eps * hidden / d, rel=1e-12)

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))  # no trust_remote_code
    loaded.eval()
    assert type(loaded) is type(model)
    x = tiny_inputs()
    assert rel_error(logits(loaded, x), logits(model, x)) < 1e-5


# ----------------------------------------------------------------------------- tied head


def _tied(model) -> bool:
    return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tied_head_is_untied_and_exact_by_default():
    model = tiny_model("llama")
    assert model.config.tie_word_embeddings and _tied(model)
    gamma = model.model.norm.weight
    assert gamma.max() - gamma.min() > 0.1  # the final norm's scale is not constant
    x = tiny_inputs()
    ref = logits(model, x)
    _compress(model, slicing=0.0, round_to=1)
    assert not _tied(model) and not model.config.tie_word_embeddings
    assert rel_error(logits(model, x), ref) < 1e-5


def test_keep_tie_is_tied_and_exact_only_for_a_constant_final_scale(tmp_path):
    from transformers import AutoModelForCausalLM

    x = tiny_inputs()
    untied = tiny_model("llama")
    _compress(untied, slicing=0.0, round_to=1)

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.fill_(1.3)
    ref = logits(model, x)
    _compress(model, slicing=0.0, round_to=1, keep_tie=True)
    assert _tied(model) and model.config.tie_word_embeddings
    assert count_parameters(model)["total"] < count_parameters(untied)["total"]
    assert count_parameters(model)["total"] == sum(p.numel() for p in model.parameters())
    assert rel_error(logits(model, x), ref) < 1e-5

    assert save(model, None, str(tmp_path)) == "vanilla"
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    loaded.eval()
    assert _tied(loaded)
    assert rel_error(logits(loaded, x), ref) < 1e-5

    random_scale = tiny_model("llama")
    ref = logits(random_scale, x)
    _compress(random_scale, slicing=0.0, round_to=1, keep_tie=True)
    assert _tied(random_scale)
    assert rel_error(logits(random_scale, x), ref) > 1e-3


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("arch", REFUSED)
def test_families_a_plain_config_cannot_express_are_refused(arch):
    model = tiny_model(arch)
    entry = get_method("slicegpt")
    assert entry.unsupported(model, SliceGPTConfig()) is None, "the per-layer variant takes this family"
    x = tiny_inputs()
    ref = logits(model, x)
    with pytest.raises(SlicekitError, match="rotation=global"):
        _compress(model, slicing=0.25)
    assert torch.equal(logits(model, x), ref), "a refused model must be left as it was"


def test_dynamic_schedule_is_refused():
    with pytest.raises(SlicekitError, match="schedule=constant"):
        _compress(tiny_model("llama"), slicing=0.25, schedule="dynamic")


def test_schedule_files(tmp_path):
    uneven = tmp_path / "uneven.json"
    uneven.write_text(json.dumps({"fractions": [0.125, 0.375]}))
    with pytest.raises(SlicekitError, match="schedule=constant"):
        _compress(tiny_model("llama"), schedule=str(uneven))
    even = tmp_path / "even.json"
    even.write_text(json.dumps({"fractions": [0.25, 0.25]}))
    model = tiny_model("llama")
    _compress(model, schedule=str(even))
    assert model.config.hidden_size == 48


def test_streamed_model_is_refused(tmp_path):
    from slicekit.streaming import load_streamed

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src, max_shard_size="20KB")
    model, _ = load_streamed(str(src), require_tokenizer=False)
    out = tmp_path / "out"
    with pytest.raises(SlicekitError, match="--stream"):
        compress(model, None, "slicegpt", _global(slicing=0.25), batches=tiny_calibration(), progress=False,
                 out_dir=str(out))
    assert not out.exists()


def test_streamed_refusal_comes_before_any_work(tmp_path, monkeypatch):
    from slicekit.streaming import load_streamed

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src, max_shard_size="20KB")
    model, _ = load_streamed(str(src), require_tokenizer=False)
    passes: list[int] = []
    real = global_rotation.stream_rotation

    def counted(*args, **kwargs):
        passes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(global_rotation, "stream_rotation", counted)
    out = tmp_path / "out"
    with pytest.raises(SlicekitError, match="--stream"):
        compress(model, None, "slicegpt", _global(slicing=0.25), batches=tiny_calibration(), progress=False,
                 out_dir=str(out))
    assert not passes, "no calibration pass should run for a model that is refused"
    assert not (tmp_path / "out.partial").exists(), "a refused run must leave no staging directory"


def test_unknown_rotation_is_refused():
    with pytest.raises(SlicekitError, match="rotation"):
        SliceGPTConfig(rotation="bogus")


# ----------------------------------------------------------------------------- quality


def test_pca_basis_beats_a_random_basis(monkeypatch):
    """The same narrower model built from a random orthogonal ``Q`` is worse: PCA chooses the width."""
    x = tiny_inputs()
    model = tiny_model("llama")
    ref = logits(model, x)
    _compress(model, slicing=0.25)
    pca_error = rel_error(logits(model, x), ref)
    assert math.isfinite(pca_error)

    g = torch.Generator().manual_seed(0)
    random_errors = []
    for _ in range(3):
        q, _r = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
        monkeypatch.setattr(global_rotation, "stream_rotation",
                            lambda *args, q=q, **kwargs: (q, torch.ones(64, dtype=torch.float64)))
        other = tiny_model("llama")
        _compress(other, slicing=0.25)
        assert other.config.hidden_size == model.config.hidden_size
        random_errors.append(rel_error(logits(other, x), ref))
    assert pca_error < min(random_errors), (pca_error, random_errors)


# ----------------------------------------------------------------------------- command line


def _cli(*args: str) -> tuple[int, str, str]:
    """``slicekit ARGS`` in this process (see clirun): exit status, stdout, stderr."""
    run = run_cli(*args)
    return run.rc, run.out, run.err


def test_cli_writes_a_vanilla_checkpoint(tmp_path, data_dir):
    src, out = tmp_path / "src", tmp_path / "out"
    save_tiny_with_tokenizer(src)
    rc, stdout, err = _cli("compress", "--model", str(src), "--method", "slicegpt", "--rotation", "global",
                           "--slicing", "0.25", "--round-to", "4", "--cal-nsamples", "4", "--cal-seqlen", "32",
                           "--out", str(out), "--json", "--quiet")
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["format"] == "vanilla"
    assert res["params"]["compressed"]["decoder"] < res["params"]["original"]["decoder"]
    cfg = json.loads((out / "config.json").read_text())
    assert "auto_map" not in cfg and "slicekit" not in cfg and cfg["hidden_size"] == 48

    rc, stdout, err = _cli("info", "--model", str(out), "--json")
    assert rc == 0, err
    info = json.loads(stdout)
    assert info["hidden_size"] == 48 and info["head_dim"] == 16 and info["num_heads"] == 4
    assert info["params"]["decoder"] == res["params"]["compressed"]["decoder"]


def test_global_output_exports_to_gguf_exactly(tmp_path):
    """The plain narrower model is what llama.cpp reads: the F32 GGUF export loads back through
    transformers' GGUF loader with the same logits (head_dim ≠ hidden/heads is written explicitly)."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from slicekit.export import export_gguf
    from test_export import bpe_tokenizer, tiny_lm

    model = tiny_lm("llama")
    compress(model, None, "slicegpt", _global(slicing=0.25, round_to=4), batches=tiny_calibration(), progress=False)
    assert model.config.hidden_size == 48
    export_gguf(model, tmp_path / "m.gguf", "f32", bpe_tokenizer())
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert back.config.hidden_size == 48
    x = tiny_inputs()
    assert rel_error(logits(back, x), logits(model, x)) < 1e-5
