"""The calibration engine: layer-by-layer forward passes every method stands on.

The engine owns the loop and the hooks; methods only say what they want observed and what to
change.  Protocol (see :class:`Method`)::

    engine = CalibrationEngine(model, spec, batches, device=...)
    engine.run(method)
        method.begin(engine)            # e.g. rotate embeddings, map engine.inputs
        for each decoder layer i:
            step = LayerStep(...)       # the layer is on the device, its inputs are known
            method.process_layer(step)  # step.forward(...) any number of times, modify the layer
            step.finish()               # outputs of the (modified) layer become layer i+1's inputs
        method.end(engine)              # e.g. rotate the head

Only one layer is on the compute device at a time; activations live on ``offload_device``
between layers, one tensor per calibration batch.  Where a layer lives between its turns is the
business of a :class:`LayerSource`: in memory (the default: moved to the device and back), or in
the safetensors shards of a checkpoint (:mod:`slicekit.streaming`: read before its turn, written
to the output and dropped after it, with per-layer progress so that a killed run resumes).  The arguments transformers passes to decoder
layers (masks, rotary position embeddings, cache flags) are recorded per layer by running the
decoder once with every layer replaced by a recording identity module — no model's forward code
is copied and nothing is stopped by raising.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from slicekit.arch import ArchSpec
from slicekit.linalg import gram_matrix
from slicekit.profiling import release_memory

# A capture point: "<module path relative to the layer>:input" or ":output"; "" is the layer itself.
Point = str


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


class _Recorder(nn.Module):
    """Stands in for a decoder layer while the decoder runs once: records what it is called with."""

    def __init__(self, index: int, sink: list, keep_hidden: bool, offload: Callable, layer: nn.Module,
                 keep: Callable | None = None) -> None:
        super().__init__()
        # The decoder loop may read plain attributes of its layers (e.g. ``attention_type`` to pick
        # the sliding-window mask): the stand-in carries them.
        for key, value in vars(layer).items():
            if not key.startswith("_") and key != "training" and not isinstance(value, (nn.Module, torch.Tensor)):
                setattr(self, key, value)
        self.index, self.sink, self.keep_hidden, self.offload = index, sink, keep_hidden, offload
        self.keep = keep or offload

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.sink.append((self.index, self.keep(hidden_states) if self.keep_hidden else None,
                          self.offload(args), self.offload(kwargs)))
        return hidden_states


class Gram:
    """Running float64 ``XᵀX`` over tokens (rows of the flattened activation) with its count."""

    def __init__(self) -> None:
        self.matrix: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        self.matrix = gram_matrix(x, self.matrix)
        self.count += x.numel() // x.shape[-1]

    def mean(self) -> torch.Tensor:
        """``XᵀX / n`` (the uncentred covariance)."""
        assert self.matrix is not None, "nothing was accumulated"
        return self.matrix / self.count


@dataclass
class Observations:
    """What one pass over the calibration batches observed."""

    grams: dict[Point, Gram] = field(default_factory=dict)
    outputs: list[torch.Tensor] | None = None  # layer outputs per batch (offloaded), if kept


class Method(Protocol):
    """What the engine drives.  A method whose state changes from layer to layer names the
    attributes that carry it in ``CARRY`` (tensors, or JSON-able values): a resumed streaming run
    restores them, so it continues exactly where the killed one stopped."""

    def begin(self, engine: CalibrationEngine) -> None: ...
    def process_layer(self, step: LayerStep) -> None: ...
    def end(self, engine: CalibrationEngine) -> None: ...


class LayerSource(Protocol):
    """Where decoder layers live between their turns (see :class:`InMemoryLayers`)."""

    def fetch(self, engine: CalibrationEngine, index: int) -> None:
        """Make layer ``index`` real, on ``engine.device``."""

    def release(self, engine: CalibrationEngine, index: int, changed: bool) -> None:
        """Layer ``index``'s turn is over (``changed``: a method has compressed it)."""

    def start(self, engine: CalibrationEngine, method: Method) -> int:
        """The first layer a run must process (after ``method.begin``): 0, or where a killed run stopped."""

    def finished(self, engine: CalibrationEngine, method: Method, index: int) -> None:
        """Layer ``index`` is done and released; ``engine.inputs`` are the next layer's inputs."""


class InMemoryLayers:
    """Every layer is in memory; the layer under calibration visits ``engine.device``."""

    def __init__(self) -> None:
        self.homes: dict[int, torch.device] = {}

    def fetch(self, engine: CalibrationEngine, index: int) -> None:
        layer = engine.layers[index]
        self.homes[index] = next(layer.parameters()).device
        layer.to(engine.device)

    def release(self, engine: CalibrationEngine, index: int, changed: bool) -> None:
        engine.layers[index].to(self.homes.pop(index))

    def start(self, engine: CalibrationEngine, method: Method) -> int:
        return 0

    def finished(self, engine: CalibrationEngine, method: Method, index: int) -> None:
        return None


def layer_source(model: nn.Module) -> LayerSource:
    """The source attached to a streamed model (:func:`slicekit.streaming.load_streamed`), else memory."""
    return getattr(model, "_slicekit_layer_source", None) or InMemoryLayers()


class LayerStep:
    """One decoder layer during calibration: its inputs, and passes over them with hooks."""

    def __init__(self, engine: CalibrationEngine, index: int) -> None:
        self.engine = engine
        self.index = index
        self.layer: nn.Module = engine.layers[index]
        self._next_inputs: list[torch.Tensor] | None = None

    @property
    def inputs(self) -> list[torch.Tensor]:
        return self.engine.inputs

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def forward(self, grams: Iterable[Point] = (), keep_outputs: bool = False,
                observers: dict[Point, Callable[[int, torch.Tensor], None]] | None = None,
                inputs: Sequence[torch.Tensor] | None = None,
                call: Callable[..., torch.Tensor] | None = None) -> Observations:
        """Run the layer on every calibration batch.

        ``grams``: capture points whose float64 Gram matrices to accumulate.
        ``observers``: capture point → ``fn(batch_index, tensor)`` for anything else.
        ``keep_outputs``: keep the layer outputs (offloaded) in the result.
        ``inputs``: run on these instead of the current layer inputs.
        ``call``: ``call(layer, hidden, *args, **kwargs)`` instead of the layer's forward (e.g. half
        a block); hooks on submodules still fire, a ``":output"`` point sees what it returns.
        """
        obs = Observations(grams={p: Gram() for p in grams}, outputs=[] if keep_outputs else None)
        observers = dict(observers or {})
        batch_index = [0]
        callbacks: dict[Point, list[Callable[[torch.Tensor], None]]] = {}
        for p, g in obs.grams.items():
            callbacks.setdefault(p, []).append(g.add)
        for p, fn in observers.items():
            callbacks.setdefault(p, []).append(lambda t, fn=fn: fn(batch_index[0], t))
        src = self.inputs if inputs is None else inputs
        with self.engine.hooks(self.layer, callbacks), torch.no_grad():
            for b, hidden in enumerate(src):
                batch_index[0] = b
                out = self.engine.run_layer(self.index, b, hidden, call)
                for fn in callbacks.get(":output", []) if call is not None else ():
                    fn(out)
                if keep_outputs:
                    obs.outputs.append(self.engine.keep(out))
        return obs

    def set_next_inputs(self, tensors: list[torch.Tensor]) -> None:
        """Give the next layer's inputs directly (a method that already has them saves a pass)."""
        if len(tensors) != len(self.inputs):
            raise ValueError("one tensor per calibration batch is required")
        self._next_inputs = [self.engine.keep(t) for t in tensors]

    def finish(self) -> None:
        if self._next_inputs is None:
            self._next_inputs = self.forward(keep_outputs=True).outputs
        self.engine.inputs = self._next_inputs


class CalibrationEngine:
    """Runs a model's decoder layers one at a time over fixed calibration batches."""

    def __init__(self, model: nn.Module, spec: ArchSpec, batches: Sequence[torch.Tensor],
                 device: str | torch.device | None = None, offload_device: str | torch.device = "cpu",
                 progress: bool = True, source: LayerSource | None = None, offload_dir: str | None = None) -> None:
        if not batches:
            raise ValueError("calibration needs at least one batch")
        self.model = model
        self.offload_dir = offload_dir
        if offload_dir is not None:
            os.makedirs(offload_dir, exist_ok=True)
        self.source = source or layer_source(model)
        self.spec = spec
        self.layers: nn.ModuleList = spec.layer_list(model)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.offload_device = torch.device(offload_device)
        self.progress = progress
        self.batches = list(batches)
        self.inputs: list[torch.Tensor] = []
        self.layer_args: list[list[tuple[tuple, dict]]] = []  # [layer][batch] -> (args, kwargs)
        self._record_layer_inputs()

    # ---------------------------------------------------------------- plumbing
    def offload(self, obj: Any) -> Any:
        return _map_tensors(obj, lambda t: t.detach().to(self.offload_device))

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """Where a calibration activation (a layer's inputs or outputs, one batch) waits between
        passes: host memory, or — with ``offload_dir`` — a file-backed memory map.  The file is
        unlinked as soon as it is mapped, so its disk space goes with the tensor; its pages are the
        kernel's to write back and evict, so activations larger than RAM do not need RAM."""
        t = t.detach()
        if self.offload_dir is None:
            return t.to(self.offload_device)
        import tempfile

        fd, path = tempfile.mkstemp(prefix="act-", suffix=".bin", dir=self.offload_dir)
        try:
            os.ftruncate(fd, max(1, t.numel() * t.element_size()))
            mapped = torch.from_file(path, shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
        finally:
            os.close(fd)
            os.unlink(path)
        mapped.copy_(t)
        return mapped

    def to_device(self, obj: Any) -> Any:
        return _map_tensors(obj, lambda t: t.to(self.device))

    @contextmanager
    def hooks(self, layer: nn.Module, callbacks: dict[Point, list[Callable[[torch.Tensor], None]]]):
        """Register forward hooks for the capture points; always removed afterwards."""
        handles = []
        try:
            for point, fns in callbacks.items():
                path, _, where = point.rpartition(":")
                if where not in ("input", "output"):
                    raise ValueError(f"capture point {point!r} must end in ':input' or ':output'")
                module = layer.get_submodule(path) if path else layer

                def hook(_mod, args, output, fns=fns, where=where):
                    t = args[0] if where == "input" else (output[0] if isinstance(output, tuple) else output)
                    for fn in fns:
                        fn(t)

                handles.append(module.register_forward_hook(hook))
            yield
        finally:
            for h in handles:
                h.remove()

    def _decoder(self) -> nn.Module:
        parent = self.spec.layers.rpartition(".")[0]
        return self.model.get_submodule(parent)

    def _record_layer_inputs(self) -> None:
        """Run the decoder once per batch with recording stand-ins for every layer."""
        sink: list = []
        decoder = self._decoder()
        parent_path, _, attr = self.spec.layers.rpartition(".")
        original = self.layers
        n = len(original)
        recorders = nn.ModuleList(_Recorder(i, sink, i == 0, self.offload, original[i], self.keep) for i in range(n))
        self.layer_args = [[] for _ in range(n)]
        # Only the embeddings and the decoder's own preprocessing run: move the non-layer modules.
        setattr(self.model.get_submodule(parent_path), attr, recorders)
        # The decoder's own modules (embeddings, rotary, final norm) visit the device only for this
        # pass; the layers stay where they are (they are replaced by recorders).
        homes = {name: next(iter(m.parameters(recurse=True)), torch.empty(0)).device
                 for name, m in decoder.named_children() if name != attr}
        for name in homes:
            getattr(decoder, name).to(self.device)
        try:
            with torch.no_grad():
                for batch in self.batches:
                    sink.clear()
                    decoder(input_ids=batch.to(self.device), use_cache=False)
                    for i, hidden, args, kwargs in sink:
                        if hidden is not None:
                            self.inputs.append(hidden)
                        self.layer_args[i].append((args, kwargs))
        finally:
            setattr(self.model.get_submodule(parent_path), attr, original)
            for name, dev in homes.items():
                if dev.type != "meta":
                    getattr(decoder, name).to(dev)
        self.layers = original

    def run_layer(self, index: int, batch: int, hidden: torch.Tensor,
                  call: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        args, kwargs = self.layer_args[index][batch]
        layer = self.layers[index]
        if call is not None:
            out = call(layer, hidden.to(self.device), *self.to_device(args), **self.to_device(kwargs))
        else:
            out = layer(hidden.to(self.device), *self.to_device(args), **self.to_device(kwargs))
        return out[0] if isinstance(out, tuple) else out

    def map_inputs(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Transform the current layer inputs in place (e.g. rotate them after the embeddings were)."""
        self.inputs = [self.keep(fn(x.to(self.device))) for x in self.inputs]

    # ---------------------------------------------------------------- the loop
    def run(self, method: Method, desc: str = "layers") -> None:
        release_memory()
        method.begin(self)
        start = self.source.start(self, method)
        for i in tqdm(range(start, len(self.layers)), desc=desc, disable=not self.progress, leave=False,
                      initial=start, total=len(self.layers)):
            self.source.fetch(self, i)
            step = LayerStep(self, i)
            method.process_layer(step)
            step.finish()
            del step
            self.source.release(self, i, changed=True)
            release_memory()
            self.source.finished(self, method, i)
        method.end(self)

    def observe(self, grams: Iterable[Point] = (), observers: dict | None = None, desc: str = "observe"):
        """Walk all layers without changing them, yielding ``(index, Observations, inputs)``
        per layer (outputs kept) — for statistics such as layer-importance scores."""
        for i in tqdm(range(len(self.layers)), desc=desc, disable=not self.progress, leave=False):
            self.source.fetch(self, i)
            step = LayerStep(self, i)
            obs = step.forward(grams=grams, keep_outputs=True, observers=observers)
            yield i, obs, self.inputs
            step.set_next_inputs(obs.outputs)
            step.finish()
            self.source.release(self, i, changed=False)
