"""Bits-back packing: interfaces are real symmetries, round trips keep the outputs, the saving is
real, damaged files fail cleanly, and the rotation code recovers its symbols exactly."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch

import slicekit
from slicekit.arch import get_arch
from slicekit.bitsback import coding as cd
from slicekit.bitsback import (
    decode,
    inspect,
    is_packed,
    load_packed,
    pack,
    rotate_model,
    rotation_interfaces,
    unpack,
)
from slicekit.bitsback import rotation as rt
from slicekit.bitsback.container import MAGIC, SectionWriter, read_container, write_container
from slicekit.errors import SlicekitError
from slicekit.invariance import make_invariant
from slicekit.methods.slicegpt import SliceGPTConfig
from slicekit.pipeline import compress
from tiny import ARCHS, logits, rel_error, rotatable_archs, tiny_calibration, tiny_inputs, tiny_model

ROUND_TRIP_ARCHS = ["llama", "opt", "phi", "gpt_neox", "gpt2"]


def sliced(arch: str, slicing: float = 0.25):
    model = tiny_model(arch)
    compress(model, None, "slicegpt", SliceGPTConfig(slicing=slicing), batches=tiny_calibration(), progress=False)
    return model


def saved(model, tmp_path, name: str = "ckpt") -> str:
    path = str(tmp_path / name)
    slicekit.save(model, None, path)
    return path


def random_rotations(interfaces, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.linalg.qr(torch.randn(i.width, i.width, generator=g, dtype=torch.float64))[0] for i in interfaces]


# ------------------------------------------------------------------------------ interfaces

@pytest.mark.parametrize("arch", rotatable_archs())
def test_interfaces_are_exact_symmetries(arch):
    model = sliced(arch)
    interfaces = rotation_interfaces(model)
    n_layers = model.config.num_hidden_layers
    parallel = get_arch(model.config).block.parallel
    assert len(interfaces) == (n_layers + 1 if parallel else 2 * n_layers + 1)
    named = dict(model.named_parameters())
    covered = {m.name for i in interfaces for m in i.members}
    # every matrix of a rotated model touches the stream; only reader biases do not
    assert {n for n, p in named.items() if p.dim() == 2} <= covered
    for iface in interfaces:
        assert all(named[m.name].shape[m.axis] == iface.width for m in iface.members)
    x = tiny_inputs()
    ref = logits(model, x)
    rotate_model(model, interfaces, random_rotations(interfaces))
    assert rel_error(logits(model, x), ref) < 1e-5


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in rotatable_archs()])
def test_families_that_cannot_rotate_report_no_interface(arch):
    assert rotation_interfaces(tiny_model(arch)) == []


def test_a_wrong_member_breaks_the_symmetry():
    """The symmetry test above is sensitive: rotating one interface without its head fails."""
    model = sliced("llama")
    interfaces = rotation_interfaces(model)
    last = interfaces[-1]
    last.members = [m for m in last.members if m.name != "lm_head.weight"]
    x = tiny_inputs()
    ref = logits(model, x)
    rotate_model(model, [last], random_rotations([last]))
    assert rel_error(logits(model, x), ref) > 1e-2


def test_dense_model_has_no_symmetry_but_invariant_model_has_one():
    model = tiny_model("llama")
    assert rotation_interfaces(model) == []
    make_invariant(model)
    interfaces = rotation_interfaces(model)  # identity shortcuts tie every position together
    assert len(interfaces) == 1 and interfaces[0].width == model.config.hidden_size
    x = tiny_inputs()
    ref = logits(model, x)
    rotate_model(model, interfaces, random_rotations(interfaces, seed=3))
    assert rel_error(logits(model, x), ref) < 1e-5


# ------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("arch", ROUND_TRIP_ARCHS)
def test_round_trip_keeps_logits(arch, tmp_path):
    model = sliced(arch)
    x = tiny_inputs()
    ref = logits(model, x)
    report = pack(saved(model, tmp_path), tmp_path / "m.skpack")
    assert report.symmetry_found
    # every interface, the first one too: the compressed config/loader files give it bits to pop
    assert [s.status for s in report.interfaces] == ["bits-back"] * len(report.interfaces)
    assert report.saved_bits > 0
    unpacked, _ = load_packed(tmp_path / "m.skpack")
    # float32 precision: steps of one ulp at each row's RMS, so the outputs agree to ~1e-6
    assert rel_error(logits(unpacked, x), ref) < 2e-6
    # the weights really were rotated (a different member of the orbit, not a copy)
    assert not torch.allclose(unpacked.get_submodule("lm_head").weight, model.get_submodule("lm_head").weight,
                              atol=1e-3)
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "m.skpack"]  # no temporary files left behind


def test_bits_back_saves_bits_over_the_same_coder(tmp_path):
    ckpt = saved(sliced("llama"), tmp_path)
    with_bb = pack(ckpt, tmp_path / "bb.skpack", estimate=True)
    without = pack(ckpt, tmp_path / "plain.skpack", bits_back=False)
    assert without.saved_bits == 0 and all(s.status == "bits-back off" for s in without.interfaces)
    assert with_bb.file_bytes < without.file_bytes
    # the smaller ANS stream is the net of popped bits, corrections and the rotated weights' extra
    # cost (measured on scratch coders, so up to a few words per interface)
    assert abs((without.ans_bytes - with_bb.ans_bytes) * 8 - with_bb.saved_bits) < 0.02 * with_bb.saved_bits
    # bits-back gets a large part of the information-theoretic estimate of every interface it used
    for s in with_bb.interfaces:
        if s.status == "bits-back":
            assert 0.6 * s.estimate_bits < s.popped_bits - s.correction_bits < 1.05 * s.estimate_bits
            assert abs(s.rotation_cost_bits) < 0.05 * s.popped_bits  # the coder is nearly rotation invariant
    assert with_bb.file_bytes < 0.85 * with_bb.safetensors_bytes + 60_000  # files (loader, config) are extra
    assert "bits back:" in with_bb.summary() and "estimate" in with_bb.summary()
    assert "bits back:" not in without.summary()


def test_explicit_bits_and_precision(tmp_path):
    model = sliced("llama")
    ckpt = saved(model, tmp_path)
    x = tiny_inputs()
    ref = logits(model, x)
    errors, sizes = {}, {}
    for label, kwargs in {"b6": {"bits": 6}, "b10": {"bits": 10}, "bf16": {"precision": "bfloat16"},
                          "f32": {}}.items():
        report = pack(ckpt, tmp_path / f"{label}.skpack", **kwargs)
        sizes[label] = report.ans_bytes
        errors[label] = rel_error(logits(load_packed(tmp_path / f"{label}.skpack")[0], x), ref)
    assert errors["b10"] < errors["b6"] / 8  # four more bits: ~16x smaller steps
    assert errors["b6"] < 0.2 and errors["bf16"] < 2e-2
    assert sizes["b6"] < sizes["b10"] < sizes["f32"]
    assert sizes["bf16"] < 0.5 * sizes["f32"]  # ~9 bits per weight instead of ~25


def test_coarse_bits_undo_unprofitable_pops_and_still_decode(tmp_path):
    """At 4 bits the rotation can hardly be read back from the weights: most pops do not pay for
    their corrections and side information and are undone; the stack must still be exact."""
    model = sliced("llama")
    report = pack(saved(model, tmp_path), tmp_path / "b4.skpack", bits=4)
    statuses = {s.status for s in report.interfaces}
    assert any(s.startswith("no gain") for s in statuses)
    assert report.saved_bits == sum(s.popped_bits - s.correction_bits - s.rotation_cost_bits
                                    for s in report.interfaces if s.status == "bits-back")
    tensors, _, header = decode(tmp_path / "b4.skpack")  # raises unless the stack decodes to empty
    assert set(tensors) == {e["name"] for e in header["tensors"]}
    x = tiny_inputs()
    assert torch.isfinite(logits(load_packed(tmp_path / "b4.skpack")[0], x)).all()


def test_unpack_writes_a_loadable_directory_and_replaces_atomically(tmp_path):
    model = sliced("opt")
    pack(saved(model, tmp_path), tmp_path / "m.skpack")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    # a directory that is not a model is never swapped away
    with pytest.raises(SlicekitError, match="not a model directory"):
        unpack(tmp_path / "m.skpack", out)
    assert os.listdir(out) == ["stale.txt"]
    (out / "config.json").write_text("{}")  # an older model directory: replaced as a whole
    assert unpack(tmp_path / "m.skpack", out) == str(out)
    names = set(os.listdir(out))
    assert "stale.txt" not in names and {"config.json", "model.safetensors"} <= names
    again, _ = slicekit.load(str(out))
    x = tiny_inputs()
    assert rel_error(logits(again, x), logits(model, x)) < 2e-6
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_model_without_symmetry_packs_and_says_so(tmp_path):
    model = tiny_model("llama")
    path = str(tmp_path / "dense")
    model.save_pretrained(path)
    report = pack(path, tmp_path / "d.skpack")
    assert not report.symmetry_found and report.interfaces == []
    assert "no rotation symmetry" in report.message
    assert "no rotation symmetry" in inspect(tmp_path / "d.skpack")["message"]
    x = tiny_inputs()
    assert rel_error(logits(load_packed(tmp_path / "d.skpack")[0], x), logits(model, x)) < 2e-6


@pytest.mark.parametrize("method, settings, symmetric", [
    ("fasp", {}, False),  # prunes neurons, keeps the norms' weights
    ("modegpt", {}, False),  # narrows heads and MLPs per layer, norms kept
    ("prunenet", {}, False),
    ("dotresize", {}, False),  # width="mlp": narrower MLPs of the original architecture
    ("dotresize", {"width": "hidden"}, True),  # the transport basis Q on the rotation-invariant model
])
def test_every_method_round_trips_and_bits_back_where_it_rotates(method, settings, symmetric, tmp_path):
    """Every method's output packs and round trips; bits-back is used exactly where the output has
    a rotation symmetry (SliceGPT: the round trips above), and the others say they have none."""
    from slicekit.methods import get_method

    model = tiny_model("llama")
    config = get_method(method).config_cls(**settings)
    compress(model, None, method, config, batches=tiny_calibration(), progress=False)
    report = pack(saved(model, tmp_path), tmp_path / "f.skpack")
    assert report.symmetry_found == symmetric == bool(rotation_interfaces(model))
    if symmetric:
        assert [s.status for s in report.interfaces] == ["bits-back"] * len(report.interfaces)
        assert report.saved_bits > 0
    else:
        assert report.saved_bits == 0 and "no rotation symmetry found" in report.message
    x = tiny_inputs()
    assert rel_error(logits(load_packed(tmp_path / "f.skpack")[0], x), logits(model, x)) < 2e-6


def test_in_memory_model_and_is_packed(tmp_path):
    model = sliced("llama")
    report = pack(model, tmp_path / "m.skpack")
    assert report.symmetry_found
    assert is_packed(tmp_path / "m.skpack") and not is_packed(tmp_path) and not is_packed(tmp_path / "nope")


# ------------------------------------------------------------------------------ damaged files

@pytest.fixture(scope="module")
def packed_bytes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packed")
    model = sliced("llama")
    ckpt = str(tmp / "ckpt")
    slicekit.save(model, None, ckpt)
    pack(ckpt, tmp / "m.skpack")
    return (tmp / "m.skpack").read_bytes()


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b[:40], "truncated"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum"),
    (lambda b: b[:200] + bytes([b[200] ^ 0x10]) + b[201:], "checksum"),
    (lambda b: b + b"\0", "trailing"),
    (lambda b: b"GARBAGE!" + b[8:], "bad magic"),
    (lambda b: b"", "bad magic"),
])
def test_damaged_file_gives_a_clear_error(packed_bytes, tmp_path, damage, message):
    path = tmp_path / "bad.skpack"
    path.write_bytes(damage(packed_bytes))
    with pytest.raises(SlicekitError, match=message):
        load_packed(path)


def test_newer_version_and_inconsistent_header_are_refused(packed_bytes, tmp_path):
    good = tmp_path / "good.skpack"
    good.write_bytes(packed_bytes)
    box = read_container(good)

    def rewrite(edit) -> str:
        header = json.loads(json.dumps(box.header))
        edit(header)
        sections = SectionWriter()
        sections.parts, sections.table, sections.size = [bytes(box.payload)], [], len(box.payload)
        path = tmp_path / "edited.skpack"
        # keep the original section table: write_container replaces it with the writer's
        sections.table = header.pop("sections")
        write_container(str(path), header, sections)
        return str(path)

    with pytest.raises(SlicekitError, match="upgrade slicekit"):
        decode(rewrite(lambda h: h.update(version=99)))
    iface = next(i for i, e in enumerate(box.header["interfaces"]) if e.get("bits_back"))
    with pytest.raises(SlicekitError, match="not recovered exactly"):
        decode(rewrite(lambda h: h["interfaces"][iface].update(crc32=h["interfaces"][iface]["crc32"] ^ 1)))
    with pytest.raises(SlicekitError, match="inconsistent header"):
        decode(rewrite(lambda h: h["tensors"][0].pop("shape")))
    data = bytearray(good.read_bytes())
    struct.pack_into("<I", data, len(MAGIC), 7)
    (tmp_path / "v7.skpack").write_bytes(bytes(data))
    with pytest.raises(SlicekitError, match="container version 7"):
        decode(tmp_path / "v7.skpack")


# ------------------------------------------------------------------------------ the rotation code

def _canonical_setup(d: int = 24, n: int = 120, seed: int = 0, step: float = 1e-3):
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, (n, 1))
    steps = np.full(n, step)
    frame = rt.canonical_frame(rows, steps)
    grid = rt.grid_exponents(frame.diag)
    return rng, rows, steps, frame, grid


def test_rotation_from_symbols_is_orthogonal_and_canonical_pivots_are_triangular():
    rng, rows, _steps, frame, grid = _canonical_setup()
    d = rows.shape[1]
    blocks = rt.rotation_blocks(grid)
    symbols = [np.rint(rng.standard_normal(n) * b.std).astype(np.int64) for b, n in blocks]
    rot = rt.build_rotation(symbols, grid)
    assert np.abs(rot @ rot.T - np.eye(d)).max() < 1e-12
    canon = rows @ frame.frame.T
    assert np.abs(np.triu(canon[frame.pivots], 1)).max() < 1e-10
    assert np.all(np.diag(canon[frame.pivots]) > 0)


def test_recovery_is_exact_with_corrections_and_robust_to_round_off():
    rng, rows, steps, frame, grid = _canonical_setup(seed=1)
    blocks = rt.rotation_blocks(grid)
    symbols = [np.rint(rng.standard_normal(n) * b.std).astype(np.int64) for b, n in blocks]
    stored = np.rint(rows @ frame.frame.T @ rt.build_rotation(symbols, grid) / steps[:, None]) * steps[:, None]
    pivots = stored[frame.pivots]
    sim = rt.simulate_recovery(symbols, grid, pivots)
    corrections = [s - e for s, e in zip(symbols, sim.estimate, strict=True)]
    flat = np.concatenate(corrections)
    assert 0.3 < flat.std() < 3.0  # the grid sits at the noise level: small corrections, never zero
    assert [np.array_equal(a, b) for a, b in zip(rt.recover(grid, pivots, corrections, sim.fragile), symbols,
                                                 strict=True)] == [True] * len(symbols)
    # another machine's round-off (here: relative 1e-13 noise on the pivot rows) changes nothing
    noisy = pivots * (1 + 1e-13 * rng.standard_normal(pivots.shape))
    again = rt.recover(grid, noisy, corrections, sim.fragile)
    assert rt.symbols_crc(again) == rt.symbols_crc(symbols)
    # while without the corrections the estimate is off
    assert rt.symbols_crc(rt.recover(grid, pivots, [c * 0 for c in corrections], sim.fragile)) != \
        rt.symbols_crc(symbols)


def test_fragile_roundings_are_listed_and_agreed():
    x = np.array([0.5 + 3e-5, 1.49999, 2.2, -0.5 - 1e-6])
    weak = np.nonzero(np.abs(x - np.floor(x) - 0.5) < rt.FRAGILE)[0]
    assert weak.tolist() == [0, 1, 3]
    assert rt.round_estimate(x, weak).tolist() == [0, 1, 2, -1]
    shifted = x.copy()
    shifted[[0, 3]] -= 6e-5  # the other side of the half-integer
    assert rt.round_estimate(shifted, weak).tolist() == [0, 1, 2, -1]


def test_blocks_round_trip_with_low_bits_and_exact_steps():
    import constriction

    rng = np.random.default_rng(2)
    coder = constriction.stream.stack.AnsCoder()
    items = []
    for std in (0.5, 300.0, 2.0 ** 30, 2.0 ** 45):  # m = 0 and several 16-bit low chunks
        block_std = std
        v = np.rint(rng.standard_normal(1000) * block_std).astype(np.int64)
        m = cd.lo_bits_for(block_std, float(np.abs(v).max()))
        hi = v >> m
        items.append((cd.Block(block_std, m, int(hi.min()), int(hi.max())), v))
    cd.push_blocks(coder, items)
    out = cd.pop_blocks(coder, [(b, v.size) for b, v in items])
    assert coder.is_empty()
    assert all(np.array_equal(a, v) for a, (_, v) in zip(out, items, strict=True))
    e = np.arange(-80, 80)
    assert np.allclose(cd.pow2_8(e), 2.0 ** (e / 8), rtol=2e-16, atol=0)


def test_quantiser_steps_follow_the_precision():
    w = np.random.default_rng(3).standard_normal((6, 50)) * np.arange(1, 7)[:, None]
    w[2] = 0.0
    qz = cd.quantise(w, 0, cd.Precision.make(None, None), "float32")
    steps = qz.steps().ravel()
    rms = np.sqrt((w ** 2).mean(1))
    live = rms > 0
    assert steps[2] == 0 and np.all(qz.q[2] == 0)
    ratio = steps[live] / (rms[live] * 2.0 ** -23)
    assert np.all((ratio > 2 ** -0.07) & (ratio < 2 ** 0.07))
    assert np.abs(qz.values() - w).max() <= 0.5 * steps.max()
    q8 = cd.quantise(w, 0, cd.Precision.make(8, None), "float32")
    assert np.abs(q8.q).max() <= 127
    with pytest.raises(SlicekitError, match="bits must be"):
        cd.Precision.make(1, None)
    with pytest.raises(SlicekitError, match="either bits or precision"):
        cd.Precision.make(8, "float16")
