"""Recovery training on tiny models: LoRA/full, distillation, shapes kept, exact resumption."""

from __future__ import annotations

import copy
import itertools
import json
import os

import pytest
import torch

from slicekit.arch import get_arch
from slicekit.data import tokenize_text
from slicekit.errors import SlicekitError
from slicekit.recover import (
    RecoverConfig,
    TokenStream,
    _adamw,
    _kl_full,
    _kl_topk,
    _lr_at,
    recover,
    sample_teacher_text,
)
from tiny import VOCAB, logits, tiny_calibration, tiny_config, tiny_inputs, tiny_model

TEXT = "the quick brown fox jumps over the lazy dog. " * 300


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    """A character-level tokenizer whose ids fit the tiny models' 128-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(32, 127)}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2, "\n": 10})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return str(path)


def _cfg(text: str, **kw) -> RecoverConfig:
    # float32 unless a test asks otherwise: "auto" would pick bf16 on some CPUs and not on others
    base = dict(dataset=text, seqlen=32, tokens=32 * 4 * 12, batch_size=4, lr=3e-3, warmup=0.1, seed=3,
                precision="fp32")
    return RecoverConfig(**{**base, **kw})


def _shapes(model) -> dict:
    return {n: (tuple(t.shape), t.dtype) for n, t in model.state_dict().items()}


def _perturbed(model, scale: float = 0.03, seed: int = 5):
    student = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return student


def _mlp_pruned(model, keep: int = 64):
    """Every layer keeps the first ``keep`` MLP neurons: a plain Hugging Face model with a smaller
    ``intermediate_size`` (what an MLP-only structured pruning produces)."""
    from slicekit.arch import linear_weight, set_linear

    spec = get_arch(model.config)
    for layer in spec.layer_list(model):
        for name in spec.block.mlp_up:
            up = layer.get_submodule(name)
            set_linear(up, linear_weight(up)[:keep].clone())
        down = layer.get_submodule(spec.block.mlp_down)
        set_linear(down, linear_weight(down)[:, :keep].clone())
    model.config.intermediate_size = keep
    return model


def _slicegpt(model):
    from slicekit.methods.slicegpt import SliceGPTConfig
    from slicekit.pipeline import compress

    compress(model, None, "slicegpt", SliceGPTConfig(target_params=0.25), batches=tiny_calibration(), progress=False)
    return model


# ---------------------------------------------------------------- settings and data

@pytest.mark.parametrize("bad", [
    dict(seqlen=1), dict(tokens=0), dict(batch_size=0), dict(grad_accum=0), dict(lr=-1.0), dict(lr=float("nan")),
    dict(warmup=1.0), dict(weight_decay=-0.1), dict(mode="qlora"), dict(lora_r=0), dict(lora_alpha=0),
    dict(lora_dropout=1.0), dict(loss="mse"), dict(kd_temperature=0), dict(kd_alpha=1.5), dict(kd_topk=0),
    dict(hidden_distill=-1), dict(teacher_cache="ram"), dict(hidden_distill=1.0, teacher_cache="disk"),
    dict(seed=-1), dict(checkpoint_every=-1), dict(dataset=""), dict(max_grad_norm=0.0), dict(precision="fp16"),
    dict(sample_tokens=0), dict(sample_length=0), dict(sample_batch_size=0), dict(sample_temperature=0.0),
    dict(sample_temperature=float("nan")), dict(sample_top_p=0.0), dict(sample_top_p=1.5),
    dict(dataset="teacher", loss="ce"), dict(dataset="teacher", seqlen=64, tokens=100),
    dict(dataset="teacher", seqlen=64, sample_tokens=127), dict(mode="lora", train_embeddings=True),
])
def test_bad_settings_are_refused(bad):
    with pytest.raises(SlicekitError):
        RecoverConfig(**bad)


def test_default_lr_depends_on_mode():
    assert RecoverConfig().lr == 2e-4
    assert RecoverConfig(mode="full").lr == 2e-5
    assert RecoverConfig(tokens=1000, seqlen=100, batch_size=2, grad_accum=2).total_steps == 3


def test_bad_runs_are_refused(tok, text, tmp_path):
    model = tiny_model("llama")
    with pytest.raises(SlicekitError, match="teacher"):
        recover(model, tok, _cfg(text, loss="distill"), progress=False)
    with pytest.raises(SlicekitError, match="evaluation split"):
        recover(model, tok, _cfg("wikitext2", split="test"), progress=False)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(SlicekitError, match="too little"):
        recover(model, tok, _cfg(str(short)), progress=False)
    with pytest.raises(SlicekitError, match="not found"):
        recover(model, tok, _cfg(str(tmp_path / "missing.txt")), progress=False)
    from transformers import AutoModelForCausalLM

    wide = tiny_config("llama")
    wide.vocab_size = VOCAB + 8
    other = AutoModelForCausalLM.from_config(wide)
    with pytest.raises(SlicekitError, match="vocabulary"):
        recover(model, tok, _cfg(text), other, progress=False)
    sliced = _slicegpt(tiny_model("llama"))
    with pytest.raises(SlicekitError, match="rotated"):
        recover(sliced, tok, _cfg(text, hidden_distill=1.0), tiny_model("llama"), progress=False)
    # nothing was touched by the refused runs
    ref = tiny_model("llama")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True))


def test_the_wikitext_test_file_is_refused_by_path(tok, data_dir):
    path = os.path.join(data_dir, "wikitext-2", "wiki.test.raw")
    if not os.path.isfile(path):
        pytest.skip("no local WikiText-2 test file")
    with pytest.raises(SlicekitError, match="evaluation split"):
        recover(tiny_model("llama"), tok, _cfg(path), progress=False)


def test_named_data_is_described_without_machine_paths(tok, tmp_path, monkeypatch):
    from slicekit.recover import recovery_stream

    (tmp_path / "brown").mkdir()
    texts = [f"text number {k}. " + TEXT[: 200 + k] for k in range(60)]
    (tmp_path / "brown" / "brown.txt").write_text("\n\n".join(texts) + "\n")
    monkeypatch.setenv("SLICEKIT_DATA_DIR", str(tmp_path))
    stream = recovery_stream(tok, RecoverConfig(dataset="brown", seqlen=64))
    assert stream.description.startswith("brown/train (texts 51–end)") and str(tmp_path) not in stream.description
    assert "$SLICEKIT_DATA_DIR" in stream.description
    # Brown has no official splits: recovery reads texts 51 on, evaluation the first 50
    from slicekit.data import load_text

    train, test = load_text("brown", purpose="calibration"), load_text("brown", purpose="eval")
    assert [r.split(".")[0] for r in train.rows] == [f"text number {k}" for k in range(50, 60)]
    assert [r.split(".")[0] for r in test.rows] == [f"text number {k}" for k in range(50)]
    assert torch.equal(stream.ids, tokenize_text(tok, train.joined()))
    with pytest.raises(SlicekitError, match="evaluation split"):
        load_text("brown", "test", purpose="calibration")


def test_token_stream_is_seeded_and_covers_each_epoch():
    ids = torch.arange(1000)
    a, b = TokenStream(ids, 50, 7, "x"), TokenStream(ids, 50, 7, "x")
    n = a.windows_per_epoch
    assert n == 19
    first = a.batch(0, n)
    assert torch.equal(first, b.batch(0, n))
    starts = sorted(int(w[0]) for w in first)  # one epoch: distinct, non-overlapping windows
    assert all(y - x == 50 for x, y in itertools.pairwise(starts))
    assert torch.equal(a.window(n + 3), b.window(n + 3))  # random access = sequential access
    assert not torch.equal(TokenStream(ids, 50, 8, "x").batch(0, n), first)


def test_lr_schedule():
    lrs = [_lr_at(s, 10, 2, 1.0) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert all(x > y for x, y in itertools.pairwise(lrs[2:])) and lrs[-1] > 0


def test_topk_kl_equals_full_kl_when_k_is_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, VOCAB, generator=g), torch.randn(2, 5, VOCAB, generator=g)
    temp = 2.0
    logp = torch.log_softmax(t / temp, -1)
    values, index = logp.topk(VOCAB, -1)
    assert torch.allclose(_kl_topk(s, index, values, temp), _kl_full(s, t, temp), atol=1e-5)
    v8, i8 = logp.topk(8, -1)
    assert 0 < _kl_topk(s, i8, v8, temp) <= _kl_full(s, t, temp) + 1e-6  # the coarsening is a lower bound


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_lowers_the_loss_and_keeps_names_and_shapes(arch, tok, text):
    model = tiny_model(arch)
    before = _shapes(model)
    ref = copy.deepcopy(model)
    x = tiny_inputs()
    report = recover(model, tok, _cfg(text, tokens=32 * 4 * 25), progress=False)
    assert _shapes(model) == before  # merged back: same names, shapes, dtypes
    assert not any("lora" in n for n in model.state_dict())
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    curve = [c["loss"] for c in report.loss_curve]
    assert len(curve) == report.steps == 25 and report.tokens == 25 * 4 * 32
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.3
    assert report.loss == "ce" and report.trainable_params > 0 and report.tokens_per_s > 0
    assert not torch.allclose(logits(model, x), logits(ref, x))  # the merge changed the weights
    # the merged model computes what it was trained to: its loss on training text is the low one
    ids = tok(TEXT[:400], return_tensors="pt").input_ids[:, :32]
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss < ref(input_ids=ids, labels=ids).loss - 0.3


def test_precision_resolution():
    from slicekit.recover import _cpu_has_bf16, resolve_precision

    cpu = torch.device("cpu")
    assert RecoverConfig().precision == "auto"
    assert resolve_precision("auto", cpu) == ("bf16" if _cpu_has_bf16() else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", torch.device("meta")) == "fp32"


def test_bf16_autocast_trains_in_bf16_and_keeps_float32_weights(tok, text):
    """``precision="bf16"``: the decoder's matrix products run in bf16 (seen by a hook during
    training), the teacher's too; weights, optimizer and the merged output stay float32; the
    distillation still converges."""
    teacher = tiny_model("llama")
    student = _perturbed(teacher)
    before = _shapes(student)
    seen: dict[str, set] = {"student": set(), "teacher": set()}
    hooks = [m.register_forward_hook(lambda mod, a, out, who=who: seen[who].add(out.dtype))
             for who, model in (("student", student), ("teacher", teacher))
             for m in [get_arch(model.config).layer_list(model)[0].mlp.down_proj]]
    report = recover(student, tok, _cfg(text, tokens=32 * 4 * 30, precision="bf16", mode="full", lr=1e-3), teacher,
                     progress=False)
    for h in hooks:
        h.remove()
    assert seen == {"student": {torch.bfloat16}, "teacher": {torch.bfloat16}}
    assert report.precision == "bf16" and report.summary()["precision"] == "bf16"
    assert _shapes(student) == before and all(p.dtype == torch.float32 for p in student.parameters())
    kl = [c["kl"] for c in report.loss_curve]
    assert sum(kl[-3:]) / 3 < 0.5 * kl[0]
    other = copy.deepcopy(student)
    dtypes: set = set()
    hook = get_arch(other.config).layer_list(other)[0].mlp.down_proj.register_forward_hook(
        lambda mod, a, out: dtypes.add(out.dtype))
    fp32 = recover(other, tok, _cfg(text, tokens=32 * 4), progress=False)
    hook.remove()
    assert fp32.precision == "fp32" and dtypes == {torch.float32}


def test_distillation_from_the_dense_copy_drives_kl_to_zero(tok, text):
    teacher = tiny_model("llama")
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = _perturbed(teacher)
    report = recover(student, tok, _cfg(text, tokens=32 * 4 * 30), teacher, progress=False)
    assert report.loss == "distill"
    kl = [c["kl"] for c in report.loss_curve]
    assert kl[0] > 0.01 and sum(kl[-3:]) / 3 < 0.3 * kl[0]
    assert "ce" not in report.loss_curve[0]  # kd_alpha = 1: pure KL
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    # the teacher's own copy has nothing to learn: its KL is zero from the start
    twin = recover(copy.deepcopy(teacher), tok, _cfg(text, tokens=32 * 4 * 2), teacher, progress=False)
    assert twin.loss_curve[0]["kl"] < 1e-6


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_top_k_teacher_logits(cache, tok, text, tmp_path):
    teacher = tiny_model("llama")
    cfg = _cfg(text, tokens=32 * 4 * 20, teacher_cache=cache, kd_topk=16)
    loads = []

    def load_teacher():
        loads.append(1)
        return teacher

    report = recover(_perturbed(teacher), tok, cfg, load_teacher, progress=False, cache_dir=str(tmp_path / "cache"))
    kl = [c["kl"] for c in report.loss_curve]
    assert sum(kl[-3:]) / 3 < 0.5 * kl[0]
    assert loads == [1]
    if cache == "disk":
        files = sorted(os.listdir(tmp_path / "cache"))
        assert files == ["manifest.json"] + [f"step-{s:08d}.safetensors" for s in range(20)]
        # a second run with the same teacher and data reuses the files without loading the teacher
        again = recover(_perturbed(teacher), tok, cfg, load_teacher, progress=False, cache_dir=str(tmp_path / "cache"))
        assert loads == [1] and again.loss_curve == report.loss_curve


def test_hidden_state_distillation_on_a_pruned_model(tok, text):
    teacher = tiny_model("llama")
    student = _mlp_pruned(copy.deepcopy(teacher))
    report = recover(student, tok, _cfg(text, tokens=32 * 4 * 15, hidden_distill=10.0, lr=1e-3), teacher,
                     progress=False)
    hidden = [c["hidden"] for c in report.loss_curve]
    assert hidden[0] > 0 and hidden[-1] < 0.8 * hidden[0]


def test_full_fine_tuning_freezes_embeddings(tok, text):
    model = tiny_model("mistral")  # untied head: trained; embeddings: frozen
    emb = model.model.embed_tokens.weight.detach().clone()
    head = model.lm_head.weight.detach().clone()
    report = recover(model, tok, _cfg(text, mode="full", lr=1e-3, tokens=32 * 4 * 15), progress=False)
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert not torch.equal(model.lm_head.weight, head)
    assert report.trainable_params == sum(p.numel() for p in model.parameters()) - emb.numel()
    curve = [c["loss"] for c in report.loss_curve]
    assert curve[-1] < curve[0] - 0.3


def test_optimizer_is_fused_adamw_with_the_same_update():
    """The fused kernel is what runs on CPU, and one step moves the weights as the per-tensor
    AdamW does (same lr, betas, weight decay): the speed-up changes nothing else."""
    torch.manual_seed(0)
    weights = [torch.randn(8, 5), torch.randn(5)]
    grads = [torch.randn_like(w) for w in weights]
    fused = [torch.nn.Parameter(w.clone()) for w in weights]
    loop = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = _adamw([{"params": fused[:1], "weight_decay": 0.1}, {"params": fused[1:], "weight_decay": 0.0}], 1e-2)
    ref = torch.optim.AdamW([{"params": loop[:1], "weight_decay": 0.1}, {"params": loop[1:], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    assert opt.defaults["fused"] is True
    for _ in range(3):
        for ps in (fused, loop):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
        opt.step()
        ref.step()
    for a, b, w in zip(fused, loop, weights, strict=True):
        assert not torch.equal(a, w)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_full_fine_tuning_with_embeddings_trains_the_tied_table(tok, text):
    """``train_embeddings``: the token table (and the head tied to it, SmolLM2's layout) is
    trained as one parameter, the tie survives, and the card says so."""
    model = tiny_model("llama")  # tied head
    assert model.lm_head.weight is model.model.embed_tokens.weight
    emb = model.model.embed_tokens.weight.detach().clone()
    report = recover(model, tok, _cfg(text, mode="full", lr=1e-3, train_embeddings=True), progress=False)
    assert not torch.equal(model.model.embed_tokens.weight, emb)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert report.trainable_params == sum(p.numel() for p in model.parameters())  # tied: counted once
    assert report.summary()["train_embeddings"] is True
    frozen = recover(tiny_model("llama"), tok, _cfg(text, mode="full", lr=1e-3), progress=False)
    assert "train_embeddings" not in frozen.summary()


def test_slicegpt_shortcuts_are_trained_and_kept(tok, text, tmp_path):
    teacher = tiny_model("llama")
    student = _slicegpt(copy.deepcopy(teacher))
    shortcuts = {n: p.detach().clone() for n, p in student.named_parameters() if n.endswith("_shortcut")}
    assert shortcuts  # the fixture really has shortcut matrices
    before = _shapes(student)
    report = recover(student, tok, _cfg(text, tokens=32 * 4 * 10), teacher, progress=False)
    assert _shapes(student) == before
    after = dict(student.named_parameters())
    assert all(not torch.equal(after[n], v) for n, v in shortcuts.items())
    assert report.trainable_params > sum(v.numel() for v in shortcuts.values())
    _assert_roundtrip(student, tok, tmp_path)


def _assert_roundtrip(model, tok, tmp_path):
    """Saved and loaded back with plain transformers, the recovered model computes the same logits."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(str(tmp_path / "out"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), trust_remote_code=True)
    x = tiny_inputs()
    assert torch.allclose(logits(loaded, x), logits(model, x), atol=1e-5)


def test_recovered_pruned_model_saves_and_loads(tok, text, tmp_path):
    student = _mlp_pruned(tiny_model("llama"))
    report = recover(student, tok, _cfg(text, tokens=32 * 4 * 5), progress=False)
    assert report.steps == 5
    _assert_roundtrip(student, tok, tmp_path)


# ---------------------------------------------------------------- gradient checkpointing

@pytest.mark.parametrize("kind", ["dense", "mlp_pruned", "slicegpt"])
def test_gradient_checkpointing_gives_the_same_training(kind, tok, text):
    def make():
        m = tiny_model("llama")
        if kind == "mlp_pruned":
            _mlp_pruned(m)
        elif kind == "slicegpt":
            _slicegpt(m)
        return m

    runs = []
    for gc in (False, True):
        model = make()
        mlp = get_arch(model.config).layer_list(model)[0].mlp
        calls = []
        # a pre-hook: the recomputation stops early, right after the last tensor the backward needs
        handle = mlp.register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        report = recover(model, tok, _cfg(text, tokens=32 * 4 * 3, gradient_checkpointing=gc, lora_dropout=0.1),
                         progress=False)
        handle.remove()
        runs.append((model, report, len(calls)))
    (m0, r0, c0), (m1, r1, c1) = runs
    assert c0 == 3 and c1 == 6  # the checkpointed layer ran again in every backward pass
    assert r0.gradient_checkpointing == "off" and r1.gradient_checkpointing.startswith(("transformers", "wrapped"))
    for a, b in zip(r0.loss_curve, r1.loss_curve, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for (n, a), b in zip(m0.state_dict().items(), m1.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), n
    assert not any(layer.__dict__.get("forward") for layer in get_arch(m1.config).layer_list(m1))
    assert not m1.get_input_embeddings()._forward_hooks  # no hook left behind
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in get_arch(m1.config).layer_list(m1))


# ---------------------------------------------------------------- interruption and resumption

def _resume_cfg(text, **kw):
    base = dict(tokens=32 * 2 * 2 * 7, batch_size=2, grad_accum=2, lora_dropout=0.1, checkpoint_every=2,
                weight_decay=0.01, kd_alpha=0.7)
    return _cfg(text, **{**base, **kw})


@pytest.mark.parametrize("how", ["callback", "exception"])
def test_interrupted_and_resumed_equals_uninterrupted(how, tok, text, tmp_path):
    teacher = tiny_model("llama")
    straight = _mlp_pruned(copy.deepcopy(teacher))
    start = copy.deepcopy(straight)
    ref = recover(straight, tok, _resume_cfg(text), teacher, progress=False,
                  resume_dir=str(tmp_path / "a"))
    assert ref.steps == 7 and ref.resumed_from is None
    assert os.listdir(tmp_path / "a") == ["step-00000007"]  # older checkpoints were removed

    first = copy.deepcopy(start)
    if how == "callback":
        part = recover(first, tok, _resume_cfg(text), teacher, progress=False,
                       resume_dir=str(tmp_path / "b"), callback=lambda info: info.step == 3)
        assert part.interrupted and part.steps == 3
        resumed_at = 3
    else:
        def boom(info):
            if info.step == 5:
                raise RuntimeError("power cut")

        with pytest.raises(RuntimeError, match="power cut"):
            recover(first, tok, _resume_cfg(text), teacher, progress=False,
                    resume_dir=str(tmp_path / "b"), callback=boom)
        resumed_at = 4  # the last periodic checkpoint
    assert os.listdir(tmp_path / "b") == [f"step-{resumed_at:08d}"]
    state = json.loads((tmp_path / "b" / f"step-{resumed_at:08d}" / "state.json").read_text())
    assert state["samples"] == resumed_at * 4 and state["scheduler"]["step"] == resumed_at

    second = copy.deepcopy(start)  # a fresh process would reload the compressed model
    rest = recover(second, tok, _resume_cfg(text, checkpoint_every=3), teacher, progress=False,
                   resume_dir=str(tmp_path / "b"))
    assert rest.resumed_from == resumed_at and rest.steps == 7 and not rest.interrupted
    assert rest.loss_curve == ref.loss_curve
    for (n, a), b in zip(straight.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    # rerunning a finished run changes nothing
    third = copy.deepcopy(start)
    recover(third, tok, _resume_cfg(text), teacher, progress=False, resume_dir=str(tmp_path / "b"))
    assert all(torch.equal(a, b) for a, b in zip(third.state_dict().values(), second.state_dict().values(), strict=True))


def test_resume_with_other_settings_is_refused(tok, text, tmp_path):
    model = tiny_model("llama")
    recover(copy.deepcopy(model), tok, _cfg(text, tokens=32 * 4 * 2), progress=False, resume_dir=str(tmp_path))
    with pytest.raises(SlicekitError, match="lr"):
        recover(copy.deepcopy(model), tok, _cfg(text, tokens=32 * 4 * 2, lr=1e-3), progress=False,
                resume_dir=str(tmp_path))
    with pytest.raises(SlicekitError, match="student"):
        recover(_perturbed(model), tok, _cfg(text, tokens=32 * 4 * 2), progress=False, resume_dir=str(tmp_path))


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(tok, text, tmp_path):
    import signal

    def press_ctrl_c(info):
        if info.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    model = tiny_model("llama")
    report = recover(model, tok, _cfg(text, tokens=32 * 4 * 6, checkpoint_every=0), progress=False,
                     resume_dir=str(tmp_path / "run"), callback=press_ctrl_c)
    assert report.interrupted and report.steps == 3  # the step after the signal finished, then it stopped
    assert os.listdir(tmp_path / "run") == ["step-00000003"]
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is back
    assert _shapes(model) == _shapes(tiny_model("llama"))


# ---------------------------------------------------------------- text sampled from the teacher

def _sampling_cfg(**kw) -> RecoverConfig:
    base = dict(dataset="teacher", seqlen=32, tokens=32 * 2 * 6, batch_size=2, lr=3e-3, warmup=0.1, seed=3,
                precision="fp32", sample_length=40, sample_batch_size=5, checkpoint_every=2)
    return RecoverConfig(**{**base, **kw})


def test_teacher_text_is_seeded_starts_each_sample_at_bos_and_leaves_the_rng_alone(tok):
    teacher = tiny_model("llama")
    cfg = _sampling_cfg(sample_tokens=400)
    state = torch.random.get_rng_state()
    ids = sample_teacher_text(teacher, tok, cfg)
    assert torch.equal(torch.random.get_rng_state(), state)
    samples = ids.reshape(-1, 41)  # ceil(400 / 41) = 10 samples of BOS + 40 tokens, in batches of 5 + 5
    assert samples.shape[0] == 10 and (samples[:, 0] == tok.bos_token_id).all()
    assert int(ids.max()) < VOCAB and len(set(samples[:, 1:].flatten().tolist())) > 20  # sampled, not greedy
    assert torch.equal(sample_teacher_text(teacher, tok, cfg), ids)
    assert not torch.equal(sample_teacher_text(teacher, tok, _sampling_cfg(sample_tokens=400, seed=4)), ids)
    assert not samples[:, 1:].eq(tok.eos_token_id).any()  # end-of-text suppressed: every sample is full length
    # a checkpoint's own sampling defaults (a repetition penalty, top-k …) do not bend the samples
    opinionated = copy.deepcopy(teacher)
    for key, value in dict(repetition_penalty=3.0, top_k=1, min_p=0.5, no_repeat_ngram_size=2, temperature=0.1).items():
        setattr(opinionated.generation_config, key, value)
    assert torch.equal(sample_teacher_text(opinionated, tok, cfg), ids)


def test_recovery_on_teacher_text_distils_resumes_and_reads_the_text_back(tok, tmp_path):
    teacher = tiny_model("llama")
    start = _perturbed(teacher)
    straight = copy.deepcopy(start)
    ref = recover(straight, tok, _sampling_cfg(), teacher, progress=False, resume_dir=str(tmp_path / "a"))
    assert "sampled from the teacher" in ref.data and ref.sample_seconds > 0
    assert ref.summary()["sample_seconds"] == round(ref.sample_seconds, 3) > 0
    assert ref.settings["sample_length"] == 40
    kl = [c["kl"] for c in ref.loss_curve]
    assert sum(kl[-2:]) / 2 < kl[0]
    assert sorted(os.listdir(tmp_path / "a")) == ["step-00000006", "teacher-text.safetensors"]
    # another run's directory is refused before sampling: its text is neither resampled nor replaced
    text_file = tmp_path / "a" / "teacher-text.safetensors"
    kept = text_file.read_bytes()
    with pytest.raises(SlicekitError, match="sample_top_p"):
        recover(copy.deepcopy(start), tok, _sampling_cfg(sample_top_p=0.9), teacher, progress=False,
                resume_dir=str(tmp_path / "a"))
    assert text_file.read_bytes() == kept

    part = copy.deepcopy(start)
    got = recover(part, tok, _sampling_cfg(), teacher, progress=False, resume_dir=str(tmp_path / "b"),
                  callback=lambda info: info.step == 3)
    assert got.interrupted and got.sample_seconds > 0
    rest = copy.deepcopy(start)
    again = recover(rest, tok, _sampling_cfg(), teacher, progress=False, resume_dir=str(tmp_path / "b"))
    assert again.resumed_from == 3 and again.sample_seconds == 0.0  # the text was read back, not sampled
    assert again.loss_curve == ref.loss_curve
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), rest.state_dict().values(), strict=True))

    # a damaged text file is sampled again (the same text: it depends on the seed alone)
    (tmp_path / "b" / "teacher-text.safetensors").write_bytes(b"not safetensors")
    third = copy.deepcopy(start)
    with pytest.warns(UserWarning, match="unreadable"):
        recover(third, tok, _sampling_cfg(), teacher, progress=False, resume_dir=str(tmp_path / "b"))
    assert all(torch.equal(a, b) for a, b in zip(third.state_dict().values(), rest.state_dict().values(), strict=True))


def test_teacher_text_needs_a_teacher_and_named_data_records_no_sampling_settings(tok, text):
    model = tiny_model("llama")
    with pytest.raises(SlicekitError, match="teacher"):
        recover(model, tok, _sampling_cfg(), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_model("llama").state_dict().values(),
                                                  strict=True))
    report = recover(model, tok, _cfg(text, tokens=32 * 4 * 2), progress=False)
    assert not any(k.startswith("sample_") for k in report.settings)  # earlier versions' checkpoints still resume
    assert "sample_seconds" not in report.summary()


def test_cli_refuses_teacher_text_without_a_teacher_before_loading(tmp_path):
    from clirun import run_cli

    run = run_cli("recover", "--model", str(tmp_path / "not-loaded"), "--dataset", "teacher", "--sample-tokens", "4096")
    assert run.rc == 2 and run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "--teacher" in lines[0] and "not-loaded" not in lines[0]
    bad = run_cli("recover", "--model", str(tmp_path / "not-loaded"), "--teacher", "x", "--dataset", "teacher",
                  "--sample-top-p", "1.5")
    assert bad.rc == 2 and "sample_top_p" in bad.stderr
