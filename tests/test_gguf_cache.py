"""The GGUF conversion cache (``slicekit.models.gguf_cache_dir``): a GGUF model is parsed and
dequantised once; later loads read the plain float32 copy and must give exactly what a fresh
conversion gives.  A damaged, stale or unwritable cache costs time at most, never a wrong model
or a failed load."""

from __future__ import annotations

import logging
import os

import pytest
import torch

pytest.importorskip("gguf")

from slicekit.models import cache_root, gguf_cache_dir, load_model, resolve_model


@pytest.fixture
def reads(monkeypatch):
    """How many times a GGUF file's metadata is parsed (every conversion parses it)."""
    import gguf

    calls = []
    original = gguf.GGUFReader.__init__

    def counting(self, *a, **k):
        calls.append(a[0] if a else k.get("path"))
        return original(self, *a, **k)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counting)
    return calls


def _export(path, seed: int = 0) -> str:
    from slicekit.export import export_gguf
    from test_export import bpe_tokenizer, tiny_lm

    path.parent.mkdir(parents=True, exist_ok=True)
    export_gguf(tiny_lm("llama", seed=seed), path, "f32", bpe_tokenizer())
    return str(path)


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("SLICEKIT_CACHE_DIR", str(tmp_path / "cache"))
    return _export(tmp_path / "src" / "m.gguf")


def _same(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.config.to_dict() == b.config.to_dict()


def test_second_load_reads_the_cache_and_gives_the_same_model(tiny_gguf, reads, tmp_path, monkeypatch):
    from slicekit.validate import model_context_length, model_parameter_count

    src = resolve_model(tiny_gguf)
    assert gguf_cache_dir(src) is None
    m1, t1 = load_model(tiny_gguf)
    assert reads, "the first load converts the GGUF file"
    entry = gguf_cache_dir(src)
    assert entry is not None and entry.startswith(str(tmp_path / "cache"))
    assert not [f for f in os.listdir(os.path.dirname(entry)) if f.startswith(".tmp-")]  # no leftovers
    reads.clear()
    m2, t2 = load_model(tiny_gguf)
    assert reads == [], "a cached load must not parse the GGUF file"
    _same(m1, m2)
    assert m2.config._name_or_path == m1.config._name_or_path == os.path.dirname(tiny_gguf)
    assert getattr(m2.config, "quantization_config", None) is None
    for text in ("hello world", "the cat sat on the mat", ""):
        assert t1(text).input_ids == t2(text).input_ids
    x = torch.tensor([[1, 5, 9, 33, 7]])
    with torch.no_grad():
        assert torch.equal(m1(x).logits, m2(x).logits)
    # the metadata readers answer from the copy too, with what the GGUF file says
    ctx, n = model_context_length(tiny_gguf), model_parameter_count(tiny_gguf)
    assert reads == []
    monkeypatch.setenv("SLICEKIT_CACHE_DIR", "none")
    assert (model_context_length(tiny_gguf), model_parameter_count(tiny_gguf)) == (ctx, n)
    assert reads, "with the cache off the GGUF file is read"


def test_a_bfloat16_load_from_the_cache_equals_one_from_the_gguf_file(tiny_gguf, monkeypatch):
    load_model(tiny_gguf)  # writes the float32 copy
    cached, _ = load_model(tiny_gguf, dtype="bfloat16")
    monkeypatch.setenv("SLICEKIT_CACHE_DIR", "none")
    fresh, _ = load_model(tiny_gguf, dtype="bfloat16")
    assert next(cached.parameters()).dtype == torch.bfloat16
    _same(cached, fresh)


def test_only_float32_conversions_are_cached(tiny_gguf):
    load_model(tiny_gguf, dtype="bfloat16")
    assert gguf_cache_dir(resolve_model(tiny_gguf)) is None


def test_cache_off(tiny_gguf, tmp_path, monkeypatch, reads):
    for off in ("none", "off", "0", ""):
        monkeypatch.setenv("SLICEKIT_CACHE_DIR", off)
        assert cache_root() is None
    load_model(tiny_gguf)
    assert reads
    reads.clear()
    load_model(tiny_gguf)
    assert reads, "with the cache off the second load converts again"
    assert not (tmp_path / "cache").exists()


def test_default_place_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("SLICEKIT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == str(tmp_path / "xdg" / "slicekit")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == os.path.join(os.path.expanduser("~"), ".cache", "slicekit")


def test_a_changed_gguf_file_is_converted_again(tiny_gguf, reads):
    first, _ = load_model(tiny_gguf)
    old_entry = gguf_cache_dir(resolve_model(tiny_gguf))
    _export(__import__("pathlib").Path(tiny_gguf), seed=1)  # new weights in the same file
    st = os.stat(tiny_gguf)
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a coarse clock would hide the rewrite
    reads.clear()
    second, _ = load_model(tiny_gguf)
    assert reads, "a changed file is not served from the old copy"
    assert not torch.equal(first.model.layers[0].mlp.up_proj.weight, second.model.layers[0].mlp.up_proj.weight)
    assert gguf_cache_dir(resolve_model(tiny_gguf)) not in (None, old_entry)


@pytest.mark.parametrize("damage", ["truncated-weights", "missing-tokenizer", "bad-marker"])
def test_a_damaged_entry_is_converted_again(tiny_gguf, reads, damage, caplog):
    good, _ = load_model(tiny_gguf)
    entry = gguf_cache_dir(resolve_model(tiny_gguf))
    if damage == "truncated-weights":
        w = os.path.join(entry, "model.safetensors")
        with open(w, "r+b") as fh:
            fh.truncate(os.path.getsize(w) // 2)
    elif damage == "missing-tokenizer":
        os.remove(os.path.join(entry, "tokenizer.json"))
        os.remove(os.path.join(entry, "tokenizer_config.json"))
    else:
        with open(os.path.join(entry, "slicekit-gguf-cache.json"), "w") as fh:
            fh.write("{not json")
    reads.clear()
    with caplog.at_level(logging.WARNING, logger="slicekit"):
        again, tok = load_model(tiny_gguf)
    assert reads, "the damaged copy was not used"
    _same(good, again)
    assert tok("hello world").input_ids
    if damage != "bad-marker":  # (an entry without a valid marker is simply not an entry)
        assert "unreadable" in caplog.text
    assert gguf_cache_dir(resolve_model(tiny_gguf)) == entry  # rewritten, whole
    reads.clear()
    load_model(tiny_gguf)
    assert reads == []


def test_an_unwritable_cache_costs_a_warning_not_the_load(tiny_gguf, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache root cannot be a directory here")
    monkeypatch.setenv("SLICEKIT_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING, logger="slicekit"):
        model, tok = load_model(tiny_gguf)
    assert tok is not None and sum(p.numel() for p in model.parameters()) > 0
    assert "could not cache" in caplog.text and "SLICEKIT_CACHE_DIR=none" in caplog.text
    assert blocker.read_text().startswith("the cache root")


def test_a_concurrent_writer_keeps_the_first_entry(tiny_gguf):
    from slicekit.models import _write_gguf_cache

    model, tok = load_model(tiny_gguf)
    entry = gguf_cache_dir(resolve_model(tiny_gguf))
    inode = os.stat(entry).st_ino
    _write_gguf_cache(model, tok, resolve_model(tiny_gguf))  # a second process finishing later
    assert gguf_cache_dir(resolve_model(tiny_gguf)) == entry and os.stat(entry).st_ino == inode
    assert not [f for f in os.listdir(os.path.dirname(entry)) if f.startswith(".tmp-")]


def test_gguf_bar_follows_transformers_bars(tiny_gguf, capfd, monkeypatch):
    """transformers' GGUF bar is plain tqdm: it follows ``disable_progress_bar`` only through
    slicekit, and its tqdm is put back afterwards."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original = gguf_utils.tqdm
    monkeypatch.setenv("SLICEKIT_CACHE_DIR", "none")
    hf_logging.disable_progress_bar()
    try:
        load_model(tiny_gguf)
    finally:
        hf_logging.enable_progress_bar()
    assert "GGUF" not in capfd.readouterr().err and gguf_utils.tqdm is original
    load_model(tiny_gguf)
    assert "Converting and de-quantizing GGUF tensors" in capfd.readouterr().err


def test_big_conversions_and_full_disks_are_not_cached(tiny_gguf, monkeypatch, caplog):
    import shutil
    from collections import namedtuple

    import slicekit.models as models

    monkeypatch.setattr(models, "GGUF_CACHE_MAX_BYTES", 1000)  # smaller than the tiny model's float32 copy
    load_model(tiny_gguf)
    assert gguf_cache_dir(resolve_model(tiny_gguf)) is None
    monkeypatch.undo()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with caplog.at_level(logging.WARNING, logger="slicekit"):
        model, _ = load_model(tiny_gguf)
    assert "GB free" in caplog.text and gguf_cache_dir(resolve_model(tiny_gguf)) is None
    assert sum(p.numel() for p in model.parameters()) > 0


def test_dry_run_plans_the_load_the_run_will_do(tiny_gguf):
    """Once the copy exists the run loads it like any model directory, and --dry-run's memory
    model must describe that load, not a GGUF dequantisation."""
    from slicekit.memory import _config_of

    assert _config_of(tiny_gguf)[1].kind == "gguf"
    load_model(tiny_gguf)
    cfg, src = _config_of(tiny_gguf)
    assert src.kind == "dir" and src.path == gguf_cache_dir(resolve_model(tiny_gguf)) and cfg.model_type == "llama"
