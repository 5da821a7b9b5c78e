"""DISP-LLM: gather/scatter residual blocks, learned masks, exact counts, checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from slicekit.arch import get_arch
from slicekit.checkpoint import load, save
from slicekit.errors import SlicekitError
from slicekit.methods import MethodContext, get_method
from slicekit.methods.disp import DISPConfig
from slicekit.methods.disp.procedure import (
    STRUCTURES,
    MaskCounter,
    MaskedModel,
    learn,
    plan_from_keeps,
    prune,
    select,
    structure_sizes,
    unsupported,
)
from slicekit.modeling_slicekit import SlicedLayer, SlicekitShapeError, apply_shape, check_features
from slicekit.pipeline import clone_model, compress
from slicekit.shape import Plan, block_spec, count_built, count_plan
from tiny import ARCHS, NO_SLICEKIT, logits, rel_error, tiny_calibration, tiny_inputs, tiny_model

SUPPORTED = [a for a in ARCHS if unsupported(tiny_model(a)) is None]
CORE = ["llama", "qwen2", "mistral", "gpt_neox", "opt"]



def random_keeps(model, seed: int = 0, keep: float = 0.6) -> list[torch.Tensor]:
    """Random kept subsets of every structure (some layers' read sets left full on purpose)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, n in enumerate(structure_sizes(Plan.of(model))):
        if k == 5:  # layer 1's attention read stays full: a layer mixing indexed and full sides
            out.append(torch.arange(n))
            continue
        m = max(1, int(keep * n))
        out.append(torch.randperm(n, generator=g)[:m].sort().values)
    return out


def hard_masks(model, keeps: list[torch.Tensor]) -> list[torch.Tensor]:
    masks = []
    for n, k in zip(structure_sizes(Plan.of(model)), keeps, strict=True):
        m = torch.zeros(n)
        m[k] = 1.0
        masks.append(m)
    return masks


def masked_logits(model, masks, x) -> torch.Tensor:
    with MaskedModel(model) as mm:
        mm.masks = masks
        return logits(model, x)


def test_supported_families_and_refusals():
    assert set(CORE) <= set(SUPPORTED)
    for arch in ("gemma2", "olmo2", "mixtral"):
        assert arch not in SUPPORTED
        with pytest.raises(SlicekitError, match="disp cannot compress this model"):
            compress(tiny_model(arch), None, "disp", DISPConfig(train_tokens=10), batches=tiny_calibration(),
                     progress=False)


def test_config_validation():
    with pytest.raises(SlicekitError, match="schedule=constant"):
        DISPConfig(schedule="dynamic")
    with pytest.raises(SlicekitError, match="target_params"):
        DISPConfig(target_params=None)
    with pytest.raises(SlicekitError, match="train_tokens"):
        DISPConfig(train_tokens=0)
    with pytest.raises(SlicekitError, match="learned masks"):
        get_method("disp").plan(tiny_model("llama"), DISPConfig(), [0.2])


@pytest.mark.parametrize("arch", SUPPORTED)
def test_all_ones_masks_are_the_original(arch):
    model = tiny_model(arch)
    x = tiny_inputs()
    ref = logits(model, x)
    ones = [torch.ones(n) for n in structure_sizes(Plan.of(model))]
    assert torch.equal(masked_logits(model, ones, x), ref)
    assert torch.equal(logits(model, x), ref)  # hooks removed
    # keeping everything plans the original shape: no block, nothing resized
    everything = [torch.arange(n) for n in structure_sizes(Plan.of(model))]
    assert plan_from_keeps(model, everything) == Plan.of(model)


@pytest.mark.parametrize("arch", SUPPORTED)
def test_full_indices_are_the_original(arch):
    """The index form with indices covering every dimension computes the original layer."""
    model = tiny_model(arch)
    x = tiny_inputs()
    ref = logits(model, x)
    d = model.config.hidden_size
    spec = get_arch(model.config)
    full = {"attn_read": d, "attn_write": d, "mlp_read": d, "mlp_write": d}
    blocks = {spec.layer_path(i): {"type": "block", **block_spec(model.config), **full}
              for i in range(len(spec.layer_list(model)))}
    apply_shape(model, {"format": 2, "features": ["residual_block", "residual_index"], "modules": blocks})
    assert all(isinstance(layer, SlicedLayer) for layer in spec.layer_list(model))
    assert rel_error(logits(model, x), ref) < 1e-6


@pytest.mark.parametrize("arch", SUPPORTED)
def test_pruned_model_is_the_masked_model_and_counts_are_exact(arch):
    model = tiny_model(arch)
    x = tiny_inputs()
    keeps = random_keeps(model)
    want = masked_logits(model, hard_masks(model, keeps), x)
    plan = plan_from_keeps(model, keeps)
    counter = MaskCounter(Plan.of(model))
    sizes = [int(k.numel()) for k in keeps]
    pruned = clone_model(model)
    prune(pruned, keeps)
    got = Plan.of(pruned)
    assert plan.differences(got) == []
    assert counter.decoder(sizes) == count_plan(plan).decoder == count_built(plan).decoder
    assert count_plan(plan) == count_built(plan)
    assert count_plan(got).total == sum(p.numel() for p in pruned.parameters())
    assert count_plan(plan).decoder < count_plan(Plan.of(model)).decoder
    assert rel_error(logits(pruned, x), want) < 1e-5
    # differentiable mask sums give the same count as integers
    assert float(counter.decoder([m.sum() for m in hard_masks(model, keeps)])) == counter.decoder(sizes)


def test_older_loader_refuses_the_index_form():
    model = tiny_model("llama")
    plan = plan_from_keeps(model, random_keeps(model))
    shape = plan.shape()
    assert "residual_index" in shape["features"]
    import slicekit.modeling_slicekit as mk

    old = mk.FEATURES
    try:
        mk.FEATURES = frozenset(old - {"residual_index"})
        with pytest.raises(SlicekitShapeError, match="residual_index"):
            check_features(shape)
    finally:
        mk.FEATURES = old
    # shortcut matrices and indices in one layer is a corrupt description
    bad = json.loads(json.dumps(shape))
    path = next(p for p, s in bad["modules"].items() if s["type"] == "block")
    bad["modules"][path]["attn_shortcut"] = [64, 64]
    with pytest.raises(SlicekitShapeError, match="both shortcut"):
        apply_shape(tiny_model("llama"), bad)


def _pruned_with_pipeline_shape(arch: str):
    model = tiny_model(arch)
    keeps = random_keeps(model, seed=3)
    plan = plan_from_keeps(model, keeps)
    prune(model, keeps)
    from slicekit.modeling_slicekit import attach

    attach(model, {"shape": plan.shape(), "info": {"method": "disp"}})
    return model


@pytest.mark.parametrize("arch", SUPPORTED)
def test_save_load_round_trip(arch, tmp_path):
    x = tiny_inputs()
    model = _pruned_with_pipeline_shape(arch)
    ref = logits(model, x)
    out = tmp_path / "c"
    assert save(model, None, str(out), info={"method": "disp"}) == "slicekit"
    cfg = json.loads((out / "config.json").read_text())
    assert "residual_index" in cfg["slicekit"]["shape"]["features"]
    blocks = [s for s in cfg["slicekit"]["shape"]["modules"].values() if s["type"] == "block"]
    # sizes in config.json, not index lists
    assert blocks and all(isinstance(s.get("attn_write"), (int, type(None))) for s in blocks)
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        idx = [k for k in fh.keys() if k.endswith("_index")]  # noqa: SIM118
        assert idx and all(fh.get_tensor(k).dtype == torch.int64 for k in idx)
    loaded, _ = load(str(out))
    assert rel_error(logits(loaded, x), ref) <= 1e-6
    loaded.save_pretrained(str(tmp_path / "again"))  # a loaded model saves again, equal
    again, _ = load(str(tmp_path / "again"))
    assert rel_error(logits(again, x), ref) <= 1e-6


def test_plain_transformers_loads_it(tmp_path):
    """trust_remote_code, slicekit not importable: equal logits; the KV cache works."""
    x = tiny_inputs()
    torch.save(x, tmp_path / "x.pt")
    for arch in CORE:
        model = _pruned_with_pipeline_shape(arch)
        torch.save(logits(model, x), tmp_path / f"{arch}-ref.pt")
        save(model, None, str(tmp_path / arch), info={"method": "disp"})
    code = NO_SLICEKIT + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        for arch in {CORE!r}:
            m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + arch, trust_remote_code=True)
            ref = torch.load({str(tmp_path)!r} + f"/{{arch}}-ref.pt", weights_only=True)
            with torch.no_grad():
                y = m(input_ids=x).logits
            err = ((y - ref).norm() / ref.norm()).item()
            assert err <= 1e-6, (arch, err)
            m.config.use_cache = True
            g = m.generate(x[:1, :6], max_new_tokens=4, do_sample=False, use_cache=True)
            g2 = m.generate(x[:1, :6], max_new_tokens=4, do_sample=False, use_cache=False)
            assert torch.equal(g, g2), arch
            print(arch, type(m).__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(arch in proc.stdout for arch in CORE)


def _run(arch: str = "llama", **kw):
    model = tiny_model(arch)
    cfg = DISPConfig(**{"target_params": 0.3, "train_tokens": 1000, "lr": 1e-2, **kw})
    report = compress(model, None, "disp", cfg, batches=tiny_calibration(), progress=False)
    return model, report


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_pipeline_meets_the_target_and_is_deterministic(arch, tmp_path):
    model, report = _run(arch)
    original = report.params_original["decoder"]
    kept = report.params_compressed["decoder"]
    assert abs(kept / original - 0.7) < 0.01
    assert report.params_compressed == count_plan(Plan.of(model)).as_dict()
    s = report.summary
    assert s["training"]["steps"] == 16  # 1000 tokens / 64 per batch (2 × 32), rounded up
    assert s["training"]["kept_last"] < s["training"]["kept_first"]  # the regulariser pulls P towards p
    assert [len(v) for v in s["structure_sizes"]["layers"]] == [len(STRUCTURES)] * 2
    model2, report2 = _run(arch)
    assert report2.plan == report.plan
    x = tiny_inputs()
    assert torch.equal(logits(model, x), logits(model2, x))
    model.save_pretrained(str(tmp_path / "c"))
    loaded, _ = load(str(tmp_path / "c"))
    assert rel_error(logits(loaded, x), logits(model, x)) <= 1e-6


def test_learning_leaves_the_model_frozen_and_checkpointing_changes_nothing():
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = MethodContext(tiny_calibration(), progress=False)

    def run(**kw):
        return learn(model, DISPConfig(**{"target_params": 0.3, "train_tokens": 256, "lr": 1e-2, **kw}), ctx)

    calls = []
    probe = get_arch(model.config).layer_list(model)[0].self_attn.q_proj.register_forward_hook(
        lambda *_: calls.append(1))
    a = run()
    assert a.log["steps"] == 4 and len(calls) == 4  # 256 tokens / 64 per batch
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    b = run(gradient_checkpointing=True)
    assert len(calls) == 4 + 2 * 4  # every layer is recomputed in the backward pass
    probe.remove()
    assert all(torch.allclose(s, t, atol=1e-5) for s, t in zip(a.scores, b.scores, strict=True))
    layers = get_arch(model.config).layer_list(model)
    assert not any("forward" in vars(layer) for layer in layers)  # the checkpoint wrappers are gone
    c = run(disp_seed=1)
    assert not all(torch.equal(s, t) for s, t in zip(a.scores, c.scores, strict=True))
    short = run(train_tokens=128, train_seqlen=8)
    assert short.log["steps"] == 8  # 128 tokens / (2 × 8) per batch


def test_select_orders_by_score_and_keeps_one_per_structure():
    scores = [torch.tensor([3.0, -1.0, 2.0]), torch.tensor([-5.0, -4.0])]
    assert [k.tolist() for k in select(scores, None)] == [[0, 2], [1]]
    assert [k.tolist() for k in select(scores, 0.0)] == [[0, 1, 2], [0, 1]]
    assert [k.tolist() for k in select(scores, 0.4)] == [[0, 1, 2], [1]]  # two lowest of five removed
    assert [k.tolist() for k in select(scores, 0.99)] == [[0], [1]]
    assert [k.tolist() for k in select(scores, 0.99, cap=0.5)] == [[0, 2], [1]]  # ⌈0.5·n⌉ kept each
    assert [k.tolist() for k in select(scores, None, cap=0.4)] == [[0, 2], [0, 1]]  # ⌈0.6·n⌉ kept each


def test_select_rounds_kept_counts_to_multiples_and_stays_monotone():
    gen = torch.Generator().manual_seed(0)
    scores = [torch.randn(n, generator=gen) for n in (64, 40, 5, 130)]
    previous = None
    for remove in [i / 50 for i in range(50)]:
        plain = select(scores, remove)
        rounded = select(scores, remove, round_to=8)
        counts = [k.numel() for k in rounded]
        for s, k, p, c in zip(scores, rounded, plain, counts, strict=True):
            n = s.numel()
            if n >= 8:
                assert c % 8 == 0 and 8 <= c <= n
                assert abs(c - p.numel()) <= 4 or (c == 8 and p.numel() < 8)  # the nearest multiple, ≥ 8
            else:
                assert c == p.numel()  # too small to round
            # the structure's best-scoring dimensions, in order
            assert k.tolist() == sorted(torch.argsort(s, descending=True, stable=True)[:c].tolist())
        if previous is not None:  # removing more never keeps more: the target bisection's premise
            assert all(c <= q for c, q in zip(counts, previous, strict=True))
        previous = counts
    assert [k.numel() for k in select(scores, None, round_to=8)] == [
        min(s.numel(), max(8, 8 * int((s > 0).sum().item() / 8 + 0.5))) if s.numel() >= 8 else int((s > 0).sum())
        for s in scores]


def test_round_to_is_the_default_and_version_1_recipes_reproduce_unrounded():
    from slicekit.methods import config_from_dict, config_to_dict

    assert DISPConfig().round_to == 8
    with pytest.raises(SlicekitError, match="round_to"):
        DISPConfig(round_to=0)
    old = {k: v for k, v in config_to_dict(DISPConfig()).items() if k != "round_to"} | {"config_version": 1}
    assert config_from_dict(DISPConfig, old).round_to == 1
    assert config_from_dict(DISPConfig, {**old, "round_to": 16}).round_to == 16  # recorded values win
    assert config_from_dict(DISPConfig, config_to_dict(DISPConfig(round_to=4))).round_to == 4


def test_noise_annealing_ends_on_the_deterministic_masks():
    from slicekit.methods.disp.hypernet import gumbel_sigmoid_masks
    from slicekit.methods.disp.procedure import noise_scale

    assert [noise_scale(s, 8, 0.0) for s in range(8)] == [1.0] * 8  # off: the paper's full noise
    assert [noise_scale(s, 8, 0.5) for s in range(8)] == [1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert noise_scale(0, 1, 0.25) == 1.0 and noise_scale(0, 4, 1.0) == 0.75  # no step past the range
    logits = [torch.linspace(-2.0, 2.0, 41)]
    noisy = gumbel_sigmoid_masks(logits, 0.5, 0.4, torch.Generator().manual_seed(0))[0]
    quiet = gumbel_sigmoid_masks(logits, 0.5, 0.4, torch.Generator().manual_seed(0), noise_scale=0.0)[0]
    assert torch.equal(quiet, (logits[0] + 0.5 > 0).float())  # the masks the surgery applies
    assert not torch.equal(noisy, quiet)
    with pytest.raises(SlicekitError, match="noise_anneal"):
        DISPConfig(noise_anneal=1.5)
    # the training log says where the final, noise-free step ended
    model = tiny_model("llama")
    out = learn(model, DISPConfig(target_params=0.3, train_tokens=256, lr=1e-2, noise_anneal=0.5),
                MethodContext(tiny_calibration(), progress=False))
    assert out.log["noise_anneal"] == 0.5 and 0.0 < out.log["kept_final_step"] <= 1.0
