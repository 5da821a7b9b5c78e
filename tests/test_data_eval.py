"""Dataset resolution, the calibration sampler, and the perplexity protocol."""

from __future__ import annotations

import math

import pytest
import torch

from slicekit.data import TextSource, load_text, sample_calibration
from slicekit.errors import SlicekitError
from slicekit.evaluate import eval_windows, perplexity
from tiny import tiny_model


class CharTokenizer:
    """A deterministic stand-in tokenizer: one token per byte (vocab 128)."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = [min(127, b) for b in text.encode("utf-8")]

        class Out:
            pass

        out = Out()
        out.input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids
        return out


TEXT = TextSource([f"row {i} " + "lorem ipsum dolor sit amet " * (1 + i % 3) for i in range(200)], "synthetic")


def test_named_dataset_from_data_dir(data_dir):
    test = load_text("wikitext2", purpose="eval")
    assert "wiki.test.raw" in test.description
    assert test.rows[0].startswith(" = Robert Boulter =")
    assert "\r" not in test.joined()
    cal = load_text("wikitext2", purpose="calibration")
    assert "wiki.valid.tokens" in cal.description  # the train split is not shipped: validation
    brown = load_text("brown", purpose="eval")
    train = load_text("brown", purpose="calibration")
    assert len(brown.rows) == 50 and len(train.rows) == 450  # 500 texts, the first 50 held out
    assert not set(brown.rows) & set(train.rows)


def test_calibration_never_reads_an_eval_split(data_dir):
    with pytest.raises(SlicekitError, match="evaluation split"):
        load_text("wikitext2", "test", purpose="calibration")


def test_unknown_dataset_and_missing_file():
    with pytest.raises(SlicekitError, match="unknown dataset"):
        load_text("wikitext3")
    with pytest.raises(SlicekitError, match="not found"):
        load_text("/no/such/file.txt")


def test_offline_without_data_gives_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("SLICEKIT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SlicekitError, match="SLICEKIT_DATA_DIR"):
        load_text("ptb", purpose="eval")


def test_local_text_jsonl_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text('{"text": "json doc"}\n\n{"text": "another"}\n')
    assert load_text(str(tmp_path / "a.txt")).rows == ["first doc\nline two", "second doc"]
    assert load_text(str(tmp_path / "b.jsonl")).rows == ["json doc", "another"]
    assert len(load_text(str(tmp_path)).rows) == 4
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(SlicekitError, match=r"bad\.jsonl:1"):
        load_text(str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize("strategy", ["documents", "windows"])
def test_sampler_is_seeded_and_exact_length(strategy):
    tok = CharTokenizer()
    a = sample_calibration(tok, TEXT, 8, 64, seed=1, strategy=strategy).input_ids
    b = sample_calibration(tok, TEXT, 8, 64, seed=1, strategy=strategy).input_ids
    c = sample_calibration(tok, TEXT, 8, 64, seed=2, strategy=strategy).input_ids
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("strategy", ["documents", "windows"])
def test_sampler_refuses_too_little_text(strategy):
    tiny = TextSource(["only a few words here"] * 3, "tiny")
    with pytest.raises(SlicekitError, match="too little calibration text"):
        sample_calibration(CharTokenizer(), tiny, 16, 64, strategy=strategy)


def test_perplexity_matches_independent_computation():
    model = tiny_model("llama")
    tok = CharTokenizer()
    res = perplexity(model, tok, TEXT, seqlen=32, max_windows=5, batch_size=2, progress=False)
    ids = tok(TEXT.joined(), return_tensors="pt").input_ids[0]
    nll, n = 0.0, 0
    for w in range(5):  # independently: one window at a time, cross-entropy from torch
        window = ids[w * 32 : (w + 1) * 32][None]
        with torch.no_grad():
            logits = model(input_ids=window).logits[0, :-1].double()
        nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        n += 31
    assert res.windows == 5 and res.tokens == n == 155 and res.seqlen == 32
    assert math.isclose(res.ppl, math.exp(nll / n), rel_tol=1e-6)


def test_eval_windows_are_non_overlapping_and_capped():
    tok = CharTokenizer()
    w = eval_windows(tok, TEXT, 50)
    ids = tok(TEXT.joined(), return_tensors="pt").input_ids[0]
    assert w.shape[0] == ids.numel() // 50
    assert torch.equal(w.flatten(), ids[: w.numel()])
    assert eval_windows(tok, TEXT, 50, max_windows=3).shape == (3, 50)
    with pytest.raises(SlicekitError):
        eval_windows(tok, TextSource(["short"], "s"), 50)
