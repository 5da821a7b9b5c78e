"""Compressing models bigger than memory: decoder layers stream from the checkpoint's shards.

A streamed model (:func:`load_streamed`) is the Hugging Face model class built with its decoder
layers' parameters on the meta device; only what lies outside the layers (embeddings, final
norm, head, rotary tables) is read into memory.  The calibration engine asks its
:class:`~slicekit.calibration.LayerSource` for one layer at a time, and this source

* **fetches** a layer by reading exactly its tensors from the safetensors shards (memory-mapped
  by safetensors, each shard opened only for the read, so no mapping outlives it);
* **releases** it after its turn: a compressed layer is written at once to its own shard in a
  staging directory next to the output (``OUT.partial/``) and its tensors go back to the meta
  device; a layer only observed (layer scores) is dropped;
* **checkpoints progress** after every finished layer: the next layer's calibration inputs, the
  method's carried state (``CARRY`` attributes: SliceGPT's current rotation, per-layer records)
  and the number of layers done, each written atomically, ``progress.json`` last.  Rerunning the
  same command resumes after the last finished layer and writes an output identical to an
  uninterrupted run; a different command refuses to mix with the partial work.

Peak memory is therefore the outer modules, about two copies of one layer (the layer and its
rewritten form), the calibration activations and the method's working set, independent of the
depth.  :func:`predict_memory` states that budget before any weight is read (``--dry-run``).

The staged layer shards become the output's shards by hard link (copy across file systems), and
the output is still written atomically by :func:`slicekit.checkpoint.save`; the staging directory
is removed only once the output is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slicekit.errors import SlicekitError
from slicekit.modeling_slicekit import _set_tensor, checkpoint_tensors

PROGRESS = "progress.json"
LAYER_FILE = "model-{index:05d}-of-{total:05d}.safetensors"  # decoder layer ``index - 1``
OUTER_FILE = "model-outer-{index:03d}-of-{total:03d}.safetensors"  # one tensor outside the layers


# ----------------------------------------------------------------------------- the checkpoint


@dataclass
class ShardIndex:
    """Which shard file holds each tensor of a safetensors checkpoint directory."""

    directory: str
    weight_map: dict[str, str]  # tensor name (the model's) -> shard file
    stored_as: dict[str, str] = field(default_factory=dict)  # model name -> name in the file, where they differ

    def adopt_model_names(self, model: nn.Module) -> None:
        """Map the file's tensor names onto the model's through transformers' own renaming rules
        for the class (e.g. GPT-NeoX's ``embed_out`` is ``lm_head``); conversions that are more
        than a rename (merged experts) are not streamable and stay unmatched."""
        import re

        try:
            from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

            rules = [(re.compile(src), r.target_patterns[0]) for r in get_model_conversion_mapping(model)
                     if isinstance(r, WeightRenaming) for src in r.source_patterns]
        except (ImportError, AttributeError, TypeError, ValueError, IndexError):
            rules = []  # an older transformers without the table: names are taken as they are
        mapped: dict[str, str] = {}
        for stored, filename in self.weight_map.items():
            name = stored
            for pattern, target in rules:
                name = pattern.sub(target, name)
            mapped[name] = filename
            if name != stored:
                self.stored_as[name] = stored
        self.weight_map = mapped

    @classmethod
    def read(cls, directory: str) -> ShardIndex:
        """The weight map, from the shards' own headers (the loader's shard listing finds them and
        refuses an incomplete checkpoint)."""
        from safetensors import SafetensorError, safe_open

        from slicekit.modeling_slicekit import SlicekitShapeError, _checkpoint_files

        try:
            files = _checkpoint_files(directory)
        except SlicekitShapeError as err:
            raise SlicekitError(f"{err}: streaming reads safetensors checkpoints; convert the model with "
                                "save_pretrained, or compress it in memory without --stream") from err
        weight_map: dict[str, str] = {}
        for path in files:
            try:
                with safe_open(path, framework="pt") as fh:
                    weight_map.update(dict.fromkeys(fh.keys(), os.path.basename(path)))
            except (SafetensorError, OSError) as err:
                raise SlicekitError(f"cannot read {path} ({err}): the file is corrupt or truncated") from err
        return cls(directory, weight_map)

    def read_tensors(self, names: list[str], dtype: torch.dtype | None, device: torch.device | str = "cpu"
                     ) -> dict[str, torch.Tensor]:
        """The tensors ``names``, each shard opened once and closed again (floating-point tensors
        converted to ``dtype``)."""
        from safetensors import SafetensorError, safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise SlicekitError(f"the checkpoint in {self.directory} has no tensor {name!r}: its tensor names do "
                                    "not match the model's (an older or converted layout); compress it in memory "
                                    "without --stream")
            by_file.setdefault(self.weight_map[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for filename, keys in by_file.items():
            path = os.path.join(self.directory, filename)
            try:
                with safe_open(path, framework="pt", device=str(device)) as fh:
                    for key in keys:
                        t = fh.get_tensor(self.stored_as.get(key, key))
                        if dtype is not None and t.is_floating_point():
                            t = t.to(dtype)
                        out[key] = t
            except (SafetensorError, OSError) as err:
                raise SlicekitError(f"cannot read {filename} ({err}): the file is corrupt or truncated") from err
        return out

    def fingerprint(self) -> str:
        """Names, sizes and modification times of the shards and the config: a resumed run must
        read the same checkpoint as the killed one."""
        h = hashlib.sha256()
        for name in [*sorted(set(self.weight_map.values())), "config.json"]:
            path = os.path.join(self.directory, name)
            st = os.stat(path) if os.path.exists(path) else None
            h.update(f"{name}:{st.st_size if st else -1}:{int(st.st_mtime) if st else -1};".encode())
        return h.hexdigest()


def _layer_names(model: nn.Module, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of everything a checkpoint stores under ``prefix`` (the loader's rule:
    parameters without tied duplicates, persistent buffers)."""
    return [(f"{prefix}.{n}", t) for n, t in checkpoint_tensors(model.get_submodule(prefix)).items()]


def drop_storage(model: nn.Module, prefix: str) -> None:
    """Drop a layer's storage: every parameter and persistent buffer becomes a meta tensor of the
    same shape (the structure, and so the plan, stays)."""
    for name, tensor in _layer_names(model, prefix):
        _set_tensor(model, name, torch.empty_like(tensor, device="meta"))


# ----------------------------------------------------------------------------- loading


def load_streamed(directory: str, dtype: torch.dtype | None = torch.float32,
                  require_tokenizer: bool = True) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` with the decoder layers left in the checkpoint (meta tensors) and
    everything else in memory; the model carries the :class:`StreamedLayers` source the engine uses."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from slicekit.arch import get_arch, model_type_of
    from slicekit.modeling_slicekit import params_on_meta

    if not os.path.isdir(directory):
        raise SlicekitError(f"--stream reads a local model directory with safetensors shards; {directory!r} is not "
                            "one (download it first, e.g. `huggingface-cli download ID --local-dir DIR`)")
    index = ShardIndex.read(directory)
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise SlicekitError(f"cannot read the config of {directory}: {str(err).splitlines()[0]}") from err
    spec = get_arch(config)
    if spec.block.experts is not None:
        # hub MoE checkpoints keep one tensor per expert, which transformers fuses into 3-D
        # parameters while loading; reading shards layer by layer would need that conversion too
        raise SlicekitError(f"--stream does not read mixture-of-experts checkpoints yet ({model_type_of(config)}: its "
                            "experts are fused by transformers at load time); compress it in memory (drop --stream)")
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.config.use_cache = False
    index.adopt_model_names(model)
    n = len(spec.layer_list(model))
    layer_prefixes = tuple(f"{spec.layers}.{i}." for i in range(n))
    from slicekit.modeling_slicekit import expected_tensors

    outer = [k for k in expected_tensors(model) if not k.startswith(layer_prefixes)]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head_key = f"{spec.head}.weight"
    wanted = [k for k in outer if not (tied and k == head_key and k not in index.weight_map)]
    for key, tensor in index.read_tensors(wanted, dtype).items():
        _set_tensor(model, key, tensor)
    if tied:
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(layer_prefixes)]
    if left:
        raise SlicekitError(f"the checkpoint in {directory} lacks {', '.join(left[:3])}")
    model._slicekit_layer_source = StreamedLayers(index, spec, dtype, n)
    tok = None
    try:
        tok = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as err:
        if require_tokenizer:
            raise SlicekitError(f"cannot load the tokenizer of {directory}: {str(err).splitlines()[0]}") from err
    return model, tok


def stream_source_dir(model_spec: str) -> str:
    """The local directory to stream ``--model`` from: a directory as given; a hub id is
    downloaded first (its safetensors shards, config and tokenizer only)."""
    from slicekit.models import resolve_model

    src = resolve_model(model_spec)
    if src.kind == "dir":
        return src.path
    if src.kind == "hub":
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(model_spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                                 "*.txt", "*.tiktoken"])
        except Exception as err:  # offline, gated, no such repo: the hub's own message
            raise SlicekitError(f"cannot download {model_spec!r} for streaming: {str(err).splitlines()[0]}") from err
    raise SlicekitError(f"--stream reads an original model's safetensors shards; {model_spec!r} is a {src.kind} "
                        "model (GGUF files and compressed outputs are compressed in memory, without --stream)")


def source_of(model: nn.Module) -> StreamedLayers | None:
    src = getattr(model, "_slicekit_layer_source", None)
    return src if isinstance(src, StreamedLayers) else None


# ----------------------------------------------------------------------------- the layer source


class StreamedLayers:
    """The engine's :class:`~slicekit.calibration.LayerSource` for a streamed model."""

    def __init__(self, index: ShardIndex, spec: Any, dtype: torch.dtype | None, n_layers: int) -> None:
        self.index, self.spec, self.dtype, self.n_layers = index, spec, dtype, n_layers
        self.staging: str | None = None
        self.run_key: dict[str, Any] | None = None
        self.plan_shape: dict[str, Any] | None = None
        self.written: dict[int, str] = {}
        self.stop_after: int | None = None  # tests: simulate a kill after this many layers
        self.save_dtype: torch.dtype | None = None  # write floating-point weights in this dtype

    # ---- set-up by the pipeline
    def prepare(self, out_dir: str, run_key: Mapping[str, Any], plan_shape: Mapping[str, Any],
                restart: bool = False) -> None:
        """Compressed layers go to ``OUT.partial``; ``run_key`` identifies the run (method,
        settings, calibration, dtype, device, checkpoint), so only the same command resumes."""
        self.staging = os.path.abspath(out_dir).rstrip(os.sep) + ".partial"
        self.run_key = {**dict(run_key), "checkpoint": self.index.fingerprint(), "layers": self.n_layers}
        self.plan_shape = dict(plan_shape)
        if restart and os.path.isdir(self.staging):
            shutil.rmtree(self.staging)
        os.makedirs(self.staging, exist_ok=True)
        progress = self._progress()
        if progress is not None and progress.get("run") != _jsonable(self.run_key):
            raise SlicekitError(f"{self.staging} holds the partial work of a different run (other settings, model or "
                                "library version); rerun the same command to resume it, or add --restart to "
                                "discard it")

    def _progress(self) -> dict[str, Any] | None:
        path = os.path.join(self.staging or "", PROGRESS)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as fh:
                return json.load(fh)
        except (OSError, json.JSONDecodeError):
            return None  # a torn write cannot happen (rename), but a hand-edited file restarts

    def _prefix(self, i: int) -> str:
        return f"{self.spec.layers}.{i}"

    def layer_file(self, i: int) -> str:
        return LAYER_FILE.format(index=i + 1, total=self.n_layers)

    # ---- LayerSource
    def fetch(self, engine: Any, index: int) -> None:
        names = [n for n, _ in _layer_names(engine.model, self._prefix(index))]
        tensors = self.index.read_tensors(names, self.dtype, engine.device)
        for key, tensor in tensors.items():
            _set_tensor(engine.model, key, tensor)

    def release(self, engine: Any, index: int, changed: bool) -> None:
        if changed:
            if self.staging is None:
                raise RuntimeError("a streamed compression needs StreamedLayers.prepare(out_dir, …) first")
            from safetensors.torch import save_file

            prefix = self._prefix(index)
            from slicekit.checkpoint import cast_tensor

            tensors = {n: cast_tensor(t.detach().to("cpu"), self.save_dtype).contiguous()
                       for n, t in _layer_names(engine.model, prefix)}
            final = os.path.join(self.staging, self.layer_file(index))
            _atomic(final, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
            self.written[index] = final
            del tensors
        drop_storage(engine.model, self._prefix(index))

    def start(self, engine: Any, method: Any) -> int:
        progress = self._progress()
        if progress is None:
            return 0
        done = int(progress["done"])
        from safetensors.torch import load_file

        missing = [self.layer_file(i) for i in range(done) if not os.path.isfile(os.path.join(self.staging, self.layer_file(i)))]
        if missing:
            raise SlicekitError(f"{self.staging} is damaged (missing {missing[0]}); add --restart to begin again")
        inputs = load_file(os.path.join(self.staging, progress["inputs"]))
        engine.inputs = [inputs[f"batch_{b}"] for b in range(len(inputs))]
        carry = load_file(os.path.join(self.staging, progress["carry"])) if progress.get("carry") else {}
        for name, value in progress.get("carry_json", {}).items():
            setattr(method, name, value)
        for name, value in carry.items():
            setattr(method, name, value)
        self._shape_done_layers(engine.model, done)
        for i in range(done):
            self.written[i] = os.path.join(self.staging, self.layer_file(i))
        return done

    def finished(self, engine: Any, method: Any, index: int) -> None:
        from safetensors.torch import save_file

        done = index + 1
        inputs_name, carry_name = f"inputs-{done:05d}.safetensors", f"carry-{done:05d}.safetensors"
        batches = {f"batch_{b}": t.detach().to("cpu").contiguous() for b, t in enumerate(engine.inputs)}
        _atomic(os.path.join(self.staging, inputs_name), lambda tmp: save_file(batches, tmp))
        tensors, plain = {}, {}
        for name in getattr(method, "CARRY", ()):
            value = getattr(method, name)
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().to("cpu").contiguous()
            else:
                plain[name] = value
        if tensors:
            _atomic(os.path.join(self.staging, carry_name), lambda tmp: save_file(tensors, tmp))
        record = {"run": _jsonable(self.run_key), "done": done, "inputs": inputs_name,
                  "carry": carry_name if tensors else None, "carry_json": _jsonable(plain)}
        _atomic(os.path.join(self.staging, PROGRESS), lambda tmp: _write_json(tmp, record))
        for old in os.listdir(self.staging):  # the previous layer's state is superseded
            if old.startswith(("inputs-", "carry-")) and old not in (inputs_name, carry_name):
                os.remove(os.path.join(self.staging, old))
        if self.stop_after is not None and done >= self.stop_after:
            raise KeyboardInterrupt(f"stopped after {done} layers (test)")

    def _shape_done_layers(self, model: nn.Module, done: int) -> None:
        """Give the layers a killed run finished their compressed structure (still on meta), so the
        model is the plan again; their weights are already in the staged shards."""
        from slicekit.modeling_slicekit import apply_shape

        shape = self.plan_shape or {}
        roots = {self._prefix(i) for i in range(done)}
        prefixes = tuple(f"{r}." for r in roots)

        def mine(path: str) -> bool:
            return path in roots or path.startswith(prefixes)

        sub = {**shape, "modules": {p: s for p, s in shape.get("modules", {}).items() if mine(p)},
               "attributes": {p: v for p, v in shape.get("attributes", {}).items() if mine(p)}}
        apply_shape(model, sub)
        for i in range(done):
            drop_storage(model, self._prefix(i))

    # ---- writing the output
    def write_weights(self, model: nn.Module, directory: str) -> None:
        """The output's weights: the staged layer shards (linked) and one shard of everything
        else, with the index; every tensor the model's structure expects must be there."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        from slicekit.modeling_slicekit import expected_tensors

        expected = expected_tensors(model)
        weight_map: dict[str, str] = {}
        total = 0
        for i in range(self.n_layers):
            src = self.written.get(i)
            if src is None or not os.path.isfile(src):
                raise SlicekitError(f"layer {i} has no staged shard: the model was not compressed, or its layers already "
                                    "went into an earlier save (a streamed model is saved once; copy that output)")
            name = self.layer_file(i)
            _link_or_copy(src, os.path.join(directory, name))
            with safe_open(src, framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    weight_map[key] = name
                    sl = fh.get_slice(key)
                    total += _numel(sl.get_shape()) * _itemsize(sl.get_dtype())
        layer_prefixes = tuple(f"{self._prefix(i)}." for i in range(self.n_layers))
        # one file per tensor outside the layers: safetensors serialises a whole file in memory,
        # and the embedding or the head alone is what a 70B model can afford to copy
        outer = [(k, t) for k, t in _all_tensors(model) if not k.startswith(layer_prefixes)]
        for k, (key, t) in enumerate(outer):
            name = OUTER_FILE.format(index=k + 1, total=len(outer))
            from slicekit.checkpoint import cast_tensor

            t = cast_tensor(t.detach().to("cpu"), self.save_dtype).contiguous()
            save_file({key: t}, os.path.join(directory, name), metadata={"format": "pt"})
            weight_map[key] = name
            total += t.numel() * t.element_size()
        wrong = sorted(set(expected) ^ set(weight_map))
        if wrong:
            raise SlicekitError(f"the streamed output does not match its shape description ({', '.join(wrong[:3])}); "
                                "add --restart to begin again")
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2, sort_keys=True)

    def cleanup(self) -> None:
        if self.staging and os.path.isdir(self.staging):
            shutil.rmtree(self.staging, ignore_errors=True)


def _all_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What a checkpoint of ``model`` stores, minus the meta tensors of released layers."""
    return [(n, t) for n, t in checkpoint_tensors(model).items() if t.device.type != "meta"]


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype, 4)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _atomic(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str, sort_keys=True))
