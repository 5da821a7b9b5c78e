"""Save → load round trips (with and without slicekit importable), corruption, atomic saves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from slicekit.checkpoint import load, save
from slicekit.errors import SlicekitError
from slicekit.methods.slicegpt import SliceGPTConfig
from slicekit.pipeline import compress
from tiny import NO_SLICEKIT, rotatable_archs, tiny_inputs, tiny_model


def _compressed(arch, slicing=0.25):
    """A SliceGPT-compressed tiny model; the pipeline records its shape on the model, which is
    what ``save`` writes."""
    model = tiny_model(arch)
    cal = [tiny_inputs(2, 32, seed=s) for s in range(3)]
    report = compress(model, None, "slicegpt", SliceGPTConfig(slicing=slicing), progress=False, batches=cal)
    return model, report


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def saved_checkpoints(tmp_path_factory):
    """Every family SliceGPT can rotate, compressed and saved, and what plain transformers in a
    process that cannot import slicekit makes of each checkpoint: one new interpreter for all of
    them (a start costs seconds of imports), per family its logits and greedy generations."""
    root = tmp_path_factory.mktemp("checkpoints")
    x = tiny_inputs()
    torch.save(x, root / "x.pt")
    built = {}
    for arch in rotatable_archs():
        model, result = _compressed(arch)
        out = root / arch
        fmt = save(model, None, str(out), info={"method": "slicegpt"})
        built[arch] = (model, result, _logits(model, x), fmt)
    code = NO_SLICEKIT + textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        root = {str(root)!r}
        x = torch.load(root + "/x.pt", weights_only=True)
        report = {{}}
        for arch in {list(built)!r}:
            try:
                m = AutoModelForCausalLM.from_pretrained(root + "/" + arch, trust_remote_code=True)
                with torch.no_grad():
                    torch.save(m(input_ids=x).logits, root + "/" + arch + ".logits.pt")
                g = m.generate(x[:1, :6], max_new_tokens=6, do_sample=False, use_cache=True)
                g2 = m.generate(x[:1, :6], max_new_tokens=6, do_sample=False, use_cache=False)
                report[arch] = {{"class": type(m).__name__, "cache_agrees": bool(torch.equal(g, g2))}}
            except Exception as e:
                report[arch] = {{"error": repr(e)[:2000]}}
        print(json.dumps(report))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    remote = json.loads(proc.stdout.strip().splitlines()[-1])
    return root, x, built, remote


@pytest.mark.parametrize("arch", rotatable_archs())  # SliceGPT: the families it can rotate
def test_round_trip_in_process_and_without_slicekit(arch, saved_checkpoints):
    root, x, built, remote = saved_checkpoints
    model, result, ref, fmt = built[arch]
    out = root / arch
    assert fmt == "slicekit"
    saved = json.loads((out / "config.json").read_text())["slicekit"]["shape"]
    assert saved == result.plan.shape()
    assert (out / "modeling_slicekit.py").is_file() and (out / "README.md").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt")), "no pickles"
    loaded, _ = load(str(out))
    assert _rel(_logits(loaded, x), ref) <= 1e-5
    # plain transformers, slicekit not importable
    assert "error" not in remote[arch], remote[arch]
    assert remote[arch]["class"] == type(model).__name__ and remote[arch]["cache_agrees"]
    assert _rel(torch.load(root / f"{arch}.logits.pt", weights_only=True), ref) <= 1e-5


def test_generate_with_cache_matches_in_memory_greedy(tmp_path):
    model, _ = _compressed("llama")
    save(model, None, str(tmp_path / "c"))
    loaded, _ = load(str(tmp_path / "c"))
    x = tiny_inputs(1, 8)
    model.config.use_cache = True
    with torch.no_grad():
        a = model.generate(x, max_new_tokens=10, do_sample=False)
        b = loaded.generate(x, max_new_tokens=10, do_sample=False)
    assert torch.equal(a, b)


def test_sharded_checkpoint_round_trip(tmp_path):
    model, _ = _compressed("qwen2")
    save(model, None, str(tmp_path / "s"), max_shard_size=20_000)
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "s").glob("model-*.safetensors"))) > 1
    loaded, _ = load(str(tmp_path / "s"))
    x = tiny_inputs()
    assert _rel(_logits(loaded, x), _logits(model, x)) <= 1e-6


def test_vanilla_config_when_shape_fits_original_architecture(tmp_path):
    """Uniform MLP-width pruning keeps the architecture: no custom code is written."""
    from slicekit.arch import linear_weight, set_linear

    model = tiny_model("llama")
    for layer in model.model.layers:
        for name in ("gate_proj", "up_proj"):
            lin = getattr(layer.mlp, name)
            set_linear(lin, linear_weight(lin)[:40])
        set_linear(layer.mlp.down_proj, linear_weight(layer.mlp.down_proj)[:, :40])
    x = tiny_inputs()
    ref = _logits(model, x)
    assert save(model, None, str(tmp_path / "v")) == "vanilla"
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["intermediate_size"] == 40 and "auto_map" not in cfg
    assert not (tmp_path / "v" / "modeling_slicekit.py").exists()
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "v").eval()
    assert _rel(_logits(plain, x), ref) <= 1e-5


def test_truncated_checkpoint_names_the_problem(tmp_path):
    model, _ = _compressed("llama")
    out = tmp_path / "t"
    save(model, None, str(out))
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlicekitError, match=r"corrupt|truncated|cannot read"):
        load(str(out))


def test_mismatched_checkpoint_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = _compressed("llama")
    out = tmp_path / "m"
    save(model, None, str(out))
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:, :8].contiguous()
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(SlicekitError) as err:
        load(str(out))
    msg = str(err.value)
    assert "model.layers.0.mlp.up_proj.weight" in msg and "missing" in msg


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(SlicekitError, match="no such checkpoint"):
        load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlicekitError, match=r"config\.json"):
        load(str(tmp_path / "empty"))


def test_killed_save_leaves_previous_output_intact(tmp_path):
    """Kill a save midway (SIGKILL, no cleanup runs): the old checkpoint must still load."""
    model, _ = _compressed("llama")
    out = tmp_path / "ckpt"
    save(model, None, str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import safetensors.torch as st
        from tiny import tiny_model
        from slicekit.checkpoint import save
        real = st.save_file
        def slow(*a, **k):
            real(*a, **k)
            print("WROTE", flush=True)
            time.sleep(60)
        st.save_file = slow
        save(tiny_model("llama"), None, {str(out)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "WROTE" in line
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    loaded, _ = load(str(out))
    x = tiny_inputs()
    assert _rel(_logits(loaded, x), _logits(model, x)) <= 1e-6


def test_counts_from_shape_respect_tied_embeddings():
    """A model that keeps its tied head is counted once, as its real tensors are — by the one
    counter on the model's plan, on the plan read back from a saved shape, and on the model the
    loader builds from it."""
    from slicekit.models import count_parameters
    from slicekit.shape import Plan, count_built, count_plan

    model = tiny_model("llama")  # tie_word_embeddings=True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    real = sum(p.numel() for p in model.parameters())  # the shared matrix once
    plan = Plan.of(model)
    counts = count_plan(plan)
    assert counts.total == real == count_parameters(model)["total"]
    assert counts.total - counts.non_embedding == model.model.embed_tokens.weight.numel()
    assert count_plan(Plan.from_shape(model.config, plan.shape())) == counts == count_built(plan)


def test_model_card_records_recovery_data_budget_and_numbers():
    """#14: the card of a recovered model states what recovery read, its budget and before/after
    perplexity; an unrecovered model's card has no recovery section."""
    from slicekit.checkpoint import model_card

    rec = {"data": "brown/train (texts 51–end)", "mode": "lora", "loss": "distill", "teacher": "dense model",
           "tokens": 184320, "steps": 720, "seqlen": 256, "lr": 2e-4, "seed": 42, "first_loss": 0.755,
           "last_loss": 0.366, "train_seconds": 1584.0, "tokens_per_s": 116.3, "precision": "fp32",
           "interrupted": False,
           "perplexity": [{"model": "before recovery", "dataset": "wikitext2/test", "seqlen": 2048, "windows": 4,
                           "ppl": 43.4868}, {"model": "after recovery", "dataset": "wikitext2/test",
                                             "seqlen": 2048, "windows": 4, "ppl": 33.5312}]}
    card = model_card({"method": "dotresize", "recovery": rec})
    section = card[card.index("## Recovery"):card.index("## Loading")]
    assert "- Data: brown/train (texts 51–end)" in section
    assert "LoRA, merged back; loss distill (teacher: dense model)" in section
    assert "184,320 tokens in 720 optimizer steps (sequences of 256), lr 0.0002, seed 42; 26.4 min" in section
    assert "| before recovery | wikitext2/test | 2048 | 4 | 43.487 |" in section
    assert "| after recovery | wikitext2/test | 2048 | 4 | 33.531 |" in section
    assert "interrupted" not in section
    cut = model_card({"method": "dotresize", "recovery": {**rec, "interrupted": True, "mode": "full",
                                                          "train_embeddings": True}})
    assert "interrupted before its budget was spent" in cut and "token embeddings and a head tied" in cut
    assert "## Recovery" not in model_card({"method": "dotresize"})
