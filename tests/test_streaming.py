"""Streaming compression (``--stream``, issue #20): decoder layers read one at a time from the
checkpoint's safetensors shards, each compressed layer written at once, a killed run resumed.

What must hold, on tiny 4-layer models saved as many small shards:

- a streamed run writes the same model as an in-memory run (logits, format, parameter count)
  for every method that can stream, on families that exercise a tied head (Llama), LayerNorm
  (OPT), a parallel block (Phi) and a checkpoint whose names transformers renames (GPT-NeoX's
  ``embed_out``);
- a run killed after some layers resumes from its staging directory without recomputing the
  finished layers, and the output is bit-identical to an uninterrupted run's; a different run
  refuses to mix with that partial work unless told to restart;
- at most one decoder layer holds real tensors at any time;
- what cannot stream is refused with a one-line :class:`SlicekitError`, in the API and the CLI.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import tiny
from slicekit.arch import get_arch
from slicekit.checkpoint import load, save
from slicekit.errors import SlicekitError
from slicekit.methods import get_method
from slicekit.models import count_parameters
from slicekit.pipeline import compress
from slicekit.schedules import needs_scores
from slicekit.streaming import PROGRESS, load_streamed, source_of
from tiny import logits, rel_error, save_tiny_with_tokenizer, tiny_calibration, tiny_inputs, tiny_model

LAYERS = 4  # deeper than the default tiny models, so that resuming and "one layer at a time" mean something
SHARD = "20KB"  # many shards per model: a layer's tensors are spread over several files

#: settings that compress (as in tests/test_matrix.py); modegpt's default schedule scores layers first
METHOD_CONFIGS = {
    "slicegpt": dict(target_params=0.3),
    "fasp": dict(target_params=0.3, round_to=4),
    "modegpt": dict(target_params=0.3),
    "dotresize": dict(target_params=0.3, round_to=4),
}
STREAM_ARCHS = ["llama", "opt", "phi", "gpt_neox"]
PAIRS = [(m, a) for m in METHOD_CONFIGS for a in STREAM_ARCHS]


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(method: str, **overrides):
    entry = get_method(method)
    return entry.config_cls(**{**METHOD_CONFIGS[method], **overrides})


def deep_model(arch: str, layers: int = LAYERS):
    """``tiny_model(arch)`` (same seeded initialisation) with ``layers`` decoder layers."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(tiny.TINY_CONFIGS, arch, {**tiny.TINY_CONFIGS[arch], "num_hidden_layers": layers})
        return tiny_model(arch)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """``arch -> directory`` of the 4-layer tiny model saved as small safetensors shards (made once)."""
    root = tmp_path_factory.mktemp("sources")
    made: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in made:
            d = root / arch
            deep_model(arch).save_pretrained(d, max_shard_size=SHARD)
            made[arch] = str(d)
        return made[arch]

    return get


def _streamed(directory: str):
    model, _tok = load_streamed(directory, require_tokenizer=False)
    return model


def _compress_streamed(directory: str, method: str, out: Path, restart: bool = False, stop_after: int | None = None,
                       **overrides):
    """Load ``directory`` streamed and compress it, staging its layers for ``out``; the model (not yet saved).
    ``stop_after`` simulates a kill after that many finished layers (KeyboardInterrupt)."""
    model = _streamed(directory)
    source_of(model).stop_after = stop_after
    compress(model, None, method, _config(method, **overrides), batches=tiny_calibration(), progress=False,
             out_dir=str(out), restart=restart)
    return model


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``directory``, by name (names must not repeat)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        for name, t in load_file(f).items():
            assert name not in out, f"{name} stored twice"
            out[name] = t
    return out


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _record_fetches(model) -> list[int]:
    """Make the model's layer source record the index of every layer it reads."""
    source = source_of(model)
    seen: list[int] = []
    original = source.fetch

    def fetch(engine, index: int) -> None:
        seen.append(index)
        original(engine, index)

    source.fetch = fetch
    return seen


# ----------------------------------------------------------------------------- streamed == in memory


@pytest.mark.parametrize(("method", "arch"), PAIRS)
def test_streamed_equals_in_memory(sources, method, arch, tmp_path):
    model = deep_model(arch)
    entry = get_method(method)
    reason = entry.unsupported(model, _config(method)) if entry.unsupported else None
    if reason:
        pytest.skip(f"{method} refuses {arch}: {reason}")
    src = sources(arch)
    with open(os.path.join(src, "model.safetensors.index.json")) as fh:
        stored = json.load(fh)["weight_map"]
    assert len(set(stored.values())) > LAYERS, "the source should be spread over many shards"
    if arch == "gpt_neox":  # the file's names are not the model's: streaming must rename them
        assert "embed_out.weight" in stored and "lm_head.weight" not in stored

    compress(model, None, method, _config(method), batches=tiny_calibration(), progress=False)
    fmt_memory = save(model, None, str(tmp_path / "mem"))

    out = tmp_path / "str"
    streamed = _compress_streamed(src, method, out)
    assert _partial(out).is_dir() and not out.exists()  # layers are staged until the output is saved
    fmt_streamed = save(streamed, None, str(out))
    assert not _partial(out).exists(), "the staging directory must go once the output is in place"
    assert fmt_streamed == fmt_memory
    assert sorted(_tensors(out)) == sorted(_tensors(tmp_path / "mem"))  # the same tensor names
    assert count_parameters(streamed) == count_parameters(model)

    a, _ = load(str(tmp_path / "mem"))
    b, _ = load(str(out))
    assert count_parameters(b) == count_parameters(a)
    x = tiny_inputs()
    assert rel_error(logits(b, x), logits(a, x)) < 1e-5


# ----------------------------------------------------------------------------- resuming


@pytest.mark.parametrize(("method", "stop"), [("slicegpt", 2), ("fasp", 2),
                                             ("slicegpt", LAYERS)])  # every layer done, killed before saving
def test_killed_run_resumes_to_an_identical_output(sources, method, stop, tmp_path):
    src = sources("llama")
    ref = tmp_path / "ref"
    save(_compress_streamed(src, method, ref), None, str(ref))

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _compress_streamed(src, method, out, stop_after=stop)
    assert not out.exists()
    progress = json.loads((_partial(out) / PROGRESS).read_text())
    assert progress["done"] == stop

    model = _streamed(src)
    fetched = _record_fetches(model)
    compress(model, None, method, _config(method), batches=tiny_calibration(), progress=False, out_dir=str(out))
    assert fetched == list(range(stop, LAYERS)), "the resumed run must read only the layers the killed one did not finish"
    save(model, None, str(out))
    assert not _partial(out).exists()

    got, want = _tensors(out), _tensors(ref)
    assert sorted(got) == sorted(want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"resumed output differs from an uninterrupted run in {different[:5]}"
    shape = json.loads((out / "config.json").read_text()).get("slicekit", {}).get("shape")
    assert shape == json.loads((ref / "config.json").read_text()).get("slicekit", {}).get("shape")


def test_other_run_refuses_partial_work_unless_restarted(sources, tmp_path):
    src = sources("llama")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _compress_streamed(src, "fasp", out, stop_after=1)
    assert (_partial(out) / PROGRESS).is_file()

    with pytest.raises(SlicekitError, match="--restart"):
        _compress_streamed(src, "fasp", out, target_params=0.2)
    assert json.loads((_partial(out) / PROGRESS).read_text())["done"] == 1  # the refusal touched nothing

    model = _compress_streamed(src, "fasp", out, restart=True, target_params=0.2)
    save(model, None, str(out))
    assert not _partial(out).exists()
    # the output is the new target's compression throughout, not the killed run's first layer
    ref = deep_model("llama")
    compress(ref, None, "fasp", _config("fasp", target_params=0.2), batches=tiny_calibration(), progress=False)
    loaded, _ = load(str(out))
    assert count_parameters(loaded) == count_parameters(ref)
    x = tiny_inputs()
    assert rel_error(logits(loaded, x), logits(ref, x)) < 1e-5


def test_other_calibration_batches_refuse_partial_work(sources, tmp_path):
    src = sources("llama")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _compress_streamed(src, "fasp", out, stop_after=2)
    other = [tiny_inputs(2, 32, seed=s + 10) for s in range(3)]
    with pytest.raises(SlicekitError, match="--restart"):
        compress(_streamed(src), None, "fasp", _config("fasp"), batches=other, progress=False, out_dir=str(out))


def test_save_pretrained_of_a_streamed_model(sources, tmp_path):
    """DESIGN: after ``compress`` the model's ``save_pretrained`` writes a loadable checkpoint."""
    out = tmp_path / "out"
    model = _compress_streamed(sources("llama"), "fasp", out)
    model.save_pretrained(str(out))
    loaded, _ = load(str(out))
    assert count_parameters(loaded) == count_parameters(model)
    assert not _partial(out).exists()


# ----------------------------------------------------------------------------- memory


def _real_layers(model) -> list[int]:
    """Indices of the decoder layers holding any parameter that is not on the meta device."""
    layers = get_arch(model.config).layer_list(model)
    return [i for i, layer in enumerate(layers) if any(p.device.type != "meta" for p in layer.parameters())]


@pytest.mark.parametrize("method", ["slicegpt", "modegpt"])  # modegpt also scores the layers first (observe)
def test_one_layer_in_memory_at_a_time(sources, method, tmp_path):
    model = _streamed(sources("llama"))
    assert _real_layers(model) == []
    source = source_of(model)
    original = source.fetch
    seen: list[tuple[int, list[int], list[int]]] = []

    def fetch(engine, index: int) -> None:
        before = _real_layers(engine.model)
        original(engine, index)
        seen.append((index, before, _real_layers(engine.model)))

    source.fetch = fetch
    compress(model, None, method, _config(method), batches=tiny_calibration(), progress=False,
             out_dir=str(tmp_path / "out"))
    passes = 2 if needs_scores(_config(method).schedule) else 1  # layer scores read every layer once more
    assert [i for i, _, _ in seen] == list(range(LAYERS)) * passes
    for index, before, after in seen:
        assert before == [], f"layers {before} still real when layer {index} was fetched"
        assert after == [index]
    assert _real_layers(model) == []
    embedding = get_arch(model.config).embeddings(model)[0]
    assert embedding.weight.device.type != "meta"  # what lies outside the layers stays in memory


# ----------------------------------------------------------------------------- refusals


def test_streaming_refusals(sources, tmp_path):
    src = sources("llama")
    model = _streamed(src)
    prunenet = get_method("prunenet").config_cls(target_params=0.3, round_to=4, episodes=2)
    with pytest.raises(SlicekitError, match="cannot stream"):
        compress(model, None, "prunenet", prunenet, batches=tiny_calibration(), progress=False,
                 out_dir=str(tmp_path / "p"))
    assert not _partial(tmp_path / "p").exists() and not (tmp_path / "p").exists()
    with pytest.raises(SlicekitError, match="output directory"):
        compress(model, None, "fasp", _config("fasp"), batches=tiny_calibration(), progress=False)
    with pytest.raises(SlicekitError, match="not compressed"):  # its layers exist only in the source
        save(model, None, str(tmp_path / "uncompressed"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a refused save must leave nothing behind"

    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / "config.json").write_text(Path(src, "config.json").read_text())
    with pytest.raises(SlicekitError, match="safetensors"):
        load_streamed(str(only_config), require_tokenizer=False)
    with pytest.raises(SlicekitError, match="local model directory"):
        load_streamed(str(tmp_path / "missing"), require_tokenizer=False)


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> str:
    """A 4-layer tiny Llama with a tokenizer, saved as one safetensors file."""
    d = tmp_path_factory.mktemp("cli-model")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(tiny.TINY_CONFIGS, "llama", {**tiny.TINY_CONFIGS["llama"], "num_hidden_layers": LAYERS})
        save_tiny_with_tokenizer(d)
    return str(d)


def _cli(capsys, *args) -> tuple[int, str, str]:
    from slicekit.cli import main

    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("slicekit:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-1500:]
    return lines[0]


FASP_CLI = ["--method", "fasp", "--target-params", "0.25", "--round-to", "4", "--cal-nsamples", "4",
            "--cal-seqlen", "32", "--quiet"]


def test_cli_stream_equals_in_memory(cli_model, data_dir, capsys, tmp_path):
    streamed, memory = tmp_path / "streamed", tmp_path / "memory"
    rc, out, err = _cli(capsys, "compress", "--model", cli_model, *FASP_CLI, "--stream", "--out", streamed, "--json")
    assert rc == 0, err
    res_streamed = json.loads(out)
    rc, out, err = _cli(capsys, "compress", "--model", cli_model, *FASP_CLI, "--out", memory, "--json")
    assert rc == 0, err
    res_memory = json.loads(out)
    assert res_streamed["params"] == res_memory["params"]
    assert not _partial(streamed).exists()
    a, _ = load(str(memory))
    b, _ = load(str(streamed))
    x = tiny_inputs()
    assert rel_error(logits(b, x), logits(a, x)) < 1e-5


def test_cli_dry_run_reads_and_writes_nothing(cli_model, data_dir, capsys, tmp_path):
    predicted = {}
    for mode in ("streamed", "in memory"):
        out_dir = tmp_path / mode.replace(" ", "-")
        rc, out, err = _cli(capsys, "compress", "--model", cli_model, *FASP_CLI, "--out", out_dir, "--dry-run",
                            "--json", *(["--stream"] if mode == "streamed" else []))
        assert rc == 0, err
        pred = json.loads(out)["dry_run"]
        assert pred["mode"] == mode and pred["host_peak_mib"] > 0
        assert not out_dir.exists() and not _partial(out_dir).exists()
        predicted[mode] = pred
    # four layers: the outer modules and two copies of one layer weigh less than all the weights
    assert predicted["streamed"]["host_terms_mib"]["weights"] < predicted["in memory"]["host_terms_mib"]["weights"]


def _tiny_gguf(path: Path) -> Path:
    pytest.importorskip("gguf")
    return tiny.write_tiny_gguf(path)


@pytest.mark.parametrize(
    ("case", "extra", "needle"),
    [
        ("eval", ["--stream", "--eval", "--out", "OUT"], "--stream"),
        ("restart-alone", ["--restart", "--out", "OUT"], "--restart"),
        ("no-out", ["--stream"], "--out"),
        ("gguf", ["--stream", "--out", "OUT"], "GGUF"),
        ("missing", ["--stream", "--out", "OUT"], "not found"),
        ("offload-file", ["--offload-dir", "FILE", "--out", "OUT"], "--offload-dir"),
        ("prunenet", ["--method", "prunenet", "--stream", "--out", "OUT"], "cannot stream"),
    ],
)
def test_cli_stream_refusals(cli_model, data_dir, capsys, tmp_path, case, extra, needle):
    model = cli_model
    if case == "gguf":
        model = str(_tiny_gguf(tmp_path / "m.gguf"))
    elif case == "missing":
        model = str(tmp_path / "no-such-model")
    out_dir = tmp_path / "out"
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    rc, _out, err = _cli(capsys, "compress", "--model", model, *FASP_CLI,
                         *[out_dir if a == "OUT" else a_file if a == "FILE" else a for a in extra])
    assert rc == 2
    assert needle in _one_line_error(err)
    assert not out_dir.exists() and not _partial(out_dir).exists()


# ----------------------------------------------------------------------------- the memory model


@pytest.mark.slow
@pytest.mark.parametrize("method", ["slicegpt"])  # FASP's terms are checked on the 4 GiB model (benchmarks)
def test_dry_run_predicts_the_measured_peak(cli_model, data_dir, tmp_path, method):
    """``--dry-run`` against the real command's peak RSS (``VmHWM`` of its own process), streamed
    and in memory, on a 170 MB random Llama: within 25 %, the issue's bar."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from slicekit.synthetic import write_random_llama

    src = tmp_path / "synthetic"
    write_random_llama(str(src), layers=12, hidden=512, intermediate=1536, heads=8, vocab=128,
                       tokenizer=AutoTokenizer.from_pretrained(cli_model))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "slicekit.cli", "compress", "--model", str(src), "--method", method,
            "--target-params", "0.25", "--cal-nsamples", "8", "--cal-seqlen", "64", "--cal-batch-size", "4",
            "--json", "--quiet"]
    for mode in ("streamed", "in memory"):
        extra = ["--stream"] if mode == "streamed" else []
        out = tmp_path / f"out-{mode.replace(' ', '-')}"

        def run(*more: str, out: Path = out, extra: list[str] = extra) -> dict:
            proc = subprocess.run([*base, *extra, "--out", str(out), *more], capture_output=True, text=True, env=env)
            assert proc.returncode == 0, proc.stderr[-2000:]
            return json.loads(proc.stdout.strip().splitlines()[-1])

        predicted = run("--dry-run")["dry_run"]["host_peak_mib"]
        measured = run()["process_peak_rss_mib"]
        assert abs(predicted - measured) <= 0.25 * measured, (mode, predicted, measured)


@pytest.mark.parametrize("method", ["slicegpt", "fasp"])
def test_offloaded_activations_give_the_same_model(method, tmp_path):
    """``offload_dir``: activations in unlinked memory-mapped files, bit-identical results, no files left."""
    a, b = tiny_model("llama"), tiny_model("llama")
    compress(a, None, method, _config(method), batches=tiny_calibration(), progress=False)
    seen: list[str | None] = []
    from slicekit.calibration import CalibrationEngine

    keep = CalibrationEngine.keep

    def spy(self, t):
        out = keep(self, t)
        seen.append(out.untyped_storage().filename)  # None for ordinary host memory
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CalibrationEngine, "keep", spy)
        compress(b, None, method, _config(method), batches=tiny_calibration(), progress=False,
                 offload_dir=str(tmp_path / "acts"))
    # every kept activation is a memory map of a file in the offload directory
    assert seen and all(f is not None and os.path.dirname(f) == str(tmp_path / "acts") for f in seen)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert list((tmp_path / "acts").iterdir()) == []  # unlinked as soon as mapped
