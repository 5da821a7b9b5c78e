"""`slicekit pack` / `slicekit unpack` and loading a packed file directly, on tiny models.

The round trip is checked end to end through the command line (``test_cli.run_cli``: the whole
command with its output captured, in the test process); the cheap error cases call
:func:`slicekit.cli.main` directly.  Tolerance: at the checkpoint's
own float32 precision the unpacked logits agree to a relative 2e-6 (docs/bitsback.md).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import slicekit
from slicekit.cli import main
from slicekit.errors import SlicekitError
from slicekit.methods.slicegpt import SliceGPTConfig
from slicekit.models import load_model
from slicekit.pipeline import compress
from test_cli import run_cli
from tiny import logits, rel_error, save_tiny_with_tokenizer, tiny_calibration, tiny_inputs

TOL = 2e-6  # float32 precision: one step = one ulp at each row's RMS


@pytest.fixture(scope="module")
def sliced(tmp_path_factory):
    """A SliceGPT-sliced tiny Llama with its tokenizer, saved; its logits; and its packed file."""
    tmp = tmp_path_factory.mktemp("pack")
    save_tiny_with_tokenizer(tmp / "dense")
    model, tok = load_model(str(tmp / "dense"))
    compress(model, tok, "slicegpt", SliceGPTConfig(slicing=0.25), batches=tiny_calibration(), progress=False)
    ckpt = tmp / "sliced"
    slicekit.save(model, tok, str(ckpt))
    rc, out, err = run_cli("pack", str(ckpt), str(tmp / "m.skpack"), "--json")
    assert rc == 0, err
    return {"dir": ckpt, "packed": tmp / "m.skpack", "report": json.loads(out), "tok": tok,
            "logits": logits(model, tiny_inputs()), "tmp": tmp}


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The command line in-process (for the error cases: no interpreter start-up)."""
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slicekit: error: "), err
    return lines[0]


def test_pack_unpack_round_trip_keeps_logits(sliced, tmp_path):
    report = sliced["report"]
    assert report["symmetry_found"] and report["bits_back"] and report["saved_bits"] > 0
    assert os.path.getsize(sliced["packed"]) == report["file_bytes"] < report["safetensors_bytes"]
    out_dir = tmp_path / "unpacked"
    rc, out, err = run_cli("unpack", str(sliced["packed"]), str(out_dir))
    assert rc == 0, err
    assert "unpacked" in out
    assert sorted(os.listdir(tmp_path)) == ["unpacked"]  # written through a temporary sibling, renamed
    x = tiny_inputs()
    model, tok = slicekit.load(str(out_dir))
    assert rel_error(logits(model, x), sliced["logits"]) < TOL
    assert tok is not None and tok("hello world")["input_ids"] == sliced["tok"]("hello world")["input_ids"]
    # the packed file loads directly, to the very same weights
    direct, _ = slicekit.checkpoint.load(str(sliced["packed"]))
    assert torch.equal(logits(direct, x), logits(model, x))
    # and the unpacked directory is an ordinary checkpoint for plain transformers
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(out_dir), trust_remote_code=True).eval()
    assert rel_error(logits(plain, x), sliced["logits"]) < TOL


def test_without_bits_back_the_file_is_larger(sliced, tmp_path):
    rc, out, err = run_cli("pack", str(sliced["dir"]), str(tmp_path / "plain.skpack"), "--no-bits-back")
    assert rc == 0, err
    assert "rotation-symmetric interface(s); bits-back off" in out  # the human summary
    with_bb, without = os.path.getsize(sliced["packed"]), os.path.getsize(tmp_path / "plain.skpack")
    # the difference is what the report says bits-back saved, less the rotations' side information
    # (pivots, grids, fragile lists, header entries: a few % of the saving on a tiny model)
    saved = sliced["report"]["saved_bits"] / 8
    assert 0.85 * saved < without - with_bb < saved


def test_explicit_bits(sliced, tmp_path, capsys):
    rc, out, err = cli(capsys, "pack", sliced["dir"], tmp_path / "b8.skpack", "--bits", "8", "--json")
    assert rc == 0, err
    assert json.loads(out)["precision"] == {"kind": "bits", "value": 8}
    assert os.path.getsize(tmp_path / "b8.skpack") < 0.5 * os.path.getsize(sliced["packed"])
    model, _ = slicekit.load(str(tmp_path / "b8.skpack"))
    w = model.model.layers[0].mlp.down_proj.weight
    assert torch.unique(w).numel() <= 255  # one symmetric 8-bit grid per tensor
    assert rel_error(logits(model, tiny_inputs()), sliced["logits"]) < 0.1


def test_bad_precision_options(sliced, tmp_path, capsys):
    rc, _, err = cli(capsys, "pack", sliced["dir"], tmp_path / "x.skpack", "--bits", "1")
    assert rc == 2 and "bits must be an integer from 2 to 24" in one_line_error(err)
    for args, message in ((["--bits", "8", "--precision", "float16"], "not allowed with argument"),
                          (["--precision", "float8"], "invalid choice")):
        with pytest.raises(SystemExit) as exc:  # argparse: usage and one error line, exit 2
            cli(capsys, "pack", sliced["dir"], tmp_path / "x.skpack", *args)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.skpack").exists()


def test_corrupt_or_truncated_file_is_a_clear_error(sliced, tmp_path, capsys):
    data = sliced["packed"].read_bytes()
    corrupt = tmp_path / "corrupt.skpack"
    corrupt.write_bytes(data[:300] + bytes([data[300] ^ 0x40]) + data[301:])
    rc, _, err = cli(capsys, "unpack", corrupt, tmp_path / "out")
    assert rc == 2 and "corrupt" in one_line_error(err)
    assert not (tmp_path / "out").exists()
    truncated = tmp_path / "truncated.skpack"
    truncated.write_bytes(data[: len(data) // 3])
    rc, _, err = cli(capsys, "unpack", truncated, tmp_path / "out")
    assert rc == 2 and "truncated" in one_line_error(err)
    with pytest.raises(SlicekitError, match="truncated"):
        slicekit.load(str(truncated))
    with pytest.raises(SlicekitError, match="corrupt"):
        slicekit.checkpoint.load(str(corrupt))
    with pytest.raises(SlicekitError, match="not a packed slicekit model"):
        slicekit.load(str(sliced["dir"] / "config.json"))
    assert sorted(os.listdir(tmp_path)) == ["corrupt.skpack", "truncated.skpack"]


def test_model_without_rotation_symmetry_packs_and_says_so(tmp_path, capsys):
    """A FASP checkpoint (pruned neurons, norms with weights) has no rotation symmetry."""
    from slicekit.methods.fasp import FASPConfig

    save_tiny_with_tokenizer(tmp_path / "dense")
    model, tok = load_model(str(tmp_path / "dense"))
    compress(model, tok, "fasp", FASPConfig(target_params=0.25), batches=tiny_calibration(), progress=False)
    slicekit.save(model, tok, str(tmp_path / "fasp"))
    rc, out, err = run_cli("pack", str(tmp_path / "fasp"), str(tmp_path / "f.skpack"))
    assert rc == 0, err
    assert "no rotation symmetry found" in out
    rc, _, err = cli(capsys, "unpack", tmp_path / "f.skpack", tmp_path / "f")
    assert rc == 0, err
    x = tiny_inputs()
    assert rel_error(logits(slicekit.load(str(tmp_path / "f"))[0], x), logits(model, x)) < TOL


def test_bad_paths(sliced, tmp_path, capsys):
    rc, _, err = cli(capsys, "pack", tmp_path / "missing", tmp_path / "m.skpack")
    assert rc == 2 and "no such checkpoint directory" in one_line_error(err)
    rc, _, err = cli(capsys, "pack", sliced["packed"], tmp_path / "m.skpack")
    assert rc == 2 and "already a packed model" in one_line_error(err)
    rc, _, err = cli(capsys, "pack", sliced["dir"], tmp_path)
    assert rc == 2 and "is a directory" in one_line_error(err)
    rc, _, err = cli(capsys, "unpack", tmp_path / "missing.skpack", tmp_path / "out")
    assert rc == 2 and "no such packed model file" in one_line_error(err)
    # unpack replaces an existing model directory, but never a directory that is not a model
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    rc, _, err = cli(capsys, "unpack", sliced["packed"], precious)
    assert rc == 2 and "not a model directory" in one_line_error(err)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["precious"]
