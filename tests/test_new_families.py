"""Today's families (issue #13): Qwen3, Gemma 1/2/3, OLMo 2, Mixtral / Qwen-MoE.

- every table row is true to the installed transformers: its paths exist, and a forward pass is
  wired as the row says (input norms, output norms, residual adds), with the norm scale and the
  embedding scale the row states;
- the methods that can compress a family do (FASP, MoDeGPT on every dense family; SliceGPT where
  the stream can be rotated), with the plan equal to the result and save → load exact;
- the methods that cannot refuse before any work, naming the reason from the table;
- the exact form of an output norm on a rotated, sliced stream (:func:`post_norm_factors`);
- ``info`` and ``eval`` work on a causal LM the table does not list at all.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from clirun import Run, offline_env, run_cli
from slicekit.arch import attention_info, get_arch, linear_weight, mlp_width
from slicekit.checkpoint import load, save
from slicekit.errors import SlicekitError
from slicekit.invariance import invariant_plan, make_invariant, post_norm_cost, post_norm_factors
from slicekit.methods import MethodContext, available_methods, get_method
from slicekit.pipeline import check_supported, compress
from slicekit.shape import Plan, count_plan
from tiny import (
    NEW_ARCHS,
    logits,
    mlp_prunable_archs,
    rel_error,
    rotatable_archs,
    save_tiny_with_tokenizer,
    tiny_calibration,
    tiny_config,
    tiny_inputs,
    tiny_model,
)

MOE = ["mixtral", "qwen3_moe", "qwen2_moe"]
DENSE = [a for a in NEW_ARCHS if a not in MOE]
SANDWICH = ["gemma2", "gemma3_text", "olmo2"]

#: what the table must say: (rotation invariant, MLP prunable, heads removable, norm offset)
EXPECTED = {
    "qwen3": (True, True, True, 0.0),
    "gemma": (True, True, True, 1.0),
    "gemma2": (False, True, True, 1.0),
    "gemma3_text": (False, True, True, 1.0),
    "olmo2": (False, True, False, 0.0),
    "mixtral": (True, False, True, 0.0),
    "qwen3_moe": (True, False, True, 0.0),
    "qwen2_moe": (True, False, True, 0.0),
}


def _resolve(model: torch.nn.Module, path: str) -> torch.nn.Module | torch.Tensor:
    """A module, or (for the experts' 3-D weights) a parameter."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return model.get_parameter(path)


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


# ------------------------------------------------------------------------ the rows are true

def test_every_new_family_is_in_the_matrix_with_the_expected_abilities():
    assert set(EXPECTED) == set(NEW_ARCHS)
    for arch, (rot, mlp, heads, offset) in EXPECTED.items():
        spec = get_arch(tiny_config(arch))
        assert spec.rotation_invariant is rot and (spec.not_invariant_reason is None) is rot, arch
        assert spec.mlp_prunable is mlp and (spec.mlp_fixed_reason is None) is mlp, arch
        assert (spec.heads_fixed_reason is None) is heads, arch
        assert spec.norm_offset == offset, arch
    assert set(rotatable_archs()) >= {"qwen3", "gemma", "llama"}
    assert not set(rotatable_archs()) & set(SANDWICH) and set(MOE) <= set(rotatable_archs())
    assert not set(mlp_prunable_archs()) & set(MOE)


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_row_paths_exist_with_the_shapes_the_row_implies(arch):
    model = tiny_model(arch)
    cfg = model.config
    spec = get_arch(cfg)
    b = spec.block
    hidden, width = cfg.hidden_size, mlp_width(cfg)
    info = attention_info(cfg)
    assert torch.isfinite(logits(model, tiny_inputs())).all()
    for path in (spec.token_embedding, spec.final_norm, spec.head):
        model.get_submodule(path)
    layers = spec.layer_list(model)
    assert len(layers) == cfg.num_hidden_layers
    for i, layer in enumerate(layers):
        for path in spec.layer_row_paths():
            _resolve(model, spec.layer_path(i, path))  # raises if the row names a path that is not there
        for name in b.attn_readers:
            assert linear_weight(layer.get_submodule(name)).shape[1] == hidden, name
        assert linear_weight(layer.get_submodule(f"{b.attn}.{b.attn_q}")).shape[0] == info.num_heads * info.head_dim
        assert linear_weight(layer.get_submodule(b.attn_writer)).shape == (hidden, info.num_heads * info.head_dim)
        for name in spec.norm_paths():
            assert layer.get_submodule(name).weight.shape == (hidden,), name
        # q/k norms: present exactly where the row says, over what the row says
        attn_norms = [m for n, m in layer.get_submodule(b.attn).named_modules() if n and "norm" in type(m).__name__.lower()]
        if not b.qk_norm:
            assert not attn_norms
        else:
            sizes = {m.weight.numel() for m in attn_norms}
            want = ({info.head_dim} if b.qk_norm_scope == "head"
                    else {info.num_heads * info.head_dim, info.num_kv_heads * info.head_dim})
            assert len(attn_norms) == 2 and sizes == want
        e = b.experts
        if e is None:
            up_rows = sum(linear_weight(layer.get_submodule(n)).shape[0] for n in b.mlp_up)
            assert up_rows == width * len(b.mlp_up) * b.mlp_up_fused
            assert linear_weight(layer.get_submodule(b.mlp_down)).shape == (hidden, width)
        else:
            n_exp = getattr(cfg, e.num_experts_key)
            experts = layer.get_submodule(e.experts)
            assert getattr(experts, e.gate_up).shape == (n_exp, 2 * width, hidden)
            assert getattr(experts, e.down).shape == (n_exp, hidden, width)
            assert layer.get_submodule(e.router).weight.shape == (n_exp, hidden)
            assert layer.get_parameter(b.mlp_down) is getattr(experts, e.down)
            assert layer.get_submodule(e.router).top_k == getattr(cfg, e.top_k_key)


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_a_forward_pass_is_wired_as_the_row_says(arch):
    """Input norms feed the readers, output norms read the writers, and the layer computes
    ``mid = x + post_attn(attn)``, ``out = mid + post_mlp(mlp(mlp_norm(mid)))`` — from hooks on the
    real modules, so a row that names the wrong norm (Gemma 2's ``post_attention_layernorm`` is
    an output norm, Llama's an input norm) fails here."""
    model = tiny_model(arch)
    spec = get_arch(model.config)
    b = spec.block
    layer = spec.layer_list(model)[1]
    seen: dict[str, tuple] = {}
    hooks = []
    names = {"layer": "", "attn": b.attn, "writer": b.attn_writer, "reader": b.attn_readers[0], "mlp": b.mlp[0]}
    names.update({k: v for k, v in (("attn_norm", b.attn_norm), ("mlp_norm", b.mlp_norm),
                                    ("post_attn", b.post_attn_norm), ("post_mlp", b.post_mlp_norm)) if v})
    for key, path in names.items():
        mod = layer.get_submodule(path) if path else layer

        def hook(m, args, kwargs, out, key=key):
            seen[key] = (_hidden_arg(args, kwargs).detach(), (out[0] if isinstance(out, tuple) else out).detach())

        hooks.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        logits(model, tiny_inputs())
    finally:
        for h in hooks:
            h.remove()
    x, out = seen["layer"]
    attn_in = seen["attn_norm"][1] if b.attn_norm else x
    assert torch.allclose(seen["reader"][0], attn_in)
    attn_out = seen["attn"][1]
    assert torch.allclose(seen["writer"][1], attn_out)
    if b.post_attn_norm:
        assert torch.allclose(seen["post_attn"][0], attn_out)
        attn_out = seen["post_attn"][1]
    mid = x + attn_out
    mlp_in = seen["mlp_norm"][1] if b.mlp_norm else mid
    if b.mlp_norm:
        assert torch.allclose(seen["mlp_norm"][0], mid, atol=1e-6)
    assert torch.allclose(seen["mlp"][0].reshape(mlp_in.shape), mlp_in, atol=1e-6)
    mlp_out = seen["mlp"][1].reshape(mid.shape)
    if b.post_mlp_norm:
        assert torch.allclose(seen["post_mlp"][0].reshape(mid.shape), mlp_out)
        mlp_out = seen["post_mlp"][1]
    assert torch.allclose(out, mid + mlp_out, atol=1e-5)


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_norm_scale_and_embedding_scale_are_what_the_row_says(arch):
    model = tiny_model(arch)
    spec = get_arch(model.config)
    hidden = model.config.hidden_size
    x = torch.randn(3, 5, hidden, generator=torch.Generator().manual_seed(0))
    layer = spec.layer_list(model)[0]
    norms = [layer.get_submodule(n) for n in spec.norm_paths()] + [model.get_submodule(spec.final_norm)]
    for norm in norms:
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (spec.norm_offset + norm.weight)
        with torch.no_grad():
            assert rel_error(norm(x), want) < 1e-6
    emb = model.get_submodule(spec.token_embedding)
    ids = tiny_inputs()
    with torch.no_grad():
        assert rel_error(emb(ids), emb.weight[ids] * spec.embedding_multiplier(model.config)) < 1e-6
    if spec.embedding_scale:
        assert spec.embedding_multiplier(model.config) == pytest.approx(math.sqrt(hidden))


# ------------------------------------------------------------------------ SliceGPT

@pytest.mark.parametrize("arch", [a for a in NEW_ARCHS if a in rotatable_archs()])
def test_slicegpt_on_rotatable_new_families(arch, tmp_path):
    """Qwen3 (q/k norms inside the heads) and Gemma ((1 + w) norms, √D embeddings, tied head):
    invariance and full-width rotation keep the logits; 25 % slicing saves and loads exactly."""
    x = tiny_inputs()
    model = tiny_model(arch)
    ref = logits(model, x)
    make_invariant(model)
    assert rel_error(logits(model, x), ref) < 1e-5  # would fail if the (1 + w) offset were not folded
    model = tiny_model(arch)
    compress(model, None, "slicegpt", get_method("slicegpt").config_cls(slicing=0.0, round_to=1),
             batches=tiny_calibration(), progress=False)
    assert get_arch(model.config).layer_list(model)[0].attn_shortcut is not None  # really rotated
    assert rel_error(logits(model, x), ref) < 1e-5
    model = tiny_model(arch)
    report = compress(model, None, "slicegpt", get_method("slicegpt").config_cls(slicing=0.25),
                      batches=tiny_calibration(), progress=False)
    out = logits(model, x)
    assert torch.isfinite(out).all() and report.summary["attn_in_widths"] == [48, 48]
    save(model, None, str(tmp_path / "c"))
    loaded, _ = load(str(tmp_path / "c"))
    assert rel_error(logits(loaded, x), out) < 1e-6


@pytest.mark.parametrize("arch", [a for a in NEW_ARCHS if a not in rotatable_archs()])
def test_rotation_is_refused_with_the_reason_and_nothing_changes(arch):
    model = tiny_model(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    classes = {n: type(m) for n, m in model.named_modules()}
    word = "experts" if arch in MOE else "post_feedforward_layernorm"
    for fn in (make_invariant, invariant_plan):
        with pytest.raises(SlicekitError, match=word):
            fn(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {n: type(m) for n, m in model.named_modules()} == classes


# ------------------------------------------------------------------------ output norms, exactly

def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def _post_norm_reference(norm: torch.nn.Module, offset: float, y: torch.Tensor) -> torch.Tensor:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * (offset + norm.weight.double())


@pytest.mark.parametrize("arch", SANDWICH)
def test_post_norm_factors_are_exact_at_any_width(arch):
    """writer → output norm → rotation (→ slicing) equals linear → weightless norm over r entries
    dividing by D → linear, on the layer's real writer inputs; and the factors cost what
    ``post_norm_cost`` says."""
    model = tiny_model(arch)
    spec = get_arch(model.config)
    b = spec.block
    layer = spec.layer_list(model)[0]
    hidden = model.config.hidden_size
    captured: dict[str, torch.Tensor] = {}
    hooks = [layer.get_submodule(w).register_forward_hook(
        lambda m, a, o, w=w: captured.__setitem__(w, a[0].detach().double())) for w in (b.attn_writer, b.mlp_down)]
    logits(model, tiny_inputs())
    for h in hooks:
        h.remove()
    q = _orthogonal(hidden, 1)
    for writer, norm_name in ((b.attn_writer, b.post_attn_norm), (b.mlp_down, b.post_mlp_norm)):
        lin, norm = layer.get_submodule(writer), layer.get_submodule(norm_name)
        w = linear_weight(lin).double()
        z = captured[writer].reshape(-1, w.shape[1])
        gamma = spec.norm_offset + norm.weight.double()
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        ref_full = _post_norm_reference(norm, spec.norm_offset, z @ w.T)  # (tokens, D), original basis
        for width in (hidden, 40):
            a_mat, a_bias, m_mat = post_norm_factors(w, None, gamma, q, width)
            assert a_bias is None
            t = z @ a_mat.T
            got = (t * torch.rsqrt(t.pow(2).sum(-1, keepdim=True) / hidden + eps)) @ m_mat.T
            assert rel_error(got, ref_full @ q[:, :width]) < 1e-10, (writer, width)
            r = min(hidden, w.shape[1])
            assert a_mat.shape == (r, w.shape[1]) and m_mat.shape == (width, r)
            assert a_mat.numel() + m_mat.numel() == post_norm_cost(hidden, w.shape[1], width)[0]
        assert post_norm_cost(hidden, w.shape[1], hidden)[1] == hidden * w.shape[1]


def test_post_norm_factors_with_a_bias_and_a_narrow_writer():
    """A writer narrower than the stream (rank m + 1 with its bias) — the generic rank of the form."""
    g = torch.Generator().manual_seed(3)
    hidden, inner, width, eps = 24, 7, 10, 1e-6
    w = torch.randn(hidden, inner, generator=g, dtype=torch.float64)
    bias = torch.randn(hidden, generator=g, dtype=torch.float64)
    gamma = 1.0 + 0.3 * torch.randn(hidden, generator=g, dtype=torch.float64)
    z = torch.randn(50, inner, generator=g, dtype=torch.float64)
    q = _orthogonal(hidden, 4)
    y = z @ w.T + bias
    ref = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * gamma) @ q[:, :width]
    a_mat, a_bias, m_mat = post_norm_factors(w, bias, gamma, q, width)
    assert a_mat.shape == (inner + 1, inner) and a_bias.shape == (inner + 1,) and m_mat.shape == (width, inner + 1)
    t = z @ a_mat.T + a_bias
    got = (t * torch.rsqrt(t.pow(2).sum(-1, keepdim=True) / hidden + eps)) @ m_mat.T
    assert rel_error(got, ref) < 1e-10
    assert a_mat.numel() + a_bias.numel() + m_mat.numel() == post_norm_cost(hidden, inner, width, bias=True)[0]


def test_exact_output_norm_form_removes_nothing_at_25_percent_on_gemma2_2b():
    """The number behind refusing SliceGPT on sandwich-norm families: on Gemma-2-2B's shapes the
    exact form keeps as many decoder parameters as the dense layer at 25 % slicing."""
    hidden, ffn, q_width, kv_width = 2304, 9216, 8 * 256, 4 * 256
    d = 1728
    dense = hidden * (2 * q_width + 2 * kv_width) + 3 * hidden * ffn
    readers = d * (q_width + 2 * kv_width) + 2 * d * ffn
    sliced = readers + 2 * d * d + post_norm_cost(hidden, q_width, d)[0] + post_norm_cost(hidden, ffn, d)[0]
    plain = readers + 2 * d * d + post_norm_cost(hidden, q_width, d)[1] + post_norm_cost(hidden, ffn, d)[1]
    assert abs(1 - sliced / dense) < 0.01  # the exact form saves nothing
    assert 1 - plain / dense > 0.15  # what the same slicing saves without output norms


# ------------------------------------------------------------------------ FASP and MoDeGPT

@pytest.mark.parametrize("method", ["fasp", "modegpt"])
@pytest.mark.parametrize("arch", DENSE)
def test_fasp_and_modegpt_compress_every_dense_new_family(arch, method, tmp_path):
    entry = get_method(method)
    x = tiny_inputs()
    model = tiny_model(arch)
    ref = logits(model, x)
    compress(model, None, method, entry.config_cls(target_params=0.0), batches=tiny_calibration(), progress=False)
    assert rel_error(logits(model, x), ref) < 1e-6
    model = tiny_model(arch)
    kwargs = {"round_to": 4} if method == "fasp" else {}
    report = compress(model, None, method, entry.config_cls(target_params=0.25, **kwargs),
                      batches=tiny_calibration(), progress=False)
    out = logits(model, x)
    assert torch.isfinite(out).all()
    assert Plan.of(model, attributes=report.plan.attributes).shape() == report.plan.shape()
    real_decoder = sum(p.numel() for p in get_arch(model.config).layer_list(model).parameters())
    assert count_plan(report.plan).decoder == real_decoder == report.params_compressed["decoder"]
    removed = 1 - real_decoder / report.params_original["decoder"]
    assert abs(removed - 0.25) < 0.05, removed
    save(model, None, str(tmp_path / "c"))
    loaded, _ = load(str(tmp_path / "c"))
    assert rel_error(logits(loaded, x), out) < 1e-6


@pytest.mark.parametrize("arch", [a for a in DENSE if get_arch(tiny_config(a)).heads_fixed_reason is None])
def test_removing_heads_that_write_nothing_is_exact(arch):
    """FASP removes a whole KV group (with its per-head q/k norms, Qwen3/Gemma 3) without
    disturbing the others: where that group's output columns are zero, the logits do not move."""
    model = tiny_model(arch)
    spec = get_arch(model.config)
    info = attention_info(model.config)
    group_cols = info.group_size * info.head_dim
    with torch.no_grad():
        for layer in spec.layer_list(model):
            linear_weight(layer.get_submodule(spec.block.attn_writer))[:, group_cols:2 * group_cols] = 0
    x = tiny_inputs()
    ref = logits(model, x)
    entry = get_method("fasp")
    config = entry.config_cls(attention_sparsity=0.5)
    fractions = [0.0] * model.config.num_hidden_layers
    plan = entry.plan(model, config, fractions)
    entry.apply(model, plan, config, MethodContext(tiny_calibration(), progress=False, fractions=fractions))
    assert Plan.of(model, attributes=plan.attributes).shape() == plan.shape()
    q_proj = f"{spec.block.attn}.{spec.block.attn_q}"
    q_rows = linear_weight(spec.layer_list(model)[0].get_submodule(q_proj)).shape[0]
    assert q_rows == info.num_heads * info.head_dim // 2  # one of two KV groups removed
    assert rel_error(logits(model, x), ref) < 1e-5


def test_fasp_refuses_head_removal_where_qk_norms_span_all_heads():
    model = tiny_model("olmo2")
    entry = get_method("fasp")
    with pytest.raises(SlicekitError, match="q_norm"):
        check_supported(entry, model, entry.config_cls(attention_sparsity=0.5))


# ------------------------------------------------------------------------ refusals before any work

def _refusals() -> list[tuple[str, str, str]]:
    # SliceGPT rotates mixture-of-experts blocks (tests/test_moe.py); FASP, MoDeGPT and DOTResize
    # narrow every expert (tests/test_moe_fasp.py, tests/test_moe_mlp_methods.py); the others cannot
    out = [(m, a, "experts") for a in MOE for m in available_methods()
           if m not in ("slicegpt", "fasp", "modegpt", "dotresize")]
    out += [("slicegpt", a, "post_attention_layernorm") for a in SANDWICH]
    return out


@pytest.mark.parametrize(("method", "arch", "word"), _refusals())
def test_methods_that_cannot_compress_a_family_refuse_before_any_work(method, arch, word):
    """Refused by the method's ``unsupported`` hook, with the table's reason — before calibration
    text is drawn (no tokenizer is given: drawing text would fail differently)."""
    model = tiny_model(arch)
    entry = get_method(method)
    with pytest.raises(SlicekitError, match=f"{method} cannot compress this model: .*{word}"):
        compress(model, None, method, entry.config_cls(), progress=False)


# ------------------------------------------------------------------------ commands without an adapter

def _cli(*args: str) -> Run:
    """``slicekit ARGS`` in this process, offline (see clirun)."""
    return run_cli(*args, env=offline_env(TRANSFORMERS_OFFLINE="1"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog; it was not amused.\n" * 300)
    return path


@pytest.mark.parametrize("arch", ["stablelm", "mixtral"])
def test_info_and_eval_without_an_adapter_or_a_compression_method(arch, text_file, tmp_path):
    """``stablelm`` has no table row at all, ``mixtral`` one that only some methods can compress
    (SliceGPT rotates it, FASP, MoDeGPT and DOTResize narrow its experts; DISP-LLM cannot): info reports
    generic facts, real counts and those methods, eval computes a perplexity."""
    from slicekit.arch import ARCHITECTURES

    assert ("stablelm" not in ARCHITECTURES) and ("mixtral" in ARCHITECTURES)
    d = tmp_path / arch
    save_tiny_with_tokenizer(d, arch)
    model = tiny_model(arch)
    res = _cli("info", "--model", str(d))
    assert res.returncode == 0, res.stderr[-2000:]
    info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in res.stdout.splitlines())}
    assert info["model_type"] == arch and info["layers"] == "2" and info["hidden_size"] == "64"
    assert int(info["params total"].replace(",", "")) == sum(p.numel() for p in model.parameters())
    assert int(info["params decoder"].replace(",", "")) == sum(p.numel() for p in model.model.layers.parameters())
    if arch == "stablelm":
        assert info["compression methods"].startswith("none")
    else:
        methods = info["compression methods"].split(", ")
        assert {"slicegpt", "fasp", "modegpt", "dotresize"} <= set(methods) and "disp" not in methods
    res = _cli("eval", "--model", str(d), "--dataset", str(text_file), "--seqlen", "32", "--max-windows", "2",
               "--json", "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    ppl = json.loads(res.stdout)
    assert ppl["windows"] == 2 and math.isfinite(ppl["ppl"]) and 1 < ppl["ppl"] < 10 * 128


def test_info_lists_the_methods_a_sandwich_family_can_use(tmp_path):
    d = tmp_path / "gemma2"
    save_tiny_with_tokenizer(d, "gemma2")
    res = _cli("info", "--model", str(d), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    methods = json.loads(res.stdout)["compression_methods"]
    assert "fasp" in methods and "modegpt" in methods and "slicegpt" not in methods
